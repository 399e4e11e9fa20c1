"""One background thread that runs short callbacks at given times (lease expiry, wait timeouts).

Started on first use and stopped by :meth:`DeadlineTimer.close`, so an idle daemon has no
timer thread at all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DeadlineTimer", "TimerHandle"]

log = logging.getLogger(__name__)


class TimerHandle:
    """A scheduled callback; :meth:`cancel` makes it not run."""

    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (no effect once it ran)."""
        self.cancelled = True


class DeadlineTimer:
    """Runs callbacks at monotonic times on a single lazily started thread."""

    def __init__(self, name: str = "labd-timer") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` at ``time.monotonic() >= when``; callbacks must be quick and not raise."""
        handle = TimerHandle(when, fn)
        with self._cond:
            if self._closed:
                handle.cancelled = True
                return handle
            heapq.heappush(self._heap, (when, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` after ``delay`` seconds."""
        return self.call_at(time.monotonic() + delay, fn)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread; pending callbacks never run. Idempotent."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
                if self._closed:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if not handle.cancelled:
                try:
                    handle.fn()
                except Exception:  # a timer callback must never kill the timer thread
                    log.exception("labd timer callback failed")
