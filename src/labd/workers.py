"""A thread pool that grows on demand and keeps idle threads for the next job.

Task runs may last hours, so a fixed-size pool would make the (N+1)-th sweep wait; starting a
fresh thread per run costs ~80 us. :class:`WorkerPool` hands a job to an idle thread when
there is one (a queue put, a few microseconds) and starts a new thread otherwise. Idle
threads above ``max_idle`` or idle longer than ``idle_timeout`` exit.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

Job = Callable[[], None]


class WorkerPool:
    """Runs jobs on reusable threads; never queues a job behind a busy thread."""

    def __init__(self, name: str = "labd-worker", max_idle: int = 16, idle_timeout: float = 30.0):
        self._name = name
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()  # threads inside a job right now
        self._ids = itertools.count(1)
        self._closed = False

    def submit(self, job: Job) -> None:
        """Run ``job`` now on an idle thread or a new one. ``job`` must not raise."""
        with self._mutex:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
            thread = threading.Thread(
                target=self._loop, args=(job,), name=f"{self._name}-{next(self._ids)}", daemon=True
            )
            self._threads.add(thread)
        thread.start()

    def _loop(self, job: Job | None) -> None:
        me = threading.current_thread()
        base_name = me.name
        while job is not None:
            self._busy.add(me)
            try:
                job()
            except BaseException:  # a job must never kill its worker silently
                log.exception("labd worker job raised")
            me.name = base_name
            with self._mutex:
                self._busy.discard(me)
                if self._closed or self._idle >= self._max_idle:
                    self._threads.discard(me)
                    return
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._mutex:
                    try:
                        # submit() may have counted on us just before the timeout.
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        job = None
        with self._mutex:
            self._threads.discard(me)

    def close(self, timeout: float = 1.0) -> list[str]:
        """Stop idle threads; returns the names of threads still busy after ``timeout``."""
        with self._mutex:
            self._closed = True
            idle, self._idle = self._idle, 0
            threads = list(self._threads)
        for _ in range(idle):
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))
        # Idle threads may still be on their way out; only threads inside a job are busy.
        return sorted(t.name for t in list(self._busy) if t is not threading.current_thread())
