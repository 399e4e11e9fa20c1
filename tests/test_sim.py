"""Tests for labd.sim: the simulated laser, power meter, DAQ and sweep task."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

import labd
from labd.devices import method_kind
from labd.errors import (
    DeviceConfigurationError,
    DeviceConnectionError,
    DeviceNotConnectedError,
    DeviceOperationError,
)
from labd.sim import DEMO_DEVICE_IDS, SimDAQ, SimLaser, SimPowerMeter, WavelengthSweep, demo_lab
from labd.sim.daq import MAX_CATCH_UP_BLOCKS

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


def connected_laser(device_id: str = "laser-t", **params: Any) -> SimLaser:
    laser = SimLaser(device_id, settling_time=0.0, **params)
    laser.connect()
    return laser


def connected_meter(laser: SimLaser, seed: int = 7) -> SimPowerMeter:
    meter = SimPowerMeter(f"pm-{laser.device_id}", laser_id=laser.device_id, seed=seed)
    meter.connect()
    return meter


@contextmanager
def connected_daq(**params: Any) -> Iterator[SimDAQ]:
    daq = SimDAQ("daq-t", **params)
    daq.connect()
    try:
        yield daq
    finally:
        daq.disconnect()


# -- SimLaser ---------------------------------------------------------------


def test_laser_rejects_out_of_range_wavelength_and_names_the_range() -> None:
    laser = connected_laser()
    laser.set_wavelength(1520.0)
    with pytest.raises(DeviceConfigurationError, match=r"1700\.0 nm.*1500\.0 to 1600\.0 nm"):
        laser.set_wavelength(1700.0)
    assert laser.get_wavelength() == 1520.0  # bad input leaves state alone


@pytest.mark.parametrize("bad", ["1550", None, True, float("nan")])
def test_laser_rejects_non_numbers(bad: object) -> None:
    laser = connected_laser()
    with pytest.raises(DeviceConfigurationError, match="wavelength"):
        laser.set_wavelength(bad)  # type: ignore[arg-type]
    assert laser.get_wavelength() == 1550.0


def test_laser_power_range_and_output() -> None:
    laser = connected_laser(max_power_mw=5.0)
    laser.set_power(2.5)
    with pytest.raises(DeviceConfigurationError, match=r"0 to 5\.0 mW"):
        laser.set_power(-1.0)
    assert laser.get_power() == 2.5
    assert not laser.is_output_on()
    laser.set_output(True)
    assert laser.is_output_on()
    assert laser.get_state()["output_on"] is True


def test_laser_calls_before_connect_say_what_to_do() -> None:
    laser = SimLaser("laser1")
    expected = "SimLaser 'laser1' is not connected; call daemon.connect_device('laser1') first"
    with pytest.raises(DeviceNotConnectedError) as info:
        laser.get_wavelength()
    assert str(info.value) == expected
    with pytest.raises(DeviceNotConnectedError):
        laser.set_wavelength(1550.0)
    with pytest.raises(DeviceNotConnectedError):
        laser.set_output(True)
    assert laser.get_state()["connected"] is False


def test_laser_disconnect_is_idempotent_and_closes_the_output() -> None:
    laser = connected_laser()
    laser.set_output(True)
    laser.disconnect()
    laser.disconnect()
    laser.connect()
    assert not laser.is_output_on()


def test_laser_constructor_rejects_bad_range() -> None:
    with pytest.raises(DeviceConfigurationError, match="min_wl"):
        SimLaser("laser-bad", min_wl=1600.0, max_wl=1500.0)
    with pytest.raises(DeviceConfigurationError, match="out of range"):
        SimLaser("laser-bad", wavelength=1400.0)


# -- SimPowerMeter ----------------------------------------------------------


def test_power_meter_sees_the_resonance_dip() -> None:
    laser = connected_laser("laser-dip")
    laser.set_output(True)
    meter = connected_meter(laser)
    laser.set_wavelength(1549.0)
    off_resonance = meter.get_power()
    laser.set_wavelength(1550.0)
    on_resonance = meter.get_power()
    assert off_resonance == pytest.approx(0.96, rel=0.02)
    assert on_resonance == pytest.approx(0.2, rel=0.05)
    assert on_resonance < 0.5 * off_resonance


def test_power_meter_reads_about_zero_with_output_off() -> None:
    laser = connected_laser("laser-dark")
    meter = connected_meter(laser)
    assert 0.0 <= meter.get_power() < 1e-4


def test_power_meter_reading_is_self_describing() -> None:
    laser = connected_laser("laser-read")
    laser.set_output(True)
    laser.set_wavelength(1551.0)
    reading = connected_meter(laser).get_reading()
    assert set(reading) == {"power_mw", "wavelength_nm", "timestamp"}
    assert reading["wavelength_nm"] == 1551.0


def test_power_meter_is_deterministic_with_a_seed() -> None:
    laser = connected_laser("laser-seed")
    laser.set_output(True)
    first = [connected_meter(laser, seed=3).get_power() for _ in range(2)]
    assert first[0] == first[1]


def test_power_meter_averaging_reduces_noise() -> None:
    laser = connected_laser("laser-avg")
    laser.set_output(True)
    laser.set_wavelength(1540.0)
    meter = connected_meter(laser)
    single = np.std([meter.get_power() for _ in range(200)])
    meter.set_averaging(100)
    averaged = np.std([meter.get_power() for _ in range(200)])
    assert averaged < single / 3  # expected ratio is 10; 3 leaves a wide margin
    with pytest.raises(DeviceConfigurationError, match="averaging"):
        meter.set_averaging(0)
    assert meter.get_averaging() == 100


def test_power_meter_without_its_laser_fails_at_connect_naming_ids() -> None:
    keep = SimLaser("laser-present")
    meter = SimPowerMeter("pm-orphan", laser_id="laser-missing")
    with pytest.raises(DeviceConnectionError, match=r"'laser-missing'.*'laser-present'"):
        meter.connect()
    with pytest.raises(DeviceNotConnectedError, match="pm-orphan"):
        meter.get_power()
    del keep


def test_power_meter_links_to_the_most_recent_laser_or_a_given_one() -> None:
    old = connected_laser("laser-twice")
    new = connected_laser("laser-twice")
    new.set_output(True)
    assert connected_meter(old).get_power() > 0.1  # resolved by id: the new one
    direct = SimPowerMeter("pm-direct", laser=old)
    direct.connect()
    assert direct.get_power() < 1e-4  # the old laser's output is off
    assert direct.laser_id == "laser-twice"


# -- SimDAQ -------------------------------------------------------------------


class BlockCollector:
    """Records blocks; sets `done` once `wanted` have arrived."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.blocks: list[dict[str, Any]] = []
        self.done = threading.Event()

    def __call__(self, block: dict[str, Any]) -> None:
        self.blocks.append(block)
        if len(self.blocks) >= self.wanted:
            self.done.set()


