"""A thread-safe, loop-agnostic "the server is stopping" signal.

``LabDaemonServer.stop()`` runs on the caller's thread while streams and pending requests wait
on the server's event loop (or on a TestClient's loop). Each waiter registers a callback with
the loop it runs on; :meth:`ShutdownSignal.set` schedules every callback on its own loop with
``call_soon_threadsafe``, so no asyncio object is ever touched from a foreign thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable

__all__ = ["ShutdownSignal"]


class ShutdownSignal:
    """Set once when the server stops; wakes registered waiters on their own event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._ids = itertools.count()
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = {}

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._set

    def add(self, callback: Callable[[], None]) -> int:
        """Call ``callback`` on the running loop when the signal is set; returns a handle.

        If the signal is already set, ``callback`` is scheduled right away.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._set:
                handle = next(self._ids)
                self._waiters[handle] = (loop, callback)
                return handle
        loop.call_soon(callback)
        return -1

    def remove(self, handle: int) -> None:
        """Forget a callback added with :meth:`add` (no effect if it already ran)."""
        with self._lock:
            self._waiters.pop(handle, None)

    def set(self) -> None:
        """Mark the server as stopping and wake every waiter. Idempotent."""
        with self._lock:
            self._set = True
            waiters, self._waiters = list(self._waiters.values()), {}
        for loop, callback in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is already closed
                loop.call_soon_threadsafe(callback)
