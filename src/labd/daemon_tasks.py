"""The task half of :class:`labd.LabDaemon`: start runs, claim their devices, history."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from labd.daemon_core import DaemonCore, _check_wait, check_id
from labd.errors import (
    DaemonClosedError,
    ErrorRecord,
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownTaskError,
    describe_choices,
)
from labd.ownership import (
    current_actor,
)
from labd.store import RunStore
from labd.streaming import DEFAULT_MAXSIZE, Subscription
from labd.tasks import TaskHandle, TaskRun, TaskState

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["TaskOps"]


class TaskOps(DaemonCore):
    """Task methods of :class:`labd.LabDaemon` (LabDaemon 1.0 names plus labd's)."""

    def execute_task(
        self,
        task_id: str | None,
        task_type: str,
        *,
        wait_for_devices: bool | float = False,
        **params: Any,
    ) -> TaskHandle:
        """Start ``task_type(task_id=..., **params).run(context)`` on a background thread.

        Claims every device in the task's ``device_ids`` first, all or none: if one is owned
        by someone else this raises :class:`DeviceBusyError` and nothing starts, unless
        ``wait_for_devices`` is True (wait in a fair queue) or a number of seconds (wait that
        long, then fail the run). ``task_id=None`` generates an id.
        """
        self._check_open()
        cls = self.task_class(task_type)
        if task_id is None:
            task_id = self._generate_task_id(task_type)
        check_id(task_id, "task id")
        wait = _check_wait(wait_for_devices)
        self._check_task_id_free(task_id)
        instance = self._construct_task(cls, task_id, task_type, params)
        device_ids = self._task_device_ids(instance, task_id)
        actor = current_actor()
        principal = actor.principal or (actor.run.principal if actor.run is not None else None)
        run = TaskRun(cast("LabDaemon", self), task_id, task_type, instance, params, device_ids, actor.run,
                      principal, self._run_state_changed)
        with self._lock:
            # Checked under the lock shutdown() closes the daemon with: a run registered here
            # is one shutdown will cancel and wait for; a later call gets DaemonClosedError.
            self._check_open()
            self._check_task_id_free(task_id)
            self._runs[task_id] = run
        if isinstance(actor.run, TaskRun):
            actor.run.adopt(run)  # a cancel of the parent reaches this run
        try:
            self._claim_for(run, wait)
        except BaseException:
            with self._lock:
                if self._runs.get(task_id) is run:
                    del self._runs[task_id]
            run.done_event.set()  # it never started: nobody (a parent included) waits for it
            raise
        return TaskHandle(run)

    def _start_run(self, run: TaskRun) -> bool:
        """Hand ``run`` to a worker; if the daemon closed meanwhile, the run ends cancelled."""
        try:
            self._pool.submit(run.execute)
        except RuntimeError:  # the pool closed: shutdown() got here first
            run.cancel_event.set()
            run.execute()  # sees the cancel at once: finishes cancelled, releases its devices
            return False
        return True

    def _submit_or_refuse(self, run: TaskRun) -> None:
        if not self._start_run(run):
            raise DaemonClosedError(
                f"Task {run.task_id!r} was not started: this LabDaemon was shut down meanwhile; "
                "create a new one."
            )

    def _claim_for(self, run: TaskRun, wait: float | bool) -> None:
        if run.device_ids and wait is False:
            self._claims.claim(
                run, run.device_ids,
                "Cancel the task that owns it, wait for it, or pass wait_for_devices=True.",
            )
        elif run.device_ids:
            self._record_created(run)  # before another thread can grant the claim
            pending = self._claims.claim_or_queue(
                run, run.device_ids, functools.partial(self._start_run, run), run.fail_pending,
                None if wait is True else float(wait),
            )
            if pending is not None:
                run.pending_claim = pending
                self._run_state_changed(run)
                return
            self._submit_or_refuse(run)
            return
        self._record_created(run)
        self._submit_or_refuse(run)

    def _record_created(self, run: TaskRun) -> None:
        store = self._store
        if store is None:
            return
        run.uid = store.new_uid()
        run.recorder = store
        store.run_created(run.uid, {
            "task_id": run.task_id, "task_type": run.task_type, "status": run.state.value,
            "params": run.params, "device_ids": list(run.device_ids), "owner": run.principal,
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
            raise InvalidArgumentError(
                f"Task id {task_id!r} is already used by a {existing.state.value} run of "
                f"{existing.task_type}. Task ids are unique among live and retained runs; "
                "pick another id or pass task_id=None to generate one."
            )

    @staticmethod
    def _construct_task(cls: Any, task_id: str, task_type: str, params: dict[str, Any]) -> Any:
        try:
            instance = cls(task_id=task_id, **params)
        except TypeError as exc:
            try:
                inspect.signature(cls).bind(task_id=task_id, **params)
            except TypeError as bind_error:
                raise InvalidArgumentError(
                    f"Task type {task_type!r} does not accept parameters {sorted(params)}: "
                    f"{bind_error}. Its constructor is {getattr(cls, '__name__', cls)}"
                    f"{inspect.signature(cls)}."
                ) from exc
            except ValueError:
                pass
            raise
        if not callable(getattr(instance, "run", None)):
            raise InvalidArgumentError(
                f"Task type {task_type!r}: the object built by {cls!r} has no run(context) method."
            )
        return instance

    def _task_device_ids(self, instance: Any, task_id: str) -> tuple[str, ...]:
        raw = getattr(instance, "device_ids", None)
        if raw is None:
            return ()
        if not isinstance(raw, list | tuple) or not all(isinstance(d, str) for d in raw):
            raise InvalidArgumentError(
                f"Task {task_id!r}: device_ids must be a list of device id strings, got {raw!r}."
            )
        unknown = [d for d in raw if d not in self._slots]
        if unknown:
            raise UnknownDeviceError(
                f"Task {task_id!r} claims unknown device(s) {describe_choices(unknown)}. "
                f"Devices: {describe_choices(self._slots)}."
            )
        return tuple(dict.fromkeys(raw))

    def _drain_devices(self, device_ids: Sequence[str]) -> None:
        for device_id in device_ids:
            slot = self._slots.get(device_id)
            if slot is not None:
                rlock = slot.lock.rlock
                if rlock.acquire(False) or slot.lock.acquire_slow(slot.call_timeout):
                    rlock.release()

    def _release_run(self, run: TaskRun) -> None:
        self._claims.release(run)

    def _run_state_changed(self, run: TaskRun) -> None:
        events = self.events
        if events.subscriptions or events._history is not None:
            events.publish({"event": "task_state", "task_id": run.task_id,
                            "task_type": run.task_type, "status": run.state.value})
        if run.state is TaskState.FAILED and run.error is not None:
            for listener in list(self._error_listeners):
                listener(run.error)

    def _run_finished(self, run: TaskRun) -> None:
        with self._lock:
            self._finished.append(run.task_id)
            while len(self._finished) > self.completed_task_buffer:
                old = self._finished.popleft()
                victim = self._runs.get(old)
                if victim is not None and victim.state.finished:
                    del self._runs[old]

    def get_task(self, task_id: str) -> TaskHandle:
        """A handle on a live or retained run."""
        return TaskHandle(self._run(task_id))

    def _run(self, task_id: str) -> TaskRun:
        run = self._runs.get(task_id) if isinstance(task_id, str) else None
        if run is None:
            raise UnknownTaskError(
                f"No task run with id {task_id!r} (live or among the last "
                f"{self.completed_task_buffer} finished). Runs: {describe_choices(self._runs)}."
            )
        return run

    @property
    def store(self) -> RunStore | None:
        """The run store, or None when history is kept in memory only."""
        return self._store

    def runs(
        self, status: str | None = None, task_type: str | None = None,
        since: float | None = None, limit: int = 50, offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Run history, newest first: from the run store, or the retained runs without one.

        ``since`` is a POSIX timestamp; each entry is a summary without result or events.
        """
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
        with self._lock:
            runs = list(self._runs.values())
        runs = [r for r in reversed(runs)
                if (status is None or r.state.value == status)
                and (task_type is None or r.task_type == task_type)
                and (since is None or r.created_at >= since)]
        return [r.info() for r in runs[offset:offset + limit]]

    def get_run(self, task_id: str) -> dict[str, Any]:
        """The full record of a run (``result`` and ``events`` included), live or historical."""
        if self._store is not None:
            self._store.flush(timeout=2.0)
            record = self._store.get_run(task_id)
            if record is not None:
                return record
        run = self._runs.get(task_id) if isinstance(task_id, str) else None
        if run is None:
            where = "in the run store" if self._store is not None else "(no run store configured)"
            raise UnknownTaskError(f"No run with id {task_id!r} {where}.")
        return {**run.info(), "result": run.result, "events": []}

    def list_tasks(self) -> list[dict[str, Any]]:
        """Summaries of live and retained runs, oldest first."""
        with self._lock:
            runs = list(self._runs.values())
        return [run.info() for run in runs]

    def task_handles(self) -> list[TaskHandle]:
        """Handles of live and retained runs."""
        with self._lock:
            return [TaskHandle(run) for run in self._runs.values()]

    @contextlib.contextmanager
    def task_context(self, task_id: str | None, task_type: str, **params: Any) -> Iterator[TaskHandle]:
        """Start a task for the block; cancel it on exit if it is still running."""
        handle = self.execute_task(task_id, task_type, **params)
        try:
            yield handle
        finally:
            if handle.is_running():
                handle.cancel()

    def subscribe_task(
        self, task_id: str, callback: Callable[[Any], object] | None = None, *,
        maxsize: int = DEFAULT_MAXSIZE, on_ready: Callable[[], None] | None = None,
    ) -> Subscription:
        """Receive a run's progress, data and state events."""
        return self._run(task_id).stream.subscribe(callback, maxsize=maxsize, on_ready=on_ready)

    def get_task_error(self, task_id: str) -> ErrorRecord | None:
        """The run's error record, kept until cleared."""
        return self._run(task_id).error

    def clear_task_error(self, task_id: str) -> None:
        """Forget the run's error record."""
        self._run(task_id).error = None

