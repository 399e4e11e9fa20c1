"""Client-side errors: HTTP answers become labd's own exceptions again.

The server turns exceptions into status codes in one table; this module turns them back,
also in one table (:data:`_BY_TYPE`, then :data:`_BY_STATUS`), so remote code catches the
same exceptions as local code::

    LabDaemonException
    └── ServerAPIError                       any failed request; .status_code, .error (record)
        ├── ServerConnectionError            no answer (also a ConnectionError)
        │   └── ServerTimeoutError           no answer in time (also a TimeoutError)
        ├── ServerAuthError                  401/403: pass token=..., or a token with a higher role
        ├── ClientClosedError                this client was closed; make a new one
        ├── RemoteError                      the server raised a class this side does not know
        └── Remote<X>(ServerAPIError, X)     for each labd error X: DeviceBusyError, UnknownDeviceError, ...

``ServerConnectionError`` is a ``ServerAPIError`` (as in LabDaemon, so old ``except
ServerAPIError`` still catches an unreachable server) and also a builtin ``ConnectionError``.
Every ``Remote<X>`` is both a ``ServerAPIError`` and the labd error ``X``, so
``except ld.DeviceBusyError`` and ``except ValueError`` work on the client as they do locally.
"""

from __future__ import annotations

import builtins
from typing import Any

import orjson

from labd.errors import (
    DaemonClosedError,
    DeviceBusyError,
    DeviceConfigurationError,
    DeviceConnectionError,
    DeviceError,
    DeviceNotConnectedError,
    DeviceOperationError,
    DeviceTimeoutError,
    InvalidArgumentError,
    LabDaemonException,
    LeaseError,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    UnknownDeviceError,
    UnknownDeviceTypeError,
    UnknownNameError,
    UnknownTaskError,
    UnknownTaskTypeError,
)

__all__ = [
    "ClientClosedError",
    "RemoteDaemonClosedError",
    "RemoteDeviceBusyError",
    "RemoteDeviceConfigurationError",
    "RemoteDeviceConnectionError",
    "RemoteDeviceError",
    "RemoteDeviceNotConnectedError",
    "RemoteDeviceOperationError",
    "RemoteDeviceTimeoutError",
    "RemoteError",
    "RemoteInvalidArgumentError",
    "RemoteLeaseError",
    "RemoteTaskCancelledError",
    "RemoteTaskError",
    "RemoteTaskFailedError",
    "RemoteUnknownDeviceError",
    "RemoteUnknownDeviceTypeError",
    "RemoteUnknownNameError",
    "RemoteUnknownTaskError",
    "RemoteUnknownTaskTypeError",
    "ServerAPIError",
    "ServerAuthError",
    "ServerConnectionError",
    "ServerTimeoutError",
    "error_from_answer",
    "exception_from_record",
]

# How much of a non-JSON error body (a proxy's HTML page) goes into the message.
_BODY_EXCERPT = 300


class ServerAPIError(LabDaemonException):
    """A request to a labd server failed.

    ``status_code`` is the HTTP status (None when there was no answer) and ``error`` the
    server's error record (``type``, ``message``, ``origin``, ``timestamp``, ``context``).
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, error: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error: dict[str, Any] = dict(error or {})

    @property
    def error_type(self) -> str | None:
        """The server-side class name (``error["type"]``), if the server sent one."""
        value = self.error.get("type")
        return value if isinstance(value, str) else None


class ServerConnectionError(ServerAPIError, ConnectionError):
    """The server could not be reached (refused, reset, DNS, TLS): nothing was answered."""


class ServerTimeoutError(ServerConnectionError, TimeoutError):
    """The server did not answer within the client's timeout (``timeout=`` of the client)."""


class ServerAuthError(ServerAPIError):
    """401/403: the server wants a bearer token (``token=...``) or one with a higher role."""


class ClientClosedError(ServerAPIError):
    """This client was closed with ``close()``; create a new one."""


