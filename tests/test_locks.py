"""The per-device lock: fair under contention, re-entrant in FIFO mode, bounded, self-describing.

Ordering tests queue waiters one at a time (each is seen waiting in ``statistics()`` before
the next starts), so the expected order does not depend on timing. The fairness test is a
share-of-calls test with a generous bound; see its docstring.

Tests through a device run with and without a ``call_timeout``: both must be fair (a plain
``RLock`` is not, see the fairness test), so a change that specialises the wrapper per
``call_timeout`` is checked on both paths.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import labd as ld
from labd.locks import DeviceLock

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until true; fail after the watchdog (a bounded wait, not a sleep)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WAIT_S} s"
        time.sleep(0.0005)


def start(target: Callable[[], Any], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


def join_all(threads: list[threading.Thread], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still blocked (deadlock?): {hung}"


class Worker:
    """A device whose every call takes about 1 ms, like a short instrument round trip."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.calls = 0

    def work(self) -> None:
        time.sleep(0.001)
        self.calls += 1

    def spin(self) -> None:
        """About 1 ms of CPU work that keeps the GIL, like parsing a large reply."""
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        self.calls += 1

    def outer(self, entered: threading.Event, proceed: threading.Event) -> str:
        entered.set()
        assert proceed.wait(WAIT_S)
        return "outer+" + self.inner()

    def inner(self) -> str:
        return "inner"

    def hold(self, entered: threading.Event, release: threading.Event) -> None:
        entered.set()
        assert release.wait(WAIT_S)


#: The device's call_timeout: none (the default) or one that is never reached.
PLAIN, BOUNDED = None, 30.0
CALL_TIMEOUTS = pytest.mark.parametrize("call_timeout", [PLAIN, BOUNDED], ids=["plain", "bounded"])


@pytest.fixture
def worker(daemon: ld.LabDaemon) -> Worker:
    daemon.register_plugins(devices={"Worker": Worker})
    device: Worker = daemon.add_device("w1", "Worker")
    return device




def lock_info(daemon: ld.LabDaemon) -> dict[str, Any]:
    info: dict[str, Any] = daemon.device_info("w1")["lock"]
    return info


class Holder:
    """Holds a DeviceLock on its own thread until released."""

    def __init__(self, lock: DeviceLock, name: str = "holder-thread") -> None:
        self.lock = lock
        self.held = threading.Event()
        self.release = threading.Event()
        self.thread = start(self._run, name)
        assert self.held.wait(WAIT_S)

    def _run(self) -> None:
        assert self.lock.acquire_slow(WAIT_S)
        self.held.set()
        self.release.wait(WAIT_S)
        self.lock.release()

    def stop(self) -> None:
        self.release.set()
        join_all([self.thread])


# -- fairness ------------------------------------------------------------------------------


@CALL_TIMEOUTS
@pytest.mark.parametrize("method", ["work", "spin"])
def test_four_hammering_threads_each_get_a_fair_share(
    daemon: ld.LabDaemon, worker: Worker, method: str, call_timeout: float | None
) -> None:
    """400 calls of ~1 ms from 4 threads: each thread gets at least 15% (60) of them.

    The threads start together (a barrier) and stop when the shared total is reached, so
    the count does not depend on speed. With FIFO hand-over the smallest share measured was
    94-99 of 400, also with 6 CPU-bound processes competing on 2 cores; a plain RLock gave
    35-55 (``spin``, idle machine) and 1 (``work``, loaded machine). Only a scheduler that
    keeps a runnable thread off the CPU for most of the run could push a share under 15%.
    """
    daemon.set_call_timeout("w1", call_timeout)
    total_calls, threads_n = 400, 4
    counts = [0] * threads_n
    issued = [0]
    count_lock = threading.Lock()
    barrier = threading.Barrier(threads_n)
    call = getattr(worker, method)

    def hammer(me: int) -> None:
        barrier.wait(WAIT_S)
        while True:
            with count_lock:
                if issued[0] >= total_calls:
                    return
                issued[0] += 1
            call()
            counts[me] += 1

    threads = [start(lambda me=me: hammer(me), f"hammer-{me}")  # type: ignore[misc]
               for me in range(threads_n)]
    join_all(threads, timeout=60)

    assert sum(counts) == total_calls == worker.calls
    assert min(counts) >= 0.15 * total_calls, f"unfair shares: {counts}"
    assert lock_info(daemon) == {"holder": None, "waiting": 0, "fifo": False}