@pytest.mark.parametrize(("channels", "shape"), [(1, (100,)), (3, (3, 100))])
def test_daq_streams_indexed_blocks_of_the_right_shape(
    channels: int, shape: tuple[int, ...]
) -> None:
    with connected_daq(rate=20_000.0, block_size=100, channels=channels) as daq:
        collector = BlockCollector(wanted=5)
        daq.start_streaming(collector)
        assert daq.is_streaming()
        assert collector.done.wait(WAIT_S), "no 5 blocks within the watchdog"
        daq.stop_streaming(timeout=WAIT_S)
    blocks = collector.blocks
    assert [b["index"] for b in blocks] == list(range(len(blocks)))
    assert all(b["samples"].shape == shape and b["samples"].dtype == np.float64 for b in blocks)
    assert all(b["rate"] == 20_000.0 for b in blocks)
    assert all(later["t0"] > earlier["t0"] for earlier, later in itertools.pairwise(blocks))


def test_daq_stop_is_prompt_idempotent_and_final() -> None:
    # One block per 10 s: stopping must not wait for the next block.
    with connected_daq(rate=10.0, block_size=100) as daq:
        daq.stop_streaming()  # before any stream: harmless
        collector = BlockCollector(wanted=1)
        daq.start_streaming(collector)
        thread = daq._thread
        daq.stop_streaming(timeout=WAIT_S)
        assert thread is not None and not thread.is_alive()
        assert not daq.is_streaming()
        daq.stop_streaming(timeout=WAIT_S)
        assert collector.blocks == []


