"""Ownership: task claims, the fair wait queue, child tasks, strict mode, remote actors, leases.

Every test synchronises with threading.Event handshakes and a recorded order of events;
bounded waits are watchdogs (WAIT_S) that only fire when something is broken.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import labd as ld
from labd.ownership import Actor, acting_as

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work
DEVICES = ("d1", "d2", "d3", "d4", "d5")
SINCE = re.compile(r"since \d\d:\d\d:\d\d UTC")


# -- fakes --------------------------------------------------------------------------------


class Dev:
    """A plain device: ``set_value`` is a command, ``get_value`` a query."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.value = 0

    def set_value(self, value: int) -> None:
        self.value = value

    def get_value(self) -> int:
        return self.value


class Log:
    """A thread-safe record of ``(what, task_id)`` events in the order they happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[str, str]] = []

    def add(self, what: str, task_id: str) -> None:
        with self._lock:
            self.events.append((what, task_id))

    def starts(self) -> list[str]:
        with self._lock:
            return [task_id for what, task_id in self.events if what == "start"]


def wait_gate(context: ld.TaskContext, gate: threading.Event) -> None:
    """Block until ``gate`` opens; give up on cancel (shutdown) or after the watchdog."""
    deadline = time.monotonic() + WAIT_S
    while not gate.wait(0.01):
        if context.cancel_event.is_set():
            raise ld.TaskCancelledError("cancelled while waiting at the gate")
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")


class Claimer:
    """Claims ``devices``; records start/end; waits at ``gate``; may command or fail."""

    def __init__(
        self,
        task_id: str,
        devices: list[str],
        log: Log,
        gate: threading.Event | None = None,
        started: threading.Event | None = None,
        fail: bool = False,
        command: int | None = None,
    ) -> None:
        self.task_id = task_id
        self.device_ids = list(devices)
        self.log = log
        self.gate = gate
        self.started = started
        self.fail = fail
        self.command = command

    def run(self, context: ld.TaskContext) -> dict[str, Any]:
        self.log.add("start", self.task_id)
        if self.command is not None:
            for device_id in self.device_ids:
                context.daemon.get_device(device_id).set_value(self.command)
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            wait_gate(context, self.gate)
        self.log.add("end", self.task_id)
        if self.fail:
            raise RuntimeError(f"{self.task_id} failed on purpose")
        return {"task_id": self.task_id}


class Parent:
    """Starts a child ``Claimer`` on its own device, waits for it, then commands the device.

    With ``go``, it waits for that gate (after setting ``started``) before starting the child.
    """

    def __init__(self, task_id: str, device: str, log: Log, child_gate: threading.Event,
                 child_started: threading.Event, started: threading.Event | None = None,
                 go: threading.Event | None = None) -> None:
        self.task_id = task_id
        self.device_ids = [device]
        self.device = device
        self.log = log
        self.child_gate = child_gate
        self.child_started = child_started
        self.started = started
        self.go = go

    def run(self, context: ld.TaskContext) -> dict[str, Any]:
        self.log.add("start", self.task_id)
        if self.started is not None:
            self.started.set()
        if self.go is not None:
            wait_gate(context, self.go)
        child = context.daemon.execute_task(
            "child", "Claimer", devices=[self.device], log=self.log, gate=self.child_gate,
            started=self.child_started, command=42,
        )
        child_result = child.wait(WAIT_S)
        context.daemon.get_device(self.device).set_value(7)
        self.log.add("end", self.task_id)
        return {"child": child_result}


def register(daemon: ld.LabDaemon, devices: tuple[str, ...] = DEVICES) -> None:
    daemon.register_plugins(devices={"Dev": Dev}, tasks={"Claimer": Claimer, "Parent": Parent})
    for device_id in devices:
        daemon.add_device(device_id, "Dev")


class EventWatch:
    """Collects ``daemon.events`` payloads and waits (bounded) for one that matches."""

    def __init__(self, daemon: ld.LabDaemon) -> None:
        self._cond = threading.Condition()
        self.seen: list[dict[str, Any]] = []
        self.sub = daemon.events.subscribe(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.seen.append(event)
            self._cond.notify_all()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next((e for e in self.seen if match(e)), None), WAIT_S
            )
        assert found is not None, f"no {what} event within {WAIT_S} s; saw {self.seen}"
        return found

    def close(self) -> None:
        self.sub.close()
        assert self.sub.join(WAIT_S)


@pytest.fixture
def bench(daemon: ld.LabDaemon) -> ld.LabDaemon:
    """A non-strict daemon with five plain devices d1..d5."""
    register(daemon)
    return daemon


@pytest.fixture
def strict() -> Iterator[ld.LabDaemon]:
    """A daemon with strict_ownership=True and devices d1..d5."""
    instance = ld.LabDaemon(strict_ownership=True)
    register(instance)
    yield instance
    instance.shutdown(timeout=2)


@pytest.fixture
def events(bench: ld.LabDaemon) -> Iterator[EventWatch]:
    watch = EventWatch(bench)
    yield watch
    watch.close()


def start_holder(daemon: ld.LabDaemon, task_id: str, devices: list[str], log: Log,
                 gate: threading.Event, **kw: Any) -> ld.TaskHandle:
    """Start a task that holds ``devices`` until ``gate`` opens; return once it runs."""
    started = threading.Event()
    handle = daemon.execute_task(task_id, "Claimer", devices=devices, log=log, gate=gate,
                                 started=started, **kw)
    assert started.wait(WAIT_S), f"{task_id} did not start"
    return handle


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a fresh thread; return its result or re-raise its exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="other-local-thread")
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the other thread hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# -- claims at execute_task ---------------------------------------------------------------


def test_conflicting_task_raises_busy_without_starting(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    first = start_holder(bench, "t1", ["d1"], log, gate)

    with pytest.raises(ld.DeviceBusyError) as info:
        bench.execute_task("t2", "Claimer", devices=["d2", "d1"], log=log)

    message = str(info.value)
    assert "'d1'" in message and "task 't1'" in message and SINCE.search(message), message
    assert "wait_for_devices=True" in message  # tells the caller what to do
    assert [(b["device_id"], b["owner_kind"], b["owner_id"]) for b in info.value.busy] == [
        ("d1", "task", "t1")
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", info.value.busy[0]["since"])
    assert isinstance(info.value, ld.DeviceError)
    assert log.starts() == ["t1"]  # run() of t2 never started
    assert bench.owner_of("d2") is None  # all or none: the free device was not taken
    with pytest.raises(ld.UnknownTaskError):
        bench.get_task("t2")  # its id stays free

    gate.set()
    assert first.wait(WAIT_S) == {"task_id": "t1"}
    assert bench.execute_task("t2", "Claimer", devices=["d2", "d1"], log=log).wait(WAIT_S)


def test_wait_for_devices_queues_as_pending_and_starts_after_the_owner(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    first = start_holder(bench, "t1", ["d1"], log, gate)

    second = bench.execute_task("t2", "Claimer", devices=["d1"], log=log, wait_for_devices=True)

    assert second.status == "pending" and second.is_running()
    assert bench.get_task("t2").info()["status"] == "pending"
    assert log.starts() == ["t1"]
    gate.set()
    assert second.wait(WAIT_S) == {"task_id": "t2"}
    first.wait(WAIT_S)
    assert log.events == [("start", "t1"), ("end", "t1"), ("start", "t2"), ("end", "t2")]
    assert bench.owner_of("d1") is None


def test_wait_for_devices_timeout_fails_the_run_with_busy_cause(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    first = start_holder(bench, "t1", ["d1"], log, gate)

    second = bench.execute_task("t2", "Claimer", devices=["d1"], log=log, wait_for_devices=0.2)

    with pytest.raises(ld.TaskFailedError) as info:
        second.wait(WAIT_S)
    cause = info.value.__cause__
    assert isinstance(cause, ld.DeviceBusyError), repr(cause)
    assert "'d1'" in str(cause) and "task 't1'" in str(cause) and "0.2" in str(cause)
    assert second.status == "failed"
    assert log.starts() == ["t1"]
    assert bench.owner_of("d1") == "task 't1'"  # the owner was not disturbed
    gate.set()
    first.wait(WAIT_S)


@pytest.mark.parametrize("bad", [0, -1, "yes", None])
def test_bad_wait_for_devices_is_refused_and_starts_nothing(bench: ld.LabDaemon, bad: Any) -> None:
    log = Log()
    with pytest.raises(ld.InvalidArgumentError, match="wait_for_devices"):
        bench.execute_task("t1", "Claimer", devices=["d1"], log=log, wait_for_devices=bad)
    assert log.starts() == [] and bench.list_tasks() == [] and bench.owner_of("d1") is None


def test_waiters_on_one_device_run_in_submission_order(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    first = start_holder(bench, "t0", ["d1"], log, gate)
    waiters = [
        bench.execute_task(f"w{i}", "Claimer", devices=["d1"], log=log, wait_for_devices=True)
        for i in (1, 2, 3)
    ]
    assert [w.status for w in waiters] == ["pending"] * 3

    gate.set()
    for handle in [first, *waiters]:
        handle.wait(WAIT_S)
    assert log.starts() == ["t0", "w1", "w2", "w3"]


def test_later_waiter_does_not_jump_ahead_of_an_overlapping_earlier_one(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    first = start_holder(bench, "t0", ["d1"], log, gate)
    w1 = bench.execute_task("w1", "Claimer", devices=["d1", "d2"], log=log, wait_for_devices=True)

    # d2 is free but reserved for w1, which waits for d1: w2 queues behind w1.
    w2 = bench.execute_task("w2", "Claimer", devices=["d2"], log=log, wait_for_devices=True)
    assert w2.status == "pending"
    with pytest.raises(ld.DeviceBusyError, match=r"'d2' is reserved by task 'w1'") as info:
        bench.execute_task("x", "Claimer", devices=["d2"], log=log)
    assert info.value.busy[0]["owner_kind"] == "pending"
    # A waiter that overlaps no earlier waiter is not held up by the queue.
    bench.execute_task("w3", "Claimer", devices=["d3"], log=log, wait_for_devices=True).wait(WAIT_S)
    assert log.starts() == ["t0", "w3"]

    gate.set()
    for handle in (first, w1, w2):
        handle.wait(WAIT_S)
    assert log.starts() == ["t0", "w3", "w1", "w2"]
    assert log.events.index(("end", "w1")) < log.events.index(("start", "w2"))


def test_cancelling_a_pending_run_removes_it_from_the_queue(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    first = start_holder(bench, "t0", ["d1"], log, gate)
    w1 = bench.execute_task("w1", "Claimer", devices=["d1", "d2"], log=log, wait_for_devices=True)
    w2 = bench.execute_task("w2", "Claimer", devices=["d2"], log=log, wait_for_devices=True)
    assert (w1.status, w2.status) == ("pending", "pending")

    w1.cancel()

    with pytest.raises(ld.TaskCancelledError):
        w1.wait(WAIT_S)
    assert w1.status == "cancelled"
    # w1's reservation of d2 is gone, so w2 starts while t0 still holds d1.
    assert w2.wait(WAIT_S) == {"task_id": "w2"}
    assert first.is_running()
    gate.set()
    first.wait(WAIT_S)
    assert log.starts() == ["t0", "w2"]  # the cancelled run never started
    assert bench.owner_of("d1") is None and bench.owner_of("d2") is None


# -- races ---------------------------------------------------------------------------------


class Exclusive:
    """Asserts, under a global lock, that no other running task holds any of its devices."""

    def __init__(self, task_id: str, devices: list[str], shared: dict[str, Any]) -> None:
        self.task_id = task_id
        self.device_ids = devices
        self.shared = shared

    def run(self, context: ld.TaskContext) -> str:
        holders, guard, violations = (self.shared[k] for k in ("holders", "guard", "violations"))
        with guard:
            for device_id in self.device_ids:
                if device_id in holders:
                    violations.append(f"{self.task_id} and {holders[device_id]} both hold {device_id}")
                holders[device_id] = self.task_id
                owner = context.daemon.owner_of(device_id)
                if owner != f"task {self.task_id!r}":
                    violations.append(f"{self.task_id}: owner_of({device_id}) is {owner}")
        time.sleep(0.0002)  # widen the window in which a double grant would show
        with guard:
            for device_id in self.device_ids:
                del holders[device_id]
        return self.task_id


def test_racing_claims_never_double_grant_and_never_deadlock(bench: ld.LabDaemon) -> None:
    bench.register_plugins(tasks={"Exclusive": Exclusive})
    shared: dict[str, Any] = {"holders": {}, "guard": threading.Lock(), "violations": []}
    errors: list[BaseException] = []
    counts = {"ran": 0, "busy": 0}
    count_lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        rng = random.Random(n)
        barrier.wait(WAIT_S)
        for i in range(30):
            devices = rng.sample(DEVICES, rng.randint(1, 3))
            wait = bool(i % 2)
            try:
                handle = bench.execute_task(f"r{n}-{i}", "Exclusive", devices=devices,
                                          shared=shared, wait_for_devices=wait)
                handle.wait(WAIT_S)
                key = "ran"
            except ld.DeviceBusyError:
                key = "busy"
            except BaseException as exc:
                errors.append(exc)
                return
            with count_lock:
                counts[key] += 1

    threads = [threading.Thread(target=worker, args=(n,), name=f"racer-{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    assert not any(t.is_alive() for t in threads), "claimers deadlocked (watchdog: 60 s)"
    assert errors == []
    assert shared["violations"] == []
    assert counts["ran"] + counts["busy"] == 8 * 30 and counts["ran"] >= 8 * 15
    assert all(bench.owner_of(d) is None for d in DEVICES)


@pytest.mark.fuzz
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sets(st.sampled_from(DEVICES), min_size=1, max_size=3), min_size=2, max_size=6))
def test_overlapping_waiters_start_in_submission_order(wanted: list[set[str]]) -> None:
    with ld.LabDaemon() as daemon:
        register(daemon)
        log, gate = Log(), threading.Event()
        blocker = start_holder(daemon, "blocker", list(DEVICES), log, gate)
        waiters = [
            daemon.execute_task(f"w{i}", "Claimer", devices=sorted(devices), log=log,
                                wait_for_devices=True)
            for i, devices in enumerate(wanted)
        ]
        assert all(w.status == "pending" for w in waiters)
        gate.set()
        for handle in [blocker, *waiters]:
            handle.wait(WAIT_S)
    order = log.starts()
    for i, earlier in enumerate(wanted):
        for j in range(i + 1, len(wanted)):
            if earlier & wanted[j]:
                assert order.index(f"w{i}") < order.index(f"w{j}"), (wanted, order)


# -- release -------------------------------------------------------------------------------


def test_a_failing_task_frees_its_devices_before_wait_returns(bench: ld.LabDaemon) -> None:
    log = Log()
    handle = bench.execute_task("t1", "Claimer", devices=["d1", "d2"], log=log, fail=True)

    with pytest.raises(ld.TaskFailedError) as info:
        handle.wait(WAIT_S)

    assert isinstance(info.value.__cause__, RuntimeError)
    assert bench.owner_of("d1") is None and bench.owner_of("d2") is None
    bench.execute_task("t2", "Claimer", devices=["d1", "d2"], log=log).wait(WAIT_S)


def test_a_cancelled_task_frees_its_devices_before_wait_returns(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    handle = start_holder(bench, "t1", ["d1"], log, gate)
    handle.cancel()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert bench.owner_of("d1") is None


# -- child tasks ---------------------------------------------------------------------------


def test_child_task_reclaims_and_commands_a_parent_device(strict: ld.LabDaemon) -> None:
    log, child_gate, child_started = Log(), threading.Event(), threading.Event()
    parent = strict.execute_task("parent", "Parent", device="d1", log=log,
                                 child_gate=child_gate, child_started=child_started)
    assert child_started.wait(WAIT_S)

    assert strict.owner_of("d1") == "task 'child'"
    assert strict.get_device("d1").get_value() == 42  # the child's command went through
    assert strict.get_task("child").info()["parent_id"] == "parent"
    with pytest.raises(ld.DeviceBusyError, match="task 'child'"):
        strict.execute_task("other", "Claimer", devices=["d1"], log=log)
    with pytest.raises(ld.DeviceBusyError):
        strict.get_device("d1").set_value(0)  # strict: this thread is not in the lineage

    child_gate.set()
    assert parent.wait(WAIT_S) == {"child": {"task_id": "child"}}
    assert strict.get_device("d1").get_value() == 7  # the parent commanded it after the child
    assert strict.owner_of("d1") is None
    assert log.starts() == ["parent", "child"]


def test_child_reclaims_a_parent_device_that_others_wait_for(bench: ld.LabDaemon) -> None:
    """A waiter queued on the parent's device must not block the parent's own child.

    The waiter cannot run before the parent ends, and the parent waits for the child,
    so refusing the child (or queueing it behind the waiter) would fail or deadlock.
    """
    log, started, go = Log(), threading.Event(), threading.Event()
    child_gate, child_started = threading.Event(), threading.Event()
    child_gate.set()
    parent = bench.execute_task("parent", "Parent", device="d1", log=log, child_gate=child_gate,
                                child_started=child_started, started=started, go=go)
    assert started.wait(WAIT_S)
    waiter = bench.execute_task("waiter", "Claimer", devices=["d1"], log=log,
                                wait_for_devices=True)
    assert waiter.status == "pending"

    go.set()

    assert parent.wait(WAIT_S) == {"child": {"task_id": "child"}}
    assert waiter.wait(WAIT_S) == {"task_id": "waiter"}
    assert log.starts() == ["parent", "child", "waiter"]
    assert log.events.index(("end", "parent")) < log.events.index(("start", "waiter"))


# -- commands and queries on owned devices -------------------------------------------------


@pytest.mark.parametrize("strict_mode", [False, True])
def test_queries_pass_and_local_commands_follow_strict_mode(strict_mode: bool) -> None:
    with ld.LabDaemon(strict_ownership=strict_mode) as daemon:
        register(daemon)
        log, gate = Log(), threading.Event()
        holder = start_holder(daemon, "t1", ["d1"], log, gate, command=5)
        device = daemon.get_device("d1")

        assert in_thread(device.get_value) == 5  # queries always pass
        assert device.get_value() == 5
        if strict_mode:
            with pytest.raises(ld.DeviceBusyError) as info:
                in_thread(lambda: device.set_value(9))
            message = str(info.value)
            assert "'d1'" in message and "task 't1'" in message and "'set_value'" in message
            assert SINCE.search(message)
            assert device.get_value() == 5  # the refused command never ran
        else:
            in_thread(lambda: device.set_value(9))
            assert device.get_value() == 9
        gate.set()
        holder.wait(WAIT_S)
        in_thread(lambda: device.set_value(1))  # free again: anyone may command it
        assert device.get_value() == 1


def test_remote_actor_is_refused_commands_even_in_non_strict_mode(bench: ld.LabDaemon) -> None:
    log, gate = Log(), threading.Event()
    holder = start_holder(bench, "t1", ["d1"], log, gate, command=5)
    remote = Actor(remote=True)

    with pytest.raises(ld.DeviceBusyError, match=r"'d1' is owned by task 't1'"):
        bench.call_device("d1", "set_value", [9], actor=remote)
    assert bench.call_device("d1", "get_value", actor=remote) == 5
    bench.call_device("d2", "set_value", [3], actor=remote)  # an unowned device is fine
    assert bench.get_device("d2").get_value() == 3
    assert bench.get_device_error("d1") is None  # a refusal is not a device error

    gate.set()
    holder.wait(WAIT_S)
    bench.call_device("d1", "set_value", [9], actor=remote)
    assert bench.get_device("d1").get_value() == 9


# -- leases --------------------------------------------------------------------------------


def test_lease_context_lets_the_holder_command_and_refuses_others(strict: ld.LabDaemon) -> None:
    device = strict.get_device("d1")
    with strict.claim(["d1"], owner="alice", ttl=30) as lease:
        assert lease.active and strict.leases() == [lease]
        assert strict.owner_of("d1") == f"lease {lease.lease_id!r} of 'alice'"
        device.set_value(1)  # this thread acts as alice
        strict.call_device("d1", "set_value", [2], actor=Actor(remote=True, principal="alice"))
        with pytest.raises(ld.DeviceBusyError, match="of 'alice'"):
            strict.call_device("d1", "set_value", [3], actor=Actor(remote=True, principal="bob"))
        with pytest.raises(ld.DeviceBusyError):
            in_thread(lambda: device.set_value(4))  # another local thread is not alice
        assert strict.call_device("d1", "get_value", actor=Actor(remote=True)) == 2
        with pytest.raises(ld.DeviceBusyError, match="'d1' is owned by lease"):
            strict.claim(["d1"], owner="bob", ttl=30)
    assert lease.status == "released" and strict.leases() == []
    assert strict.owner_of("d1") is None
    device.set_value(5)
    # Leaving the block restored this thread's actor: it is not alice for carol's lease.
    carol = strict.claim(["d1"], owner="carol")
    with pytest.raises(ld.DeviceBusyError, match="of 'carol'"):
        device.set_value(6)
    carol.release()
    assert device.get_value() == 5


def test_lease_renew_extends_the_expiry(bench: ld.LabDaemon, events: EventWatch) -> None:
    renewed = bench.claim(["d1"], owner="alice", ttl=0.3)
    first_expiry = renewed.expires_at
    assert first_expiry is not None
    renewed.renew(ttl=60)
    assert renewed.ttl == 60 and renewed.expires_at is not None
    assert renewed.expires_at > first_expiry + 30
    events.wait_for(lambda e: e["event"] == "lease_renewed", "lease_renewed")

    # A lease made after the renew, with the old ttl, expires later than the old deadline.
    # Deadlines fire in order, so if the renew had not moved the old one, d1 would be free now.
    probe = bench.claim(["d2"], owner="probe", ttl=0.3)
    events.wait_for(lambda e: e["event"] == "lease_expired"
                    and e["lease"]["lease_id"] == probe.lease_id, "probe lease_expired")
    assert renewed.active and bench.owner_of("d1") == renewed.label
    renewed.renew()  # default: the current ttl
    renewed.release()
    assert bench.owner_of("d1") is None


def test_lease_expiry_frees_the_device(bench: ld.LabDaemon, events: EventWatch) -> None:
    lease = bench.claim(["d1", "d2"], owner="alice", ttl=0.1)

    expired = events.wait_for(lambda e: e["event"] == "lease_expired", "lease_expired")

    assert expired["lease"]["lease_id"] == lease.lease_id
    assert expired["lease"]["status"] == "expired"
    assert lease.status == "expired" and not lease.active
    assert bench.owner_of("d1") is None and bench.owner_of("d2") is None and bench.leases() == []
    with pytest.raises(ld.LeaseError, match="expired"):
        lease.renew()
    bench.execute_task("t1", "Claimer", devices=["d1"], log=Log()).wait(WAIT_S)


def test_break_lease_frees_the_device_and_the_holder_cannot_renew(bench: ld.LabDaemon,
                                                                  events: EventWatch) -> None:
    lease = bench.claim(["d1"], owner="alice")
    assert lease.expires_at is None  # no ttl: held until released or broken

    bench.break_lease(lease.lease_id, reason="maintenance")

    assert bench.owner_of("d1") is None and lease.status == "broken"
    events.wait_for(lambda e: e["event"] == "lease_broken", "lease_broken")
    with pytest.raises(ld.LeaseError, match=r"broken.*maintenance"):
        lease.renew()
    with pytest.raises(ValueError, match="No active lease"):
        bench.break_lease(lease.lease_id)
    lease.release()  # idempotent, and does not change the recorded outcome
    assert lease.status == "broken"
    with pytest.raises(ld.LeaseError), lease:
        pass


@pytest.mark.parametrize(
    ("device_ids", "owner", "ttl", "error"),
    [
        ([], "alice", 30, ld.InvalidArgumentError),
        ("d1", "alice", 30, ld.InvalidArgumentError),
        (["d1", "nope"], "alice", 30, ld.UnknownDeviceError),
        ([1], "alice", 30, ld.UnknownDeviceError),
        (["d1"], "alice", 0, ld.InvalidArgumentError),
        (["d1"], "alice", -1, ld.InvalidArgumentError),
        (["d1"], "alice", "5", ld.InvalidArgumentError),
        (["d1"], "alice", True, ld.InvalidArgumentError),
        (["d1"], "", 30, ld.InvalidArgumentError),
        (["d1"], None, 30, ld.InvalidArgumentError),
    ],
)
def test_bad_claims_raise_clearly_and_change_nothing(
    bench: ld.LabDaemon, device_ids: Any, owner: Any, ttl: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        bench.claim(device_ids, owner=owner, ttl=ttl)
    assert isinstance(info.value, ValueError)  # old `except ValueError` code still works
    assert len(str(info.value)) > 20
    assert bench.leases() == [] and all(bench.owner_of(d) is None for d in DEVICES)


@pytest.mark.parametrize("bad_ttl", [0, -1, "soon", True])
def test_bad_renew_raises_and_leaves_the_lease_unchanged(
    bench: ld.LabDaemon, events: EventWatch, bad_ttl: Any
) -> None:
    lease = bench.claim(["d1"], owner="alice", ttl=0.3)
    expires_at, ttl = lease.expires_at, lease.ttl

    with pytest.raises(ValueError, match="ttl"):
        lease.renew(bad_ttl)

    assert (lease.expires_at, lease.ttl, lease.active) == (expires_at, ttl, True)
    # The original deadline still stands: the lease expires on time.
    events.wait_for(lambda e: e["event"] == "lease_expired", "lease_expired")
    assert bench.owner_of("d1") is None


def test_task_of_the_lease_holder_may_claim_the_leased_device(strict: ld.LabDaemon) -> None:
    log = Log()
    lease = strict.claim(["d1"], owner="alice")
    with acting_as(Actor(remote=True, principal="bob")), pytest.raises(
        ld.DeviceBusyError, match="of 'alice'"
    ):
        strict.execute_task("bobs", "Claimer", devices=["d1"], log=log, command=1)

    with acting_as(Actor(remote=True, principal="alice")):
        handle = strict.execute_task("alices", "Claimer", devices=["d1"], log=log, command=8)
    handle.wait(WAIT_S)

    assert strict.get_device("d1").get_value() == 8  # the task's commands passed
    assert strict.get_task("alices").info()["owner"] == "alice"
    assert strict.owner_of("d1") == lease.label  # the lease holds it again
    assert log.starts() == ["alices"]
    lease.release()


def test_a_task_started_inside_the_lease_block_may_claim_its_devices(strict: ld.LabDaemon) -> None:
    log = Log()
    with strict.claim(["d1"], owner="alice", ttl=30) as lease:
        handle = strict.execute_task("mine", "Claimer", devices=["d1"], log=log, command=3)
        handle.wait(WAIT_S)
        assert strict.owner_of("d1") == lease.label
    lease = strict.claim(["d1"], owner="alice")  # not entered: this thread is not alice
    with pytest.raises(ld.DeviceBusyError, match="of 'alice'"):
        strict.execute_task("not-mine", "Claimer", devices=["d1"], log=log)
    lease.release()
    assert strict.get_device("d1").get_value() == 3 and log.starts() == ["mine"]


def test_an_expiring_lease_hands_the_device_to_a_waiting_task(bench: ld.LabDaemon,
                                                              events: EventWatch) -> None:
    log = Log()
    lease = bench.claim(["d1"], owner="alice", ttl=0.1)
    waiting = bench.execute_task("t1", "Claimer", devices=["d1"], log=log, wait_for_devices=True)
    assert waiting.status == "pending"

    assert waiting.wait(WAIT_S) == {"task_id": "t1"}

    assert lease.status == "expired" and log.starts() == ["t1"]
    released = events.wait_for(lambda e: e["event"] == "devices_released"
                               and e["owner"] == lease.label, "devices_released by the lease")
    claimed = events.wait_for(lambda e: e["event"] == "devices_claimed"
                              and e["owner"] == "task 't1'", "devices_claimed by t1")
    assert events.seen.index(released) < events.seen.index(claimed)
    events.wait_for(lambda e: e["event"] == "lease_expired", "lease_expired")
