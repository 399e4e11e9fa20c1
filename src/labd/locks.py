"""The per-device lock: a re-entrant lock with a cheap fast path and a fair slow path.

Every public device method holds its device's lock. Uncontended, that costs one C-level
``RLock.acquire(False)``. Under contention a plain lock lets the thread that just released it
take it straight back, so a sweep calling in a loop can starve a monitoring client forever.
:class:`DeviceLock` borrows Go's ``sync.Mutex`` answer: waiters first try a short blocking
acquire (barging allowed, good for throughput); a waiter that has waited longer than
``STARVE_AFTER`` switches the lock into FIFO mode, where newcomers queue behind it instead of
barging. FIFO mode ends when the queue empties or when a waiter got the lock quickly.

Interrupts (Ctrl+C, any BaseException) never leave a waiter queued: each waiter holds a ticket
in the FIFO queue and removes it in a ``finally``; the wrappers release what they took in
theirs (see :mod:`labd.devices`). ``tests/test_interrupts.py`` proves both with real signals.

The raw ``RLock`` is exposed as :attr:`DeviceLock.rlock` (injected into devices as
``_ld_lock``) so a device's own threads can ``with self._ld_lock:``.
"""

from __future__ import annotations

import re
import threading
import time
from _thread import LockType, allocate_lock
from collections import deque
from collections.abc import Callable
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

    Interrupts (Ctrl+C, any BaseException) never leave a caller queued: every queue entry is
    removed in a ``finally``. An interrupt can land after the lock was taken and before
    :meth:`acquire_slow` returns (Python checks for signals after each call), so a caller
    that did not hold the lock before must release it when it holds it after an exception
    (``rlock._is_owned()``); :meth:`acquire_slow` does that for its own frames.
    """

    __slots__ = ("_fifo", "_mutex", "_queue", "name", "on_fifo_change", "rlock")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rlock = threading.RLock()
        self._fifo = False
        #: Called with no argument whenever FIFO mode turns on or off (the device slot folds
        #: it into the one flag its method wrappers read per call).
        self.on_fifo_change: Callable[[], None] | None = None
        #: One pre-locked ticket per queued waiter, in arrival order; the head's turn is
        #: next. A head that leaves releases the next ticket (hands over the turn).
        self._queue: deque[LockType] = deque()
        self._mutex = threading.Lock()

    @property
    def fifo(self) -> bool:
        """True while waiters are served first-come first-served."""
        return self._fifo

    @fifo.setter
    def fifo(self, value: bool) -> None:
        if value is not self._fifo:
            self._fifo = value
            hook = self.on_fifo_change
            if hook is not None:
                hook()

    def acquire_slow(self, timeout: float | None = None) -> bool:
        """Acquire when the fast path failed; returns False only when ``timeout`` ran out.

        On an exception (an interrupt) this thread is no longer queued and, unless it held
        the lock before the call, does not hold it.
        """
        rlock = self.rlock
        # Re-entrant calls (a device method calling another) must never queue behind others.
        if rlock._is_owned():  # type: ignore[attr-defined]
            return rlock.acquire()
        try:
            start = time.monotonic()
            deadline = None if timeout is None else start + timeout
            if not self.fifo:
                first = STARVE_AFTER if deadline is None else min(STARVE_AFTER, max(timeout or 0, 0))
                if rlock.acquire(True, first):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
            return self._acquire_in_turn(start, deadline)
        except BaseException:
            # This thread did not hold the lock on entry: holding it now means this call
            # took it just before the interrupt landed.
            if rlock._is_owned():  # type: ignore[attr-defined]
                rlock.release()
            raise

    def _acquire_in_turn(self, start: float, deadline: float | None) -> bool:
        # A queued waiter's turn signal: a plain lock, taken now, released on its turn.
        ticket = allocate_lock()
        ticket.acquire()
        queue = self._queue
        quick = False
        try:
            with self._mutex:
                queue.append(ticket)
                self.fifo = True
                my_turn = queue[0] is ticket
            if not my_turn:
                # Wait for the waiter ahead to leave; it releases this ticket.
                if deadline is None:
                    ticket.acquire()
                elif not ticket.acquire(True, max(deadline - time.monotonic(), 0.0)):
                    return False
            if deadline is None:
                got = self.rlock.acquire()
            else:
                got = self.rlock.acquire(True, max(deadline - time.monotonic(), 0.0))
            quick = got and time.monotonic() - start < STARVE_AFTER
            return got
        finally:
            # Runs on success, timeout and interrupt alike: no waiter stays queued.
            with self._mutex:
                self._leave(ticket)
                if quick:
                    self.fifo = False

    def _leave(self, ticket: LockType) -> None:
        # Caller holds self._mutex.
        queue = self._queue
        if queue and queue[0] is ticket:
            queue.popleft()
            if queue:
                queue[0].release()  # the next waiter's turn
        else:
            try:
                queue.remove(ticket)
            except ValueError:  # interrupted before it was queued
                pass
        if not queue:
            self.fifo = False

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
