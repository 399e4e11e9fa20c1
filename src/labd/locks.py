"""The per-device lock: a re-entrant lock with a cheap fast path and a fair slow path.

Every public device method holds its device's lock. Uncontended, that costs one C-level
``RLock.acquire(False)``. Under contention a plain lock lets the thread that just released it
take it straight back, so a sweep calling in a loop can starve a monitoring client forever.
:class:`DeviceLock` borrows Go's ``sync.Mutex`` answer: waiters first try a short blocking
acquire (barging allowed, good for throughput); a waiter that has waited longer than
``STARVE_AFTER`` switches the lock into FIFO mode, where newcomers queue behind it instead of
barging. FIFO mode ends when the queue empties or when a waiter got the lock quickly.

The raw ``RLock`` is exposed as :attr:`DeviceLock.rlock` (injected into devices as
``_ld_lock``) so a device's own threads can ``with self._ld_lock:``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["STARVE_AFTER", "DeviceLock", "LockStatistics"]

#: A waiter that waited this long (seconds) turns on FIFO hand-over.
STARVE_AFTER = 0.001

_OWNER_RE = re.compile(r"owner=(\d+)")


@dataclass(frozen=True)
class LockStatistics:
    """Who holds a device lock and who waits for it (for messages and the dashboard)."""

    locked: bool
    holder_thread: str | None
    waiting: int
    fifo_mode: bool


class DeviceLock:
    """A re-entrant device lock whose contended path is fair.

    The method wrappers use ``rlock.acquire(False)`` inline and call :meth:`acquire_slow`
    only when that fails or FIFO mode is on.
    """

    __slots__ = ("_cond", "_queue", "fifo", "name", "rlock")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rlock = threading.RLock()
        #: True while waiters are served first-come first-served (read by the fast path).
        self.fifo = False
        self._queue: deque[int] = deque()
        self._cond = threading.Condition(threading.Lock())

    def acquire_slow(self, timeout: float | None = None) -> bool:
        """Acquire when the fast path failed; returns False only when ``timeout`` ran out."""
        rlock = self.rlock
        # Re-entrant calls (a device method calling another) must never queue behind others.
        if rlock._is_owned():  # type: ignore[attr-defined]
            return rlock.acquire()
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        if not self.fifo:
            first = STARVE_AFTER if deadline is None else min(STARVE_AFTER, max(timeout or 0, 0))
            if rlock.acquire(True, first):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return self._acquire_in_turn(start, deadline)

    def _acquire_in_turn(self, start: float, deadline: float | None) -> bool:
        me = threading.get_ident()
        cond = self._cond
        with cond:
            self._queue.append(me)
            self.fifo = True
            while self._queue[0] != me:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._leave(me)
                    return False
                cond.wait(remaining)
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        got = self.rlock.acquire() if remaining is None else self.rlock.acquire(True, remaining)
        with cond:
            self._leave(me)
            if got and time.monotonic() - start < STARVE_AFTER:
                self.fifo = False
        return got

    def _leave(self, me: int) -> None:
        # Caller holds self._cond.
        try:
            self._queue.remove(me)
        except ValueError:  # pragma: no cover - defensive: never queued twice
            pass
        if not self._queue:
            self.fifo = False
        self._cond.notify_all()

    def release(self) -> None:
        """Release one level of the re-entrant lock."""
        self.rlock.release()

    def statistics(self) -> LockStatistics:
        """Who holds the lock (thread name) and how many wait."""
        holder = None
        match = _OWNER_RE.search(repr(self.rlock))
        if match and match.group(1) != "0":
            ident = int(match.group(1))
            thread = next((t for t in threading.enumerate() if t.ident == ident), None)
            holder = thread.name if thread is not None else f"thread {ident}"
        locked = holder is not None
        return LockStatistics(locked, holder, len(self._queue), self.fifo)
