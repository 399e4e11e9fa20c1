"""The coordinator: plugins, devices, task runs, ownership, streams and shutdown.

:class:`LabDaemon` is LabDaemon 1.0's class with the same names and meanings, plus labd's
ownership (claims, leases, strict mode), fan-out streaming, progress, error records and a
bounded shutdown. Everything here is threads and locks; the HTTP server sits on top.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from labd.deadlines import DeadlineTimer
from labd.device_streams import DeviceStreams
from labd.devices import DeviceSlot, DeviceState, rewrap_device, wrap_device
from labd.errors import (
    DaemonClosedError,
    DeviceConnectionError,
    DeviceError,
    DeviceNotConnectedError,
    DeviceTimeoutError,
    ErrorRecord,
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownDeviceTypeError,
    UnknownLeaseError,
    UnknownTaskError,
    UnknownTaskTypeError,
    describe_choices,
    iso_from_timestamp,
)
from labd.ownership import (
    Actor,
    ClaimRegistry,
    Lease,
    acting_as,
    current_actor,
)
from labd.shutdown import ShutdownReport, run_shutdown
from labd.store import RunStore
from labd.streaming import DEFAULT_MAXSIZE, StreamHub, Subscription
from labd.tasks import TaskHandle, TaskRun, TaskState
from labd.workers import WorkerPool

__all__ = ["LabDaemon", "ShutdownReport"]

log = logging.getLogger("labd")

#: Ids of devices and tasks: letters, digits and ``_ - . :``, 1 to 128 characters.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-.:]{1,128}$")

_LIVE: weakref.WeakSet[LabDaemon] = weakref.WeakSet()


def _live_daemons() -> list[LabDaemon]:
    """Daemons created in this process and not shut down yet (used by the test suite)."""
    return [d for d in list(_LIVE) if not d.closed]


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidArgumentError`."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidArgumentError(
            f"Invalid {what} {value!r}: use 1 to 128 letters, digits or the characters _ - . :"
        )
    return value


def _plugin_map(argument: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"register_plugins({argument}=...) takes a dict of type name -> class, e.g. "
            f"{{'MyLaser': MyLaser}}; got {type(value).__name__} {value!r}."
        )
    return dict(value)


def _check_plugin(kind: str, name: object, cls: Any) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"{kind} type names must be non-empty strings, got {name!r}")
    if not callable(cls):
        raise InvalidArgumentError(
            f"{kind} type {name!r}: expected a class (or callable factory), got "
            f"{type(cls).__name__} {cls!r}"
        )
    if kind == "Task" and inspect.isclass(cls) and not callable(getattr(cls, "run", None)):
        raise InvalidArgumentError(
            f"Task type {name!r}: class {cls.__name__} has no run(self, context) method; "
            "a task class needs one."
        )


class LabDaemon:
    """Holds your device and task classes, runs them safely, and shares them.

    Every public device method is serialised per device; tasks run on background threads and
    own the devices they declare in ``device_ids``; streams fan out to any number of
    subscribers. Use it as a context manager or call :meth:`shutdown`.

    Example::

        import labd as ld
        daemon = ld.LabDaemon()
        daemon.register_plugins(devices={"MyLaser": MyLaser}, tasks={"Sweep": Sweep})
        laser = daemon.add_device("laser1", "MyLaser", address="GPIB0::1")
        daemon.connect_device(laser)
        result = daemon.execute_task("sweep1", "Sweep", laser_id="laser1").wait()
    """

    def __init__(
        self,
        completed_task_buffer: int = 20,
        *,
        strict_ownership: bool = False,
        call_timeout: float | None = None,
        stream_maxsize: int = DEFAULT_MAXSIZE,
        store: RunStore | str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(completed_task_buffer, int) or completed_task_buffer < 0:
            raise InvalidArgumentError(
                f"completed_task_buffer must be an integer >= 0, got {completed_task_buffer!r}"
            )
        self.completed_task_buffer = completed_task_buffer
        self.strict_ownership = bool(strict_ownership)
        self.call_timeout = call_timeout
        self.stream_maxsize = stream_maxsize
        self._lock = threading.RLock()
        self._device_classes: dict[str, Any] = {}
        self._task_classes: dict[str, Any] = {}
        self._slots: dict[str, DeviceSlot] = {}
        self._runs: dict[str, TaskRun] = {}
        self._finished: deque[str] = deque()
        self._auto_ids = itertools.count(1)
        self._timer = DeadlineTimer()
        self._pool = WorkerPool()
        self.events = StreamHub("events", history=512)
        self._claims = ClaimRegistry(self._slot_for_claims, self._timer, self._publish_event)
        self._streams = DeviceStreams(self)
        self._error_listeners: list[Callable[[ErrorRecord], None]] = []
        self._closed = False
        self._shutdown_report: ShutdownReport | None = None
        self._shutdown_lock = threading.Lock()
        self._store: RunStore | None = None
        self._owns_store = False
        if store is not None:
            self._owns_store = not isinstance(store, RunStore)
            self._store = store if isinstance(store, RunStore) else RunStore(store)
        _LIVE.add(self)

    # ------------------------------------------------------------------ plugins
    def register_plugins(
        self,
        devices: Mapping[str, Any] | None = None,
        tasks: Mapping[str, Any] | None = None,
    ) -> None:
        """Register device and task classes by name. Re-registering a name is an error.

        All names are checked before any is registered, so a bad entry changes nothing.
        """
        devices = _plugin_map("devices", devices)
        tasks = _plugin_map("tasks", tasks)
        with self._lock:
            for name, cls in devices.items():
                _check_plugin("Device", name, cls)
                if name in self._device_classes:
                    raise InvalidArgumentError(f"Device type {name!r} is already registered.")
            for name, cls in tasks.items():
                _check_plugin("Task", name, cls)
                if name in self._task_classes:
                    raise InvalidArgumentError(f"Task type {name!r} is already registered.")
            self._device_classes.update(devices)
            self._task_classes.update(tasks)

    @property
    def device_types(self) -> list[str]:
        """Registered device type names."""
        return sorted(self._device_classes)

    @property
    def task_types(self) -> list[str]:
        """Registered task type names."""
        return sorted(self._task_classes)

    def device_class(self, device_type: str) -> Any:
        """The class registered as ``device_type``."""
        try:
            return self._device_classes[device_type]
        except (KeyError, TypeError):
            raise UnknownDeviceTypeError(
                f"Unknown device type {device_type!r}. Registered device types: "
                f"{describe_choices(self._device_classes)}. Register it with "
                "daemon.register_plugins(devices={...})."
            ) from None

    def task_class(self, task_type: str) -> Any:
        """The class registered as ``task_type``."""
        try:
            return self._task_classes[task_type]
        except (KeyError, TypeError):
            raise UnknownTaskTypeError(
                f"Unknown task type {task_type!r}. Registered task types: "
                f"{describe_choices(self._task_classes)}. Register it with "
                "daemon.register_plugins(tasks={...})."
            ) from None

    # ------------------------------------------------------------------ devices
    def add_device(self, device_id: str, device_type: str, **params: Any) -> Any:
        """Construct ``device_type(device_id, **params)`` and return it, with locked methods."""
        self._check_open()
        check_id(device_id, "device id")
        cls = self.device_class(device_type)
        with self._lock:
            if device_id in self._slots:
                raise InvalidArgumentError(
                    f"A device with id {device_id!r} already exists ({self._slots[device_id].device_type}). "
                    "Pick another id or remove it first."
                )
        instance = self._construct_device(cls, device_id, device_type, params)
        timeout = getattr(instance, "labd_call_timeout", None) or self.call_timeout
        slot = DeviceSlot(
            device_id, device_type, instance, params, strict=self.strict_ownership,
            call_timeout=timeout, on_error=self._device_error,
        )
        wrap_device(slot)
        with self._lock:
            if device_id in self._slots:
                raise InvalidArgumentError(f"A device with id {device_id!r} already exists.")
            self._slots[device_id] = slot
        self._streams.add(slot)
        if not callable(getattr(instance, "connect", None)):
            slot.state = DeviceState.CONNECTED
        self._publish_event({"event": "device_added", "device_id": device_id,
                             "device_type": device_type})
        return instance

    @staticmethod
    def _construct_device(cls: Any, device_id: str, device_type: str, params: dict[str, Any]) -> Any:
        try:
            return cls(device_id, **params)
        except TypeError as first:
            # A class whose __init__ takes no device_id still works (DESIGN.md 2.1).
            try:
                signature = inspect.signature(cls)
            except (TypeError, ValueError):
                raise first from None
            try:
                signature.bind(device_id, **params)
            except TypeError:
                try:
                    signature.bind(**params)
                except TypeError as exc:
                    raise InvalidArgumentError(
                        f"Device type {device_type!r} does not accept these parameters "
                        f"{sorted(params)}: {exc}. Its constructor is {cls.__name__}{signature}."
                    ) from first
                instance = cls(**params)
                with contextlib.suppress(AttributeError):
                    instance.device_id = device_id
                return instance
            raise

    def remove_device(self, device_id: str, timeout: float | None = 2.0) -> None:
        """Stop streaming, disconnect and forget a device that no one owns."""
        slot = self._slot(device_id)
        owner = self._claims.owner_of(device_id)
        if owner is not None:
            self._streams.raise_if_not_permitted(slot)
        self._streams.stop(slot, timeout=timeout or 1.0)
        self.disconnect_device(device_id, timeout=timeout)
        with self._lock:
            self._slots.pop(device_id, None)
        self._claims.forget_device(device_id)
        self._publish_event({"event": "device_removed", "device_id": device_id})

    def get_device(self, device_id: str) -> Any:
        """The device instance (its public methods are locked and ownership-checked)."""
        return self._slot(device_id).instance

    def _slot(self, device: Any) -> DeviceSlot:
        device_id: object = device
        if not isinstance(device, str):
            device_id = getattr(device, "device_id", None)
            if not isinstance(device_id, str):
                for slot in list(self._slots.values()):
                    if slot.instance is device:
                        return slot
                raise TypeError(
                    "Pass a device id (str) or a device instance returned by add_device(), "
                    f"not {type(device).__name__}."
                )
        found = self._slots.get(device_id) if isinstance(device_id, str) else None
        if found is None:
            raise UnknownDeviceError(
                f"No device with id {device_id!r}. Devices: {describe_choices(self._slots)}."
            )
        return found

    def _slot_for_claims(self, device_id: str) -> DeviceSlot:
        return self._slots[device_id]

    def device_ids(self) -> list[str]:
        """Ids of all devices, in the order they were added."""
        return list(self._slots)

    def device_info(self, device_id: str) -> dict[str, Any]:
        """JSON-ready state of one device (the shape of ``GET /devices/{id}``)."""
        slot = self._slot(device_id)
        owner = self._claims.owner_of(device_id)

        return {
            "device_id": slot.device_id,
            "device_type": slot.device_type,
            "state": slot.state.value,
            "connected": slot.state is DeviceState.CONNECTED,
            "streaming": self._streams.is_streaming(slot),
            "owned_by": owner[0].label if owner else None,
            "owner_kind": owner[0].kind if owner else None,
            "owner_id": owner[0].owner_id if owner else None,
            "owned_since": iso_from_timestamp(owner[1]) if owner else None,
            "unresponsive": slot.unresponsive,
            "last_error": slot.last_error.to_dict(include_traceback=False) if slot.last_error else None,
            "params": slot.params,
            "call_timeout": slot.call_timeout,
            "lock": slot.lock_info(),
            "stream": self._streams.stats(slot),
        }

    def list_devices(self) -> list[dict[str, Any]]:
        """:meth:`device_info` for every device."""
        return [self.device_info(device_id) for device_id in self.device_ids()]

    def device_methods(self, device_id: str) -> list[dict[str, Any]]:
        """Public methods of a device: name, kind (query/command), parameters, doc."""
        from labd.introspection import describe_method

        slot = self._slot(device_id)
        return [describe_method(name, slot.originals[name], slot.kinds[name])
                for name in sorted(slot.originals)]

    def set_call_timeout(self, device_id: str, seconds: float | None) -> None:
        """Raise :class:`DeviceTimeoutError` when a call waits longer than ``seconds`` for the device."""
        if seconds is not None and (not isinstance(seconds, int | float) or seconds <= 0):
            raise InvalidArgumentError(f"call_timeout must be a positive number or None, got {seconds!r}")
        slot = self._slot(device_id)
        slot.call_timeout = seconds
        rewrap_device(slot)

    def call_device(
        self,
        device_id: str,
        method: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        actor: Actor | None = None,
    ) -> Any:
        """Call ``device.method(*args, **kwargs)`` by name, as ``actor`` (e.g. a remote client).

        Checks the name and the arguments before calling, so bad input never reaches the device.
        """
        from labd.introspection import check_call

        slot = self._slot(device_id)
        bound = check_call(slot, method, args, kwargs)
        with acting_as(actor or current_actor()):
            return bound(*(args or ()), **dict(kwargs or {}))

    # ------------------------------------------------------------------ connect
    def connect_device(self, device: Any, timeout: float | None = None) -> None:
        """Call the device's ``connect()`` (bounded by ``timeout`` seconds if given).

        Raises :class:`DeviceConnectionError` (the driver's error as ``__cause__``) or
        :class:`DeviceTimeoutError`; the device is then ``faulted``.
        """
        self._check_open()
        slot = self._slot(device)
        connect = getattr(slot.instance, "connect", None)
        if not callable(connect):
            slot.state = DeviceState.CONNECTED
            return
        self._run_lifecycle(slot, connect, "connect", timeout, DeviceState.CONNECTED, raise_timeout=True)

    def disconnect_device(self, device: Any, timeout: float | None = None) -> None:
        """Call the device's ``disconnect()``; idempotent. A timeout is logged, not raised."""
        slot = self._slot(device)
        if slot.state in (DeviceState.DISCONNECTED, DeviceState.ADDED):
            return
        self._streams.stop(slot, timeout=1.0 if timeout is None else timeout)
        disconnect = getattr(slot.instance, "disconnect", None)
        if not callable(disconnect):
            slot.state = DeviceState.DISCONNECTED
            return
        self._run_lifecycle(
            slot, disconnect, "disconnect", timeout, DeviceState.DISCONNECTED, raise_timeout=False
        )

    def _run_lifecycle(
        self, slot: DeviceSlot, fn: Callable[[], Any], what: str, timeout: float | None,
        success: DeviceState, *, raise_timeout: bool,
    ) -> None:
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise InvalidArgumentError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        previous = slot.state
        if what == "connect":
            slot.state = DeviceState.CONNECTING
        outcome: dict[str, BaseException | None] = {}
        done = threading.Event()
        actor = current_actor()

        def job() -> None:
            try:
                with acting_as(actor):
                    fn()
                outcome["error"] = None
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                done.set()

        if timeout is None:
            job()
        else:
            try:
                self._pool.submit(job)
            except RuntimeError:  # the daemon was shut down: its pool no longer takes jobs
                threading.Thread(target=job, name=f"labd-{what}-{slot.device_id}", daemon=True).start()
        if not done.wait(timeout):
            slot.state = DeviceState.FAULTED
            err = DeviceTimeoutError(
                f"Device {slot.device_id!r}: {what}() did not finish within {timeout:g} s; "
                "it is marked faulted. Check the instrument and its connection."
            )
            slot.record_error(err, what, origin="framework")
            self._publish_device_state(slot)
            if raise_timeout:
                raise err
            log.warning("%s", err)
            return
        error = outcome.get("error")
        if error is None:
            slot.state = success
            self._publish_device_state(slot)
            return
        if isinstance(error, DeviceError) and not isinstance(error, DeviceNotConnectedError):
            slot.state = previous if what == "connect" and type(error).__name__ == "DeviceBusyError" else DeviceState.FAULTED
            self._publish_device_state(slot)
            raise error
        slot.state = DeviceState.FAULTED
        self._publish_device_state(slot)
        raise DeviceConnectionError(
            f"Device {slot.device_id!r} ({slot.device_type}): {what}() failed: "
            f"{type(error).__name__}: {error}"
        ) from error

    def _publish_device_state(self, slot: DeviceSlot) -> None:
        self._publish_event({"event": "device_state", "device_id": slot.device_id,
                             "state": slot.state.value})

    @contextlib.contextmanager
    def device_context(self, device_id: str, device_type: str, **params: Any) -> Iterator[Any]:
        """Add and connect a device for the block; disconnect it on exit."""
        instance = self.add_device(device_id, device_type, **params)
        try:
            self.connect_device(instance)
            yield instance
        finally:
            try:
                self.disconnect_device(instance)
            except Exception:
                log.exception("Failed to disconnect device %r on context exit", device_id)

    # ------------------------------------------------------------------ tasks
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
        run = TaskRun(self, task_id, task_type, instance, params, device_ids, actor.run,
                      principal, self._run_state_changed)
        with self._lock:
            self._check_task_id_free(task_id)
            self._runs[task_id] = run
        try:
            self._claim_for(run, wait)
        except BaseException:
            with self._lock:
                self._runs.pop(task_id, None)
            raise
        return TaskHandle(run)

    def _claim_for(self, run: TaskRun, wait: float | bool) -> None:
        if run.device_ids and wait is False:
            self._claims.claim(
                run, run.device_ids,
                "Cancel the task that owns it, wait for it, or pass wait_for_devices=True.",
            )
        elif run.device_ids:
            self._record_created(run)  # before another thread can grant the claim
            pending = self._claims.claim_or_queue(
                run, run.device_ids, lambda: self._pool.submit(run.execute), run.fail_pending,
                None if wait is True else float(wait),
            )
            if pending is not None:
                run.pending_claim = pending
                self._run_state_changed(run)
                return
            self._pool.submit(run.execute)
            return
        self._record_created(run)
        self._pool.submit(run.execute)

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

    # ------------------------------------------------------------------ history
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

    # ------------------------------------------------------------------ ownership
    def claim(
        self,
        device_ids: Sequence[str],
        owner: str,
        ttl: float | None = None,
        *,
        wait: bool | float = False,
    ) -> Lease:
        """Lease devices to ``owner`` (a person or program) so nobody else can command them.

        The lease expires after ``ttl`` seconds unless renewed (``lease.renew()``). Use it as a
        context manager to release on exit. Raises :class:`DeviceBusyError` if a device is owned.

        Example::

            with daemon.claim(["laser1"], owner="alice", ttl=30) as lease:
                laser.set_wavelength(1550.0)
                lease.renew()
        """
        self._check_open()
        if not isinstance(owner, str) or not owner:
            raise InvalidArgumentError(f"owner must be a non-empty string naming who holds the lease, got {owner!r}")
        if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0):
            raise InvalidArgumentError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        ids = self._check_device_list(device_ids, "claim")
        timeout = _check_wait(wait)
        if timeout is False:
            return self._claims.grant_lease(ids, owner, ttl)
        deadline = None if timeout is True else time.monotonic() + float(timeout)
        while True:
            try:
                return self._claims.grant_lease(ids, owner, ttl)
            except DeviceError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _check_device_list(self, device_ids: Any, what: str) -> tuple[str, ...]:
        if isinstance(device_ids, str) or not isinstance(device_ids, list | tuple) or not device_ids:
            raise InvalidArgumentError(
                f"{what}: device_ids must be a non-empty list of device ids, got {device_ids!r}."
            )
        unknown = [d for d in device_ids if not isinstance(d, str) or d not in self._slots]
        if unknown:
            raise UnknownDeviceError(
                f"{what}: unknown device(s) {unknown!r}. Devices: {describe_choices(self._slots)}."
            )
        return tuple(dict.fromkeys(device_ids))

    def leases(self) -> list[Lease]:
        """Active leases."""
        return self._claims.leases()

    def get_lease(self, lease_id: str) -> Lease:
        """The active lease with that id."""
        lease = self._claims.get_lease(lease_id)
        if lease is None:
            raise UnknownLeaseError(
                f"No active lease {lease_id!r} (it may have expired or been released). Active leases: "
                f"{describe_choices(lease.lease_id for lease in self._claims.leases())}."
            )
        return lease

    def break_lease(self, lease_id: str, reason: str = "broken by an admin") -> None:
        """End someone's lease now (admin action); their next command is refused."""
        lease = self.get_lease(lease_id)
        self._claims.end_lease(lease, "broken", reason)

    def owner_of(self, device_id: str) -> str | None:
        """Label of the device's current owner (``task 'sweep1'``, ``lease ...``) or None."""
        self._slot(device_id)
        owner = self._claims.owner_of(device_id)
        return owner[0].label if owner else None

    # ------------------------------------------------------------------ streaming
    def subscribe(
        self,
        device: Any,
        callback: Callable[[Any], object] | None = None,
        *,
        maxsize: int | None = None,
        on_ready: Callable[[], None] | None = None,
        **stream_params: Any,
    ) -> Subscription:
        """Subscribe to a device's stream, starting it if needed.

        Each subscriber has its own bounded queue (``maxsize``); ``callback`` runs on the
        subscription's delivery thread, never on the device's thread. A stream started by a
        subscription stops when its last subscriber closes.
        """
        slot = self._slot(device)
        return self._streams.subscribe(
            slot, callback, self.stream_maxsize if maxsize is None else maxsize, on_ready,
            stream_params, pinned=False
        )

    def start_streaming(self, device: Any, callback: Callable[[Any], object], **stream_params: Any) -> Subscription:
        """Start the device's stream (or join it if running) with ``callback`` as a subscriber.

        A stream started this way runs until :meth:`stop_streaming`.
        """
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {type(callback).__name__}")
        slot = self._slot(device)
        return self._streams.subscribe(
            slot, callback, self.stream_maxsize, None, stream_params, pinned=True
        )

    def stop_streaming(self, device: Any, timeout: float | None = 1.0) -> None:
        """Stop the device's stream and end every subscription. No effect if not streaming."""
        self._streams.stop(self._slot(device), timeout=timeout)

    def stream_hub(self, device: Any) -> StreamHub | None:
        """The device's current stream hub (None if not streaming)."""
        return self._streams.hub(self._slot(device))

    # ------------------------------------------------------------------ errors
    def get_device_error(self, device_id: str) -> ErrorRecord | None:
        """The device's last error record, kept until cleared."""
        return self._slot(device_id).last_error

    def clear_device_error(self, device_id: str) -> None:
        """Forget the device's last error."""
        self._slot(device_id).last_error = None

    def get_task_error(self, task_id: str) -> ErrorRecord | None:
        """The run's error record, kept until cleared."""
        return self._run(task_id).error

    def clear_task_error(self, task_id: str) -> None:
        """Forget the run's error record."""
        self._run(task_id).error = None

    def add_error_listener(self, listener: Callable[[ErrorRecord], None]) -> None:
        """Call ``listener(record)`` for every device, callback and task error (e.g. a run store)."""
        self._error_listeners.append(listener)

    def _device_error(self, slot: DeviceSlot, record: ErrorRecord) -> None:
        self._publish_event({"event": "device_error", "device_id": slot.device_id,
                             "error": record.to_dict(include_traceback=False)})
        if self._store is not None:
            self._store.device_error(record.to_dict())
        for listener in list(self._error_listeners):
            try:
                listener(record)
            except Exception:
                log.exception("labd error listener failed")

    def _publish_event(self, event: dict[str, Any]) -> None:
        self.events.publish(event)
        name = event.get("event", "")
        if self._store is not None and name.startswith("lease_"):
            self._store.lease_event(name[6:], event.get("lease", {}))

    # ------------------------------------------------------------------ shutdown
    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` started."""
        return self._closed

    def _close_store(self) -> None:
        store = self._store
        if store is None:
            return
        if self._owns_store:
            store.close()
        else:
            store.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise DaemonClosedError("This LabDaemon has been shut down; create a new one.")

    def shutdown(self, timeout: float | None = 2.0) -> ShutdownReport:
        """Stop streams, cancel tasks, disconnect devices; bounded by ``timeout``. Idempotent.

        Tasks get ``timeout`` seconds in total to stop after cancel; devices are disconnected
        in reverse order within another ``timeout``. Returns (and logs) what did not stop.
        """
        with self._shutdown_lock:
            if self._shutdown_report is not None:
                return self._shutdown_report
            self._closed = True
            report = run_shutdown(self, 2.0 if timeout is None else float(timeout))
            self._shutdown_report = report
        if report.clean:
            log.info("%s", report)
        else:
            log.warning("%s", report)
        return report

    def __enter__(self) -> LabDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"<LabDaemon devices={len(self._slots)} runs={len(self._runs)}"
                f"{' closed' if self._closed else ''}>")


def _check_wait(value: object) -> bool | float:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value > 0:
        return float(value)
    raise InvalidArgumentError(
        f"wait_for_devices must be True, False or a positive number of seconds, got {value!r}"
    )

