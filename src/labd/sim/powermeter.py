"""A simulated optical power meter behind a sample with a resonance.

`SimPowerMeter` reads the light of a linked `SimLaser` after it passed a
simulated sample: a Lorentzian dip at 1550 nm (a ring resonator, say), plus
Gaussian relative noise. A wavelength sweep over it shows a real-looking
resonance, which is what the demo and the tests need.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from labd.errors import (
    DeviceConfigurationError,
    DeviceConnectionError,
    DeviceNotConnectedError,
)
from labd.sim.laser import SimLaser, find_sim_laser, known_sim_laser_ids

__all__ = ["SimPowerMeter", "sample_transmission"]

RESONANCE_CENTRE_NM = 1550.0
RESONANCE_FWHM_NM = 0.4
RESONANCE_DEPTH = 0.8
# A dark detector still reads a little: amplifier noise in mW.
NOISE_FLOOR_MW = 1e-6


def sample_transmission(wavelength_nm: float) -> float:
    """Return the fraction of light the simulated sample lets through (0..1).

    A Lorentzian dip: 1 - depth at the centre, about 1 far from it.

    >>> round(sample_transmission(1550.0), 3)
    0.2
    >>> sample_transmission(1540.0) > 0.99
    True
    """
    half_width = RESONANCE_FWHM_NM / 2.0
    detuning = wavelength_nm - RESONANCE_CENTRE_NM
    lorentzian = half_width**2 / (detuning**2 + half_width**2)
    return 1.0 - RESONANCE_DEPTH * lorentzian


class SimPowerMeter:
    """A simulated power meter that measures a `SimLaser` through a sample.

    Link it by id (``laser_id``; resolved at `connect()`) or pass ``laser=``.
    Readings are in mW; ``seed`` makes the noise repeatable.

    >>> laser = SimLaser("doc-laser", settling_time=0.0); laser.connect()
    >>> laser.set_output(True)
    >>> meter = SimPowerMeter("doc-pm", laser_id="doc-laser", seed=1)
    >>> meter.connect()
    >>> 0.1 < meter.get_power() < 0.3   # 1 mW at the centre of the dip
    True
    """

    def __init__(
        self,
        device_id: str,
        laser_id: str = "laser1",
        noise: float = 0.002,
        seed: int | None = None,
        laser: SimLaser | None = None,
        averaging: int = 1,
    ) -> None:
        self.device_id = device_id
        self._label = f"SimPowerMeter {device_id!r}"
        if laser is not None and not isinstance(laser, SimLaser):
            raise DeviceConfigurationError(
                f"{self._label}: laser must be a SimLaser, got {type(laser).__name__}"
            )
        self.laser_id = laser.device_id if laser is not None else laser_id
        self.noise = self._checked_noise(noise)
        self._given_laser = laser
        self._laser: SimLaser | None = None
        self._averaging = self._checked_averaging(averaging)
        # numpy Generators are not thread-safe; this guards only the RNG so
        # the meter is safe to read from several threads even without a daemon.
        self._rng_lock = threading.Lock()
        self._rng = np.random.default_rng(seed)

    # -- lifecycle -------------------------------------------------------

    def connect(self) -> None:
        """Find the linked laser and start measuring; calling it again is harmless.

        Raises DeviceConnectionError when no SimLaser with `laser_id` exists.
        """
        if self._laser is not None:
            return
        laser = self._given_laser or find_sim_laser(self.laser_id)
        if laser is None:
            known = ", ".join(repr(i) for i in known_sim_laser_ids()) or "none"
            raise DeviceConnectionError(
                f"{self._label} cannot find SimLaser {self.laser_id!r} to measure; "
                f"known SimLaser ids: {known}. Add the laser before connecting "
                f"the meter, or pass laser_id=<one of those>"
            )
        self._laser = laser

    def disconnect(self) -> None:
        """Stop measuring and forget the laser; idempotent."""
        self._laser = None

    # -- readings ----------------------------------------------------------

    def get_power(self) -> float:
        """Return the measured power in mW, averaged over `set_averaging(n)` reads."""
        return self._measure()[1]

    def get_reading(self) -> dict[str, Any]:
        """Return {"power_mw", "wavelength_nm", "timestamp"} for one measurement.

        The wavelength is the laser's at the time of the reading, so a
        reading is self-describing when logged or streamed.
        """
        wavelength, power = self._measure()
        return {"power_mw": power, "wavelength_nm": wavelength, "timestamp": time.time()}

    def set_averaging(self, n: int) -> None:
        """Average `n` (>= 1) raw reads per reading; noise falls as 1/sqrt(n)."""
        self._averaging = self._checked_averaging(n)

    def get_averaging(self) -> int:
        """Return how many raw reads are averaged per reading."""
        return self._averaging

    # -- helpers -----------------------------------------------------------

    def _measure(self) -> tuple[float, float]:
        laser = self._laser
        if laser is None:
            raise DeviceNotConnectedError(
                f"{self._label} is not connected; "
                f"call daemon.connect_device({self.device_id!r}) first"
            )
        wavelength, emitted = laser._emission()
        ideal = emitted * sample_transmission(wavelength)
        with self._rng_lock:
            relative = self._rng.normal(0.0, self.noise, self._averaging)
            floor = np.abs(self._rng.normal(0.0, NOISE_FLOOR_MW, self._averaging))
        raw = ideal * (1.0 + relative) + floor
        return wavelength, float(np.mean(raw))

    def _checked_noise(self, noise: object) -> float:
        if (
            isinstance(noise, bool)
            or not isinstance(noise, (int, float))
            or not (math.isfinite(noise) and noise >= 0)
        ):
            raise DeviceConfigurationError(
                f"{self._label}: noise must be a relative standard deviation >= 0 "
                f"(e.g. 0.002), got {noise!r}"
            )
        return float(noise)

    def _checked_averaging(self, n: object) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DeviceConfigurationError(
                f"{self._label}: averaging must be an integer >= 1, got {n!r}"
            )
        return n
