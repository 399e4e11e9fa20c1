"""The seed example task: step a laser's wavelength and read a detector.

`WavelengthSweep` is the task from DESIGN.md section 2, filled in. It runs
under labd (with progress and live data) and under a LabDaemon-style context
that only has `daemon`, `cancel_event` and `resume_event`.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any

import numpy as np

__all__ = ["WavelengthSweep"]

_SETTABLE = ("dwell",)


def _real(name: str, value: object) -> float:
    """Return `value` as a finite float or raise ValueError naming `name`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"WavelengthSweep: {name} must be a finite number, got {value!r}")
    return float(value)


def _steps(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"WavelengthSweep: steps must be an integer >= 1, got {value!r}")
    return int(value)


def _dwell(value: object) -> float:
    dwell = _real("dwell", value)
    if dwell < 0:
        raise ValueError(f"WavelengthSweep: dwell must be >= 0 seconds, got {value!r}")
    return dwell


class WavelengthSweep:
    """Sweep `laser_id` from `start_wl` to `stop_wl` in `steps` points, reading `detector_id`.

    Each point waits `dwell` seconds after tuning (changeable while running
    with `set_parameter("dwell", s)`), then records {"wavelength", "power"}.

    >>> sweep = WavelengthSweep("s1", "laser1", "pm1", 1549.0, 1551.0, 5)
    >>> sweep.device_ids
    ['laser1', 'pm1']
    """

    def __init__(
        self,
        task_id: str,
        laser_id: str,
        detector_id: str,
        start_wl: float,
        stop_wl: float,
        steps: int,
        dwell: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.task_id = task_id
        self.laser_id, self.detector_id = laser_id, detector_id
        self.start_wl = _real("start_wl", start_wl)
        self.stop_wl = _real("stop_wl", stop_wl)
        self.steps = _steps(steps)
        self.device_ids = [laser_id, detector_id]
        self._dwell = _dwell(dwell)
        # Extra keywords are kept, not rejected, as the seed accepts **kwargs.
        self.extra = dict(kwargs)
        # set_parameter arrives from another thread while run() reads.
        self._params_lock = threading.Lock()

    def set_parameter(self, key: str, value: object) -> None:
        """Change a parameter while the sweep runs; only "dwell" is changeable."""
        if key not in _SETTABLE:
            raise ValueError(
                f"WavelengthSweep: parameter {key!r} cannot be changed while running; "
                f"changeable parameters: {', '.join(_SETTABLE)}"
            )
        dwell = _dwell(value)
        with self._params_lock:
            self._dwell = dwell

    def get_parameter(self, key: str) -> Any:
        """Return a parameter's current value (e.g. "dwell", "steps", "start_wl")."""
        with self._params_lock:
            params = self._parameters()
        if key not in params:
            raise ValueError(
                f"WavelengthSweep: unknown parameter {key!r}; known: {', '.join(params)}"
            )
        return params[key]

    def run(self, context: Any) -> dict[str, Any]:
        """Run the sweep; returns {"status": "completed" | "cancelled", "results": [...]}."""
        laser = context.daemon.get_device(self.laser_id)
        detector = context.daemon.get_device(self.detector_id)
        progress = getattr(context, "progress", None)
        emit = getattr(context, "emit", None)
        laser.set_output(True)
        results: list[dict[str, float]] = []
        for i, wl in enumerate(self._wavelengths()):
            context.resume_event.wait()  # the pause gate; cancel opens it too
            if context.cancel_event.is_set():
                return {"status": "cancelled", "results": results}
            laser.set_wavelength(wl)
            # Dwell on the cancel event so a cancel does not wait out the dwell.
            if context.cancel_event.wait(self._current_dwell()):
                return {"status": "cancelled", "results": results}
            point = {"wavelength": wl, "power": float(detector.get_power())}
            results.append(point)
            if callable(progress):
                progress(i + 1, self.steps, f"{wl:.3f} nm")
            if callable(emit):
                emit(dict(point))
        return {"status": "completed", "results": results}

    def _wavelengths(self) -> list[float]:
        # linspace(a, b, 1) is [a], which is what steps == 1 means.
        return [float(wl) for wl in np.linspace(self.start_wl, self.stop_wl, self.steps)]

    def _current_dwell(self) -> float:
        with self._params_lock:
            return self._dwell

    def _parameters(self) -> dict[str, Any]:
        return {
            "laser_id": self.laser_id,
            "detector_id": self.detector_id,
            "start_wl": self.start_wl,
            "stop_wl": self.stop_wl,
            "steps": self.steps,
            "dwell": self._dwell,
        }
