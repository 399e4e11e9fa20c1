"""Device and task classes registered by name ("plugins"), as LabDaemon 1.0 keeps them.

    plugins = PluginRegistry()
    plugins.register(devices={"MyLaser": MyLaser}, tasks={"Sweep": Sweep})
    plugins.device_class("MyLaser")
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import Any

from labd.errors import (
    InvalidArgumentError,
    UnknownDeviceTypeError,
    UnknownTaskTypeError,
    describe_choices,
)

__all__ = ["PluginRegistry"]


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


class PluginRegistry:
    """Device and task classes by type name; a name is registered once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, Any] = {}
        self._tasks: dict[str, Any] = {}

    def register(self, devices: object, tasks: object) -> None:
        """Check every entry, then register all of them (a bad entry changes nothing)."""
        device_map = _plugin_map("devices", devices)
        task_map = _plugin_map("tasks", tasks)
        with self._lock:
            for name, cls in device_map.items():
                _check_plugin("Device", name, cls)
                if name in self._devices:
                    raise InvalidArgumentError(f"Device type {name!r} is already registered.")
            for name, cls in task_map.items():
                _check_plugin("Task", name, cls)
                if name in self._tasks:
                    raise InvalidArgumentError(f"Task type {name!r} is already registered.")
            self._devices.update(device_map)
            self._tasks.update(task_map)

    def device_types(self) -> list[str]:
        """Registered device type names, sorted."""
        return sorted(self._devices)

    def task_types(self) -> list[str]:
        """Registered task type names, sorted."""
        return sorted(self._tasks)

    def device_class(self, device_type: str) -> Any:
        """The class registered as ``device_type``, or :class:`UnknownDeviceTypeError`."""
        try:
            return self._devices[device_type]
        except (KeyError, TypeError):
            raise UnknownDeviceTypeError(
                f"Unknown device type: '{device_type}'. Registered device types: "
                f"{describe_choices(self._devices)}. Register it with "
                "daemon.register_plugins(devices={...})."
            ) from None

    def task_class(self, task_type: str) -> Any:
        """The class registered as ``task_type``, or :class:`UnknownTaskTypeError`."""
        try:
            return self._tasks[task_type]
        except (KeyError, TypeError):
            raise UnknownTaskTypeError(
                f"Unknown task type: '{task_type}'. Registered task types: "
                f"{describe_choices(self._tasks)}. Register it with "
                "daemon.register_plugins(tasks={...})."
            ) from None
