"""What typed remote calls add to one ``POST /devices/{id}/call`` (issue 9 item 7), in µs.

Why: the server validates a call's arguments against the method's annotations on the event
loop before offloading it (``routes_devices._prepared_call``: a slot lookup,
``labd.signatures.signature_of``, ``CallableSignature.validate``). This times exactly that
work, each call on its own with ``perf_counter_ns``, and reports p50 and p99 after
subtracting the cost of the empty timed loop. The end-to-end effect on throughput is
``bench/run.py --only call`` (``http_call_typed*`` next to ``http_call*``).

    .venv/bin/python bench/validation_cost.py            # 200,000 samples per case
    .venv/bin/python bench/validation_cost.py --quick    # 20,000

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import enum
import gc
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from labd import LabDaemon
from labd.signatures import signature_of


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Bench:
    """The methods timed: none, one float, and five parameters of richer types."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def ping(self) -> int:
        return 1

    def set_level(self, level: float, mode: str = "fast") -> float:
        return level

    def configure(self, wavelength: float, steps: int, mode: Literal["fast", "slow"],
                  speed: Mode, points: list[float]) -> None:
        pass


CASES: dict[str, tuple[str, list[Any], dict[str, Any]]] = {
    "no_params": ("ping", [], {}),
    "float_and_str": ("set_level", [1550, "slow"], {}),
    "five_params_100_floats": ("configure", [1550, 40, "fast"],
                               {"speed": "slow", "points": [float(i) for i in range(100)]}),
}


def _timed(fn: Callable[[], object], samples: int) -> list[int]:
    clock = time.perf_counter_ns
    out = [0] * samples
    for i in range(samples):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] / 1000.0


def measure(samples: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with LabDaemon() as daemon:
        daemon.register_plugins(devices={"Bench": Bench})
        daemon.add_device("dev1", "Bench")
        slot = daemon.device_slot("dev1")
        empty = _pct(_timed(lambda: None, samples), 50)
        for name, (method, args, kwargs) in CASES.items():

            def added(method: str = method, args: list[Any] = args,
                      kwargs: dict[str, Any] = kwargs) -> object:
                # What the call route does on the loop (routes_devices._prepared_call).
                original = slot.originals.get(method)
                signature = signature_of(original) if original is not None else None
                if signature is None:
                    return args, kwargs
                return signature.validate(args, kwargs, f"{slot.device_id}.{method}()")

            added()  # builds the cached adapters (once per method)
            gc.collect()
            got = _timed(added, samples)
            figures[f"validate_{name}_p50_us"] = round(_pct(got, 50) - empty, 3)
            figures[f"validate_{name}_p99_us"] = round(_pct(got, 99) - empty, 3)
        figures["timer_overhead_p50_us"] = empty
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    figures = measure(20_000 if options.quick else 200_000)
    for name, value in figures.items():
        print(f"{name:40s} {value:8.3f} µs", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
