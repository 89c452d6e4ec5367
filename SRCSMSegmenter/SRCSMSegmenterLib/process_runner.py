"""Run a long job (``srcsm segment … --progress json``) in a background process, Qt-free.

Why a separate process rather than a thread: PyTorch inference holds the GIL in places, allocates
gigabytes and may crash the interpreter (driver faults, out of memory); in a child process none of
that freezes or kills Slicer, and cancelling is a kill rather than a polite request a busy C++ loop
ignores.

How it works:

* :meth:`ProcessRunner.start` launches the command with :class:`subprocess.Popen` in a process group
  of its own (a new session on POSIX, ``CREATE_NEW_PROCESS_GROUP`` on Windows), so the whole tree can
  be stopped at once.
* Reader threads parse the child's stderr line by line: JSON objects with an ``"event"`` key are the
  progress protocol of :mod:`.progress` (progress / message / done / error); any other line (a
  traceback, a library warning) is kept as *details* for the error report.
* The threads only queue events. :meth:`ProcessRunner.poll`, called from the owner's thread (in Slicer:
  a ``QTimer`` in the GUI thread), emits them through plain-Python :class:`~.signals.Signal` objects,
  so slots may touch the GUI safely.
* :meth:`ProcessRunner.cancel` asks the whole tree to stop (SIGTERM to the process group: the CLI then
  stops at the next sliding-window step and its atomic writer leaves no partial file) and kills it
  (SIGKILL) after a grace period. On Windows ``taskkill /F /T`` kills the tree: ``PythonSlicer.exe``
  is a launcher, and killing the launcher alone does not stop the Python process it started.

Limitation: a descendant that deliberately leaves the process group (``setsid``) escapes the kill;
nothing in the segmentation pipeline does that.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SRCSMError
from .signals import Signal

#: Exit code of the ``srcsm`` command when it was cancelled.
EXIT_CANCELLED = 130
#: Lines of non-protocol output kept for the error details.
MAX_DETAIL_LINES = 200

Status = Literal["succeeded", "failed", "cancelled"]


class ProcessStartError(SRCSMError):
    """The background process could not be started (missing executable, permissions...)."""


@dataclass(frozen=True)
class ProcessResult:
    """How a background job ended, in words a user can act on."""

    status: Status
    returncode: int | None
    message: str
    details: str = ""
    error_type: str | None = None
    done: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass
class _State:
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    details: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_DETAIL_LINES))


def parse_event(line: str) -> dict[str, Any] | None:
    """The protocol event on one stderr line, or None for any other output."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and obj.get("event") in ("progress", "message", "done", "error"):
        return obj
    return None


