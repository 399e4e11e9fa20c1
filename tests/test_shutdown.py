"""Shutdown: bounded even when tasks ignore cancel or instruments hang, ordered, idempotent,
reported by name, and final (a closed daemon refuses new work).

Elapsed-time asserts here are watchdogs with generous margins, not benchmarks.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import labd as ld
import labd.sim

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


class Stubborn:
    """Ignores cancel: runs until the test sets ``release``."""

    def __init__(
        self,
        task_id: str,
        release: threading.Event,
        started: threading.Event,
        device_ids: list[str] | None = None,
    ) -> None:
        self.task_id = task_id
        self.release = release
        self.started = started
        if device_ids is not None:
            self.device_ids = device_ids

    def run(self, context: ld.TaskContext) -> str:
        self.started.set()
        self.release.wait(WAIT_S * 2)
        return "finally done"


class Polite:
    """Stops as soon as cancel is requested."""

    def __init__(self, task_id: str, started: threading.Event) -> None:
        self.task_id = task_id
        self.started = started

    def run(self, context: ld.TaskContext) -> None:
        self.started.set()
        context.sleep(60)


class Instrument:
    def __init__(self, device_id: str, log: list[str], hang: threading.Event | None = None) -> None:
        self.device_id = device_id
        self.log = log
        self.hang = hang

    def connect(self) -> None:
        self.log.append(f"connect {self.device_id}")

    def disconnect(self) -> None:
        if self.hang is not None:
            self.hang.wait(WAIT_S * 2)
        self.log.append(f"disconnect {self.device_id}")


@pytest.fixture
def plugged(daemon: ld.LabDaemon) -> ld.LabDaemon:
    daemon.register_plugins(
        devices={"Instrument": Instrument}, tasks={"Stubborn": Stubborn, "Polite": Polite}
    )
    return daemon


def test_shutdown_with_a_task_that_ignores_cancel_is_bounded_and_names_it(
    plugged: ld.LabDaemon,
) -> None:
    release, started = threading.Event(), threading.Event()
    handle = plugged.execute_task("stubborn", "Stubborn", release=release, started=started)
    try:
        assert started.wait(WAIT_S)
        began = time.monotonic()
        report = plugged.shutdown(timeout=1)
        elapsed = time.monotonic() - began
        assert elapsed < 3.0, f"shutdown(timeout=1) took {elapsed:.2f} s"
        assert isinstance(report, ld.ShutdownReport)
        assert report.tasks_not_stopped == ["stubborn"]
        assert not report.clean
        assert "stubborn" in str(report) and "ignored cancel" in str(report)
        assert handle.is_running()
    finally:
        release.set()
    # Released, it ends (as cancelled: cancel was requested) and its thread goes away.
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert handle.result == "finally done"


def test_shutdown_cancels_cooperative_tasks_and_reports_clean(plugged: ld.LabDaemon) -> None:
    started = threading.Event()
    handle = plugged.execute_task("polite", "Polite", started=started)
    assert started.wait(WAIT_S)
    report = plugged.shutdown(timeout=WAIT_S)
    assert report.clean and report.tasks_not_stopped == []
    assert handle.status == "cancelled"  # stopped within shutdown, not after
    assert "cleanly" in str(report)


def test_shutdown_never_starts_pending_runs(plugged: ld.LabDaemon) -> None:
    log: list[str] = []
    plugged.add_device("dev1", "Instrument", log=log)
    release, started = threading.Event(), threading.Event()
    other_started = threading.Event()
    holder = plugged.execute_task(
        "holder", "Stubborn", release=release, started=started, device_ids=["dev1"]
    )
    pending = plugged.execute_task(
        "pending",
        "Stubborn",
        release=release,
        started=other_started,
        device_ids=["dev1"],
        wait_for_devices=True,
    )
    assert pending.status == "pending"
    try:
        assert started.wait(WAIT_S)
        report = plugged.shutdown(timeout=0.2)
        assert pending.status == "cancelled"
        assert report.tasks_not_stopped == ["holder"]
    finally:
        release.set()
    with pytest.raises(ld.TaskCancelledError):
        holder.wait(WAIT_S)
    assert not other_started.is_set()


def test_hung_disconnect_is_bounded_and_named(plugged: ld.LabDaemon) -> None:
    log: list[str] = []
    hang = threading.Event()
    plugged.add_device("hung", "Instrument", log=log, hang=hang)
    plugged.add_device("fine", "Instrument", log=log)
    plugged.connect_device("hung")
    plugged.connect_device("fine")
    try:
        began = time.monotonic()
        report = plugged.shutdown(timeout=0.5)
        elapsed = time.monotonic() - began
        assert elapsed < 3.0, f"shutdown(timeout=0.5) took {elapsed:.2f} s"
        assert report.devices_not_disconnected == ["hung"]
        assert "hung" in str(report)
        # Reverse order of adding: "fine" went first and was not held up by "hung".
        assert "disconnect fine" in log
        assert plugged.device_info("fine")["state"] == "disconnected"
    finally:
        hang.set()


class Parking:
    """A device whose ``park()`` holds the device lock until ``release`` is set."""

    def __init__(self, device_id: str, release: threading.Event, inside: threading.Event) -> None:
        self.device_id = device_id
        self.release = release
        self.inside = inside

    def connect(self) -> None:
        pass

    def park(self) -> None:
        self.inside.set()
        self.release.wait(WAIT_S * 2)

    def disconnect(self) -> None:
        pass


class ParkTask:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.device_ids = ["parking"]

    def run(self, context: ld.TaskContext) -> None:
        context.daemon.get_device("parking").park()  # ignores cancel while inside


def test_task_stuck_inside_a_device_call_bounds_both_budgets(plugged: ld.LabDaemon) -> None:
    plugged.register_plugins(devices={"Parking": Parking}, tasks={"ParkTask": ParkTask})
    release, inside = threading.Event(), threading.Event()
    plugged.add_device("parking", "Parking", release=release, inside=inside)
    plugged.connect_device("parking")
    handle = plugged.execute_task("parker", "ParkTask")
    try:
        assert inside.wait(WAIT_S)
        began = time.monotonic()
        report = plugged.shutdown(timeout=0.5)
        elapsed = time.monotonic() - began
        assert elapsed < 3.0, f"shutdown(timeout=0.5) took {elapsed:.2f} s"
        assert report.tasks_not_stopped == ["parker"]
        # disconnect() waits for the device lock the task holds: bounded and named.
        assert report.devices_not_disconnected == ["parking"]
    finally:
        release.set()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)


def test_devices_are_disconnected_in_reverse_order_of_adding(plugged: ld.LabDaemon) -> None:
    log: list[str] = []
    for device_id in ("a", "b", "c"):
        plugged.add_device(device_id, "Instrument", log=log)
        plugged.connect_device(device_id)
    plugged.add_device("never_connected", "Instrument", log=log)
    report = plugged.shutdown(timeout=WAIT_S)
    assert report.clean
    assert [line for line in log if line.startswith("disconnect")] == [
        "disconnect c",
        "disconnect b",
        "disconnect a",
    ]
    assert [plugged.device_info(d)["state"] for d in ("a", "b", "c")] == ["disconnected"] * 3


def test_shutdown_is_idempotent(plugged: ld.LabDaemon) -> None:
    log: list[str] = []
    plugged.add_device("dev1", "Instrument", log=log)
    plugged.connect_device("dev1")
    first = plugged.shutdown(timeout=WAIT_S)
    second = plugged.shutdown(timeout=WAIT_S)
    assert second is first
    assert plugged.closed
    assert log.count("disconnect dev1") == 1


def test_after_shutdown_new_work_raises_daemon_closed(plugged: ld.LabDaemon) -> None:
    log: list[str] = []
    plugged.add_device("dev1", "Instrument", log=log)
    plugged.shutdown(timeout=WAIT_S)
    started = threading.Event()
    with pytest.raises(ld.DaemonClosedError, match="shut down"):
        plugged.execute_task("t1", "Polite", started=started)
    with pytest.raises(ld.DaemonClosedError):
        plugged.add_device("dev2", "Instrument", log=log)
    with pytest.raises(ld.DaemonClosedError):
        plugged.claim(["dev1"], owner="alice")
    assert not started.is_set()
    assert plugged.device_ids() == ["dev1"]
    assert plugged.list_tasks() == []


def test_connect_after_shutdown_raises_daemon_closed(plugged: ld.LabDaemon) -> None:
    log: list[str] = []
    plugged.add_device("dev1", "Instrument", log=log)
    plugged.shutdown(timeout=WAIT_S)
    for timeout in (None, 1.0):
        with pytest.raises(ld.DaemonClosedError):
            plugged.connect_device("dev1", timeout=timeout)
    assert log == []


def test_shutdown_ends_task_stream_subscriptions(plugged: ld.LabDaemon) -> None:
    # A subscriber of a run's stream that forgot close() must not keep a thread alive.
    started = threading.Event()
    handle = plugged.execute_task("polite", "Polite", started=started)
    events: list[Any] = []
    subscription = handle.subscribe(events.append)
    assert started.wait(WAIT_S)
    plugged.shutdown(timeout=WAIT_S)
    assert subscription.join(WAIT_S), "the task stream's delivery thread outlived shutdown"
    assert subscription.closed


def test_shutdown_stops_device_streams() -> None:
    daemon = ld.LabDaemon()
    try:
        labd.sim.demo_lab(daemon)
        blocks: list[Any] = []
        first = threading.Event()

        def on_block(block: Any) -> None:
            blocks.append(block)
            first.set()

        subscription = daemon.start_streaming("daq1", on_block)
        assert first.wait(WAIT_S)
        daq = daemon.get_device("daq1")
        assert daq.is_streaming()
    finally:
        report = daemon.shutdown(timeout=WAIT_S)
    assert report.clean, str(report)
    assert not daq.is_streaming()
    assert subscription.join(WAIT_S)
    assert daemon.device_info("daq1")["state"] == "disconnected"


def test_context_manager_shuts_down() -> None:
    with ld.LabDaemon() as daemon:
        labd.sim.demo_lab(daemon)
        laser = daemon.get_device("laser1")
        laser.set_output(True)
    assert daemon.closed
    assert daemon.device_info("laser1")["state"] == "disconnected"
    assert laser.get_state()["output_on"] is False  # SimLaser.disconnect closes the shutter
