"""The labd exception tree and the error record shape.

Exceptions are split by who must act::

    LabDaemonException                 root of everything labd raises
    ├── DeviceError                    something about a device
    │   ├── DeviceBusyError            someone else owns it (task or lease): wait, cancel, or ask
    │   ├── DeviceConnectionError      connect/disconnect failed (the driver's error is __cause__)
    │   ├── DeviceNotConnectedError    used before connect_device()
    │   ├── DeviceTimeoutError         waited too long for the device or its lock
    │   ├── DeviceConfigurationError   bad parameters for the device
    │   └── DeviceOperationError       the instrument failed during an operation
    ├── TaskError                      something about a task run
    │   ├── TaskCancelledError         the run was cancelled (partial result in .result)
    │   └── TaskFailedError            run() raised (original in __cause__) or returned status "failed"
    ├── LeaseError                     a lease is expired, broken or released
    ├── DaemonClosedError              the daemon was shut down
    └── (also ValueError) UnknownNameError   an id or type that does not exist
            ├── UnknownDeviceError, UnknownDeviceTypeError
            ├── UnknownTaskError, UnknownTaskTypeError
            └── UnknownLeaseError
        (also ValueError) InvalidArgumentError    bad input: duplicate ids, bad plugins, bad device_ids

``UnknownNameError`` and ``InvalidArgumentError`` subclass ``ValueError`` so LabDaemon scripts that
catch ``ValueError`` keep working.

An :class:`ErrorRecord` is the one shape every error takes when it is stored or sent:
``{"type", "message", "origin", "timestamp", "traceback", "context"}``.
"""

from __future__ import annotations

import traceback as _traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "DaemonClosedError",
    "DeviceBusyError",
    "DeviceConfigurationError",
    "DeviceConnectionError",
    "DeviceError",
    "DeviceNotConnectedError",
    "DeviceOperationError",
    "DeviceTimeoutError",
    "ErrorRecord",
    "InvalidArgumentError",
    "LabDaemonException",
    "LeaseError",
    "TaskCancelledError",
    "TaskError",
    "TaskFailedError",
    "UnknownDeviceError",
    "UnknownDeviceTypeError",
    "UnknownLeaseError",
    "UnknownNameError",
    "UnknownTaskError",
    "UnknownTaskTypeError",
    "UnserializableResult",
]

Origin = Literal["framework", "device", "callback", "task"]


class LabDaemonException(Exception):
    """Root of every exception labd raises."""


class DeviceError(LabDaemonException):
    """Something about a device went wrong."""


class DeviceConnectionError(DeviceError):
    """A device failed to connect or disconnect; the driver's exception is ``__cause__``."""


class DeviceNotConnectedError(DeviceError):
    """An operation needs a connected device."""


class DeviceTimeoutError(DeviceError):
    """Waiting for a device (its lock, its connect, its answer) took longer than allowed."""


class DeviceConfigurationError(DeviceError):
    """A device was given parameters it cannot use."""


class DeviceOperationError(DeviceError):
    """The instrument failed during an operation."""


class DeviceBusyError(DeviceError):
    """A device is owned by a task run or a lease, and the caller is not that owner.

    ``busy`` lists one dict per busy device: ``device_id``, ``owner`` (a label such as
    ``"task 'sweep1'"``), ``owner_kind`` (``"task"``, ``"lease"`` or ``"pending"``), ``owner_id``
    and ``since`` (ISO 8601 UTC).
    """

    def __init__(self, message: str, busy: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.busy: list[dict[str, Any]] = list(busy or [])


class TaskError(LabDaemonException):
    """Something about a task run went wrong."""


class TaskCancelledError(TaskError):
    """The run was cancelled. ``result`` holds whatever ``run`` returned (partial results)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class TaskFailedError(TaskError):
    """The run failed: ``run`` raised (the original is ``__cause__``) or returned status "failed"."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class LeaseError(LabDaemonException):
    """A lease can no longer be used: it expired, was broken by an admin, or was released."""


class DaemonClosedError(LabDaemonException):
    """The daemon has been shut down; make a new one."""


class UnknownNameError(LabDaemonException, ValueError):
    """An id or a type name that does not exist. Also a ``ValueError`` for LabDaemon scripts."""


class UnknownDeviceError(UnknownNameError):
    """No device with that id."""


class UnknownDeviceTypeError(UnknownNameError):
    """No device class registered under that name."""


class UnknownTaskError(UnknownNameError):
    """No task run with that id (live or retained)."""


class UnknownTaskTypeError(UnknownNameError):
    """No task class registered under that name."""


class UnknownLeaseError(UnknownNameError):
    """No active lease with that id (it may have expired, been released or broken)."""


class InvalidArgumentError(LabDaemonException, ValueError):
    """Bad input: a duplicate id, a bad plugin class, a malformed ``device_ids``, a bad value."""


class UnserializableResult(TypeError):
    """A value cannot be sent as JSON (HTTP 502 ``UnserializableResult``); see
    :func:`labd.wire.dumps`."""



def utc_now_iso() -> str:
    """Current time as ISO 8601 UTC with milliseconds, e.g. ``2026-11-27T18:03:07.123Z``."""
    return iso_from_timestamp(datetime.now(UTC).timestamp())


def iso_from_timestamp(ts: float) -> str:
    """A POSIX timestamp as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_choices(names: Any, limit: int = 20) -> str:
    """``'a', 'b', 'c'`` (sorted, at most ``limit``), or ``(none)`` when there are none."""
    items = sorted(str(n) for n in names)
    if not items:
        return "(none)"
    shown = ", ".join(repr(n) for n in items[:limit])
    more = len(items) - limit
    return shown + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class ErrorRecord:
    """One error, in the shape stored per device and per task and sent over HTTP.

    Build one with :meth:`from_exception`; send it with :meth:`to_dict`.
    """

    type: str
    message: str
    origin: Origin
    timestamp: str = field(default_factory=utc_now_iso)
    traceback: str | None = None
    context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(
        cls, exc: BaseException, origin: Origin, context: dict[str, Any] | None = None
    ) -> ErrorRecord:
        """Record ``exc`` with its formatted traceback (chained causes included)."""
        tb = "".join(_traceback.format_exception(exc))
        return cls(
            type=type(exc).__name__,
            message=str(exc) or type(exc).__name__,
            origin=origin,
            traceback=tb,
            context=dict(context or {}),
        )

    def to_dict(self, *, include_traceback: bool = True) -> dict[str, Any]:
        """The record as a JSON-ready dict; ``include_traceback=False`` for immediate answers."""
        return {
            "type": self.type,
            "message": self.message,
            "origin": self.origin,
            "timestamp": self.timestamp,
            "traceback": self.traceback if include_traceback else None,
            "context": dict(self.context),
        }
