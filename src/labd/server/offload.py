"""Run blocking daemon and device code on bounded worker pools, with a deadline, from the loop.

The event loop never calls device code. :meth:`Offloader.run` hands a job to one of two
:class:`BoundedPool`\\ s and awaits a future that the worker settles with
``loop.call_soon_threadsafe``:

- the *device* pool (``device=True``; :attr:`ServerSettings.device_workers` threads) runs
  device calls, connects and stream starts. The server caps the calls in flight per device
  (:meth:`labd.server.context.ServerContext.run_for_device`), so one hung instrument holds
  at most that many of these threads and never the whole pool;
- the *general* pool (``ServerSettings.server_workers`` threads) runs everything else that
  may block: task and run-store reads, parameter updates, encoding large stream payloads.

Neither pool ever has more threads than its size, whatever clients send: a job that finds
every thread busy waits in the pool's FIFO queue. If the deadline passes first, the request
answers 504 and the job is *abandoned*: a job still queued is taken out and never runs; a job
already running keeps running, and ``on_late`` runs on the worker when it finally ends (the
server uses that to clear a device's ``unresponsive`` flag). ``on_exit`` runs exactly once
when the job has left the pool, run or not (the per-device in-flight count). A stopping
server fails every pending request with :class:`ServerStopping`, so ``stop()`` never waits
for a hung device.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from labd.errors import DeviceTimeoutError
from labd.server.errors import ServerStopping
from labd.server.shutdown import ShutdownSignal

__all__ = ["BoundedPool", "Offloader"]

log = logging.getLogger("labd.server")

T = TypeVar("T")
Job = Callable[[], None]


class BoundedPool:
    """At most ``max_workers`` daemon threads, started on demand; further jobs queue (FIFO).

    A thread idle for ``idle_timeout`` seconds exits, so an idle server holds no threads.
    """

    def __init__(self, name: str, max_workers: int, idle_timeout: float = 30.0) -> None:
        if max_workers < 1:
            raise ValueError(f"a pool needs at least one worker, got max_workers={max_workers}")
        self.name = name
        self.max_workers = max_workers
        self._idle_timeout = idle_timeout
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Job] = deque()
        self._threads: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for a job, or started and about to
        self._ids = itertools.count(1)
        self._closed = False

    def submit(self, job: Job) -> None:
        """Queue ``job`` (it must not raise); start a thread if none is free and there is room."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"worker pool {self.name} is closed")
            self._queue.append(job)
            if len(self._queue) <= self._idle or len(self._threads) >= self.max_workers:
                self._cond.notify()
                return
            thread = threading.Thread(target=self._loop, daemon=True,
                                      name=f"{self.name}-{next(self._ids)}")
            self._threads.add(thread)
            self._idle += 1
        try:
            thread.start()
        except BaseException:  # no thread after all: the queued job waits for another one
            with self._cond:
                self._threads.discard(thread)
                self._idle -= 1
            raise

    def cancel(self, job: Job) -> bool:
        """Take ``job`` out of the queue; False if a worker already took it (or never had it)."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            return True

    def _next_job(self, me: threading.Thread) -> Job | None:
        with self._cond:
            while not self._queue:
                timed_out = self._closed or not self._cond.wait(self._idle_timeout)
                if timed_out and not self._queue:  # closed, or idle too long: exit
                    self._idle -= 1
                    self._threads.discard(me)
                    return None
            self._idle -= 1
            self._busy.add(me)
            return self._queue.popleft()

    def _loop(self) -> None:
        me = threading.current_thread()
        while (job := self._next_job(me)) is not None:
            try:
                job()
            except BaseException:  # a job must never kill its worker silently
                log.exception("labd server worker job raised")
            finally:
                with self._cond:
                    self._busy.discard(me)
                    self._idle += 1

    def stats(self) -> dict[str, int]:
        """Threads, busy threads and queued jobs right now."""
        with self._cond:
            return {"threads": len(self._threads), "busy": len(self._busy),
                    "queued": len(self._queue), "max_workers": self.max_workers}

    def close(self, timeout: float = 0.0) -> tuple[list[Job], list[str]]:
        """Stop taking jobs; idle threads exit. Returns the jobs never started and busy threads.

        Waits up to ``timeout`` seconds for the threads to end.
        """
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            threads = list(self._threads)
            self._cond.notify_all()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
                timeout = 0.0  # one budget for all: later threads only get checked
        with self._cond:
            busy = sorted(t.name for t in self._busy if t is not threading.current_thread())
        return dropped, busy


class _JobState(enum.Enum):
    PENDING = "pending"  # queued or running on a worker; the request waits
    DONE = "done"  # the worker finished; the result is (being) delivered
    ABANDONED = "abandoned"  # the request gave up (timeout or stop); a started job runs on


class _Job(Generic[T]):
    """One offloaded call: the worker side and the loop side agree on its state under a lock."""

    def __init__(
        self, fn: Callable[[], T], loop: asyncio.AbstractEventLoop, future: asyncio.Future[T],
        on_late: Callable[[], None] | None, on_exit: Callable[[], None] | None,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future
        self.on_late = on_late
        self._on_exit = on_exit
        self.lock = threading.Lock()
        self.state = _JobState.PENDING
        self.timed_out = False

    def __call__(self) -> None:  # on the worker thread
        try:
            outcome: tuple[bool, object] = (True, self.fn())
        except BaseException as exc:
            outcome = (False, exc)
        with self.lock:
            abandoned = self.state is _JobState.ABANDONED
            late = abandoned and self.timed_out
            self.state = _JobState.DONE
        try:
            if late and self.on_late is not None:
                self.on_late()
        finally:
            # Before the answer goes out: a client that got its answer finds its slot free.
            self.exit()
        if not abandoned:
            with contextlib.suppress(RuntimeError):  # the loop closed while we ran
                self.loop.call_soon_threadsafe(self._settle, outcome)

    def exit(self) -> None:
        """Run ``on_exit`` once: the job left the pool (it ran, or it will never run)."""
        with self.lock:
            on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            on_exit()

    def _settle(self, outcome: tuple[bool, object]) -> None:  # on the loop
        if self.future.done():
            return
        ok, value = outcome
        if ok:
            self.future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            self.future.set_exception(value)

    def abandon(
        self, exc: BaseException, *, timed_out: bool, on_abandon: Callable[[], None] | None = None,
    ) -> bool:
        """Give up waiting (on the loop). False if the worker already finished.

        ``on_abandon`` runs under the job's lock, so it always runs before ``on_late``.
        """
        with self.lock:
            if self.state is not _JobState.PENDING:
                return False
            self.state = _JobState.ABANDONED
            self.timed_out = timed_out
            if on_abandon is not None:
                on_abandon()
        if not self.future.done():
            self.future.set_exception(exc)
        return True


class Offloader:
    """Runs blocking jobs on the server's two bounded pools; see the module docstring."""

    def __init__(
        self, shutdown: ShutdownSignal, name: str = "labd-server", *,
        device_workers: int = 32, server_workers: int = 8,
    ) -> None:
        self._shutdown = shutdown
        self._name = name
        self._sizes = {True: device_workers, False: server_workers}
        self._pools: dict[bool, BoundedPool] = {}
        self._pool_lock = threading.Lock()

    def _get_pool(self, device: bool) -> BoundedPool:
        with self._pool_lock:
            pool = self._pools.get(device)
            if pool is None:
                kind = "device" if device else "work"
                pool = self._pools[device] = BoundedPool(f"{self._name}-{kind}", self._sizes[device])
            return pool

    def stats(self) -> dict[str, dict[str, int]]:
        """Each pool's threads, busy threads and queued jobs (pools not yet used: absent)."""
        with self._pool_lock:
            pools = dict(self._pools)
        return {("device" if device else "general"): pool.stats() for device, pool in pools.items()}

    async def run(
        self,
        fn: Callable[[], T],
        *,
        timeout: float | None,
        what: str,
        device: bool = False,
        on_timeout: Callable[[], None] | None = None,
        on_late: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn()`` on a worker and return its result (or raise its exception).

        ``device=True`` uses the device pool. After ``timeout`` seconds raise
        :class:`DeviceTimeoutError` (HTTP 504) naming ``what``; if ``fn`` had started,
        ``on_timeout`` then runs on the loop and ``on_late`` on the worker once ``fn`` ends.
        ``on_exit`` runs exactly once, whatever happens, when the job has left the pool.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(fn, loop, future, on_late, on_exit)
        if self._shutdown.is_set():
            job.exit()
            raise ServerStopping(f"The labd server is stopping; {what} was not started.")
        pool = self._get_pool(device)
        try:
            pool.submit(job)
        except BaseException as exc:
            job.exit()
            if isinstance(exc, RuntimeError):  # pool closed by a concurrent stop()
                raise ServerStopping(
                    f"The labd server is stopping; {what} was not started.") from None
            raise
        timer = None if timeout is None else loop.call_later(
            timeout, self._expire, pool, job, what, timeout, on_timeout)

        def on_stop() -> None:
            if pool.cancel(job):
                job.exit()
            job.abandon(ServerStopping(
                f"The labd server stopped while {what} was still running; it may still finish."
            ), timed_out=False)

        handle = self._shutdown.add(on_stop)
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            self._shutdown.remove(handle)
            if future.cancelled() and pool.cancel(job):  # the request went away while queued
                job.abandon(ServerStopping(f"{what} was cancelled before it started."),
                            timed_out=False)
                job.exit()

    @staticmethod
    def _expire(pool: BoundedPool, job: _Job[T], what: str, timeout: float,
                on_timeout: Callable[[], None] | None) -> None:
        if pool.cancel(job):  # never started: every worker was busy the whole time
            job.abandon(DeviceTimeoutError(
                f"{what} was not started within {timeout:g} s (the request timeout): all "
                f"{pool.max_workers} of the server's {pool.name} workers were busy, and it "
                "will not run. Retry later, raise ?timeout=, or check for hung instruments "
                "(GET /health)."), timed_out=False)
            job.exit()
            return
        error = DeviceTimeoutError(
            f"{what} did not finish within {timeout:g} s (the request timeout); it keeps running "
            "in the background and any error it raises is recorded. Raise ?timeout= or check "
            "the instrument."
        )
        job.abandon(error, timed_out=True, on_abandon=on_timeout)

    def close(self, timeout: float = 0.0) -> list[str]:
        """Stop idle workers; returns names of workers still busy after ``timeout`` seconds.

        Jobs that never started are dropped. The pools are created again on next use, so
        an app can be started again (TestClient).
        """
        with self._pool_lock:
            pools, self._pools = list(self._pools.values()), {}
        busy: list[str] = []
        for pool in pools:
            dropped, still_busy = pool.close(timeout)
            for job in dropped:
                if isinstance(job, _Job):
                    job.exit()
            busy.extend(still_busy)
        return busy
