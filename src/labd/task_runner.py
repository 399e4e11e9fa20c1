"""The task runner: one part of :class:`labd.LabDaemon` (DESIGN.md section 5).

It starts runs (constructs the task, claims its devices through the ownership registry,
hands ``TaskRun.execute`` to a worker), keeps the table of live and retained runs, answers
history queries (from the run store when there is one), and at shutdown stops taking runs,
cancels the ones it has and waits for them. It is each run's :class:`~labd.tasks.RunHost`.

    runner = TaskRunner(daemon=facade, claims=claims, devices=devices, store=store, ...)
    handle = runner.start(cls, "sweep1", "WavelengthSweep", params, wait=False)
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from labd.constructors import construct_task
from labd.device_table import DeviceTable, check_id
from labd.errors import (
    DaemonClosedError,
    DeviceBusyError,
    ErrorRecord,
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownTaskError,
    describe_choices,
)
from labd.ownership import ClaimRegistry, PendingClaim, current_actor
from labd.secrets import redact
from labd.store import RunStore
from labd.streaming import StreamHub
from labd.tasks import TaskHandle, TaskRun, TaskState

__all__ = ["TaskRunner"]

Job = Callable[[], None]


class TaskRunner:
    """Runs tasks; owns the run table and the retained-run buffer."""

    def __init__(
        self,
        *,
        daemon: Any,
        claims: ClaimRegistry,
        devices: DeviceTable,
        store: RunStore | None,
        submit: Callable[[Job], None],
        events: StreamHub,
        on_task_error: Callable[[ErrorRecord], None],
        completed_task_buffer: int,
    ) -> None:
        self._daemon = daemon  # what tasks see as context.daemon
        self._claims = claims
        self._devices = devices
        self._store = store
        self._submit = submit
        self._events = events
        self._on_task_error = on_task_error
        self.completed_task_buffer = completed_task_buffer
        self._lock = threading.RLock()
        self._runs: dict[str, TaskRun] = {}
        self._finished: deque[str] = deque()
        self._auto_ids = itertools.count(1)
        self._closed = False

    # -- starting runs -----------------------------------------------------------------------
    def start(
        self, cls: Any, task_id: str | None, task_type: str, params: dict[str, Any],
        wait: bool | float,
    ) -> TaskHandle:
        """Construct, claim and start one run (``LabDaemon.execute_task`` after validation)."""
        if task_id is None:
            task_id = self._generate_task_id(task_type)
        check_id(task_id, "task id")
        self._check_task_id_free(task_id)
        instance = _construct_task(cls, task_id, task_type, params)
        device_ids = self._task_device_ids(instance, task_id)
        actor = current_actor()
        principal = actor.principal or (actor.run.principal if actor.run is not None else None)
        run = TaskRun(self._daemon, self, task_id, task_type, instance, params, device_ids,
                      actor.run, principal)
        registered = False
        try:
            with self._lock:
                # Checked under the lock close() takes: a run registered here is one
                # shutdown will cancel and wait for; a later call gets DaemonClosedError.
                if self._closed:
                    raise DaemonClosedError("This LabDaemon has been shut down; create a new one.")
                self._check_task_id_free(task_id)
                registered = True  # before the insert: over-cleaning beats a ghost run
                self._runs[task_id] = run
            if isinstance(actor.run, TaskRun):
                actor.run.adopt(run)  # a cancel of the parent reaches this run
            self._claim_for(run, wait)
        except DeviceBusyError:
            # Refused (all or none): it holds nothing and never existed for anyone else.
            self._forget(run)
            run.done_event.set()
            raise
        except BaseException:
            if registered:
                # A closed pool, or Ctrl+C anywhere after registering: the run ends cancelled
                # with no device held and no waiter queued, unless a worker already has it.
                run.abandon()
                if run.started_at is None:  # it never ran: forget it, its id is free again
                    self._claims.withdraw(run)  # a claim queued before we learnt of it
                    self._forget(run)
            raise
        return TaskHandle(run)

    def _forget(self, run: TaskRun) -> None:
        with self._lock:
            if self._runs.get(run.task_id) is run:
                del self._runs[run.task_id]

    def _claim_for(self, run: TaskRun, wait: float | bool) -> None:
        if run.device_ids and wait is False:
            self._claims.claim(
                run, run.device_ids,
                "Cancel the task that owns it, wait for it, or pass wait_for_devices=True.",
            )
        elif run.device_ids:
            self._record_created(run)  # before another thread can grant the claim
            pending = self._claims.claim_or_queue(
                run, run.device_ids, functools.partial(self._hand_to_worker, run),
                run.fail_pending, None if wait is True else float(wait),
            )
            if pending is not None:
                run.pending_claim = pending
                self.state_changed(run)
                return
            self._start_or_refuse(run)
            return
        self._record_created(run)
        self._start_or_refuse(run)

    def _hand_to_worker(self, run: TaskRun) -> bool:
        """Hand ``run`` to a worker; if the daemon closed meanwhile, the run ends cancelled."""
        try:
            self._submit(run.execute)
        except RuntimeError:  # the pool closed: shutdown got here first
            run.cancel_event.set()
            run.execute()  # sees the cancel at once: finishes cancelled, releases its devices
            return False
        return True

    def _start_or_refuse(self, run: TaskRun) -> None:
        if not self._hand_to_worker(run):
            raise DaemonClosedError(
                f"Task {run.task_id!r} was not started: this LabDaemon was shut down meanwhile; "
                "create a new one."
            )

    def _record_created(self, run: TaskRun) -> None:
        store = self._store
        if store is None:
            return
        run.uid = store.new_uid()
        run.recorder = store
        store.run_created(run.uid, {
            "task_id": run.task_id, "task_type": run.task_type, "status": run.state.value,
            "params": redact(run.params),  # never stored in clear (labd.secrets)
            "device_ids": list(run.device_ids), "owner": run.principal,
            "parent_id": run.parent.owner_id if run.parent is not None else None,
            "created_at": run.created_at,
        })

    def _generate_task_id(self, task_type: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_\-.:]", "_", task_type)[:100] or "task"
        while True:
            candidate = f"{base}-{next(self._auto_ids)}"
            if candidate not in self._runs:
                return candidate

    def _check_task_id_free(self, task_id: str) -> None:
        existing = self._runs.get(task_id)
        if existing is not None:
            # LabDaemon's own words first (its users' code matches on them), then labd's.
            said = (f"Task ID '{task_id}' has been used recently." if existing.state.finished
                    else f"Task with ID '{task_id}' is already running.")
            raise InvalidArgumentError(
                f"{said} It names a {existing.state.value} run of {existing.task_type}; task ids "
                "are unique among live and retained runs: pick another id or pass task_id=None "
                "to generate one."
            )

    def _task_device_ids(self, instance: Any, task_id: str) -> tuple[str, ...]:
        raw = getattr(instance, "device_ids", None)
        if raw is None:
            return ()
        if not isinstance(raw, list | tuple) or not all(isinstance(d, str) for d in raw):
            raise InvalidArgumentError(
                f"Task {task_id!r}: device_ids must be a list of device id strings, got {raw!r}."
            )
        unknown = self._devices.unknown(raw)
        if unknown:
            raise UnknownDeviceError(
                f"Task {task_id!r} claims unknown device(s) {describe_choices(unknown)}. "
                f"Devices: {describe_choices(self._devices.ids())}."
            )
        return tuple(dict.fromkeys(raw))

    # -- RunHost: what each run asks of its runner ---------------------------------------------
    def drain_devices(self, device_ids: Sequence[str]) -> None:
        """Wait until calls already inside these devices have returned."""
        self._devices.drain(device_ids)

    def release(self, run: TaskRun) -> None:
        """Give back every device ``run`` claimed."""
        self._claims.release(run)

    def cancel_pending(self, claim: PendingClaim) -> bool:
        """Take a queued claim out of the FIFO."""
        return self._claims.cancel_pending(claim)

    def state_changed(self, run: TaskRun) -> None:
        """Publish a run's new state; a failure also goes to the error listeners."""
        events = self._events
        if events.subscriptions or events.keeps_history:
            events.publish({"event": "task_state", "task_id": run.task_id,
                            "task_type": run.task_type, "status": run.state.value})
        if run.state is TaskState.FAILED and run.error is not None:
            self._on_task_error(run.error)

    def run_finished(self, run: TaskRun) -> None:
        """Retention: keep the last ``completed_task_buffer`` finished runs."""
        with self._lock:
            self._finished.append(run.task_id)
            while len(self._finished) > self.completed_task_buffer:
                old = self._finished.popleft()
                victim = self._runs.get(old)
                if victim is not None and victim.state.finished:
                    del self._runs[old]

    # -- the run table -----------------------------------------------------------------------
    def run(self, task_id: str) -> TaskRun:
        """A live or retained run, or :class:`UnknownTaskError` naming the ones there are."""
        run = self._runs.get(task_id) if isinstance(task_id, str) else None
        if run is None:
            raise UnknownTaskError(
                f"No task run with id {task_id!r} (live or among the last "
                f"{self.completed_task_buffer} finished). Runs: {describe_choices(self._runs)}."
            )
        return run

    def find(self, task_id: str) -> TaskRun | None:
        """The run with that id, or None."""
        return self._runs.get(task_id) if isinstance(task_id, str) else None

    def all_runs(self) -> list[TaskRun]:
        """Live and retained runs, oldest first."""
        with self._lock:
            return list(self._runs.values())

    def history(
        self, status: str | None, task_type: str | None, since: float | None,
        limit: int, offset: int,
    ) -> list[dict[str, Any]]:
        """Run summaries, newest first: from the run store, or the retained runs without one."""
        if not isinstance(limit, int) or limit < 1 or limit > 10_000:
            raise InvalidArgumentError(f"limit must be an integer from 1 to 10000, got {limit!r}")
        if not isinstance(offset, int) or offset < 0:
            raise InvalidArgumentError(f"offset must be an integer >= 0, got {offset!r}")
        if status is not None and status not in {s.value for s in TaskState}:
            raise InvalidArgumentError(
                f"Unknown status {status!r}; valid: {describe_choices(s.value for s in TaskState)}."
            )
        if self._store is not None:
            self._store.flush(timeout=2.0)
            return self._store.runs(status=status, task_type=task_type, since=since,
                                    limit=limit, offset=offset)
        runs = [r for r in reversed(self.all_runs())
                if (status is None or r.state.value == status)
                and (task_type is None or r.task_type == task_type)
                and (since is None or r.created_at >= since)]
        return [r.info() for r in runs[offset:offset + limit]]

    def record(self, task_id: str) -> dict[str, Any]:
        """The full record of a run (``result`` and ``events`` included), live or historical."""
        if self._store is not None:
            self._store.flush(timeout=2.0)
            found = self._store.get_run(task_id)
            if found is not None:
                return found
        run = self.find(task_id)
        if run is None:
            where = "in the run store" if self._store is not None else "(no run store configured)"
            raise UnknownTaskError(f"No run with id {task_id!r} {where}.")
        return {**run.info(), "result": run.result, "events": []}

    # -- shutdown ------------------------------------------------------------------------------
    def close(self) -> list[TaskRun]:
        """Take no more runs; return every run registered so far (to cancel and wait for)."""
        with self._lock:
            self._closed = True
            return list(self._runs.values())

    @staticmethod
    def wait_for(runs: list[TaskRun], deadline: float) -> list[str]:
        """Wait until ``deadline`` (monotonic) for ``runs`` to end; ids of those still going."""
        late = []
        for run in runs:
            if not run.done_event.wait(max(deadline - time.monotonic(), 0.0)):
                late.append(run.task_id)
        return late

    def close_streams(self, timeout: float) -> None:
        """End every run's stream: a subscriber that never called close() must not keep a thread."""
        deadline = time.monotonic() + timeout
        for run in self.all_runs():
            run.close_stream(max(deadline - time.monotonic(), 0.0))


def _construct_task(cls: Any, task_id: str, task_type: str, params: dict[str, Any]) -> Any:
    instance = construct_task(cls, task_id, task_type, params)
    if not callable(getattr(instance, "run", None)):
        raise InvalidArgumentError(
            f"Task type {task_type!r}: the object built by {cls!r} has no run(context) method."
        )
    return instance
