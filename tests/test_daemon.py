"""The daemon's API with bad input: every mistake raises a clear error that names what is
wrong and what exists, and leaves the daemon exactly as it was.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import labd as ld

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


class Laser:
    constructed = 0

    def __init__(self, device_id: str, address: str = "GPIB0::1") -> None:
        type(self).constructed += 1
        self.device_id = device_id
        self.address = address

    def get_wavelength(self) -> float:
        return 1550.0


class Blocker:
    """A task that claims ``device_ids`` and runs until ``gate`` is set."""

    def __init__(
        self,
        task_id: str,
        gate: threading.Event,
        device_ids: Any = None,
        started: threading.Event | None = None,
    ) -> None:
        self.task_id = task_id
        self.gate = gate
        self.started = started or threading.Event()
        if device_ids is not None:
            self.device_ids = device_ids

    def run(self, context: ld.TaskContext) -> str:
        self.started.set()
        self.gate.wait(WAIT_S)
        return "done"


class Quick:
    runs = 0

    def __init__(self, task_id: str, value: int = 1) -> None:
        self.task_id = task_id
        self.value = value

    def run(self, context: ld.TaskContext) -> int:
        type(self).runs += 1
        return self.value


@pytest.fixture
def lab(daemon: ld.LabDaemon) -> ld.LabDaemon:
    daemon.register_plugins(devices={"Laser": Laser}, tasks={"Blocker": Blocker, "Quick": Quick})
    daemon.add_device("laser1", "Laser")
    daemon.add_device("laser2", "Laser")
    return daemon


def snapshot(daemon: ld.LabDaemon) -> tuple[Any, ...]:
    """Everything a failed call must leave unchanged."""
    return (
        daemon.device_types,
        daemon.task_types,
        daemon.device_ids(),
        [(t["task_id"], t["status"]) for t in daemon.list_tasks()],
        [daemon.owner_of(d) for d in daemon.device_ids()],
    )


# -- unknown names -------------------------------------------------------------------------------


def test_unknown_device_type_names_it_and_the_registered_types(lab: ld.LabDaemon) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.UnknownDeviceTypeError) as info:
        lab.add_device("x1", "Lazer")
    message = str(info.value)
    assert "'Lazer'" in message and "'Laser'" in message and "register_plugins" in message
    assert isinstance(info.value, ValueError)
    assert snapshot(lab) == before


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.get_device("laser9"),
        lambda d: d.connect_device("laser9"),
        lambda d: d.disconnect_device("laser9"),
        lambda d: d.device_info("laser9"),
        lambda d: d.device_methods("laser9"),
        lambda d: d.get_device_error("laser9"),
        lambda d: d.call_device("laser9", "get_wavelength"),
        lambda d: d.owner_of("laser9"),
    ],
)
def test_unknown_device_id_names_it_and_the_devices(lab: ld.LabDaemon, call: Any) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.UnknownDeviceError) as info:
        call(lab)
    assert "'laser9'" in str(info.value) and "'laser1', 'laser2'" in str(info.value)
    assert snapshot(lab) == before


def test_unknown_task_type_names_it_and_the_registered_types(lab: ld.LabDaemon) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.UnknownTaskTypeError) as info:
        lab.execute_task("t1", "Sweeep")
    assert "'Sweeep'" in str(info.value) and "'Blocker', 'Quick'" in str(info.value)
    assert snapshot(lab) == before


def test_unknown_task_id_names_it_and_the_runs(lab: ld.LabDaemon) -> None:
    lab.execute_task("q1", "Quick").wait(WAIT_S)
    for call in (lab.get_task, lab.get_task_error, lab.clear_task_error, lab.subscribe_task):
        with pytest.raises(ld.UnknownTaskError) as info:
            call("q9")  # type: ignore[operator]
        assert "'q9'" in str(info.value) and "'q1'" in str(info.value)


def test_except_value_error_still_catches_unknown_ids(lab: ld.LabDaemon) -> None:
    # LabDaemon scripts written as `except ValueError:` keep working.
    for call in (
        lambda: lab.get_device("nope"),
        lambda: lab.add_device("x", "Nope"),
        lambda: lab.execute_task("x", "Nope"),
        lambda: lab.get_task("nope"),
        lambda: lab.add_device("laser1", "Laser"),
        lambda: lab.register_plugins(devices={"Laser": Laser}),
    ):
        with pytest.raises(ValueError):
            call()
    assert issubclass(ld.UnknownNameError, ld.LabDaemonException)


# -- duplicates ----------------------------------------------------------------------------------


def test_duplicate_device_id_is_refused_before_constructing(lab: ld.LabDaemon) -> None:
    original = lab.get_device("laser1")
    constructed = Laser.constructed
    before = snapshot(lab)
    with pytest.raises(ld.InvalidArgumentError, match=r"^Device with ID 'laser1' already exists\. It is a Laser;"):
        lab.add_device("laser1", "Laser", address="GPIB0::9")
    assert Laser.constructed == constructed
    assert lab.get_device("laser1") is original
    assert original.address == "GPIB0::1"
    assert snapshot(lab) == before


def test_duplicate_task_id_of_a_live_run_is_refused(lab: ld.LabDaemon) -> None:
    gate = threading.Event()
    started = threading.Event()
    handle = lab.execute_task("t1", "Blocker", gate=gate, started=started)
    assert started.wait(WAIT_S)
    runs = Quick.runs
    with pytest.raises(
        ld.InvalidArgumentError, match=r"^Task with ID 't1' is already running\..*running run of Blocker.*task_id=None"
    ):
        lab.execute_task("t1", "Quick")
    assert Quick.runs == runs
    assert [t["task_id"] for t in lab.list_tasks()] == ["t1"]
    gate.set()
    assert handle.wait(WAIT_S) == "done"


def test_duplicate_task_id_of_a_retained_run_is_refused(lab: ld.LabDaemon) -> None:
    assert lab.execute_task("q1", "Quick", value=5).wait(WAIT_S) == 5
    with pytest.raises(ld.InvalidArgumentError, match=r"^Task ID 'q1' has been used recently\..*completed run of Quick"):
        lab.execute_task("q1", "Quick", value=6)
    assert lab.get_task("q1").wait(WAIT_S) == 5  # the retained run is untouched


# -- device_ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device_ids", "error", "match"),
    [
        ("laser1", ld.InvalidArgumentError, r"device_ids must be a list.*'laser1'"),
        ({"laser1": 1}, ld.InvalidArgumentError, r"device_ids must be a list.*\{'laser1': 1\}"),
        (["laser1", 2], ld.InvalidArgumentError, r"device_ids must be a list.*\['laser1', 2\]"),
        (
            ["laser1", "ghost"],
            ld.UnknownDeviceError,
            r"unknown device\(s\) 'ghost'.*'laser1', 'laser2'",
        ),
    ],
)
def test_bad_task_device_ids_are_refused_and_nothing_starts(
    lab: ld.LabDaemon,
    device_ids: Any,
    error: type[Exception],
    match: str,
) -> None:
    gate = threading.Event()
    started = threading.Event()
    before = snapshot(lab)
    with pytest.raises(error, match=match) as info:
        lab.execute_task("t1", "Blocker", gate=gate, device_ids=device_ids, started=started)
    assert "'t1'" in str(info.value)
    assert not started.is_set()
    assert snapshot(lab) == before
    # The id was not used up: the same id starts fine with good input.
    gate.set()
    assert (
        lab.execute_task("t1", "Blocker", gate=gate, device_ids=["laser1"]).wait(WAIT_S) == "done"
    )


# -- plugins -------------------------------------------------------------------------------------


class NoRun:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id


@pytest.mark.parametrize(
    ("devices", "tasks", "match"),
    [
        ({"Good": Laser, "Bad": 3}, None, r"Device type 'Bad'.*expected a class.*int 3"),
        ({"Good": Laser}, {"NoRun": NoRun}, r"'NoRun'.*NoRun has no run\(self, context\)"),
        ({"Good": Laser}, {"Bad": "Quick"}, r"Task type 'Bad'.*expected a class"),
        ({"Good": Laser, "": Laser}, None, "non-empty strings"),
        ({"Good": Laser, "Laser": Laser}, None, r"Device type 'Laser' is already registered"),
        (None, {"Good": Quick, "Quick": Quick}, r"Task type 'Quick' is already registered"),
    ],
)
def test_a_bad_entry_in_register_plugins_registers_nothing(
    lab: ld.LabDaemon,
    devices: Any,
    tasks: Any,
    match: str,
) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.InvalidArgumentError, match=match):
        lab.register_plugins(devices=devices, tasks=tasks)
    assert snapshot(lab) == before
    assert "Good" not in lab.device_types and "Good" not in lab.task_types


@pytest.mark.parametrize("bad", [[Laser], "Laser", 5, ("Laser", Laser)])
def test_register_plugins_needs_a_mapping(lab: ld.LabDaemon, bad: Any) -> None:
    before = snapshot(lab)
    with pytest.raises(
        ld.InvalidArgumentError, match=r"register_plugins\(devices=...\) takes a dict"
    ):
        lab.register_plugins(devices=bad)
    with pytest.raises(
        ld.InvalidArgumentError, match=r"register_plugins\(tasks=...\) takes a dict"
    ):
        lab.register_plugins(devices={"Good": Laser}, tasks=bad)
    assert snapshot(lab) == before


def test_register_plugins_either_argument_optional(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Laser": Laser})
    daemon.register_plugins(tasks={"Quick": Quick})
    daemon.register_plugins()
    assert daemon.device_types == ["Laser"]
    assert daemon.task_types == ["Quick"]
    # The same class under another name is fine; it is the name that must be unique.
    daemon.register_plugins(devices={"Laser2": Laser})
    assert daemon.device_class("Laser2") is Laser


# -- ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 129, "é", 5, None])
def test_invalid_device_ids_are_refused(lab: ld.LabDaemon, bad: Any) -> None:
    before = snapshot(lab)
    constructed = Laser.constructed
    with pytest.raises(ld.InvalidArgumentError, match=r"Invalid device id.*letters, digits"):
        lab.add_device(bad, "Laser")
    assert Laser.constructed == constructed
    assert snapshot(lab) == before


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 129, 5])
def test_invalid_task_ids_are_refused(lab: ld.LabDaemon, bad: Any) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.InvalidArgumentError, match=r"Invalid task id"):
        lab.execute_task(bad, "Quick")
    assert snapshot(lab) == before


def test_ids_may_use_letters_digits_and_punctuation(lab: ld.LabDaemon) -> None:
    lab.add_device("Laser_2-b.c:d", "Laser")
    lab.add_device("x" * 128, "Laser")
    assert lab.execute_task("run_1-a.b:c", "Quick").wait(WAIT_S) == 1


# -- constructor errors --------------------------------------------------------------------------


def test_device_constructor_type_error_names_the_bad_parameters(lab: ld.LabDaemon) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.InvalidArgumentError) as info:
        lab.add_device("laser3", "Laser", adress="GPIB0::2")
    message = str(info.value)
    assert "'Laser'" in message and "adress" in message and "address" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert snapshot(lab) == before
    lab.add_device("laser3", "Laser", address="GPIB0::2")  # the id was not used up


class RaisesTypeErrorInside:
    def __init__(self, device_id: str, n: int = 1) -> None:
        raise TypeError("driver bug: unsupported operand")


def test_a_type_error_inside_a_constructor_is_not_blamed_on_the_parameters(
    daemon: ld.LabDaemon,
) -> None:
    daemon.register_plugins(devices={"Buggy": RaisesTypeErrorInside})
    with pytest.raises(TypeError, match="driver bug") as info:
        daemon.add_device("b1", "Buggy", n=2)
    assert not isinstance(info.value, ld.InvalidArgumentError)
    assert daemon.device_ids() == []


def test_device_constructor_errors_propagate_and_add_nothing(daemon: ld.LabDaemon) -> None:
    import labd.sim

    daemon.register_plugins(devices={"SimLaser": labd.sim.SimLaser})
    with pytest.raises(ld.DeviceConfigurationError, match="min_wl"):
        daemon.add_device("l1", "SimLaser", min_wl=1600.0, max_wl=1500.0)
    assert daemon.device_ids() == []


def test_task_constructor_type_error_names_the_bad_parameters_and_keeps_the_id(
    lab: ld.LabDaemon,
) -> None:
    before = snapshot(lab)
    with pytest.raises(ld.InvalidArgumentError) as info:
        lab.execute_task("q1", "Quick", valu=3)
    assert "'Quick'" in str(info.value) and "valu" in str(info.value)
    assert "value" in str(info.value)  # the constructor signature shows what is accepted
    assert snapshot(lab) == before
    assert lab.execute_task("q1", "Quick", value=3).wait(WAIT_S) == 3


def test_a_task_refused_for_busy_devices_does_not_use_up_its_id(lab: ld.LabDaemon) -> None:
    gate = threading.Event()
    holder = lab.execute_task("holder", "Blocker", gate=gate, device_ids=["laser1"])
    with pytest.raises(ld.DeviceBusyError, match=r"'laser1'.*task 'holder'") as info:
        lab.execute_task("second", "Blocker", gate=gate, device_ids=["laser2", "laser1"])
    assert [b["device_id"] for b in info.value.busy] == ["laser1"]
    assert lab.owner_of("laser2") is None  # all or none: laser2 was not claimed
    assert [t["task_id"] for t in lab.list_tasks()] == ["holder"]
    gate.set()
    assert holder.wait(WAIT_S) == "done"
    assert (
        lab.execute_task("second", "Blocker", gate=gate, device_ids=["laser1"]).wait(WAIT_S)
        == "done"
    )


def test_failed_starts_with_an_unknown_type_do_not_use_up_the_id(lab: ld.LabDaemon) -> None:
    with pytest.raises(ld.UnknownTaskTypeError):
        lab.execute_task("t1", "Nope")
    assert lab.execute_task("t1", "Quick").wait(WAIT_S) == 1


def test_bad_wait_for_devices_is_refused(lab: ld.LabDaemon) -> None:
    before = snapshot(lab)
    for bad in (0, -1, "yes", None):
        with pytest.raises(ld.InvalidArgumentError, match="wait_for_devices"):
            lab.execute_task("q1", "Quick", wait_for_devices=bad)
    assert snapshot(lab) == before


def test_bad_completed_task_buffer_is_refused() -> None:
    for bad in (-1, 1.5, "20"):
        with pytest.raises(ld.InvalidArgumentError, match="completed_task_buffer"):
            ld.LabDaemon(completed_task_buffer=bad)  # type: ignore[arg-type]


# -- the API on good input -----------------------------------------------------------------------


def test_device_info_and_list_devices(lab: ld.LabDaemon) -> None:
    info = lab.device_info("laser1")
    assert info["device_id"] == "laser1"
    assert info["device_type"] == "Laser"
    assert info["state"] == "connected"  # no connect(): usable straight away
    assert info["owned_by"] is None and info["last_error"] is None
    assert [d["device_id"] for d in lab.list_devices()] == ["laser1", "laser2"]
    assert lab.device_ids() == ["laser1", "laser2"]


def test_get_device_returns_the_instance_add_device_returned(lab: ld.LabDaemon) -> None:
    dev = lab.add_device("laser3", "Laser", address="USB0")
    assert lab.get_device("laser3") is dev
    assert isinstance(dev, Laser) and dev.address == "USB0"


def test_remove_device_forgets_it(lab: ld.LabDaemon) -> None:
    lab.remove_device("laser2")
    assert lab.device_ids() == ["laser1"]
    with pytest.raises(ld.UnknownDeviceError):
        lab.get_device("laser2")
    lab.add_device("laser2", "Laser")  # the id is free again
