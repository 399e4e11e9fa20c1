"""The simulated lab: a tunable laser, a power meter, a streaming DAQ and a sweep.

Use it to try labd, to demo the server and dashboard, and to test code
without instruments. These are plain classes, exactly like a lab's own
drivers; `demo_lab` puts them into a daemon.

    import labd
    from labd.sim import demo_lab

    daemon = labd.LabDaemon()
    devices = demo_lab(daemon)
    handle = daemon.execute_task("sweep1", "WavelengthSweep", laser_id="laser1",
                                 detector_id="pm1", start_wl=1549.0,
                                 stop_wl=1551.0, steps=41)
"""

from __future__ import annotations

from typing import Any

from labd.sim.daq import SimDAQ
from labd.sim.laser import SimLaser
from labd.sim.powermeter import SimPowerMeter
from labd.sim.sweep import WavelengthSweep

__all__ = [
    "DEMO_DEVICE_IDS",
    "SimDAQ",
    "SimLaser",
    "SimPowerMeter",
    "WavelengthSweep",
    "demo_lab",
]

DEMO_DEVICE_IDS = ("laser1", "pm1", "daq1")

_DEVICE_TYPES: dict[str, type] = {
    "SimLaser": SimLaser,
    "SimPowerMeter": SimPowerMeter,
    "SimDAQ": SimDAQ,
}
_TASK_TYPES: dict[str, type] = {"WavelengthSweep": WavelengthSweep}


def demo_lab(
    daemon: Any,
    *,
    settling_time: float = 0.002,
    daq_rate: float = 10_000.0,
    daq_block_size: int = 500,
) -> dict[str, object]:
    """Register the sim classes and add connected laser1, pm1 and daq1 to `daemon`.

    For `labd demo`, the docs and tests: one call gives a working lab. Types
    already registered (by name) are left alone; the devices must not exist yet.

    >>> import labd                                      # doctest: +SKIP
    >>> demo_lab(labd.LabDaemon())["laser1"].get_wavelength()  # doctest: +SKIP
    1550.0
    """
    # `daemon` is typed Any: labd.sim sits below labd.daemon and must not import it.
    _register_missing(daemon)
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("laser1", "SimLaser", {"settling_time": settling_time}),
        ("pm1", "SimPowerMeter", {"laser_id": "laser1"}),
        ("daq1", "SimDAQ", {"rate": daq_rate, "block_size": daq_block_size}),
    ]
    devices: dict[str, object] = {}
    # In order: pm1 finds laser1 when it connects, so the laser comes first.
    for device_id, device_type, params in specs:
        devices[device_id] = daemon.add_device(device_id, device_type, **params)
        daemon.connect_device(device_id)
    return devices


def _register_missing(daemon: Any) -> None:
    known_devices = set(daemon.device_types)
    known_tasks = set(daemon.task_types)
    devices = {n: c for n, c in _DEVICE_TYPES.items() if n not in known_devices}
    tasks = {n: c for n, c in _TASK_TYPES.items() if n not in known_tasks}
    if devices or tasks:
        daemon.register_plugins(devices=devices, tasks=tasks)
