"""LabDaemon 1.0's ``labdaemon.exceptions`` under labd: the same names, the same tree.

Kept so that ``from labdaemon.exceptions import DeviceError`` becomes ``from labd.exceptions
import DeviceError`` with nothing else changed. The classes are labd's own (:mod:`labd.errors`,
where the tree is drawn), so ``except labd.exceptions.DeviceError`` catches what labd raises.
New code can write ``ld.DeviceError``.
"""

from __future__ import annotations

from labd.errors import (
    DeviceConfigurationError,
    DeviceConnectionError,
    DeviceError,
    DeviceNotConnectedError,
    DeviceOperationError,
    DeviceTimeoutError,
    LabDaemonException,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
)

__all__ = [
    "DeviceConfigurationError",
    "DeviceConnectionError",
    "DeviceError",
    "DeviceNotConnectedError",
    "DeviceOperationError",
    "DeviceTimeoutError",
    "LabDaemonException",
    "TaskCancelledError",
    "TaskError",
    "TaskFailedError",
]