class RemoteError(ServerAPIError):
    """The server raised an exception whose class has no counterpart here; see ``error_type``."""


class RemoteDeviceError(ServerAPIError, DeviceError):
    """Remote :class:`labd.DeviceError`."""


class RemoteDeviceBusyError(ServerAPIError, DeviceBusyError):
    """Remote :class:`labd.DeviceBusyError` (409); ``busy`` lists who owns what since when."""

    def __init__(
        self, message: str, *, status_code: int | None = None, error: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, status_code=status_code, error=error)
        busy = self.error.get("context", {}).get("busy") if self.error else None
        self.busy = list(busy) if isinstance(busy, list) else []


class RemoteDeviceConnectionError(ServerAPIError, DeviceConnectionError):
    """Remote :class:`labd.DeviceConnectionError`."""


class RemoteDeviceNotConnectedError(ServerAPIError, DeviceNotConnectedError):
    """Remote :class:`labd.DeviceNotConnectedError`."""


class RemoteDeviceTimeoutError(ServerAPIError, DeviceTimeoutError):
    """Remote :class:`labd.DeviceTimeoutError` (504)."""


class RemoteDeviceConfigurationError(ServerAPIError, DeviceConfigurationError):
    """Remote :class:`labd.DeviceConfigurationError`."""


class RemoteDeviceOperationError(ServerAPIError, DeviceOperationError):
    """Remote :class:`labd.DeviceOperationError` (502); ``error["context"]["cause_type"]`` names the driver's error."""


class RemoteTaskError(ServerAPIError, TaskError):
    """Remote :class:`labd.TaskError`."""


class RemoteTaskCancelledError(ServerAPIError, TaskCancelledError):
    """Remote :class:`labd.TaskCancelledError`."""


class RemoteTaskFailedError(ServerAPIError, TaskFailedError):
    """Remote :class:`labd.TaskFailedError`."""


class RemoteLeaseError(ServerAPIError, LeaseError):
    """Remote :class:`labd.LeaseError`."""


class RemoteDaemonClosedError(ServerAPIError, DaemonClosedError):
    """Remote :class:`labd.DaemonClosedError` (503): the server's daemon is shutting down."""


class RemoteUnknownNameError(ServerAPIError, UnknownNameError):
    """Remote :class:`labd.UnknownNameError` (404); also a ``ValueError``."""


class RemoteUnknownDeviceError(ServerAPIError, UnknownDeviceError):
    """Remote :class:`labd.UnknownDeviceError` (404); also a ``ValueError``."""


class RemoteUnknownDeviceTypeError(ServerAPIError, UnknownDeviceTypeError):
    """Remote :class:`labd.UnknownDeviceTypeError` (404); also a ``ValueError``."""


class RemoteUnknownTaskError(ServerAPIError, UnknownTaskError):
    """Remote :class:`labd.UnknownTaskError` (404); also a ``ValueError``."""


class RemoteUnknownTaskTypeError(ServerAPIError, UnknownTaskTypeError):
    """Remote :class:`labd.UnknownTaskTypeError` (404); also a ``ValueError``."""


class RemoteInvalidArgumentError(ServerAPIError, InvalidArgumentError):
    """Remote :class:`labd.InvalidArgumentError` (400, 413); also a ``ValueError``."""


