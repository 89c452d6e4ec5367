"""Progress reporting for the CLI: a bar for humans or JSON lines for the Slicer GUI.

The JSON protocol (one object per line on stderr) is what the Slicer module's background-process
runner parses; keep it stable:

* ``{"event": "progress", "fraction": 0.42, "message": "Segmenting (window 3/8)"}``
* ``{"event": "message", "level": "warning", "message": "..."}``
* ``{"event": "done", "output": "/path/result.seg.nrrd", ...}``
* ``{"event": "error", "message": "...", "type": "InputError"}``

In JSON mode *every* stderr line is such an object: :func:`json_stderr` wraps whatever else reaches
the process's stderr (a Python warning, a C++ library's message) into ``message`` events, so that a
parser never meets a stray line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, Iterator, TextIO


class ProgressReporter:
    def __init__(self, mode: str = "bar", stream: TextIO | None = None) -> None:
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stderr
        self._last = -1.0
        self._last_t = 0.0
        self._bar = None
        self._lock = threading.Lock()
        #: Set by :func:`json_stderr`: waits until what was written to stderr so far has been forwarded,
        #: so that a library's last line never arrives after the ``done``/``error`` event.
        self._drain = lambda: None

    def _emit(self, obj: dict[str, Any]) -> None:
        with self._lock:  # json_stderr's reader thread emits too: never interleave two lines
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
        """A note or warning. Shown in every mode — ``none`` silences the progress, not what the user must
        know (which model ran, a doubtful result)."""
        if self.mode == "json":
            self._emit({"event": "message", "level": level, "message": text})
        else:
            self.close()
            with self._lock:
                self.stream.write(f"{level}: {text}\n" if level != "info" else f"{text}\n")
                self.stream.flush()

    def done(self, **info: Any) -> None:
        self.close()
        self._drain()
        if self.mode == "json":
            self._emit({"event": "done", **info})

    def error(self, text: str, kind: str = "error") -> None:
        self.close()
        self._drain()
        if self.mode == "json":
            self._emit({"event": "error", "type": kind, "message": text})
        else:
            self.stream.write(f"error: {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def json_stderr(reporter: ProgressReporter) -> Iterator[None]:
    """While active, the process's stderr (file descriptor 2) is a pipe whose lines become ``message``
    events, and ``reporter`` writes to the real stderr.

    Why at the descriptor level: ITK, torch and other C/C++ code write to fd 2 directly, around
    ``sys.stderr``; a raw line among the JSON events would be a protocol error for the Slicer module.
    Does nothing unless ``reporter`` is in JSON mode and stderr is a real file descriptor.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. replaced by an in-memory stream
        fd = -1
    if reporter.mode != "json" or fd < 0 or reporter.stream is not sys.stderr:
        yield
        return
    sys.stderr.flush()
    real = os.fdopen(os.dup(fd), "w", encoding="utf-8", errors="backslashreplace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    reporter.stream = real
    marker = f"\x00srcsm-drain-{os.getpid()}\x00"
    drained = threading.Event()

    def drain() -> None:
        """A marker line through the pipe: once the reader has seen it, everything before it is out."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        drained.clear()
        os.write(fd, (marker + "\n").encode())
        drained.wait(timeout=5)

    def forward() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="backslashreplace") as pipe:
            for line in pipe:
                text = line.rstrip()
                if marker in text:  # (after a library's unterminated last line, the marker ends it)
                    text = text.replace(marker, "").rstrip()
                    drained.set()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                if isinstance(obj, dict) and "event" in obj:
                    reporter._emit(obj)  # already a protocol line (e.g. a child process's)
                else:
                    reporter.message(text, "warning")

    thread = threading.Thread(target=forward, name="srcsm-stderr", daemon=True)
    thread.start()
    reporter._drain = drain
    try:
        yield
    finally:
        reporter._drain = lambda: None
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real.fileno(), fd)  # closes the pipe's last write end: the reader sees EOF
        thread.join(timeout=5)
        reporter.stream = sys.stderr
        real.close()