def test_daq_start_while_streaming_is_refused_and_restart_works() -> None:
    with connected_daq(rate=20_000.0, block_size=100) as daq:
        daq.start_streaming(BlockCollector(wanted=1))
        with pytest.raises(DeviceOperationError, match="already streaming"):
            daq.start_streaming(BlockCollector(wanted=1))
        with pytest.raises(DeviceOperationError, match="stop_streaming"):
            daq.set_rate(1000.0)
        daq.stop_streaming(timeout=WAIT_S)
        daq.set_rate(40_000.0)
        again = BlockCollector(wanted=2)
        daq.start_streaming(again)
        assert again.done.wait(WAIT_S)
        daq.stop_streaming(timeout=WAIT_S)
    assert again.blocks[0]["index"] == 0 and again.blocks[0]["rate"] == 40_000.0


def test_daq_survives_a_raising_callback() -> None:
    seen = BlockCollector(wanted=5)

    def flaky(block: dict[str, Any]) -> None:
        seen(block)
        if block["index"] < 3:
            raise RuntimeError("consumer bug")

    with connected_daq(rate=20_000.0, block_size=100) as daq:
        daq.start_streaming(flaky)
        assert seen.done.wait(WAIT_S), "thread died after the callback raised"
        daq.stop_streaming(timeout=WAIT_S)
    assert daq.callback_errors == 3
    assert isinstance(daq.last_callback_error, RuntimeError)


def test_daq_skips_schedule_slots_after_a_long_stall_but_keeps_counting() -> None:
    period = 100 / 20_000.0
    seen = BlockCollector(wanted=3)

    def stalls_once(block: dict[str, Any]) -> None:
        if block["index"] == 0:
            # Hold the acquisition thread for 12 periods: far past the catch-up bound.
            until = time.monotonic() + 12 * period
            while (remaining := until - time.monotonic()) > 0:
                threading.Event().wait(remaining)
        seen(block)

    with connected_daq(rate=20_000.0, block_size=100) as daq:
        daq.start_streaming(stalls_once)
        assert seen.done.wait(WAIT_S)
        daq.stop_streaming(timeout=WAIT_S)
    first, second = seen.blocks[0], seen.blocks[1]
    assert second["index"] == 1  # the counter stays consecutive
    assert daq.blocks_skipped >= 12 - 1 - MAX_CATCH_UP_BLOCKS
    # The timestamp tells the truth about the gap the skip left.
    skipped_time = daq.blocks_skipped * period
    assert second["t0"] - first["t0"] == pytest.approx(period + skipped_time, abs=1e-6)


class HoldUntilStopLock:
    """A device lock whose holder, in the DAQ thread, keeps it until stop is requested.

    Stands in for the daemon's injected lock to pin the DAQ thread inside
    `_ld_lock` exactly while another thread calls stop_streaming.
    """

    def __init__(self, daq: SimDAQ) -> None:
        self._lock = threading.RLock()
        self._daq = daq
        self.held_by_stream = threading.Event()

    def __enter__(self) -> None:
        self._lock.acquire()
        if threading.current_thread().name == "labd-sim-daq-daq-t":
            self.held_by_stream.set()
            assert self._daq._stop.wait(WAIT_S), "stop_streaming never signalled"

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_stop_from_another_thread_while_stream_holds_lock_does_not_deadlock() -> None:
    with connected_daq(rate=20_000.0, block_size=100) as daq:
        lock = HoldUntilStopLock(daq)
        daq._ld_lock = lock
        collector = BlockCollector(wanted=1)
        daq.start_streaming(collector)
        assert lock.held_by_stream.wait(WAIT_S)
        stopper = threading.Thread(target=daq.stop_streaming, kwargs={"timeout": WAIT_S})
        stopper.start()
        stopper.join(WAIT_S)
        assert not stopper.is_alive(), "stop_streaming deadlocked"
        assert daq._thread is not None and not daq._thread.is_alive()
    # The block generated while stop was requested is not delivered.
    assert collector.blocks == []