# The one table: the server's `error.type` decides; the status code is the fallback for
# answers without a labd error body (a proxy, an older server).
_BY_TYPE: dict[str, type[ServerAPIError]] = {
    "DaemonClosedError": RemoteDaemonClosedError,
    "DeviceBusyError": RemoteDeviceBusyError,
    "DeviceConfigurationError": RemoteDeviceConfigurationError,
    "DeviceConnectionError": RemoteDeviceConnectionError,
    "DeviceError": RemoteDeviceError,
    "DeviceNotConnectedError": RemoteDeviceNotConnectedError,
    "DeviceOperationError": RemoteDeviceOperationError,
    "DeviceTimeoutError": RemoteDeviceTimeoutError,
    "Forbidden": ServerAuthError,
    "InternalError": RemoteError,
    "InvalidArgumentError": RemoteInvalidArgumentError,
    "LeaseError": RemoteLeaseError,
    "MalformedRequest": RemoteInvalidArgumentError,
    "PayloadTooLarge": RemoteInvalidArgumentError,
    "ServerStopping": RemoteDaemonClosedError,
    "TaskCancelledError": RemoteTaskCancelledError,
    "TaskError": RemoteTaskError,
    "TaskFailedError": RemoteTaskFailedError,
    "Unauthorized": ServerAuthError,
    "UnknownDeviceError": RemoteUnknownDeviceError,
    "UnknownDeviceTypeError": RemoteUnknownDeviceTypeError,
    "UnknownNameError": RemoteUnknownNameError,
    "UnknownTaskError": RemoteUnknownTaskError,
    "UnknownTaskTypeError": RemoteUnknownTaskTypeError,
    "UnserializableResult": RemoteDeviceOperationError,
}

_BY_STATUS: dict[int, type[ServerAPIError]] = {
    400: RemoteInvalidArgumentError,
    401: ServerAuthError,
    403: ServerAuthError,
    404: RemoteUnknownNameError,
    409: RemoteDeviceBusyError,
    413: RemoteInvalidArgumentError,
    422: RemoteInvalidArgumentError,
    502: RemoteDeviceOperationError,
    504: RemoteDeviceTimeoutError,
}


def _record_from_body(body: bytes) -> dict[str, Any] | None:
    """The `{"error": {...}}` record of an error answer, or None if the body is not one."""
    try:
        decoded = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    record = decoded.get("error") if isinstance(decoded, dict) else None
    return record if isinstance(record, dict) else None


def error_from_answer(status: int, body: bytes, method: str, url: str) -> ServerAPIError:
    """The exception for an HTTP error answer: mirrored labd type from `error.type`, else by status.

    Example: a 409 with ``{"error": {"type": "DeviceBusyError", ...}}`` becomes a
    :class:`RemoteDeviceBusyError`, which ``except labd.DeviceBusyError`` catches.
    """
    record = _record_from_body(body)
    error_type = record.get("type") if record else None
    cls = _BY_TYPE.get(error_type) if isinstance(error_type, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status, RemoteError if record else ServerAPIError)
    if record and isinstance(record.get("message"), str):
        message = record["message"]
    else:
        excerpt = body[:_BODY_EXCERPT].decode("utf-8", "replace").strip()
        message = f"the server answered HTTP {status} without a labd error record: {excerpt!r}"
    label = f"{error_type}, " if isinstance(error_type, str) else ""
    return cls(f"{message} [HTTP {status} {label}{method} {url}]", status_code=status, error=record)


def exception_from_record(record: dict[str, Any]) -> BaseException:
    """Rebuild an exception from a stored error record (a remote task's failure).

    labd types come back as their ``Remote<X>`` class, builtin types (``ValueError``,
    ``RuntimeError``...) as themselves, anything else as :class:`RemoteError`; each carries
    the record as ``error_record``.
    """
    type_name = str(record.get("type") or "RemoteError")
    message = str(record.get("message") or type_name)
    exc: BaseException
    mirrored = _BY_TYPE.get(type_name)
    builtin = getattr(builtins, type_name, None)
    if mirrored is not None:
        exc = mirrored(message, error=record)
    elif isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            exc = builtin(message)
        except Exception:  # a builtin with a special constructor (UnicodeDecodeError)
            exc = RemoteError(f"{type_name}: {message}", error=record)
    else:
        exc = RemoteError(f"{type_name}: {message}", error=record)
    exc.error_record = dict(record)  # type: ignore[attr-defined]
    return exc
