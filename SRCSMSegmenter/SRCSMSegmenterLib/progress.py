"""Progress reporting for the CLI: a bar for humans or JSON lines for the Slicer GUI.

The JSON protocol (one object per line on stderr) is what the Slicer module's background-process
runner parses; keep it stable:

* ``{"event": "progress", "fraction": 0.42, "message": "Segmenting (window 3/8)"}``
* ``{"event": "message", "level": "warning", "message": "..."}``
* ``{"event": "done", "output": "/path/result.seg.nrrd", ...}``
* ``{"event": "error", "message": "...", "type": "InputError"}``
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


class ProgressReporter:
    def __init__(self, mode: str = "bar", stream: TextIO | None = None) -> None:
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stderr
        self._last = -1.0
        self._last_t = 0.0
        self._bar = None

    def _emit(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj) + "\n")
        self.stream.flush()

    def __call__(self, fraction: float, message: str) -> None:
        fraction = max(0.0, min(1.0, float(fraction)))
        if self.mode == "json":
            now = time.monotonic()
            # throttle: at most ~10 lines a second, but always report a new stage message
            if fraction >= 1.0 or now - self._last_t > 0.1 or fraction - self._last > 0.05:
                self._emit({"event": "progress", "fraction": round(fraction, 4), "message": message})
                self._last, self._last_t = fraction, now
        elif self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=1000, file=self.stream, dynamic_ncols=True,
                                 bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
            self._bar.n = int(fraction * 1000)
            self._bar.set_description_str(message[:40])
            self._bar.refresh()

    def message(self, text: str, level: str = "info") -> None:
        if self.mode == "json":
            self._emit({"event": "message", "level": level, "message": text})
        elif self.mode == "bar":
            self.close()
            self.stream.write(f"{level}: {text}\n" if level != "info" else f"{text}\n")
            self.stream.flush()

    def done(self, **info: Any) -> None:
        self.close()
        if self.mode == "json":
            self._emit({"event": "done", **info})

    def error(self, text: str, kind: str = "error") -> None:
        self.close()
        if self.mode == "json":
            self._emit({"event": "error", "type": kind, "message": text})
        else:
            self.stream.write(f"error: {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
