"""The labd client: use a labd server's devices and tasks from another process or machine.

- :func:`connect` returns a :class:`RemoteDaemon` whose devices feel local
  (``lab.get_device("laser1").set_wavelength(1550)``) and whose tasks return
  :class:`RemoteTaskHandle` objects that behave like :class:`labd.TaskHandle`.
- :class:`ServerAPI` / :class:`AsyncServerAPI`: every HTTP endpoint as a method
  (LabDaemon 1.0's ``ServerAPI`` names), blocking or awaited.
- :class:`SSEClient`: follow a device's data, a task's progress or the daemon's events.

Errors come back as the exceptions the server raised: ``except labd.DeviceBusyError`` works,
and every HTTP failure is also a :class:`ServerAPIError` (see ``labd.client.errors``).
This package depends only on ``labd.errors``, httpx, httpx-sse and orjson.
"""

from __future__ import annotations

from labd.client.aio import AsyncServerAPI
from labd.client.api import DEFAULT_URL, ServerAPI
from labd.client.errors import (
    ClientClosedError,
    RemoteDaemonClosedError,
    RemoteDeviceBusyError,
    RemoteDeviceConfigurationError,
    RemoteDeviceConnectionError,
    RemoteDeviceError,
    RemoteDeviceNotConnectedError,
    RemoteDeviceOperationError,
    RemoteDeviceTimeoutError,
    RemoteError,
    RemoteInvalidArgumentError,
    RemoteLeaseError,
    RemoteTaskCancelledError,
    RemoteTaskError,
    RemoteTaskFailedError,
    RemoteUnknownDeviceError,
    RemoteUnknownDeviceTypeError,
    RemoteUnknownNameError,
    RemoteUnknownTaskError,
    RemoteUnknownTaskTypeError,
    ServerAPIError,
    ServerAuthError,
    ServerConnectionError,
    ServerTimeoutError,
)
from labd.client.handles import RemoteTaskHandle
from labd.client.remote import RemoteDaemon, RemoteDevice, RemoteLease, RemoteMethod, connect
from labd.client.sse import SSEClient

__all__ = [
    "DEFAULT_URL",
    "AsyncServerAPI",
    "ClientClosedError",
    "RemoteDaemon",
    "RemoteDaemonClosedError",
    "RemoteDevice",
    "RemoteDeviceBusyError",
    "RemoteDeviceConfigurationError",
    "RemoteDeviceConnectionError",
    "RemoteDeviceError",
    "RemoteDeviceNotConnectedError",
    "RemoteDeviceOperationError",
    "RemoteDeviceTimeoutError",
    "RemoteError",
    "RemoteInvalidArgumentError",
    "RemoteLease",
    "RemoteLeaseError",
    "RemoteMethod",
    "RemoteTaskCancelledError",
    "RemoteTaskError",
    "RemoteTaskFailedError",
    "RemoteTaskHandle",
    "RemoteUnknownDeviceError",
    "RemoteUnknownDeviceTypeError",
    "RemoteUnknownNameError",
    "RemoteUnknownTaskError",
    "RemoteUnknownTaskTypeError",
    "SSEClient",
    "ServerAPI",
    "ServerAPIError",
    "ServerAuthError",
    "ServerConnectionError",
    "ServerTimeoutError",
    "connect",
]