def test_daq_read_block_and_validation() -> None:
    with connected_daq(rate=1000.0, block_size=50, channels=2, seed=1) as daq:
        assert daq.read_block().shape == (2, 50)
        assert daq.get_rate() == 1000.0
        with pytest.raises(DeviceConfigurationError, match="rate must be > 0"):
            daq.set_rate(0)
    with pytest.raises(DeviceNotConnectedError, match="connect_device\\('daq-t'\\)"):
        daq.read_block()
    with pytest.raises(DeviceConfigurationError, match="valid signals: sine, noise"):
        SimDAQ("daq-bad", signal="square")


def test_daq_read_block_is_a_query_for_the_daemon() -> None:
    assert method_kind(SimDAQ, "read_block") == "query"
    assert method_kind(SimDAQ, "set_rate") == "command"


# -- WavelengthSweep --------------------------------------------------------


class FakeDaemon:
    def __init__(self, devices: dict[str, Any]) -> None:
        self.devices = devices

    def get_device(self, device_id: str) -> Any:
        return self.devices[device_id]


class PlainContext:
    """The LabDaemon 1.0 context surface: daemon, cancel_event, resume_event."""

    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.cancel_event = threading.Event()
        self.resume_event = threading.Event()
        self.resume_event.set()


def sim_context(device_id: str) -> PlainContext:
    laser = connected_laser(device_id)
    return PlainContext(FakeDaemon({"laser1": laser, "pm1": connected_meter(laser)}))


def test_sweep_completes_with_one_point_per_step() -> None:
    sweep = WavelengthSweep("s1", "laser1", "pm1", 1549.0, 1551.0, 21)
    result = sweep.run(sim_context("laser-sweep"))
    assert result["status"] == "completed"
    points = result["results"]
    assert [p["wavelength"] for p in points] == pytest.approx(np.linspace(1549.0, 1551.0, 21))
    dip = min(points, key=lambda p: p["power"])
    assert dip["wavelength"] == pytest.approx(1550.0)


def test_sweep_reports_progress_and_stops_when_cancelled() -> None:
    context = sim_context("laser-cancel")
    reported: list[tuple[int, int, str]] = []
    emitted: list[dict[str, float]] = []

    def progress(done: int, total: int, message: str) -> None:
        reported.append((done, total, message))
        if done == 3:
            context.cancel_event.set()

    context.progress = progress  # type: ignore[attr-defined]
    context.emit = emitted.append  # type: ignore[attr-defined]
    result = WavelengthSweep("s2", "laser1", "pm1", 1549.0, 1551.0, 10).run(context)
    assert result["status"] == "cancelled"
    assert len(result["results"]) == 3
    assert reported[0] == (1, 10, "1549.000 nm")
    assert emitted == result["results"]


def test_sweep_waits_at_the_pause_gate() -> None:
    context = sim_context("laser-pause")
    order: list[str] = []
    paused = threading.Event()

    def progress(done: int, total: int, message: str) -> None:
        order.append(f"step {done}")
        if done == 2:
            context.resume_event.clear()
            paused.set()

    context.progress = progress  # type: ignore[attr-defined]
    sweep = WavelengthSweep("s3", "laser1", "pm1", 1549.0, 1551.0, 4)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(sweep.run(context)))
    runner.start()
    assert paused.wait(WAIT_S)
    order.append("resumed")
    context.resume_event.set()
    runner.join(WAIT_S)
    assert not runner.is_alive()
    assert order == ["step 1", "step 2", "resumed", "step 3", "step 4"]
    assert outcome["status"] == "completed"


