"""A Python lab config for ``labd serve examples/lab_setup.py``.

Use a Python file instead of TOML when setting up the lab needs logic: devices that depend
on each other, values computed at start-up, classes defined right here. labd calls
``setup(daemon)`` once, before the server starts; an exception stops ``labd serve`` with
a one-line error naming this file and line.
"""

from __future__ import annotations

from typing import Any

from labd.sim import SimLaser, SimPowerMeter, WavelengthSweep


class Shutter:
    """A device defined in the config itself: a plain class, no base class needed."""

    def __init__(self, device_id: str, open_at_start: bool = False) -> None:
        self.device_id = device_id
        self._open = open_at_start

    def set_open(self, is_open: bool) -> None:
        """Open (True) or close (False) the shutter: a command."""
        self._open = bool(is_open)

    def is_open(self) -> bool:
        """Whether the shutter is open: a query (names starting is_/get_ are queries)."""
        return self._open


def setup(daemon: Any) -> None:
    """Register the classes and add the lab's devices, connected."""
    daemon.register_plugins(
        devices={"SimLaser": SimLaser, "SimPowerMeter": SimPowerMeter, "Shutter": Shutter},
        tasks={"WavelengthSweep": WavelengthSweep},
    )
    daemon.add_device("laser1", "SimLaser", wavelength=1550.0)
    # pm1 looks laser1 up when it connects, so the laser connects first.
    daemon.connect_device("laser1")
    daemon.add_device("pm1", "SimPowerMeter", laser_id="laser1")
    daemon.connect_device("pm1")
    daemon.add_device("shutter1", "Shutter")  # no connect(): usable at once
