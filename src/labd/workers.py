"""Thread pools that grow on demand and keep idle threads for the next job.

Task runs may last hours, so a fixed-size pool would make the (N+1)-th sweep wait; starting a
fresh thread per run costs ~80 us. Both pools hand a job to an idle thread when there is one
and start a new thread otherwise; idle threads above ``max_idle`` or idle longer than
``idle_timeout`` exit.

- :class:`WorkerPool` feeds one shared queue: a worker that finishes takes the next queued
  job without sleeping. Best for a caller that keeps running after it submits (the server's
  event loop offloading device calls).
- :class:`AffineWorkerPool` hands each job to one idle worker and wakes it on the
  submitter's CPU. Waking a sleeping thread on another CPU costs tens of microseconds on a
  virtual machine (an inter-processor interrupt), more than the rest of a task start, and
  ``execute_task`` is usually followed by ``wait()``. On Linux the pool sets the worker's
  affinity to the submitter's CPU just before the hand-off and the worker gives itself every
  CPU back as its first step: the wake-up stays local, the job is never confined. Only the
  pool's own threads are touched: labd never changes the affinity of a thread it did not
  create (the submitter's, a waiter's), see ADR 0010.
"""

from __future__ import annotations

import _thread
import ctypes
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

__all__ = ["AffineWorkerPool", "WorkerPool"]

log = logging.getLogger(__name__)

Job = Callable[[], None]

def _cpu_probe() -> Callable[[], int] | None:
    """libc's ``sched_getcpu`` when this platform has it and per-thread affinity works."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        getcpu = ctypes.CDLL(None).sched_getcpu
    except (AttributeError, OSError):
        return None
    getcpu.restype = ctypes.c_int
    getcpu.argtypes = []
    return getcpu


_SCHED_GETCPU = _cpu_probe()

class _Worker:
    """One pooled thread: a private gate it sleeps on while idle, and the next job."""

    __slots__ = ("gate", "job", "thread", "tid")

    def __init__(self) -> None:
        self.gate = _thread.allocate_lock()
        self.gate.acquire()
        self.job: Job | None = None
        self.thread: threading.Thread | None = None
        self.tid: int | None = None


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
                # The count and the queue change together even if an interrupt arrives
                # between them: otherwise an idle worker waits for a job that never comes.
                try:
                    self._idle -= 1
                finally:
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


class AffineWorkerPool:
    """Runs each job on its own reusable thread, woken on the submitter's CPU (Linux).

    Interrupt-safe by construction: a worker's job is assigned under the pool's mutex in the
    same step that takes the worker off the idle list, and a worker decides what a wake-up
    (or an idle timeout) means by looking at that state under the mutex. So a Ctrl+C in
    ``submit`` between those steps and the wake-up only delays the job until the worker's
    idle timeout, or lets the worker retire; it never strands a thread.
    """

    def __init__(
        self,
        name: str = "labd-worker",
        max_idle: int = 16,
        idle_timeout: float = 30.0,
    ) -> None:
        self._name = name
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._mutex = threading.Lock()
        self._idle: list[_Worker] = []  # a stack: the most recently idle worker is cache-hot
        self._workers: set[_Worker] = set()
        self._threads: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()  # threads inside a job right now
        self._ids = itertools.count(1)
        self._closed = False
        self._all_cpus = os.sched_getaffinity(0) if _SCHED_GETCPU is not None else None

    def submit(self, job: Job) -> None:
        """Run ``job`` now on an idle thread or a new one. ``job`` must not raise."""
        with self._mutex:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            if self._idle:
                worker = self._idle.pop()
                worker.job = job  # with the pop, under the mutex (see the class docstring)
                thread = None
            else:
                worker = _Worker()
                worker.job = job
                thread = threading.Thread(
                    target=self._loop, args=(worker,), name=f"{self._name}-{next(self._ids)}",
                    daemon=True,
                )
                worker.thread = thread
                self._workers.add(worker)
                self._threads.add(thread)
        if thread is not None:
            thread.start()
            return
        # Outside the mutex: a worker woken while we still held it would block on the mutex
        # to re-idle and lose the race to our next submit (one new thread per job).
        self._wake_here(worker)
        try:
            worker.gate.release()
        except RuntimeError:
            # Already released: this worker woke at its idle timeout just as an earlier submit
            # took it, and that submit's wake-up is still unused. Its next acquire returns at
            # once and finds this job, assigned above under the mutex (nothing is lost).
            pass

    def _wake_here(self, worker: _Worker) -> None:
        if self._all_cpus is None or _SCHED_GETCPU is None or worker.tid is None:
            return
        try:
            os.sched_setaffinity(worker.tid, {_SCHED_GETCPU()})
        except OSError:  # a CPU set we may not use (containers): wake it wherever
            pass

    def _loop(self, worker: _Worker) -> None:
        me = threading.current_thread()
        base_name = me.name
        worker.tid = threading.get_native_id()
        with self._mutex:
            job, worker.job = worker.job, None
        while job is not None:
            if self._all_cpus is not None:
                try:
                    os.sched_setaffinity(0, self._all_cpus)  # never confine the job itself
                except OSError:
                    pass
            self._busy.add(me)
            try:
                job()
            except BaseException:  # a job must never kill its worker silently
                log.exception("labd worker job raised")
            me.name = base_name
            with self._mutex:
                self._busy.discard(me)
                retire = self._closed or len(self._idle) >= self._max_idle
                if not retire:
                    self._idle.append(worker)
            job = None if retire else self._next_job(worker)
        with self._mutex:
            self._threads.discard(me)
            self._workers.discard(worker)

    def _next_job(self, worker: _Worker) -> Job | None:
        """Sleep until a job is assigned; None to retire (closed, idle too long, or taken
        by a submit that was interrupted before it assigned a job)."""
        while True:
            woken = worker.gate.acquire(True, self._idle_timeout)
            with self._mutex:
                if worker.job is not None:
                    job, worker.job = worker.job, None
                    return job
                if self._closed:
                    return None
                if woken:
                    continue  # a late wake-up for a job already taken at an idle timeout
                if worker in self._idle:
                    self._idle.remove(worker)
                return None

    def close(self, timeout: float = 1.0) -> list[str]:
        """Stop idle threads; returns the names of threads still busy after ``timeout``."""
        with self._mutex:
            self._closed = True
            self._idle.clear()
            workers = list(self._workers)
            threads = list(self._threads)
        for worker in workers:
            try:
                worker.gate.release()  # wake it to see `closed` (a busy one sees it later)
            except RuntimeError:  # already released: it is awake or about to be
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread() and thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
        # Idle threads may still be on their way out; only threads inside a job are busy.
        return sorted(t.name for t in list(self._busy) if t is not threading.current_thread())