def test_sweep_single_step_and_parameters() -> None:
    sweep = WavelengthSweep("s4", "laser1", "pm1", 1550.5, 1560.0, 1, dwell=0.0)
    result = sweep.run(sim_context("laser-one"))
    assert [p["wavelength"] for p in result["results"]] == [1550.5]
    sweep.set_parameter("dwell", 0.01)
    assert sweep.get_parameter("dwell") == 0.01
    assert sweep.get_parameter("steps") == 1
    with pytest.raises(ValueError, match="changeable parameters: dwell"):
        sweep.set_parameter("steps", 3)
    with pytest.raises(ValueError, match="dwell must be >= 0"):
        sweep.set_parameter("dwell", -1)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        sweep.get_parameter("nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"start_wl": "1549"}, "start_wl must be a finite number"),
        ({"stop_wl": float("inf")}, "stop_wl must be a finite number"),
    ],
)
def test_sweep_validates_parameters(kwargs: dict[str, Any], message: str) -> None:
    params: dict[str, Any] = {"start_wl": 1549.0, "stop_wl": 1551.0, "steps": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        WavelengthSweep("bad", "laser1", "pm1", **params)


# -- demo_lab in a real daemon ----------------------------------------------


@pytest.fixture
def daemon() -> Iterator[labd.LabDaemon]:
    lab = labd.LabDaemon()
    try:
        yield lab
    finally:
        lab.shutdown(timeout=WAIT_S)


def test_demo_lab_adds_connected_devices(daemon: labd.LabDaemon) -> None:
    devices = demo_lab(daemon, settling_time=0.0)
    assert tuple(devices) == DEMO_DEVICE_IDS
    laser, meter, daq = devices["laser1"], devices["pm1"], devices["daq1"]
    assert isinstance(laser, SimLaser) and laser is daemon.get_device("laser1")
    assert isinstance(meter, SimPowerMeter) and isinstance(daq, SimDAQ)
    assert laser.get_wavelength() == 1550.0
    assert 0.0 <= meter.get_power() < 1e-4  # output starts off
    assert daq.get_rate() == 10_000.0
    assert {"SimLaser", "SimPowerMeter", "SimDAQ"} <= set(daemon.device_types)
    assert "WavelengthSweep" in daemon.task_types


def test_demo_lab_keeps_types_registered_before(daemon: labd.LabDaemon) -> None:
    daemon.register_plugins(
        devices={"SimLaser": SimLaser}, tasks={"WavelengthSweep": WavelengthSweep}
    )
    demo_lab(daemon, settling_time=0.0)
    assert daemon.get_device("pm1").get_power() >= 0.0


def test_demo_sweep_runs_as_a_daemon_task(daemon: labd.LabDaemon) -> None:
    demo_lab(daemon, settling_time=0.0)
    handle = daemon.execute_task(
        "sweep1",
        "WavelengthSweep",
        laser_id="laser1",
        detector_id="pm1",
        start_wl=1549.0,
        stop_wl=1551.0,
        steps=11,
    )
    result = handle.wait(timeout=WAIT_S)
    assert result["status"] == "completed"
    assert len(result["results"]) == 11
    assert min(result["results"], key=lambda p: p["power"])["wavelength"] == pytest.approx(1550.0)


def test_demo_daq_streams_through_the_daemon_and_stops(daemon: labd.LabDaemon) -> None:
    devices = demo_lab(daemon, daq_rate=20_000.0, daq_block_size=100)
    collector = BlockCollector(wanted=3)
    daemon.start_streaming("daq1", collector)
    assert collector.done.wait(WAIT_S)
    daemon.stop_streaming("daq1", timeout=WAIT_S)
    daq = devices["daq1"]
    assert isinstance(daq, SimDAQ)
    assert not daq.is_streaming()
    assert daq._thread is not None and not daq._thread.is_alive()
    assert [b["index"] for b in collector.blocks[:3]] == [0, 1, 2]
