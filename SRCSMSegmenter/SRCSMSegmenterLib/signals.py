"""A tiny plain-Python signal, so logic can report progress and errors without Qt.

The same logic then drives the Slicer widget (which connects its slots), a command line and a web
front end. Named ``signals`` rather than ``signal`` so it can never shadow the standard library's
``signal`` module.

Slots are called synchronously, in the thread that calls :meth:`Signal.emit`. Code that runs work in
a thread (see :mod:`.process_runner`) therefore queues its events and emits them from the thread
that polls it — in Slicer, the GUI thread via a ``QTimer``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Signal:
    """Call every connected slot with the emitted arguments.

    >>> s = Signal("fraction", "message")
    >>> seen = []
    >>> s.connect(lambda f, m: seen.append((f, m)))
    >>> s.emit(0.5, "half way")
    >>> seen
    [(0.5, 'half way')]

    A slot that raises does not stop the others: the error is logged (a broken progress label must
    not abort a segmentation), unless the signal was created with ``raise_errors=True`` (tests).
    """

    def __init__(self, *argument_names: str, raise_errors: bool = False) -> None:
        self.argument_names = argument_names
        self.raise_errors = raise_errors
        self._slots: list[Callable[..., Any]] = []
        self._lock = threading.Lock()

    def connect(self, slot: Callable[..., Any]) -> Callable[..., Any]:
        """Connect ``slot`` (returned, so this also works as a decorator). Connecting twice is a no-op."""
        if not callable(slot):
            raise TypeError(f"slot must be callable, got {slot!r}")
        with self._lock:
            if slot not in self._slots:
                self._slots.append(slot)
        return slot

    def disconnect(self, slot: Callable[..., Any] | None = None) -> None:
        """Disconnect ``slot``, or every slot when None. Disconnecting an unknown slot is a no-op."""
        with self._lock:
            if slot is None:
                self._slots.clear()
            elif slot in self._slots:
                self._slots.remove(slot)

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def emit(self, *args: Any) -> None:
        if self.argument_names and len(args) != len(self.argument_names):
            raise TypeError(f"signal expects {len(self.argument_names)} argument(s) "
                            f"({', '.join(self.argument_names)}), got {len(args)}")
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            try:
                slot(*args)
            except Exception:
                if self.raise_errors:
                    raise
                log.exception("A slot connected to a signal raised")

    __call__ = emit
