"""Task runs: their states, the context a task's ``run`` receives, and the user's handle.

A :class:`TaskRun` is one execution of a task class. It is an ownership :class:`Owner`
(it holds the devices in the task's ``device_ids``), it publishes progress, emitted data and
state changes on its own stream, and it is driven through a :class:`TaskHandle`.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from labd.errors import (
    ErrorRecord,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    iso_from_timestamp,
)
from labd.ownership import Actor, Owner, PendingClaim, acting_as
from labd.secrets import redact
from labd.streaming import StreamHub

__all__ = ["RunHost", "TaskContext", "TaskHandle", "TaskRun", "TaskState"]


class TaskState(enum.Enum):
    """Lifecycle of a task run."""

    PENDING = "pending"  # waiting in the FIFO for its devices
    RUNNING = "running"  # run() is executing
    PAUSED = "paused"  # run() is executing and pause was requested (the gate is closed)
    COMPLETED = "completed"  # run() returned normally
    FAILED = "failed"  # run() raised, or returned {"status": "failed"}
    CANCELLED = "cancelled"  # cancelled before or during run()
    INTERRUPTED = "interrupted"  # the process died while it ran (set by the run store)

    @property
    def finished(self) -> bool:
        """True for the final states."""
        return self in _FINISHED


_FINISHED = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED,
                       TaskState.INTERRUPTED})


class TaskContext:
    """What a task's ``run(context)`` receives.

    ``daemon``, ``cancel_event``, ``resume_event`` (a gate: set = run, cleared = paused) and
    ``task_id`` are LabDaemon-compatible; :meth:`progress`, :meth:`emit`, :meth:`checkpoint`
    and :meth:`sleep` are labd additions.
    """

    def __init__(self, daemon: Any, run: TaskRun) -> None:
        self.daemon = daemon
        self.task_id = run.task_id
        self.cancel_event = run.cancel_event
        self.resume_event = run.resume_event
        self._run = run

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Publish progress (``done`` of ``total`` steps) to the task's stream and handle.

        Example: ``context.progress(i + 1, steps, f"{wl:.2f} nm")``.
        """
        self._run.set_progress(done, total, message)

    def emit(self, data: Any) -> None:
        """Publish intermediate data (a dict, an array) to the task's stream."""
        run = self._run
        run.publish("data", {"data": data})
        if run.recorder is not None:
            run.recorder.run_data(run.uid, data)

    def checkpoint(self) -> None:
        """Raise :class:`TaskCancelledError` if cancelled; block here while paused."""
        run = self._run
        while True:
            if run.cancel_event.is_set():
                raise TaskCancelledError(f"Task {run.task_id!r} was cancelled.")
            if run.resume_event.wait(0.1):
                if run.cancel_event.is_set():
                    raise TaskCancelledError(f"Task {run.task_id!r} was cancelled.")
                return

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, but raise :class:`TaskCancelledError` as soon as cancel is requested."""
        if self._run.cancel_event.wait(max(float(seconds), 0.0)):
            raise TaskCancelledError(f"Task {self._run.task_id!r} was cancelled.")

    @property
    def cancelled(self) -> bool:
        """True once cancel was requested."""
        return self._run.cancel_event.is_set()


class RunHost(Protocol):
    """What a run needs from the part that runs it (:class:`labd.task_runner.TaskRunner`)."""

    def drain_devices(self, device_ids: Sequence[str]) -> None:
        """Wait until calls already inside these devices have returned."""

    def release(self, run: TaskRun) -> None:
        """Give back every device ``run`` claimed."""

    def state_changed(self, run: TaskRun) -> None:
        """``run.state`` changed (publish it)."""

    def run_finished(self, run: TaskRun) -> None:
        """``run`` ended: retention bookkeeping, before its waiters wake."""

    def cancel_pending(self, claim: PendingClaim) -> bool:
        """Take a queued claim out of the FIFO; False if it was granted or failed meanwhile."""


class TaskRun(Owner):
    """One execution of a task class; also the owner of the devices it claimed.

    ``daemon`` is what the task sees as ``context.daemon`` (the :class:`labd.LabDaemon`);
    the run touches the rest of labd only through its ``host``.
    """

    kind = "task"

    def __init__(
        self,
        daemon: Any,
        host: RunHost,
        task_id: str,
        task_type: str,
        instance: Any,
        params: dict[str, Any],
        device_ids: tuple[str, ...],
        parent: Owner | None,
        principal: str | None,
    ) -> None:
        self.owner_id = task_id
        self.task_id = task_id
        self.task_type = task_type
        self.instance = instance
        self.params = params
        self.device_ids = device_ids
        self.parent = parent
        self.principal = principal
        self.state = TaskState.PENDING
        self.cancel_event = threading.Event()
        self.resume_event = threading.Event()
        self.resume_event.set()
        #: Set once the run has ended and its devices are free (a standard Event: see ADR 0010).
        self.done_event = threading.Event()
        self.result: Any = None
        self.exception: BaseException | None = None
        self.error: ErrorRecord | None = None
        self.progress: dict[str, Any] | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.pending_claim: PendingClaim | None = None
        #: Run-store uid and recorder (set by the daemon when it has a store).
        self.uid = 0
        self.recorder: Any = None
        #: True once the run store has its records, or StoreWriteError if some could not be written.
        self.persisted: Future[bool] = Future()
        self.context = TaskContext(daemon, self)
        self._host = host
        self._hub: StreamHub | None = None
        self._hub_lock = threading.Lock()
        #: Guards the state, the pause gate and the children: each changes with its signal.
        self._finish_lock = threading.RLock()
        #: Runs started from inside this one; they end before it does (see execute()).
        self.children: list[TaskRun] = []

    # -- stream ----------------------------------------------------------------------------
    @property
    def stream(self) -> StreamHub:
        """The run's stream: progress, emitted data and state changes."""
        hub = self._hub
        if hub is None:
            with self._hub_lock:
                if self._hub is None:
                    self._hub = StreamHub(f"task-{self.task_id}", history=256)
                hub = self._hub
        return hub

    def close_stream(self, timeout: float) -> None:
        """End the run's stream and its subscriptions (at shutdown)."""
        hub = self._hub
        if hub is not None:
            hub.close(timeout=timeout)

    def publish(self, kind: str, body: dict[str, Any]) -> None:
        """Put one event on the run's stream (only if anyone ever looked at it)."""
        hub = self._hub
        if hub is not None:
            hub.publish({"event": kind, "task_id": self.task_id, **body})

    def set_progress(self, done: float, total: float | None, message: str | None) -> None:
        """Record and publish progress."""
        fraction = None
        if total:
            fraction = max(0.0, min(1.0, float(done) / float(total)))
        self.progress = {"done": done, "total": total, "fraction": fraction, "message": message}
        self.publish("progress", self.progress)
        if self.recorder is not None:
            self.recorder.run_progress(self.uid, self.progress)

    def _set_state(self, state: TaskState) -> None:
        self.state = state
        self.publish("state", {"status": state.value})
        if self.recorder is not None and not state.finished:
            self.recorder.run_state(self.uid, state.value, self.started_at)
        self._host.state_changed(self)

    # -- control (any thread) --------------------------------------------------------------
    # The state and the pause gate change together under _finish_lock, so no interleaving of
    # pause, resume, cancel and the run's own start can leave "paused" with the gate open.
    def request_pause(self) -> None:
        """Close the gate; the state becomes ``paused`` once the run is running."""
        with self._finish_lock:
            if self.state.finished or self.cancel_event.is_set():
                return
            self.resume_event.clear()
            if self.state is TaskState.RUNNING:
                self._set_state(TaskState.PAUSED)

    def request_resume(self) -> None:
        """Open the gate; a paused run is running again."""
        with self._finish_lock:
            self.resume_event.set()
            if self.state is TaskState.PAUSED:
                self._set_state(TaskState.RUNNING)

    def request_cancel(self) -> None:
        """Cancel this run and every run it started (children first hear it from here)."""
        with self._finish_lock:
            if self.state.finished:
                return
            self.cancel_event.set()
            self.resume_event.set()  # a paused run must wake up to see the cancel
            if self.state is TaskState.PAUSED:
                self._set_state(TaskState.RUNNING)
            children = list(self.children)
            pending = self.state is TaskState.PENDING
        for child in children:
            child.request_cancel()
        if pending:
            self.cancel_pending()

    def abandon(self) -> None:
        """The call that was starting this run failed or was interrupted: end it cancelled
        (releasing any claim it got) unless a worker already started it."""
        self.request_cancel()
        with self._finish_lock:
            if self.state is TaskState.PENDING and self.started_at is None:
                self._finish(TaskState.CANCELLED, None, None)

    def adopt(self, child: TaskRun) -> None:
        """Record ``child`` as started from inside this run; a cancelled parent cancels it."""
        with self._finish_lock:
            self.children = [c for c in self.children if not c.done_event.is_set()]
            self.children.append(child)
            if self.cancel_event.is_set() or self.state.finished:
                child.cancel_event.set()

    # -- execution (worker thread) ---------------------------------------------------------
    def execute(self) -> None:
        """Run the task on the current (worker) thread and finish the run. Never raises."""
        thread = threading.current_thread()
        thread.name = f"labd-task-{self.task_id}"
        with self._finish_lock:
            cancelled = self.cancel_event.is_set()
            if not cancelled and self.state is TaskState.PENDING:
                self.started_at = time.time()
                gate_open = self.resume_event.is_set()
                self._set_state(TaskState.RUNNING if gate_open else TaskState.PAUSED)
        if cancelled:
            self._finish(TaskState.CANCELLED, None, None)
            return
        outcome: tuple[TaskState, Any, BaseException | None]
        try:
            # Let any command that a non-owner started before our claim finish first, so no
            # foreign command ever runs alongside this run's use of its devices.
            self._host.drain_devices(self.device_ids)
            with acting_as(Actor(run=self, principal=self.principal)):
                result = self.instance.run(self.context)
        except TaskCancelledError as exc:
            outcome = (TaskState.CANCELLED, getattr(exc, "result", None), exc)
        except BaseException as exc:
            outcome = (TaskState.FAILED, None, exc)
        else:
            outcome = (self._state_from_result(result), result, None)
        try:
            self._end_children(outcome[0])
        finally:
            self._finish(*outcome)

    def _end_children(self, state: TaskState) -> None:
        """Children end before their parent: cancelled unless the parent completed, then awaited.

        A parent's devices are released only after every child released its own claims, so
        no run outlives the run that started it (structured concurrency, as trio's nurseries).
        """
        with self._finish_lock:
            children = [c for c in self.children if not c.done_event.is_set()]
        if state is not TaskState.COMPLETED or self.cancel_event.is_set():
            for child in children:
                child.request_cancel()
        for child in children:
            child.done_event.wait()

    def _state_from_result(self, result: Any) -> TaskState:
        status = result.get("status") if isinstance(result, dict) else None
        if status == "failed":
            return TaskState.FAILED
        if status == "cancelled":
            return TaskState.CANCELLED
        if self.cancel_event.is_set() and status is None:
            # Cancel was requested and run() returned without saying how it ended: it stopped.
            return TaskState.CANCELLED
        return TaskState.COMPLETED

    def _finish(self, state: TaskState, result: Any, exc: BaseException | None) -> None:
        with self._finish_lock:
            if self.state.finished:
                return
            self.result = result
            self.exception = exc
            if exc is not None and state is TaskState.FAILED:
                self.error = ErrorRecord.from_exception(
                    exc, "task", {"task_id": self.task_id, "task_type": self.task_type}
                )
            elif state is TaskState.FAILED:
                message = result.get("error") or result.get("message") if isinstance(result, dict) else None
                self.error = ErrorRecord(
                    type="TaskFailedError",
                    message=str(message or f"Task {self.task_id!r} returned status 'failed'."),
                    origin="task",
                    context={"task_id": self.task_id, "task_type": self.task_type},
                )
            try:
                # Devices are free before anyone waiting on the handle hears that the run ended.
                self._host.release(self)
                self.finished_at = time.time()
                if self.recorder is not None:
                    self.recorder.run_finished(
                        self.uid, state.value, result,
                        self.error.to_dict() if self.error else None, self.finished_at,
                        self.persisted,
                    )
                else:
                    self.persisted.set_result(True)
                self._set_state(state)
                # Trim the retained-run buffer before waking waiters, so that after wait()
                # returns, list_tasks()/get_task() already reflect any eviction.
                self._host.run_finished(self)
            finally:
                # Whatever failed above, the run has ended and its waiters must hear it.
                self.state = state
                self.done_event.set()
        hub = self._hub
        if hub is not None:
            hub.publish({"event": "finished", "task_id": self.task_id, "status": state.value})

    def cancel_pending(self) -> bool:
        """Cancel a run still waiting for devices; True if it was pending."""
        claim = self.pending_claim
        if claim is None or not self._host.cancel_pending(claim):
            return False
        self._finish(TaskState.CANCELLED, None, None)
        return True

    def fail_pending(self, exc: BaseException) -> None:
        """A waiting claim gave up (timeout): the run fails without starting."""
        self._finish(TaskState.FAILED, None, exc)

    # -- description -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """JSON-ready summary (the shape of ``GET /tasks/{id}``)."""
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "status": self.state.value,
            "running": not self.state.finished and self.state is not TaskState.PENDING,
            "paused": not self.resume_event.is_set() and not self.state.finished,
            "progress": self.progress,
            "params": redact(self.params),  # secret-named values as "***" (labd.secrets)
            "device_ids": list(self.device_ids),
            "parent_id": self.parent.owner_id if self.parent is not None else None,
            "owner": self.principal,
            "created_at": iso_from_timestamp(self.created_at),
            "started_at": iso_from_timestamp(self.started_at) if self.started_at else None,
            "finished_at": iso_from_timestamp(self.finished_at) if self.finished_at else None,
            "exception": repr(self.exception) if self.exception is not None else None,
            "error": self.error.to_dict(include_traceback=False) if self.error else None,
        }


