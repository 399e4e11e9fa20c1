"""labd: instrument control and experiment automation, safely shared.

Write plain classes for instruments and experiments; labd serialises device access, runs
tasks in the background, lets tasks own the devices they use (everyone can still read
them), fans streams out to many subscribers and keeps error records. A drop-in superset of
LabDaemon 1.0: ``import labd as ld``.

Example::

    import labd as ld
    daemon = ld.LabDaemon()
    ld.sim.demo_lab(daemon)
    handle = daemon.execute_task(None, "WavelengthSweep", laser_id="laser1", detector_id="pm1",
                                 start_wl=1545.0, stop_wl=1555.0, steps=50)
    print(handle.wait()["results"][:3])
    daemon.shutdown()
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from labd import sim  # the simulated lab: ``ld.sim.demo_lab(daemon)``
from labd.daemon import LabDaemon
from labd.devices import DeviceState, command, query
from labd.errors import (
    DaemonClosedError,
    DeviceBusyError,
    DeviceConfigurationError,
    DeviceConnectionError,
    DeviceError,
    DeviceNotConnectedError,
    DeviceOperationError,
    DeviceTimeoutError,
    ErrorRecord,
    InvalidArgumentError,
    LabDaemonException,
    LeaseError,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    UnknownDeviceError,
    UnknownDeviceTypeError,
    UnknownLeaseError,
    UnknownNameError,
    UnknownTaskError,
    UnknownTaskTypeError,
)
from labd.io import capture_metadata, load_hdf5, load_json, save_hdf5, save_json
from labd.ownership import Lease
from labd.shutdown import ShutdownReport
from labd.store import RunStore, StoreError
from labd.streaming import StreamItem, Subscription
from labd.tasks import TaskContext, TaskHandle, TaskState

if TYPE_CHECKING:
    from labd.client import RemoteDaemon, ServerAPI, SSEClient
    from labd.patterns import ensure_device, ensure_server

# LabDaemon 1.0's top-level client names, loaded on first use: they need the ``server``
# extra (httpx), and `import labd` stays light for scripts that never talk HTTP.
_LAZY = {
    "SSEClient": "labd.client",
    "ServerAPI": "labd.client",
    "ensure_device": "labd.patterns",
    "ensure_server": "labd.patterns",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'labd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def connect(url: str = "http://127.0.0.1:5000", **kwargs: Any) -> RemoteDaemon:
    """Connect to a labd server; remote devices and tasks then feel local.

    Needs the ``server`` extra (httpx). Example::

        lab = labd.connect("http://127.0.0.1:5000")
        laser = lab.get_device("laser1")
        laser.set_wavelength(1550.0)
        print(lab.execute_task(None, "WavelengthSweep", laser_id="laser1", detector_id="pm1",
                               start_wl=1549.0, stop_wl=1551.0, steps=11).wait())
    """
    from labd.client import connect as _connect

    return _connect(url, **kwargs)


try:
    __version__ = version("labd")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = [
    "DaemonClosedError",
    "DeviceBusyError",
    "DeviceConfigurationError",
    "DeviceConnectionError",
    "DeviceError",
    "DeviceNotConnectedError",
    "DeviceOperationError",
    "DeviceState",
    "DeviceTimeoutError",
    "ErrorRecord",
    "InvalidArgumentError",
    "LabDaemon",
    "LabDaemonException",
    "Lease",
    "LeaseError",
    "RunStore",
    "SSEClient",
    "ServerAPI",
    "ShutdownReport",
    "StoreError",
    "StreamItem",
    "Subscription",
    "TaskCancelledError",
    "TaskContext",
    "TaskError",
    "TaskFailedError",
    "TaskHandle",
    "TaskState",
    "UnknownDeviceError",
    "UnknownDeviceTypeError",
    "UnknownLeaseError",
    "UnknownNameError",
    "UnknownTaskError",
    "UnknownTaskTypeError",
    "__version__",
    "capture_metadata",
    "command",
    "connect",
    "ensure_device",
    "ensure_server",
    "load_hdf5",
    "load_json",
    "query",
    "save_hdf5",
    "save_json",
    "sim",
]
