"""Exceptions of a lab of several nodes, placed in labd's tree by who must act.

    DeviceBusyError
    └── ClaimLostError          the run's claim expired or was taken over (HTTP 409)
    InvalidArgumentError
    ├── DeviceIdConflictError   a device id another live node already serves
    ├── NodeNameConflictError   a node name another live process already uses
    └── EngineUrlError          an engine URL that labd refuses (no password off loopback)
    LabDaemonException
    ├── EngineUnavailableError  the engine (Redis) cannot be reached (HTTP 503)
    └── QueriesOnlyError        a caller allowed queries only sent a command (the server: 403)
"""

from __future__ import annotations

from labd.errors import DeviceBusyError, InvalidArgumentError, LabDaemonException

__all__ = [
    "ClaimLostError",
    "DeviceIdConflictError",
    "EngineUnavailableError",
    "EngineUrlError",
    "NodeNameConflictError",
    "QueriesOnlyError",
]


class EngineUnavailableError(LabDaemonException):
    """The lab's engine cannot be reached; the node keeps serving its own devices."""


class QueriesOnlyError(LabDaemonException):
    """A call marked queries-only (a viewer's, through another node) named a command."""


class ClaimLostError(DeviceBusyError):
    """A command carried a claim that is no longer the device's live claim ("claim lost")."""


class DeviceIdConflictError(InvalidArgumentError):
    """A device id is already served by another live node of the lab."""

    def __init__(self, device_id: str, node: str) -> None:
        super().__init__(
            f"Device id {device_id!r} is already served by live node {node!r} of this lab; "
            "device ids are unique across the lab. Rename the device, or stop it on that node "
            "(its entry leaves the directory within the directory TTL of that node's exit).")
        self.device_id = device_id
        self.node = node


class NodeNameConflictError(InvalidArgumentError):
    """A node name is already used by another live process of the lab."""

    def __init__(self, node: str) -> None:
        super().__init__(
            f"Node name {node!r} is already used by another live labd process in this lab; "
            "node names are unique across the lab. Pass another --node (or [lab] node), or "
            "stop the other process (its entry expires within the directory TTL).")
        self.node = node


class EngineUrlError(InvalidArgumentError):
    """An engine URL that is malformed or unsafe."""
