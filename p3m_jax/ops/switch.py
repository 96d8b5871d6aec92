"""A thread-local on/off setting that changes what the ops trace inside a ``with`` block (the export paths)."""

from __future__ import annotations

import contextlib
import threading


class TraceSwitch:
    """Off unless the current thread is inside ``with switch.turned_on():``; blocks nest."""

    def __init__(self):
        self._local = threading.local()

    @contextlib.contextmanager
    def turned_on(self):
        previous = self.on
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous

    @property
    def on(self) -> bool:
        return getattr(self._local, "on", False)
