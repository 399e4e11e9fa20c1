"""Task runs: states, pause/resume, progress and data streams, cancellation, results, ids,
the retained-run buffer, child tasks, parameters and the worker threads underneath.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import labd as ld

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` until true (a watchdog, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        threading.Event().wait(0.002)


class Scripted:
    """A task driven by the test: it reports where it is and waits for ``gate`` when asked.

    ``script`` is a list of steps: ``"gate"`` (wait for the gate, ignoring cancel),
    ``"checkpoint"``, ``"resume_wait"`` (LabDaemon-style pause gate), ``"sleep"``
    (``context.sleep(60)``), ``"progress"``, ``"emit"``, ``"raise"``; then it returns ``result``.
    """

    def __init__(
        self,
        task_id: str,
        script: list[str] | None = None,
        result: Any = "ok",
        gate: threading.Event | None = None,
        device_ids: list[str] | None = None,
        log: list[str] | None = None,
        reached: dict[str, threading.Event] | None = None,
        contexts: list[ld.TaskContext] | None = None,
    ) -> None:
        self.task_id = task_id
        self.script = script or []
        self.result = result
        self.gate = gate or threading.Event()
        self.log = log if log is not None else []
        self.reached = reached if reached is not None else {}
        self.contexts = contexts if contexts is not None else []
        if device_ids is not None:
            self.device_ids = device_ids

    def _mark(self, step: str) -> None:
        self.log.append(step)
        event = self.reached.get(step)
        if event is not None:
            event.set()

    def run(self, context: ld.TaskContext) -> Any:
        self.contexts.append(context)
        self._mark("start")
        for index, step in enumerate(self.script):
            self._mark(f"before-{step}")
            if step == "gate":
                self.gate.wait(WAIT_S)
            elif step == "checkpoint":
                context.checkpoint()
            elif step == "resume_wait":
                context.resume_event.wait(WAIT_S)
            elif step == "sleep":
                context.sleep(60)
            elif step == "progress":
                context.progress(index + 1, len(self.script), f"step {index}")
            elif step == "emit":
                context.emit({"index": index})
            elif step == "raise":
                raise RuntimeError("boom in run")
            self._mark(f"after-{step}")
        return self.result


class Holder:
    """Claims a device until ``gate`` is set."""

    def __init__(self, task_id: str, device: str, gate: threading.Event) -> None:
        self.task_id = task_id
        self.device_ids = [device]
        self.gate = gate

    def run(self, context: ld.TaskContext) -> str:
        self.gate.wait(WAIT_S)
        return "held"


class Dummy:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def ping(self) -> str:
        return "pong"


@pytest.fixture
def daemon_t(daemon: ld.LabDaemon) -> ld.LabDaemon:
    daemon.register_plugins(
        devices={"Dummy": Dummy}, tasks={"Scripted": Scripted, "Holder": Holder}
    )
    daemon.add_device("dev1", "Dummy")
    daemon.add_device("dev2", "Dummy")
    return daemon


def status_in_list(daemon: ld.LabDaemon, task_id: str) -> str:
    return next(t["status"] for t in daemon.list_tasks() if t["task_id"] == task_id)


# -- states ----------------------------------------------------------------------------------


def test_running_then_completed(daemon_t: ld.LabDaemon) -> None:
    gate = threading.Event()
    started = threading.Event()
    handle = daemon_t.execute_task(
        "t1", "Scripted", script=["gate"], gate=gate, reached={"start": started}, result={"v": 1}
    )
    assert started.wait(WAIT_S)
    assert handle.status == "running" and status_in_list(daemon_t, "t1") == "running"
    assert handle.is_running() and not handle.is_paused()
    assert handle.result is None
    gate.set()
    assert handle.wait(WAIT_S) == {"v": 1}
    assert handle.status == "completed" and status_in_list(daemon_t, "t1") == "completed"
    assert not handle.is_running()
    info = daemon_t.get_task("t1").info()
    assert info["started_at"] and info["finished_at"] and info["running"] is False


def test_pending_while_waiting_for_devices_then_running(daemon_t: ld.LabDaemon) -> None:
    gate = threading.Event()
    holder = daemon_t.execute_task("holder", "Holder", device="dev1", gate=gate)
    waiter = daemon_t.execute_task(
        "waiter", "Scripted", device_ids=["dev1"], wait_for_devices=True, result="got it"
    )
    assert waiter.status == "pending" and status_in_list(daemon_t, "waiter") == "pending"
    assert waiter.is_running()  # pending counts as not finished
    gate.set()
    assert holder.wait(WAIT_S) == "held"
    assert waiter.wait(WAIT_S) == "got it"
    assert waiter.status == "completed"


def test_cancelling_a_pending_run_means_it_never_starts(daemon_t: ld.LabDaemon) -> None:
    gate = threading.Event()
    log: list[str] = []
    holder = daemon_t.execute_task("holder", "Holder", device="dev1", gate=gate)
    waiter = daemon_t.execute_task(
        "waiter", "Scripted", device_ids=["dev1"], wait_for_devices=True, log=log
    )
    waiter.cancel()
    assert waiter.status == "cancelled" and status_in_list(daemon_t, "waiter") == "cancelled"
    with pytest.raises(ld.TaskCancelledError):
        waiter.wait(WAIT_S)
    gate.set()
    holder.wait(WAIT_S)
    assert log == []


def test_failed_when_run_raises(daemon_t: ld.LabDaemon) -> None:
    handle = daemon_t.execute_task("t1", "Scripted", script=["raise"])
    with pytest.raises(ld.TaskFailedError, match=r"^Task 't1' failed during execution\. Scripted failed: boom in run") as info:
        handle.wait(WAIT_S)
    original = handle.exception()
    assert isinstance(original, RuntimeError) and str(original) == "boom in run"
    assert info.value.__cause__ is original
    assert handle.status == "failed" and status_in_list(daemon_t, "t1") == "failed"
    record = daemon_t.get_task_error("t1")
    assert record is not None and record.origin == "task" and record.type == "RuntimeError"
    assert record.traceback is not None and "boom in run" in record.traceback
    assert record.context == {"task_id": "t1", "task_type": "Scripted"}
    assert daemon_t.list_tasks()[0]["error"]["message"] == "boom in run"
    daemon_t.clear_task_error("t1")
    assert daemon_t.get_task_error("t1") is None
    assert handle.exception() is original  # clearing the record keeps the exception


def test_returned_status_failed_sets_the_state(daemon_t: ld.LabDaemon) -> None:
    result = {"status": "failed", "error": "laser lost lock", "results": [1, 2]}
    handle = daemon_t.execute_task("t1", "Scripted", result=result)
    with pytest.raises(ld.TaskFailedError, match="laser lost lock") as info:
        handle.wait(WAIT_S)
    assert info.value.result == result and info.value.__cause__ is None
    assert handle.status == "failed" and handle.result == result
    assert handle.exception() is None
    record = daemon_t.get_task_error("t1")
    assert record is not None and record.message == "laser lost lock"


def test_returned_status_cancelled_sets_the_state(daemon_t: ld.LabDaemon) -> None:
    result = {"status": "cancelled", "results": [1]}
    handle = daemon_t.execute_task("t1", "Scripted", result=result)
    with pytest.raises(ld.TaskCancelledError) as info:
        handle.wait(WAIT_S)
    assert info.value.result == result
    assert handle.status == "cancelled" and handle.result == result


def test_wait_timeout_raises_timeout_error_and_leaves_the_run_alone(daemon_t: ld.LabDaemon) -> None:
    gate = threading.Event()
    handle = daemon_t.execute_task("t1", "Scripted", script=["gate"], gate=gate)
    with pytest.raises(TimeoutError, match="'t1'"):
        handle.wait(timeout=0.01)
    assert handle.is_running()
    gate.set()
    assert handle.wait(WAIT_S) == "ok"


# -- pause / resume ---------------------------------------------------------------------------


def test_pause_blocks_at_checkpoint_and_resume_continues(daemon_t: ld.LabDaemon) -> None:
    go = threading.Event()
    entering = threading.Event()
    log: list[str] = []
    handle = daemon_t.execute_task(
        "t1",
        "Scripted",
        script=["gate", "checkpoint"],
        gate=go,
        log=log,
        reached={"before-checkpoint": entering},
    )
    handle.pause()
    assert handle.is_paused()
    assert handle.status == "paused" and status_in_list(daemon_t, "t1") == "paused"
    assert daemon_t.list_tasks()[0]["paused"] is True
    go.set()
    assert entering.wait(WAIT_S)
    assert "after-checkpoint" not in log
    handle.resume()
    assert not handle.is_paused() and handle.status in ("running", "completed")
    assert handle.wait(WAIT_S) == "ok"
    assert log[-1] == "after-checkpoint"


def test_pause_closes_the_resume_event_gate(daemon_t: ld.LabDaemon) -> None:
    go = threading.Event()
    started = threading.Event()
    contexts: list[ld.TaskContext] = []
    handle = daemon_t.execute_task(
        "t1",
        "Scripted",
        script=["gate", "resume_wait"],
        gate=go,
        contexts=contexts,
        reached={"start": started},
    )
    assert started.wait(WAIT_S)
    [instance_context] = contexts
    assert instance_context.resume_event.is_set()
    handle.pause()
    assert not instance_context.resume_event.is_set()
    handle.resume()
    assert instance_context.resume_event.is_set()
    go.set()
    assert handle.wait(WAIT_S) == "ok"


def test_cancel_opens_the_pause_gate(daemon_t: ld.LabDaemon) -> None:
    go = threading.Event()
    entering = threading.Event()
    handle = daemon_t.execute_task(
        "t1",
        "Scripted",
        script=["gate", "checkpoint"],
        gate=go,
        reached={"before-checkpoint": entering},
    )
    handle.pause()
    go.set()
    assert entering.wait(WAIT_S)
    handle.cancel()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert handle.status == "cancelled" and not handle.is_paused()


def test_pause_and_resume_after_the_end_change_nothing(daemon_t: ld.LabDaemon) -> None:
    handle = daemon_t.execute_task("t1", "Scripted")
    assert handle.wait(WAIT_S) == "ok"
    handle.pause()
    assert not handle.is_paused() and handle.status == "completed"
    handle.resume()
    assert handle.status == "completed"


# -- progress and data stream ----------------------------------------------------------------


def test_progress_and_emit_reach_subscribers(daemon_t: ld.LabDaemon) -> None:
    go = threading.Event()
    finished = threading.Event()
    events: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "finished":
            finished.set()

    handle = daemon_t.execute_task("t1", "Scripted", script=["gate", "progress", "emit"], gate=go)
    subscription = handle.subscribe(on_event)
    try:
        go.set()
        assert handle.wait(WAIT_S) == "ok"
        assert finished.wait(WAIT_S), f"no 'finished' event; got {events}"
    finally:
        subscription.close()
    kinds = [e["event"] for e in events]
    assert kinds == ["progress", "data", "state", "finished"]
    progress = events[0]
    assert progress["task_id"] == "t1"
    assert (progress["done"], progress["total"], progress["message"]) == (2, 3, "step 1")
    assert progress["fraction"] == pytest.approx(2 / 3)
    assert events[1]["data"] == {"index": 2}
    assert events[2]["status"] == "completed" and events[3]["status"] == "completed"
    assert handle.progress == {
        "done": 2,
        "total": 3,
        "fraction": pytest.approx(2 / 3),
        "message": "step 1",
    }
    assert subscription.delivered == 4 and subscription.dropped == 0


def test_progress_without_subscribers_is_kept_on_the_handle(daemon_t: ld.LabDaemon) -> None:
    handle = daemon_t.execute_task("t1", "Scripted", script=["progress"])
    handle.wait(WAIT_S)
    assert handle.progress is not None and handle.progress["done"] == 1
    assert daemon_t.list_tasks()[0]["progress"]["fraction"] == 1.0


# -- cancellation ------------------------------------------------------------------------------


def test_context_sleep_is_cancellable(daemon_t: ld.LabDaemon) -> None:
    sleeping = threading.Event()
    log: list[str] = []
    handle = daemon_t.execute_task(
        "t1", "Scripted", script=["sleep"], log=log, reached={"before-sleep": sleeping}
    )
    assert sleeping.wait(WAIT_S)
    handle.cancel()
    with pytest.raises(ld.TaskCancelledError, match="'t1'"):
        handle.wait(WAIT_S)  # far less than the 60 s sleep
    assert handle.status == "cancelled"
    assert "after-sleep" not in log
    assert daemon_t.get_task_error("t1") is None  # a cancel is not an error


def test_checkpoint_raises_when_cancelled(daemon_t: ld.LabDaemon) -> None:
    go = threading.Event()
    log: list[str] = []
    handle = daemon_t.execute_task(
        "t1", "Scripted", script=["gate", "checkpoint"], gate=go, log=log
    )
    handle.cancel()
    go.set()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert "after-checkpoint" not in log and handle.status == "cancelled"


def test_cancel_after_finish_is_a_no_op_and_wait_still_returns(daemon_t: ld.LabDaemon) -> None:
    handle = daemon_t.execute_task("t1", "Scripted", result={"results": [1, 2, 3]})
    assert handle.wait(WAIT_S) == {"results": [1, 2, 3]}
    handle.cancel()
    assert handle.status == "completed"
    assert handle.wait(WAIT_S) == {"results": [1, 2, 3]}
    assert daemon_t.get_task("t1").wait(0) == {"results": [1, 2, 3]}


def test_run_that_returns_plain_value_after_cancel_is_cancelled(daemon_t: ld.LabDaemon) -> None:
    # A LabDaemon-style task that sees cancel_event and just returns what it has.
    go = threading.Event()
    handle = daemon_t.execute_task("t1", "Scripted", script=["gate"], gate=go, result=[1, 2])
    handle.cancel()
    go.set()
    with pytest.raises(ld.TaskCancelledError) as info:
        handle.wait(WAIT_S)
    assert info.value.result == [1, 2] and handle.result == [1, 2]


# -- ids and the retained-run buffer ------------------------------------------------------------


def test_generated_task_ids_are_unique(daemon_t: ld.LabDaemon) -> None:
    handles = [daemon_t.execute_task(None, "Scripted") for _ in range(10)]
    handles += [
        daemon_t.execute_task(
            None, "Holder", device="dev2", gate=_set_event(), wait_for_devices=True
        )
        for _ in range(3)
    ]
    ids = [h.task_id for h in handles]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("Scripted-") for i in ids[:10])
    for handle in handles:
        handle.wait(WAIT_S)


def test_generated_ids_skip_ids_already_used(daemon_t: ld.LabDaemon) -> None:
    daemon_t.execute_task("Scripted-1", "Scripted").wait(WAIT_S)
    handle = daemon_t.execute_task(None, "Scripted")
    assert handle.task_id != "Scripted-1"
    handle.wait(WAIT_S)


def test_generated_ids_are_unique_across_threads(daemon_t: ld.LabDaemon) -> None:
    ids: list[str] = []
    lock = threading.Lock()

    def start_five() -> None:
        for _ in range(5):
            handle = daemon_t.execute_task(None, "Scripted")
            with lock:
                ids.append(handle.task_id)

    threads = [threading.Thread(target=start_five) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert len(ids) == 20 and len(set(ids)) == 20
    for task_id in ids:
        daemon_t.get_task(task_id).wait(WAIT_S)


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def test_completed_task_buffer_evicts_only_the_oldest_finished_runs() -> None:
    with ld.LabDaemon(completed_task_buffer=2) as daemon:
        daemon.register_plugins(tasks={"Scripted": Scripted})
        gate = threading.Event()
        long_run = daemon.execute_task("long", "Scripted", script=["gate"], gate=gate)
        for n in range(1, 5):
            daemon.execute_task(f"q{n}", "Scripted").wait(WAIT_S)
        assert [t["task_id"] for t in daemon.list_tasks()] == ["long", "q3", "q4"]
        with pytest.raises(ld.UnknownTaskError, match=r"'q1'.*last 2 finished.*'long', 'q3', 'q4'"):
            daemon.get_task("q1")
        assert daemon.get_task("long").is_running()
        # An evicted id is free again.
        daemon.execute_task("q1", "Scripted").wait(WAIT_S)
        assert [t["task_id"] for t in daemon.list_tasks()] == ["long", "q4", "q1"]
        gate.set()
        long_run.wait(WAIT_S)
        # Oldest first by creation; q4 was the oldest finished run, so it went.
        assert [t["task_id"] for t in daemon.list_tasks()] == ["long", "q1"]
        # A handle keeps working after its run was evicted.
        daemon.execute_task("q5", "Scripted").wait(WAIT_S)
        assert long_run.wait(0) == "ok" and long_run.status == "completed"


def test_completed_task_buffer_zero_keeps_no_finished_runs() -> None:
    with ld.LabDaemon(completed_task_buffer=0) as daemon:
        daemon.register_plugins(tasks={"Scripted": Scripted})
        handle = daemon.execute_task("t1", "Scripted")
        assert handle.wait(WAIT_S) == "ok"
        assert daemon.list_tasks() == []  # trimmed before wait() returned
        with pytest.raises(ld.UnknownTaskError):
            daemon.get_task("t1")


# -- child tasks --------------------------------------------------------------------------------


class Parent:
    def __init__(self, task_id: str, child_type: str = "Scripted") -> None:
        self.task_id = task_id
        self.device_ids = ["dev1", "dev2"]
        self.child_type = child_type

    def run(self, context: ld.TaskContext) -> Any:
        child = context.daemon.execute_task(
            f"{self.task_id}-child", self.child_type, device_ids=["dev1"], result="child ok"
        )
        return {"child": child.wait(WAIT_S), "parent_id": child.info()["parent_id"]}


def test_child_task_may_claim_devices_its_parent_owns(daemon_t: ld.LabDaemon) -> None:
    daemon_t.register_plugins(tasks={"Parent": Parent})
    handle = daemon_t.execute_task("p1", "Parent")
    assert handle.wait(WAIT_S) == {"child": "child ok", "parent_id": "p1"}
    assert daemon_t.owner_of("dev1") is None and daemon_t.owner_of("dev2") is None


def test_unrelated_task_may_not_claim_a_device_owned_by_another(daemon_t: ld.LabDaemon) -> None:
    gate = threading.Event()
    holder = daemon_t.execute_task("holder", "Holder", device="dev1", gate=gate)
    with pytest.raises(ld.DeviceBusyError, match=r"'dev1'.*task 'holder'"):
        daemon_t.execute_task("other", "Scripted", device_ids=["dev1"])
    gate.set()
    holder.wait(WAIT_S)


# -- parameters ---------------------------------------------------------------------------------


class Tunable:
    def __init__(self, task_id: str, gain: float = 1.0) -> None:
        self.task_id = task_id
        self.params = {"gain": gain}
        self.changed = threading.Event()

    def set_parameter(self, key: str, value: Any) -> None:
        if key not in self.params:
            raise KeyError(f"unknown parameter {key!r}")
        self.params[key] = value
        self.changed.set()

    def get_parameter(self, key: str) -> Any:
        return self.params[key]

    def run(self, context: ld.TaskContext) -> Any:
        self.changed.wait(WAIT_S)
        return self.params["gain"]


def test_set_and_get_parameter_while_running(daemon_t: ld.LabDaemon) -> None:
    daemon_t.register_plugins(tasks={"Tunable": Tunable})
    handle = daemon_t.execute_task("t1", "Tunable", gain=2.0)
    assert handle.get_parameter("gain") == 2.0
    with pytest.raises(KeyError, match="nope"):
        handle.set_parameter("nope", 1)
    handle.set_parameter("gain", 5.0)
    assert handle.get_parameter("gain") == 5.0
    assert handle.wait(WAIT_S) == 5.0


def test_parameters_on_a_task_without_them_raise_task_error(daemon_t: ld.LabDaemon) -> None:
    handle = daemon_t.execute_task("t1", "Scripted")
    with pytest.raises(ld.TaskError, match=r"'t1'.*no set_parameter"):
        handle.set_parameter("x", 1)
    with pytest.raises(ld.TaskError, match=r"'t1'.*no get_parameter"):
        handle.get_parameter("x")
    handle.wait(WAIT_S)


# -- worker threads -----------------------------------------------------------------------------


class RecordIdent:
    def __init__(self, task_id: str, idents: list[int]) -> None:
        self.task_id = task_id
        self.idents = idents

    def run(self, context: ld.TaskContext) -> None:
        self.idents.append(threading.get_ident())


def test_worker_threads_are_reused(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(tasks={"RecordIdent": RecordIdent})
    idents: list[int] = []
    for _ in range(50):
        daemon.execute_task(None, "RecordIdent", idents=idents).wait(WAIT_S)
    assert len(idents) == 50
    # Runs are sequential, so at most the previous worker can still be busy at each start.
    assert len(set(idents)) <= 5, f"{len(set(idents))} threads for 50 sequential runs"


class WaitShared:
    def __init__(self, task_id: str, gate: threading.Event, started: threading.Semaphore) -> None:
        self.task_id = task_id
        self.gate = gate
        self.started = started

    def run(self, context: ld.TaskContext) -> str:
        self.started.release()
        self.gate.wait(WAIT_S)
        return self.task_id


def test_many_long_tasks_run_at_once(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(tasks={"WaitShared": WaitShared})
    gate = threading.Event()
    started = threading.Semaphore(0)
    handles = [
        daemon.execute_task(f"w{n}", "WaitShared", gate=gate, started=started) for n in range(20)
    ]
    try:
        for n in range(20):
            assert started.acquire(timeout=WAIT_S), f"only {n} of 20 tasks started"
        assert [h.status for h in handles] == ["running"] * 20
        assert sum(t["status"] == "running" for t in daemon.list_tasks()) == 20
    finally:
        gate.set()
    assert [h.wait(WAIT_S) for h in handles] == [f"w{n}" for n in range(20)]
