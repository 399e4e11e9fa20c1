"""The daemon's shared state: plugins, the device table, runs, events, the store.

:class:`DaemonCore` is the base of :class:`labd.LabDaemon`; the device half
(:mod:`labd.daemon_devices`) and the task half (:mod:`labd.daemon_tasks`) build on it.
Nothing here talks to an instrument.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import re
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from labd.deadlines import DeadlineTimer
from labd.device_streams import DeviceStreams
from labd.devices import DeviceSlot
from labd.errors import (
    DaemonClosedError,
    ErrorRecord,
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownDeviceTypeError,
    UnknownTaskTypeError,
    describe_choices,
)
from labd.ownership import (
    ClaimRegistry,
)
from labd.shutdown import ShutdownReport
from labd.store import RunStore
from labd.streaming import DEFAULT_MAXSIZE, StreamHub
from labd.tasks import TaskRun
from labd.workers import AffineWorkerPool

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["ID_PATTERN", "DaemonCore", "check_id"]

log = logging.getLogger("labd")

#: Ids of devices and tasks: letters, digits and ``_ - . :``, 1 to 128 characters.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-.:]{1,128}$")

_LIVE: weakref.WeakSet[DaemonCore] = weakref.WeakSet()


def _live_daemons() -> list[DaemonCore]:
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




class DaemonCore:
    """State shared by the device and task halves of :class:`labd.LabDaemon`."""

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
        self._pool = AffineWorkerPool()
        self.events = StreamHub("events", history=512)
        self._claims = ClaimRegistry(self._slot_for_claims, self._timer, self._publish_event)
        self._streams = DeviceStreams(cast("LabDaemon", self))  # always a LabDaemon at run time
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

    def _publish_event(self, event: dict[str, Any]) -> None:
        self.events.publish(event)
        name = event.get("event", "")
        if self._store is not None and name.startswith("lease_"):
            self._store.lease_event(name[6:], event.get("lease", {}))

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` started."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise DaemonClosedError("This LabDaemon has been shut down; create a new one.")


def _check_wait(value: object) -> bool | float:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value > 0:
        return float(value)
    raise InvalidArgumentError(
        f"wait_for_devices must be True, False or a positive number of seconds, got {value!r}"
    )

