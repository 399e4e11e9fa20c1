"""The fake instruments both benchmarked servers serve (standard library and NumPy only).

Why: the server benchmark must put the same devices behind labd's server and LabDaemon
1.0.1's, so this module is imported by both venvs. The devices are plain classes, as a lab
writes them, using the streaming trio both daemons call: ``start_streaming(callback)``,
``stop_streaming(timeout)``, ``is_streaming()``.

Example::

    daemon.register_plugins(devices=DEVICE_TYPES)
    daemon.add_device("s20", "Streamer", rate=20.0, kind="scalar")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: How far (in seconds of data) the producer may fall behind before it stops catching up.
#: Past this it re-anchors its clock instead of bursting: a burst would not be the configured
#: rate either, and the benchmark reports the rate actually published.
MAX_LAG_S = 0.05


class Ping:
    """A device whose one method costs nothing, so a call measures the server alone."""

    def __init__(self, device_id: str, **params: Any) -> None:
        self.device_id = device_id
        self._value = params.get("value", 1)

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def ping(self) -> Any:
        return self._value

    def set_level(self, level: float, mode: str = "fast") -> float:
        """A typed command: labd validates ``level`` and ``mode`` against these annotations."""
        self._value = level
        return level


class Slow:
    """A device whose method takes 10 ms of I/O (it sleeps, releasing the GIL)."""

    def __init__(self, device_id: str, **params: Any) -> None:
        self.device_id = device_id
        self._seconds = float(params.get("seconds", 0.010))

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def work(self) -> int:
        time.sleep(self._seconds)
        return 1


class Streamer:
    """Pushes ``{"n", "t", ...}`` at ``rate`` Hz into the callback from its own thread.

    ``n`` counts items from 0 (a gap seen by a client is a lost item) and ``t`` is
    ``time.time()`` just before the callback, for latency. ``kind="scalar"`` adds a float
    ``v``; ``kind="block"`` adds ``data``, a float64 array of ``samples`` values.
    ``published()`` returns how many items have been pushed since the stream started.
    """

    def __init__(self, device_id: str, **params: Any) -> None:
        self.device_id = device_id
        self._rate = float(params.get("rate", 20.0))
        self._kind = str(params.get("kind", "scalar"))
        if self._kind not in ("scalar", "block"):
            raise ValueError(f"kind must be 'scalar' or 'block', got {self._kind!r}")
        samples = int(params.get("samples", 1000))
        # Made once and reused: the benchmark measures delivery, not NumPy allocation.
        self._block = np.sin(np.linspace(0.0, 20.0, samples))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        self.stop_streaming(timeout=2.0)

    def published(self) -> int:
        return self._count

    def is_streaming(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_streaming(self, callback: Callable[[Any], object], **_params: Any) -> None:
        if self.is_streaming():
            raise RuntimeError(f"{self.device_id} is already streaming")
        self._stop = threading.Event()
        self._count = 0
        self._thread = threading.Thread(
            target=self._produce,
            args=(callback, self._stop),
            name=f"stream-{self.device_id}",
            daemon=True,
        )
        self._thread.start()

    def stop_streaming(self, timeout: float | None = None) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0 if timeout is None else timeout)

    def _item(self, n: int) -> dict[str, Any]:
        if self._kind == "block":
            return {"n": n, "t": time.time(), "data": self._block}
        return {"n": n, "t": time.time(), "v": float(n)}

    def _produce(self, callback: Callable[[Any], object], stop: threading.Event) -> None:
        rate, n = self._rate, 0
        start = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - start) * rate) + 1
            if due - n > rate * MAX_LAG_S:
                start = time.perf_counter() - n / rate  # fell behind: re-anchor, do not burst
                due = n + 1
            while n < due:
                callback(self._item(n))
                n += 1
                self._count = n
            # Wake at the next item's time (at least ~1 ms apart for fast streams: batches).
            delay = start + n / rate - time.perf_counter()
            stop.wait(max(delay, 0.0005 if rate > 1000 else 0.0))


#: Device types, as both daemons' ``register_plugins(devices=...)`` take them.
DEVICE_TYPES: dict[str, type] = {"Ping": Ping, "Slow": Slow, "Streamer": Streamer}

#: Devices each scenario adds: ``(device_id, device_type, params)``.
SCENARIO_DEVICES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "call": [("ping", "Ping", {})],
    "slow": [(f"slow{i}", "Slow", {}) for i in range(8)],
    "latency": [("s20", "Streamer", {"rate": 20.0, "kind": "scalar"})],
    "fanout": [("s5k", "Streamer", {"rate": 5000.0, "kind": "scalar"})],
    "blocks": [("blk", "Streamer", {"rate": 1000.0, "kind": "block", "samples": 1000})],
}