class ProcessRunner:
    """One background process, its parsed progress and its cancellation. Single use.

    Signals (emitted from :meth:`poll`, in the caller's thread):

    * ``started(pid)``
    * ``progress(fraction, message)`` — fraction in 0..1
    * ``message(level, text)`` — warnings and notes from the job
    * ``output(line)`` — any other output line (for a log window)
    * ``finished(result)`` — a :class:`ProcessResult`, exactly once
    """

    def __init__(self, grace_seconds: float = 3.0) -> None:
        self.grace_seconds = grace_seconds
        self.started = Signal("pid")
        self.progress = Signal("fraction", "message")
        self.message = Signal("level", "text")
        self.output = Signal("line")
        self.finished = Signal("result")
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._state = _State()
        self._threads: list[threading.Thread] = []
        self._cancel_requested = threading.Event()
        self._kill_timer: threading.Timer | None = None
        self._result: ProcessResult | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True from :meth:`start` until :meth:`poll` has delivered the result."""
        return self._proc is not None and self._result is None

    @property
    def result(self) -> ProcessResult | None:
        return self._result

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    # ------------------------------------------------------------------------------------ start
    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None) -> int:
        """Start ``command`` (a list, never a shell string). Returns the process id."""
        if self._proc is not None:
            raise RuntimeError("A ProcessRunner runs one process; create a new runner for the next job.")
        command = [str(c) for c in command]
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True  # own session = own process group, pgid == pid
        try:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=dict(env) if env is not None else None, cwd=cwd, **kwargs)
        except OSError as exc:
            raise ProcessStartError(
                f"Could not start the background process '{command[0]}' ({exc.strerror or exc}). Check that "
                f"the Python executable exists (in Slicer: PythonSlicer next to the Slicer executable) and "
                f"reinstall the extension if it does not."
            ) from exc
        self._t0 = time.monotonic()
        self._queue.put(("started", self._proc.pid))
        readers = [
            threading.Thread(target=self._read_stderr, name="srcsm-stderr", daemon=True),
            threading.Thread(target=self._read_stdout, name="srcsm-stdout", daemon=True),
        ]
        for t in readers:
            t.start()
        waiter = threading.Thread(target=self._wait, args=(readers,), name="srcsm-wait", daemon=True)
        waiter.start()
        self._threads = [*readers, waiter]
        return self._proc.pid

    # --------------------------------------------------------------------------------- threads
    @staticmethod
    def _lines(stream) -> Any:
        # Bytes, decoded here: the child's console code page (Windows) must not break the reader.
        for raw in iter(stream.readline, b""):
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        with self._proc.stderr:
            for line in self._lines(self._proc.stderr):
                event = parse_event(line)
                if event is None:
                    if line.strip():
                        self._state.details.append(line)
                        self._queue.put(("output", line))
                    continue
                kind = event["event"]
                if kind == "done":
                    self._state.done = {k: v for k, v in event.items() if k != "event"}
                elif kind == "error":
                    self._state.error = event
                self._queue.put((kind, event))

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self._proc.stdout:
            for line in self._lines(self._proc.stdout):
                if line.strip():
                    self._state.details.append(line)
                    self._queue.put(("output", line))

    def _wait(self, readers: list[threading.Thread]) -> None:
        assert self._proc is not None
        returncode = self._proc.wait()
        if self._cancel_requested.is_set():
            # The main process is gone; anything left in its group is an orphan of a cancelled job.
            self._kill_tree(force=True)
        # A grandchild that inherited the pipes could keep them open; do not wait on it forever.
        for t in readers:
            t.join(timeout=5.0)
        with self._lock:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        self._queue.put(("exit", returncode))

    # ---------------------------------------------------------------------------------- cancel
    def cancel(self) -> None:
        """Stop the job and every process it started. Returns at once; :meth:`poll` reports the end."""
        if self._proc is None or self._cancel_requested.is_set():
            return
        self._cancel_requested.set()
        if self._proc.poll() is not None:
            return
        if sys.platform == "win32":
            self._kill_tree(force=True)
            return
        self._kill_tree(force=False)
        with self._lock:
            self._kill_timer = threading.Timer(self.grace_seconds, self._kill_tree, kwargs={"force": True})
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def _kill_tree(self, force: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if sys.platform == "win32":
            # /T: the whole tree (PythonSlicer.exe is a launcher; its python child must die too).
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL if force else signal.SIGTERM)  # pgid == pid (new session)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    # ------------------------------------------------------------------------------------ poll
    def poll(self) -> bool:
        """Deliver queued events through the signals. Returns True while the job is still running."""
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "started":
                self.started.emit(payload)
            elif kind == "progress":
                try:
                    fraction = min(1.0, max(0.0, float(payload.get("fraction", 0.0))))
                except (TypeError, ValueError):
                    fraction = 0.0
                self.progress.emit(fraction, str(payload.get("message", "")))
            elif kind == "message":
                self.message.emit(str(payload.get("level", "info")), str(payload.get("message", "")))
            elif kind == "error":
                self.message.emit("error", str(payload.get("message", "")))
            elif kind == "output":
                self.output.emit(payload)
            elif kind == "exit":
                self._result = self._make_result(payload)
                self.finished.emit(self._result)
        return self.running

    def wait(self, timeout: float | None = None, poll_interval: float = 0.05,
             on_idle: Callable[[], None] | None = None) -> ProcessResult:
        """Poll until the job ends (for scripts, tests and Slicer self-tests; the GUI uses a timer).

        ``on_idle`` runs between polls (e.g. ``slicer.app.processEvents``). Raises ``TimeoutError``
        after ``timeout`` seconds, leaving the job running (cancel it if you give up on it).
        """
        if self._proc is None:
            raise RuntimeError("Nothing to wait for: the runner was not started.")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"The background process {self.pid} is still running after {timeout} s.")
            if on_idle is not None:
                on_idle()
            time.sleep(poll_interval)
        assert self._result is not None
        return self._result

    # ---------------------------------------------------------------------------------- result
    def _make_result(self, returncode: int) -> ProcessResult:
        seconds = time.monotonic() - self._t0
        details = "\n".join(self._state.details)
        error = self._state.error
        if self._cancel_requested.is_set() or returncode == EXIT_CANCELLED:
            return ProcessResult("cancelled", returncode, "Cancelled by the user.", details,
                                 "CancelledError", None, seconds)
        if returncode == 0 and error is None:
            return ProcessResult("succeeded", returncode, "Finished.", details, None, self._state.done, seconds)
        if error is not None:
            message = str(error.get("message", "")).strip() or "The background process reported an error."
            kind = str(error.get("type", "error"))
            # An unexpected error carries its traceback in the message: show the first line, keep
            # the rest as details.
            first, _, rest = message.partition("\n")
            if rest:
                details = f"{rest}\n{details}".strip()
            return ProcessResult("failed", returncode, first, details, kind, None, seconds)
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            message = (f"The background process was killed by {name}. If the computer ran out of memory, use "
                       f"a region of interest or close other programs; otherwise see the details.")
        else:
            message = (f"The background process stopped with exit code {returncode} without reporting an "
                       f"error. See the details; a missing Python package (torch, monai...) is the usual cause.")
        return ProcessResult("failed", returncode, message, details, None, None, seconds)


__all__ = ["EXIT_CANCELLED", "ProcessResult", "ProcessRunner", "ProcessStartError", "parse_event"]