def test_fifo_mode_serves_queued_waiters_in_arrival_order() -> None:
    lock = DeviceLock("dev")
    holder = Holder(lock)
    order: list[int] = []

    def waiter(n: int) -> None:
        assert lock.acquire_slow(WAIT_S)
        order.append(n)
        lock.release()

    threads = []
    try:
        for n in range(1, 5):
            threads.append(start(lambda n=n: waiter(n), f"waiter-{n}"))  # type: ignore[misc]
            wait_until(lambda n=n: lock.statistics().waiting == n, f"waiter {n} queued")  # type: ignore[misc]
        assert lock.statistics().fifo_mode and lock.fifo
    finally:
        holder.stop()
        join_all(threads)

    assert order == [1, 2, 3, 4]
    stats = lock.statistics()
    assert (stats.locked, stats.waiting, stats.fifo_mode) == (False, 0, False)


@CALL_TIMEOUTS
def test_device_callers_queue_in_arrival_order(
    daemon: ld.LabDaemon, worker: Worker, call_timeout: float | None
) -> None:
    daemon.set_call_timeout("w1", call_timeout)
    entered, release = threading.Event(), threading.Event()
    holder = start(lambda: worker.hold(entered, release), "holder-thread")
    assert entered.wait(WAIT_S)
    order: list[int] = []
    threads = []
    try:
        for n in range(1, 4):
            threads.append(start(lambda n=n: order.append(worker.inner() and n),  # type: ignore[misc]
                                 f"caller-{n}"))
            wait_until(lambda n=n: lock_info(daemon)["waiting"] == n, f"caller {n} queued")  # type: ignore[misc]
        assert lock_info(daemon)["fifo"]
    finally:
        release.set()
        join_all([holder, *threads])
    assert order == [1, 2, 3]


# -- re-entrancy ---------------------------------------------------------------------------


@CALL_TIMEOUTS
def test_reentrant_call_while_others_wait_does_not_deadlock(
    daemon: ld.LabDaemon, worker: Worker, call_timeout: float | None
) -> None:
    daemon.set_call_timeout("w1", call_timeout)
    entered, proceed = threading.Event(), threading.Event()
    results: dict[str, str] = {}
    outer = start(lambda: results.update(outer=worker.outer(entered, proceed)), "outer-caller")
    threads = [outer]
    try:
        assert entered.wait(WAIT_S)
        inner = start(lambda: results.update(inner=worker.inner()), "inner-caller")
        threads.append(inner)
        wait_until(lambda: lock_info(daemon)["waiting"] == 1, "inner-caller queued")
        assert lock_info(daemon)["fifo"]  # newcomers now queue; the holder must not
    finally:
        proceed.set()  # outer() now calls self.inner() while holding the lock
    join_all(threads)
    assert results == {"outer": "outer+inner", "inner": "inner"}


def test_acquire_slow_is_reentrant_for_the_holder_even_in_fifo_mode() -> None:
    lock = DeviceLock("dev")
    assert lock.acquire_slow(WAIT_S)
    waiter = start(lambda: (lock.acquire_slow(WAIT_S), lock.release()), "waiter")
    try:
        wait_until(lambda: lock.statistics().waiting == 1, "waiter queued")
        assert lock.acquire_slow(0.01)  # the holder re-enters at once, never queues
        lock.release()
    finally:
        lock.release()
    join_all([waiter])


# -- bounded waits -------------------------------------------------------------------------


def test_acquire_slow_gives_up_after_its_timeout_while_held_elsewhere() -> None:
    lock = DeviceLock("dev")
    holder = Holder(lock)
    try:
        started = time.monotonic()
        assert lock.acquire_slow(0.05) is False
        assert time.monotonic() - started >= 0.05
        stats = lock.statistics()
        assert (stats.holder_thread, stats.waiting, stats.fifo_mode) == ("holder-thread", 0, False)
    finally:
        holder.stop()
    assert lock.acquire_slow(WAIT_S) is True  # the failed wait left nothing behind
    lock.release()


