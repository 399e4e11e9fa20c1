"""Task runs and leases under faults: interrupts, races with shutdown, trees of runs.

Each test here pins one item of issue 7 and failed on the code before its fix. Races are
provoked with ``sys.setswitchinterval(1e-6)`` (a thread switch after almost every bytecode)
and real signals; every wait is bounded by a watchdog, and none depends on timing to pass.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import labd as ld

WAIT_S = 10.0  # watchdog for every bounded wait; never reached when things work


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` until true (a watchdog, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        threading.Event().wait(0.002)


@contextlib.contextmanager
def switch_every_bytecode() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class SigintInjector:
    """Real SIGINTs to the main thread every ``interval`` s, raised only while ``armed``.

    A test arms it around the call it wants interrupted and catches ``KeyboardInterrupt``
    there; anywhere else the signal is ignored. With ``once``, the handler disarms itself
    (one Ctrl+C per call: the clean-up it triggers is not interrupted again). The garbage
    collector is off meanwhile: a KeyboardInterrupt raised in one of its callbacks (a
    WeakSet's) would be unraisable, not the test's.
    """

    def __init__(self, interval: float, *, once: bool = False,
                 on_hit: Callable[[], None] | None = None) -> None:
        self.interval = interval
        self.once = once
        self.on_hit = on_hit
        self.armed = False
        self.landed = 0
        self._main = threading.get_ident()
        assert self._main == threading.main_thread().ident
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send, name="test-sigint")
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.armed:
            if self.once:
                self.armed = False
            self.landed += 1
            if self.on_hit is not None:
                self.on_hit()
            raise KeyboardInterrupt

    def _send(self) -> None:
        while not self._stop.is_set():
            signal.pthread_kill(self._main, signal.SIGINT)
            self._stop.wait(self.interval)

    def __enter__(self) -> SigintInjector:
        gc.collect()
        gc.disable()
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._sender.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.armed = False
        self._stop.set()
        self._sender.join(WAIT_S)
        signal.signal(signal.SIGINT, self._previous)
        gc.enable()


class Device:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.value = 0

    def set_value(self, value: int) -> None:
        self.value = value

    def get_value(self) -> int:
        return self.value


class UntilCancelled:
    """Holds ``devices`` and loops on checkpoints until cancelled; may start one child first."""

    def __init__(
        self,
        task_id: str,
        devices: list[str] | None = None,
        child: dict[str, Any] | None = None,
        started: threading.Event | None = None,
        ended: list[str] | None = None,
    ) -> None:
        self.task_id = task_id
        self.device_ids = devices or []
        self.child = child
        self.started = started or threading.Event()
        self.ended = ended if ended is not None else []

    def run(self, context: ld.TaskContext) -> Any:
        if self.child is not None:
            context.daemon.execute_task(**self.child)
        self.started.set()
        try:
            while True:
                context.checkpoint()
                context.cancel_event.wait(0.05)
        finally:
            self.ended.append(self.task_id)


class CancelQueuedChild:
    """Starts a child that must queue for a busy device, cancels it, and waits for it."""

    def __init__(self, task_id: str, device: str) -> None:
        self.task_id = task_id
        self.device = device

    def run(self, context: ld.TaskContext) -> Any:
        child = context.daemon.execute_task(
            f"{self.task_id}-child", "UntilCancelled", devices=[self.device], wait_for_devices=True
        )
        assert child.status == "pending"
        child.cancel()
        try:
            child.wait(WAIT_S)
        except ld.TaskCancelledError:
            return "child cancelled"
        except TimeoutError:
            return "hung"
        return "child completed"


class UntilEvent:
    def __init__(self, task_id: str, event: threading.Event) -> None:
        self.task_id = task_id
        self.event = event

    def run(self, context: ld.TaskContext) -> str:
        assert self.event.wait(WAIT_S)
        return "done"


class ClaimAndReturn:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.device_ids = ["d1", "d2"]

    def run(self, context: ld.TaskContext) -> str:
        return "claimed"


class Quick:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def run(self, context: ld.TaskContext) -> str:
        return "done"


@pytest.fixture
def daemon() -> Iterator[ld.LabDaemon]:
    d = ld.LabDaemon(completed_task_buffer=10_000)
    d.register_plugins(
        devices={"Device": Device},
        tasks={"UntilCancelled": UntilCancelled, "CancelQueuedChild": CancelQueuedChild,
               "Quick": Quick, "UntilEvent": UntilEvent, "ClaimAndReturn": ClaimAndReturn},
    )
    for device_id in ("d1", "d2"):
        d.add_device(device_id, "Device")
        d.connect_device(device_id)
    yield d
    d.shutdown(timeout=5)


# -- item 1: the run's completion signal survives Ctrl+C in a waiter ------------------------


def test_ctrl_c_in_a_waiter_never_stops_other_waiters_from_hearing_the_end(
    daemon: ld.LabDaemon,
) -> None:
    """A real SIGINT interrupts ``wait()`` in the main thread over and over; every run still
    wakes its other waiter. The old one-shot latch could stay held by an interrupted waiter."""
    hit = threading.Event()  # each run ends only after an interrupt landed in a wait for it
    # Interrupts land only inside wait(), where the test catches them.
    with SigintInjector(0.0005, on_hit=hit.set) as sigint:
        for index in range(200):
            hit.clear()
            handle = daemon.execute_task(f"q{index}", "UntilEvent", event=hit)
            heard = threading.Event()
            other = threading.Thread(
                target=lambda h=handle, e=heard: (h.wait(WAIT_S), e.set())  # type: ignore[misc]
            )
            other.start()
            while True:
                try:
                    sigint.armed = True
                    handle.wait(WAIT_S)
                    sigint.armed = False
                    break
                except KeyboardInterrupt:
                    sigint.armed = False
            other.join(WAIT_S)
            assert heard.is_set(), f"run {index}: a second waiter never heard that it ended"
    assert sigint.landed >= 200  # the signals really arrived inside wait()


# -- item 5: a cancel reaches the whole tree --------------------------------------------------


def test_cancelling_a_parent_cancels_its_children_and_frees_every_device(
    daemon: ld.LabDaemon,
) -> None:
    ended: list[str] = []
    child_started = threading.Event()
    parent = daemon.execute_task(
        "parent", "UntilCancelled", devices=["d1"], ended=ended,
        child={"task_id": "child", "task_type": "UntilCancelled", "devices": ["d2"],
               "started": child_started, "ended": ended},
    )
    assert child_started.wait(WAIT_S)
    assert daemon.owner_of("d2") == "task 'child'"
    parent.cancel()
    with pytest.raises(ld.TaskCancelledError):
        parent.wait(WAIT_S)
    child = daemon.get_task("child")
    assert child.status == "cancelled"  # ended before its parent did
    assert sorted(ended) == ["child", "parent"]  # both run() bodies returned
    assert daemon.owner_of("d1") is None and daemon.owner_of("d2") is None


def test_a_child_started_by_a_cancelled_parent_never_runs(daemon: ld.LabDaemon) -> None:
    class LateChild:
        def __init__(self, task_id: str) -> None:
            self.task_id = task_id

        def run(self, context: ld.TaskContext) -> Any:
            context.cancel_event.wait(WAIT_S)
            return context.daemon.execute_task("late", "UntilCancelled", devices=["d2"]).task_id

    daemon.register_plugins(tasks={"LateChild": LateChild})
    parent = daemon.execute_task("p", "LateChild")
    parent.cancel()
    with pytest.raises(ld.TaskCancelledError):
        parent.wait(WAIT_S)
    assert daemon.get_task("late").status == "cancelled"
    assert daemon.owner_of("d2") is None


# -- item 6: a run's completion wakes its own waiters, not its parent's job end ---------------


def test_a_task_can_cancel_its_queued_child_and_wait_for_it(daemon: ld.LabDaemon) -> None:
    holder = daemon.claim(["d1"], owner="alice")  # not as a `with`: the task is not alice's
    handle = daemon.execute_task("parent", "CancelQueuedChild", device="d1")
    assert handle.wait(WAIT_S * 2) == "child cancelled"
    holder.release()


# -- item 7: pause and resume racing ----------------------------------------------------------


def test_pause_and_resume_racing_always_leave_state_and_gate_in_step(
    daemon: ld.LabDaemon,
) -> None:
    """pause() and resume() from two fresh threads at once, 20,000 times: "paused" always
    means the gate is closed. The old code left "paused" with the gate open about once in
    5,000 rounds under this stress, so this fails on it with probability above 98 %."""
    started = threading.Event()
    handle = daemon.execute_task("gated", "UntilCancelled", started=started)
    assert started.wait(WAIT_S)
    mismatches = []
    with switch_every_bytecode():
        for index in range(20_000):
            threads = [threading.Thread(target=handle.pause), threading.Thread(target=handle.resume)]
            if index % 2:
                threads.reverse()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_S)
            info = handle.info()
            if (info["status"] == "paused") != info["paused"]:
                mismatches.append((index, info["status"], info["paused"]))
    handle.cancel()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert mismatches == []


def test_cancel_wakes_a_paused_run_and_ends_it_cancelled(daemon: ld.LabDaemon) -> None:
    started = threading.Event()
    handle = daemon.execute_task("p", "UntilCancelled", started=started)
    assert started.wait(WAIT_S)
    handle.pause()
    assert handle.status == "paused"
    handle.cancel()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert handle.status == "cancelled" and not handle.is_paused()


# -- item 8: execute_task racing shutdown -----------------------------------------------------


def test_execute_task_racing_shutdown_never_leaves_a_run_behind() -> None:
    """Either the late call raises DaemonClosedError, or its run was cancelled and awaited:
    after shutdown() returns nothing runs, and nobody gets a bare RuntimeError."""
    for attempt in range(40):
        d = ld.LabDaemon(completed_task_buffer=10_000)
        d.register_plugins(devices={"Device": Device}, tasks={"UntilCancelled": UntilCancelled})
        d.add_device("d1", "Device")
        d.connect_device("d1")
        handles: list[ld.TaskHandle] = []
        errors: list[BaseException] = []
        go = threading.Event()

        def submit(d: ld.LabDaemon = d, handles: list[Any] = handles,
                   errors: list[BaseException] = errors, go: threading.Event = go) -> None:
            go.set()
            for index in range(10_000):
                try:
                    handles.append(d.execute_task(f"t{index}", "UntilCancelled"))
                except ld.DaemonClosedError:
                    return
                except BaseException as exc:
                    errors.append(exc)
                    return

        submitter = threading.Thread(target=submit)
        with switch_every_bytecode():
            submitter.start()
            assert go.wait(WAIT_S)
            wait_until(lambda h=handles, n=attempt % 7: len(h) > n, "a few runs")  # type: ignore[misc]
            report = d.shutdown(timeout=5)
            submitter.join(WAIT_S)
        assert errors == [], f"attempt {attempt}: execute_task raised {errors!r}"
        assert report.clean, f"attempt {attempt}: {report}"
        running = [h.task_id for h in handles if h.is_running()]
        assert running == [], f"attempt {attempt}: runs still going after shutdown: {running}"


def test_execute_task_after_shutdown_raises_daemon_closed() -> None:
    d = ld.LabDaemon()
    d.register_plugins(tasks={"Quick": Quick})
    d.shutdown()
    with pytest.raises(ld.DaemonClosedError, match="shut down"):
        d.execute_task("late", "Quick")


# -- item 9: a waiting lease queues in the same FIFO as tasks ---------------------------------


def test_a_lease_that_waits_first_gets_the_device_before_a_later_task(
    daemon: ld.LabDaemon,
) -> None:
    holder = daemon.claim(["d1"], owner="alice")
    got: list[str] = []
    bob_lease: list[ld.Lease] = []

    def bob() -> None:
        lease = daemon.claim(["d1"], owner="bob", wait=WAIT_S)
        got.append("bob")
        bob_lease.append(lease)

    waiter = threading.Thread(target=bob)
    waiter.start()
    wait_until(lambda: len(daemon.device_info("d1")["claims_waiting"]) == 1, "bob to queue")
    task = daemon.execute_task("t", "UntilCancelled", devices=["d1"], wait_for_devices=True)
    assert len(daemon.device_info("d1")["claims_waiting"]) == 2
    holder.release()
    waiter.join(WAIT_S)
    assert got == ["bob"]
    assert task.status == "pending"  # still behind bob
    assert daemon.owner_of("d1") == bob_lease[0].label
    bob_lease[0].release()
    wait_until(lambda: task.status == "running", "the task to get d1 after bob")
    task.cancel()
    with pytest.raises(ld.TaskCancelledError):
        task.wait(WAIT_S)


def test_ctrl_c_while_a_lease_waits_leaves_nothing_queued(daemon: ld.LabDaemon) -> None:
    holder = daemon.claim(["d1"], owner="alice")
    main = threading.get_ident()
    armed = threading.Event()

    def interrupt_once_queued() -> None:
        wait_until(lambda: len(daemon.device_info("d1")["claims_waiting"]) == 1, "the claim")
        armed.set()
        signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=interrupt_once_queued)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            daemon.claim(["d1"], owner="bob", wait=WAIT_S)
    finally:
        sender.join(WAIT_S)
    assert armed.is_set()
    assert daemon.device_info("d1")["claims_waiting"] == []
    holder.release()
    assert daemon.owner_of("d1") is None


# -- item 10: lease renewals racing each other and the expiry ---------------------------------


def test_two_concurrent_renewals_leave_only_the_last_deadline(daemon: ld.LabDaemon) -> None:
    expired = threading.Event()
    sub = daemon.events.subscribe(
        lambda item: expired.set() if item.payload.get("event") == "lease_expired" else None
    )
    try:
        with switch_every_bytecode():
            for _ in range(30):
                lease = daemon.claim(["d1"], owner="alice", ttl=60)
                barrier = threading.Barrier(2)

                def renew(lease: ld.Lease = lease, barrier: threading.Barrier = barrier) -> None:
                    barrier.wait(WAIT_S)
                    lease.renew(ttl=0.05)
                    lease.renew(ttl=60)

                threads = [threading.Thread(target=renew) for _ in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(WAIT_S)
                # Both renewals ended with ttl=60: no earlier deadline may survive them.
                assert not expired.wait(0.2), "a stray timer expired a lease renewed for 60 s"
                assert lease.active
                lease.release()
    finally:
        sub.close()


def test_a_renewal_after_the_deadline_is_refused_even_before_the_timer_ran(
    daemon: ld.LabDaemon,
) -> None:
    """The lease's deadline has passed; whether or not the expiry timer has run yet, renew()
    must not report success (the old code renewed an expired lease while its timer waited
    for the GIL, which this test's busy main thread holds)."""
    for _ in range(20):
        lease = daemon.claim(["d1"], owner="alice", ttl=0.001)
        past = time.monotonic() + 0.002  # the deadline was set inside claim(), before this
        while time.monotonic() < past:
            pass
        with pytest.raises(ld.LeaseError, match="expired"):
            lease.renew(ttl=60)
        assert not lease.active
        assert daemon.owner_of("d1") is None


def test_a_renewal_racing_the_expiry_never_reports_success_on_an_ended_lease(
    daemon: ld.LabDaemon,
) -> None:
    successes = refusals = 0
    with switch_every_bytecode():
        for _ in range(300):
            lease = daemon.claim(["d1"], owner="alice", ttl=0.002)
            deadline = time.monotonic() + 0.002
            while time.monotonic() < deadline - 0.0002:
                pass
            try:
                lease.renew(ttl=60)
            except ld.LeaseError:
                refusals += 1
                assert not lease.active
                continue
            successes += 1
            assert lease.active, "renew() succeeded on a lease that had expired"
            lease.release()
    assert successes + refusals == 300


# -- labd never changes a thread it did not create --------------------------------------------


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs per-thread CPU affinity and two CPUs",
)
def test_waiting_for_a_run_never_changes_the_waiters_cpu_affinity(daemon: ld.LabDaemon) -> None:
    """The old TaskHandle.wait pinned the waiting thread to one CPU while it slept."""
    waiter = threading.get_native_id()
    before = os.sched_getaffinity(0)

    class ReadWaiterAffinity:
        def __init__(self, task_id: str) -> None:
            self.task_id = task_id

        def run(self, context: ld.TaskContext) -> set[int]:
            context.sleep(0.05)  # let the waiter block in wait() first
            return os.sched_getaffinity(waiter)

    daemon.register_plugins(tasks={"ReadWaiterAffinity": ReadWaiterAffinity})
    for index in range(5):
        seen = daemon.execute_task(f"a{index}", "ReadWaiterAffinity").wait(WAIT_S)
        assert seen == before



# -- Ctrl+C while a run is being started -------------------------------------------------------


def test_ctrl_c_at_any_point_of_execute_task_leaves_no_run_or_claim_behind(
    daemon: ld.LabDaemon,
) -> None:
    """Real SIGINTs land at random points inside execute_task (claiming, recording, handing
    the run to a worker). Afterwards every run that exists ends, and no device stays owned:
    an interrupted start is abandoned (cancelled, its claim released), never left pending."""
    with SigintInjector(0.0002, once=True) as sigint, switch_every_bytecode():
        for index in range(20_000):  # until enough interrupts landed (bounded)
            if index >= 400 and sigint.landed >= 50:
                break
            try:
                sigint.armed = True
                daemon.execute_task(f"r{index}", "Quick")
                sigint.armed = False
            except KeyboardInterrupt:
                sigint.armed = False
    assert sigint.landed >= 50
    for handle in daemon.task_handles():
        with contextlib.suppress(ld.TaskCancelledError):
            handle.wait(WAIT_S)
    # The same, with devices to claim: afterwards both are free.
    with SigintInjector(0.0002, once=True) as sigint, switch_every_bytecode():
        for index in range(20_000):  # until enough interrupts landed (bounded)
            if index >= 400 and sigint.landed >= 50:
                break
            try:
                sigint.armed = True
                handle = daemon.execute_task(f"c{index}", "ClaimAndReturn", wait_for_devices=True)
                sigint.armed = False
                handle.wait(WAIT_S)
            except KeyboardInterrupt:
                sigint.armed = False
    assert sigint.landed >= 50
    for handle in daemon.task_handles():
        with contextlib.suppress(ld.TaskCancelledError):
            assert handle.wait(WAIT_S) in (None, "claimed", "done")
        assert not handle.is_running()
    assert daemon.owner_of("d1") is None and daemon.owner_of("d2") is None
    assert daemon.device_info("d1")["claims_waiting"] == []
