"""A simulated streaming DAQ card.

`SimDAQ` produces blocks of samples from its own thread at a fixed sample
rate, like a real acquisition card with a driver callback. It deliberately
generates each block while holding the device lock (``_ld_lock``), as real
drivers do, so it exercises the case where the daemon must never call
`stop_streaming` while holding that lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from labd.errors import (
    DeviceConfigurationError,
    DeviceNotConnectedError,
    DeviceOperationError,
)

__all__ = ["SIGNALS", "Block", "SimDAQ"]

Block = dict[str, Any]
SIGNALS = ("sine", "noise")

# When the thread falls behind (a slow callback, a GC pause) it catches up by
# producing late blocks back to back, but never more than this many; beyond
# that it skips schedule slots, like a card whose FIFO overflowed.
MAX_CATCH_UP_BLOCKS = 3
# How long disconnect() waits for the acquisition thread before returning.
DISCONNECT_JOIN_TIMEOUT_S = 2.0


class SimDAQ:
    """A simulated DAQ card streaming sine-plus-noise blocks at a fixed rate.

    Use it to try live plots, fan-out and slow subscribers without hardware.
    Each block is ``{"t0", "rate", "index", "samples"}`` where ``samples`` has
    shape ``(block_size,)`` for one channel, ``(channels, block_size)`` else.

    >>> import threading
    >>> daq = SimDAQ("doc-daq", rate=10_000.0, block_size=100); daq.connect()
    >>> got = threading.Event()
    >>> daq.start_streaming(lambda block: got.set())
    >>> got.wait(5.0)
    True
    >>> daq.stop_streaming(timeout=5.0)
    """

    # read_block changes nothing, so non-owners may call it while a task owns the card.
    labd_queries: ClassVar[frozenset[str]] = frozenset({"read_block"})

    def __init__(
        self,
        device_id: str,
        rate: float = 100_000.0,
        block_size: int = 1000,
        channels: int = 1,
        signal: str = "sine",
        frequency: float = 1000.0,
        amplitude: float = 1.0,
        noise: float = 0.05,
        seed: int | None = None,
    ) -> None:
        self.device_id = device_id
        self._label = f"SimDAQ {device_id!r}"
        self._rate = self._checked_rate(rate)
        self._block_size = self._checked_block_size(block_size)
        self.channels = self._checked_positive_int(channels, "channels")
        if signal not in SIGNALS:
            raise DeviceConfigurationError(
                f"{self._label}: unknown signal {signal!r}; valid signals: {', '.join(SIGNALS)}"
            )
        self.signal = signal
        self.frequency = self._checked_non_negative(frequency, "frequency")
        self.amplitude = self._checked_non_negative(amplitude, "amplitude")
        self.noise = self._checked_non_negative(noise, "noise")
        # The daemon replaces this with its own re-entrant device lock; the
        # default keeps the class usable (and its thread correct) standalone.
        self._ld_lock: AbstractContextManager[Any] = threading.RLock()
        self._rng = np.random.default_rng(seed)
        self._connected = False
        # Guards the _thread/_stop pair only; never held while joining.
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.callback_errors = 0
        self.last_callback_error: BaseException | None = None
        self.blocks_skipped = 0

    # -- lifecycle -------------------------------------------------------

    def connect(self) -> None:
        """Open the (simulated) card; calling it again is harmless."""
        self._connected = True

    def disconnect(self) -> None:
        """Stop streaming (waiting up to 2 s for the thread) and close; idempotent."""
        self.stop_streaming(timeout=DISCONNECT_JOIN_TIMEOUT_S)
        self._connected = False

    # -- configuration -----------------------------------------------------

    def get_rate(self) -> float:
        """Return the sample rate in samples per second (per channel)."""
        return self._rate

    def set_rate(self, hz: float) -> None:
        """Set the sample rate; refused while streaming (stop first)."""
        rate = self._checked_rate(hz)
        if self.is_streaming():
            raise DeviceOperationError(
                f"{self._label} is streaming; call stop_streaming() before set_rate({hz!r})"
            )
        self._rate = rate

    def get_block_size(self) -> int:
        """Return the number of samples per channel in each block."""
        return self._block_size

    def read_block(self) -> npt.NDArray[np.float64]:
        """Acquire one block synchronously and return its samples.

        A query: it changes no settings, so it is allowed for non-owners.
        """
        self._require_connected()
        with self._ld_lock:
            return self._generate(time.monotonic(), self._rate, self._block_size)

    # -- streaming ---------------------------------------------------------

    def start_streaming(
        self,
        callback: Callable[[Block], object],
        rate: float | None = None,
        block_size: int | None = None,
    ) -> None:
        """Start the acquisition thread, calling `callback(block)` per block.

        `rate` and `block_size`, when given, become the card's settings.
        Raises DeviceOperationError if a stream is already running.
        """
        self._require_connected()
        if not callable(callback):
            raise TypeError(f"{self._label}: callback must be callable, got {callback!r}")
        new_rate = self._rate if rate is None else self._checked_rate(rate)
        new_size = self._block_size if block_size is None else self._checked_block_size(block_size)
        with self._state_lock:
            if self._thread is not None and self._thread.is_alive():
                raise DeviceOperationError(self._busy_message())
            self._rate, self._block_size = new_rate, new_size
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._acquire,
                args=(callback, new_rate, new_size, self._stop),
                name=f"labd-sim-daq-{self.device_id}",
                daemon=True,
            )
            self._thread.start()

    def stop_streaming(self, timeout: float | None = None) -> None:
        """Stop the acquisition thread and wait up to `timeout` s for it; idempotent.

        Never call this while holding ``_ld_lock`` with no timeout: the
        thread may be waiting for that lock to finish its block.
        """
        with self._state_lock:
            thread, stop = self._thread, self._stop
        stop.set()
        # A callback may stop its own stream; a thread cannot join itself.
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def is_streaming(self) -> bool:
        """Return True while a stream runs and has not been asked to stop."""
        with self._state_lock:
            thread, stop = self._thread, self._stop
        return thread is not None and thread.is_alive() and not stop.is_set()

    # -- the acquisition thread --------------------------------------------

    def _acquire(
        self,
        callback: Callable[[Block], object],
        rate: float,
        block_size: int,
        stop: threading.Event,
    ) -> None:
        period = block_size / rate
        wall_start, mono_start = time.time(), time.monotonic()
        slot = 0  # schedule slot: block `slot` covers [slot, slot + 1) periods
        index = 0  # blocks delivered; consecutive even when slots are skipped
        while not stop.is_set():
            # Deadlines are computed from the start, not accumulated, so the
            # stream never drifts from the monotonic clock.
            delay = mono_start + (slot + 1) * period - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            slot = self._skip_if_far_behind(slot, mono_start, period)
            with self._ld_lock:
                samples = self._generate(slot * period, rate, block_size)
            if stop.is_set():
                return  # stopped while waiting for the lock: deliver nothing more
            block = {
                "t0": wall_start + slot * period,
                "rate": rate,
                "index": index,
                "samples": samples,
            }
            self._deliver(callback, block)
            slot += 1
            index += 1

    def _skip_if_far_behind(self, slot: int, mono_start: float, period: float) -> int:
        behind = int((time.monotonic() - mono_start) / period) - (slot + 1)
        if behind <= MAX_CATCH_UP_BLOCKS:
            return slot
        skipped = behind - MAX_CATCH_UP_BLOCKS
        self.blocks_skipped += skipped
        return slot + skipped

    def _deliver(self, callback: Callable[[Block], object], block: Block) -> None:
        # A faulty consumer must not kill acquisition; the count and the last
        # exception stay visible on the device for diagnosis.
        try:
            callback(block)
        except Exception as exc:
            self.callback_errors += 1
            self.last_callback_error = exc

    def _generate(self, start_s: float, rate: float, block_size: int) -> npt.NDArray[np.float64]:
        """Return one block of samples starting `start_s` seconds into the stream."""
        times = start_s + np.arange(block_size, dtype=np.float64) / rate
        shape = (self.channels, block_size)
        if self.signal == "sine":
            phases = 2.0 * math.pi * np.arange(self.channels)[:, np.newaxis] / self.channels
            clean = self.amplitude * np.sin(2.0 * math.pi * self.frequency * times + phases)
        else:
            clean = np.zeros(shape)
        samples: npt.NDArray[np.float64] = clean + self._rng.normal(0.0, self.noise, shape)
        return samples[0] if self.channels == 1 else samples

    # -- helpers -----------------------------------------------------------

    def _require_connected(self) -> None:
        if not self._connected:
            raise DeviceNotConnectedError(
                f"{self._label} is not connected; "
                f"call daemon.connect_device({self.device_id!r}) first"
            )

    def _busy_message(self) -> str:
        if self._stop.is_set():
            return f"{self._label} is still stopping its previous stream; wait and retry"
        return f"{self._label} is already streaming; call stop_streaming() first"

    def _checked_rate(self, rate: object) -> float:
        value = self._checked_non_negative(rate, "rate")
        if value <= 0:
            raise DeviceConfigurationError(f"{self._label}: rate must be > 0 Hz, got {rate!r}")
        return value

    def _checked_block_size(self, block_size: object) -> int:
        return self._checked_positive_int(block_size, "block_size")

    def _checked_positive_int(self, value: object, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeviceConfigurationError(
                f"{self._label}: {name} must be an integer >= 1, got {value!r}"
            )
        return value

    def _checked_non_negative(self, value: object, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DeviceConfigurationError(
                f"{self._label}: {name} must be a number, got {type(value).__name__} {value!r}"
            )
        if not (math.isfinite(value) and value >= 0):
            raise DeviceConfigurationError(
                f"{self._label}: {name} must be a finite number >= 0, got {value!r}"
            )
        return float(value)