class TaskHandle:
    """Your handle on a task run: wait for it, cancel, pause, resume, tune parameters.

    Example::

        handle = daemon.execute_task("sweep1", "WavelengthSweep", laser_id="laser1", ...)
        result = handle.wait(timeout=60)
    """

    def __init__(self, run: TaskRun) -> None:
        self._run = run
        self.task_id = run.task_id

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id!r} {self._run.state.value}>"

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run ends and return its result.

        Raises ``TimeoutError`` if it is still going after ``timeout`` seconds,
        :class:`TaskCancelledError` (``.result`` holds what ``run`` returned) if it was cancelled,
        :class:`TaskFailedError` (chained from the task's exception) if it failed.
        """
        run = self._run
        if not run.done_event.wait(timeout):
            raise TimeoutError(
                f"Wait timed out for task '{self.task_id}'. It is still {run.state.value} after "
                f"{timeout} s; wait longer, or cancel() it."
            )
        state = run.state
        if state is TaskState.COMPLETED:
            return run.result
        if state is TaskState.CANCELLED:
            raise TaskCancelledError(
                f"Task {self.task_id!r} was cancelled.", result=run.result
            ) from run.exception
        error = run.error.message if run.error else state.value
        raise TaskFailedError(
            f"Task '{self.task_id}' failed during execution. {run.task_type} failed: {error}",
            result=run.result,
        ) from run.exception

    def cancel(self) -> None:
        """Ask the run and every run it started to stop (also opens the pause gate).

        No effect once it has ended. A pending run ends at once; a running one ends when its
        ``run`` returns, after its children ended.
        """
        self._run.request_cancel()

    def pause(self) -> None:
        """Close the gate: the run blocks at its next ``resume_event.wait()`` / ``checkpoint()``."""
        self._run.request_pause()

    def resume(self) -> None:
        """Open the gate again."""
        self._run.request_resume()

    def is_running(self) -> bool:
        """True until the run has ended (pending and paused runs count as running)."""
        return not self._run.state.finished

    def is_paused(self) -> bool:
        """True while a pause is requested and the run has not ended."""
        return not self._run.resume_event.is_set() and not self._run.state.finished

    def exception(self) -> BaseException | None:
        """The exception ``run`` raised, or None."""
        return self._run.exception

    @property
    def result(self) -> Any:
        """What ``run`` returned (None until it ends); never raises."""
        return self._run.result

    @property
    def status(self) -> str:
        """``pending``, ``running``, ``paused``, ``completed``, ``failed`` or ``cancelled``."""
        return self._run.state.value

    @property
    def progress(self) -> dict[str, Any] | None:
        """The last progress report: ``done``, ``total``, ``fraction``, ``message``."""
        return self._run.progress

    @property
    def task_type(self) -> str:
        """The registered task type name."""
        return self._run.task_type

    @property
    def device_ids(self) -> list[str]:
        """Devices this run claims."""
        return list(self._run.device_ids)

    @property
    def error(self) -> ErrorRecord | None:
        """The run's error record (kept until cleared)."""
        return self._run.error

    def info(self) -> dict[str, Any]:
        """JSON-ready summary of the run."""
        return self._run.info()

    def set_parameter(self, key: str, value: Any) -> None:
        """Call the task's ``set_parameter(key, value)``; :class:`TaskError` if it has none."""
        setter = getattr(self._run.instance, "set_parameter", None)
        if not callable(setter):
            raise TaskError(
                f"Task {self.task_id!r} ({self._run.task_type}) does not support parameter updates: "
                "its class has no set_parameter(key, value) method."
            )
        setter(key, value)
        # Every viewer reads the run's stream: a secret-named value goes out as "***".
        self._run.publish("parameter", {"key": key, "value": redact({key: value})[key]})

    def get_parameter(self, key: str) -> Any:
        """Call the task's ``get_parameter(key)``; :class:`TaskError` if it has none."""
        getter = getattr(self._run.instance, "get_parameter", None)
        if not callable(getter):
            raise TaskError(
                f"Task {self.task_id!r} ({self._run.task_type}) does not support parameter queries: "
                "its class has no get_parameter(key) method."
            )
        return getter(key)

    def subscribe(
        self, callback: Callable[[Any], object], maxsize: int = 1000
    ) -> Any:
        """Receive the run's progress, data and state events on a delivery thread."""
        return self._run.stream.subscribe(callback, maxsize=maxsize)
