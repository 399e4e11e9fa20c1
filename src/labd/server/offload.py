"""Run blocking daemon and device code on worker threads, with a deadline, from the event loop.

The event loop never calls device code. :meth:`Offloader.run` hands a job to a dedicated
:class:`labd.workers.WorkerPool` (it grows on demand, so one hung instrument cannot use up a
fixed thread budget) and awaits a future that the worker settles with
``loop.call_soon_threadsafe``. If the deadline passes first the request answers 504 and the
job is *abandoned*: it keeps running, and ``on_late`` runs on the worker when it finally ends
(the server uses that to clear a device's ``unresponsive`` flag). A stopping server fails
every pending request with :class:`ServerStopping` so ``stop()`` never waits for a hung device.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from labd.errors import DeviceTimeoutError
from labd.server.errors import ServerStopping
from labd.server.shutdown import ShutdownSignal
from labd.workers import WorkerPool

__all__ = ["Offloader"]

T = TypeVar("T")


class _JobState(enum.Enum):
    RUNNING = "running"  # the worker is executing the job; the request waits
    DONE = "done"  # the worker finished; the result is (being) delivered
    ABANDONED = "abandoned"  # the request gave up (timeout or stop); the worker runs on


class _Job(Generic[T]):
    """One offloaded call: the worker side and the loop side agree on its state under a lock."""

    def __init__(
        self, fn: Callable[[], T], loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[T], on_late: Callable[[], None] | None,
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future
        self.on_late = on_late
        self.lock = threading.Lock()
        self.state = _JobState.RUNNING
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
        if late and self.on_late is not None:
            self.on_late()
        if not abandoned:
            with contextlib.suppress(RuntimeError):  # the loop closed while we ran
                self.loop.call_soon_threadsafe(self._settle, outcome)

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
            if self.state is not _JobState.RUNNING:
                return False
            self.state = _JobState.ABANDONED
            self.timed_out = timed_out
            if on_abandon is not None:
                on_abandon()
        if not self.future.done():
            self.future.set_exception(exc)
        return True


class Offloader:
    """Runs blocking jobs on the server's own worker pool; see the module docstring."""

    def __init__(self, shutdown: ShutdownSignal, name: str = "labd-server") -> None:
        self._shutdown = shutdown
        self._name = name
        self._pool: WorkerPool | None = None
        self._pool_lock = threading.Lock()

    def _get_pool(self) -> WorkerPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = WorkerPool(name=self._name)
            return self._pool

    async def run(
        self,
        fn: Callable[[], T],
        *,
        timeout: float | None,
        what: str,
        on_timeout: Callable[[], None] | None = None,
        on_late: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn()`` on a worker and return its result (or raise its exception).

        After ``timeout`` seconds raise :class:`DeviceTimeoutError` (HTTP 504) naming ``what``;
        ``on_timeout`` then runs on the loop and ``on_late`` on the worker once ``fn`` ends.
        """
        if self._shutdown.is_set():
            raise ServerStopping(f"The labd server is stopping; {what} was not started.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(fn, loop, future, on_late)
        try:
            self._get_pool().submit(job)
        except RuntimeError:  # pool closed by a concurrent stop()
            raise ServerStopping(f"The labd server is stopping; {what} was not started.") from None
        timer = None if timeout is None else loop.call_later(timeout, self._expire, job, what, timeout, on_timeout)
        def on_stop() -> None:
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

    @staticmethod
    def _expire(job: _Job[T], what: str, timeout: float, on_timeout: Callable[[], None] | None) -> None:
        error = DeviceTimeoutError(
            f"{what} did not finish within {timeout:g} s (the request timeout); it keeps running "
            "in the background and any error it raises is recorded. Raise ?timeout= or check "
            "the instrument."
        )
        job.abandon(error, timed_out=True, on_abandon=on_timeout)

    def close(self, timeout: float = 0.0) -> list[str]:
        """Stop idle workers; returns names of workers still busy after ``timeout`` seconds.

        The pool is created again on next use, so an app can be started again (TestClient).
        """
        with self._pool_lock:
            pool, self._pool = self._pool, None
        return pool.close(timeout=timeout) if pool is not None else []
