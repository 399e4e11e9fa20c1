"""A simulated tunable laser.

`SimLaser` behaves like a GPIB tunable laser: it must be connected before use,
it refuses wavelengths outside its tuning range and it takes a moment to
settle after each wavelength step. Every instance registers itself by
device id so that a simulated power meter can find "the light" it measures.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
import weakref
from typing import Any

from labd.errors import DeviceConfigurationError, DeviceNotConnectedError

__all__ = ["SimLaser", "find_sim_laser", "known_sim_laser_ids"]

# Weak values: a laser that nobody holds any more disappears from the registry
# instead of being kept alive (and found) forever by a power meter lookup.
_registry: weakref.WeakValueDictionary[str, SimLaser] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def find_sim_laser(device_id: str) -> SimLaser | None:
    """Return the most recently constructed live `SimLaser` called `device_id`.

    Used by `SimPowerMeter.connect()` to link a meter to its laser by id.

    >>> find_sim_laser("no-such-laser") is None
    True
    """
    with _registry_lock:
        return _registry.get(device_id)


def known_sim_laser_ids() -> list[str]:
    """Return the sorted ids of every live `SimLaser`, for error messages.

    >>> isinstance(known_sim_laser_ids(), list)
    True
    """
    with _registry_lock:
        return sorted(_registry.keys())


def _as_real(value: object, what: str, owner: str) -> float:
    """Return `value` as a finite float or raise DeviceConfigurationError."""
    # bool is an int subclass; True nm is never what the caller meant.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DeviceConfigurationError(
            f"{owner}: {what} must be a number, got {type(value).__name__} {value!r}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise DeviceConfigurationError(f"{owner}: {what} must be finite, got {number!r}")
    return number


class SimLaser:
    """A simulated tunable laser with a tuning range, power and an output shutter.

    Use it to try labd (or test code against it) without hardware; `demo_lab`
    adds one as ``laser1``.

    >>> laser = SimLaser("doc-laser", settling_time=0.0)
    >>> laser.connect()
    >>> laser.set_wavelength(1551.0)
    >>> laser.get_wavelength()
    1551.0
    """

    def __init__(
        self,
        device_id: str,
        wavelength: float = 1550.0,
        power_mw: float = 1.0,
        settling_time: float = 0.002,
        min_wl: float = 1500.0,
        max_wl: float = 1600.0,
        max_power_mw: float = 10.0,
    ) -> None:
        self.device_id = device_id
        self._label = f"SimLaser {device_id!r}"
        self.min_wl = _as_real(min_wl, "min_wl", self._label)
        self.max_wl = _as_real(max_wl, "max_wl", self._label)
        if self.min_wl >= self.max_wl:
            raise DeviceConfigurationError(
                f"{self._label}: min_wl ({self.min_wl}) must be below max_wl ({self.max_wl})"
            )
        self.max_power_mw = _as_real(max_power_mw, "max_power_mw", self._label)
        if self.max_power_mw <= 0:
            raise DeviceConfigurationError(
                f"{self._label}: max_power_mw must be positive, got {self.max_power_mw}"
            )
        self.settling_time = _as_real(settling_time, "settling_time", self._label)
        if self.settling_time < 0:
            raise DeviceConfigurationError(
                f"{self._label}: settling_time must be >= 0 s, got {self.settling_time}"
            )
        self._wavelength = self._checked_wavelength(wavelength)
        self._power_mw = self._checked_power(power_mw)
        self._output_on = False
        self._connected = False
        with _registry_lock:
            _registry[device_id] = self

    # -- lifecycle -------------------------------------------------------

    def connect(self) -> None:
        """Open the (simulated) connection; calling it again is harmless."""
        self._connected = True

    def disconnect(self) -> None:
        """Close the connection and close the shutter; idempotent.

        The output goes off so that a released laser never keeps lighting a
        sample that nobody is watching.
        """
        self._output_on = False
        self._connected = False

    # -- wavelength ----------------------------------------------------------

    def set_wavelength(self, nm: float) -> None:
        """Tune to `nm` nanometres and wait `settling_time` seconds to settle.

        Raises DeviceConfigurationError (state unchanged) outside [min_wl, max_wl].

        >>> laser = SimLaser("doc-laser", settling_time=0.0); laser.connect()
        >>> laser.set_wavelength(1520.5)
        """
        self._require_connected()
        self._wavelength = self._checked_wavelength(nm)
        # Real tunable lasers need time to lock; blocking here is what makes
        # the daemon's per-device lock and task ownership matter.
        if self.settling_time > 0:
            time.sleep(self.settling_time)

    def get_wavelength(self) -> float:
        """Return the current wavelength in nm."""
        self._require_connected()
        return self._wavelength

    # -- power and output ------------------------------------------------------

    def set_power(self, mw: float) -> None:
        """Set the output power in mW; valid values are 0 to `max_power_mw`."""
        self._require_connected()
        self._power_mw = self._checked_power(mw)

    def get_power(self) -> float:
        """Return the set output power in mW (whether or not the output is on)."""
        self._require_connected()
        return self._power_mw

    def set_output(self, on: bool) -> None:
        """Open (True) or close (False) the output shutter."""
        self._require_connected()
        if not isinstance(on, bool):
            raise DeviceConfigurationError(
                f"{self._label}: output must be True or False, got {on!r}"
            )
        self._output_on = on

    def is_output_on(self) -> bool:
        """Return True when the shutter is open and light leaves the laser."""
        self._require_connected()
        return self._output_on

    def get_state(self) -> dict[str, Any]:
        """Return a snapshot of the laser's settings, for dashboards and logs.

        Works before `connect()` too (it reports ``connected: False``) so that
        a status view can describe a laser it cannot yet drive.
        """
        return {
            "device_id": self.device_id,
            "connected": self._connected,
            "wavelength_nm": self._wavelength,
            "power_mw": self._power_mw,
            "output_on": self._output_on,
            "min_wl": self.min_wl,
            "max_wl": self.max_wl,
            "max_power_mw": self.max_power_mw,
        }

    # -- for the simulated power meter -----------------------------------------

    def _emission(self) -> tuple[float, float]:
        """Return (wavelength nm, emitted mW): what a detector downstream sees.

        Private so the daemon does not publish it as a device method; reads of
        plain attributes need no lock.
        """
        wavelength = self._wavelength
        emitted = self._power_mw if (self._connected and self._output_on) else 0.0
        return wavelength, emitted

    # -- helpers -----------------------------------------------------------

    def _require_connected(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(
                f"{self._label} is not connected; "
                f"call daemon.connect_device({self.device_id!r}) first"
            )

    def _checked_wavelength(self, nm: object) -> float:
        value = _as_real(nm, "wavelength", self._label)
        if not self.min_wl <= value <= self.max_wl:
            raise DeviceConfigurationError(
                f"{self._label}: wavelength {value} nm is out of range; "
                f"valid range is {self.min_wl} to {self.max_wl} nm"
            )
        return value

    def _checked_power(self, mw: object) -> float:
        value = _as_real(mw, "power", self._label)
        if not 0.0 <= value <= self.max_power_mw:
            raise DeviceConfigurationError(
                f"{self._label}: power {value} mW is out of range; "
                f"valid range is 0 to {self.max_power_mw} mW"
            )
        return value