def test_a_queued_waiter_that_times_out_leaves_the_queue_in_order() -> None:
    lock = DeviceLock("dev")
    holder = Holder(lock)
    order: list[str] = []

    def patient() -> None:
        assert lock.acquire_slow(WAIT_S)
        order.append("patient")
        lock.release()

    first = start(patient, "patient")
    try:
        wait_until(lambda: lock.statistics().waiting == 1, "patient queued")
        assert lock.acquire_slow(0.05) is False  # queued behind "patient", then gave up
        assert lock.statistics().waiting == 1 and lock.fifo
    finally:
        holder.stop()
        join_all([first])
    assert order == ["patient"] and lock.statistics().waiting == 0


def test_call_timeout_names_the_holder(daemon: ld.LabDaemon, worker: Worker) -> None:
    daemon.set_call_timeout("w1", 0.05)
    entered, release = threading.Event(), threading.Event()
    holder = start(lambda: worker.hold(entered, release), "slow-sweep")
    try:
        assert entered.wait(WAIT_S)
        with pytest.raises(ld.DeviceTimeoutError, match=r"'w1'.*'work'.*slow-sweep holds it"):
            worker.work()
    finally:
        release.set()
        join_all([holder])
    worker.work()
    assert worker.calls == 1


# -- statistics ----------------------------------------------------------------------------


@CALL_TIMEOUTS
def test_statistics_name_the_holder_thread_and_count_waiters(
    daemon: ld.LabDaemon, worker: Worker, call_timeout: float | None
) -> None:
    daemon.set_call_timeout("w1", call_timeout)
    assert lock_info(daemon) == {"holder": None, "waiting": 0, "fifo": False}
    entered, release = threading.Event(), threading.Event()
    holder = start(lambda: worker.hold(entered, release), "holder-thread")
    waiters = []
    try:
        assert entered.wait(WAIT_S)
        assert lock_info(daemon)["holder"] == "holder-thread"
        waiters.append(start(worker.work, "first-waiter"))
        wait_until(lambda: lock_info(daemon)["waiting"] == 1, "first-waiter queued")
        waiters.append(start(worker.inner, "second-waiter"))
        wait_until(lambda: lock_info(daemon)["waiting"] == 2, "second-waiter queued")
        assert lock_info(daemon) == {"holder": "holder-thread", "waiting": 2, "fifo": True}
    finally:
        release.set()
        join_all([holder, *waiters])
    assert lock_info(daemon) == {"holder": None, "waiting": 0, "fifo": False}


class Reader:
    """A device with a query and a command, to see both kinds of blocked caller."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def hold(self, entered: threading.Event, release: threading.Event) -> None:
        entered.set()
        assert release.wait(WAIT_S)

    def set_x(self) -> None:
        pass

    def get_x(self) -> int:
        return 1


def test_statistics_count_blocked_queries_and_commands(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Reader": Reader})
    reader = daemon.add_device("r1", "Reader")
    entered, release = threading.Event(), threading.Event()
    holder = start(lambda: reader.hold(entered, release), "holder-thread")
    waiters = []
    try:
        assert entered.wait(WAIT_S)
        waiters = [start(reader.set_x, "command-waiter"), start(reader.get_x, "query-waiter")]
        wait_until(lambda: daemon.device_info("r1")["lock"]["waiting"] == 2, "both queued")
    finally:
        release.set()
        join_all([holder, *waiters])


def test_statistics_of_a_lock_held_through_ld_lock(daemon: ld.LabDaemon, worker: Worker) -> None:
    lock: Any = worker._ld_lock  # type: ignore[attr-defined]
    with lock:
        assert lock_info(daemon)["holder"] == threading.current_thread().name
        worker.inner()  # the same thread may still call methods (re-entrant)
    assert lock_info(daemon)["holder"] is None
