"""LabDaemon 1.0 compatibility: the seed example and every name of DESIGN.md section 3.

A lab switches by changing ``import labdaemon as ld`` to ``import labd as ld``; these tests use
only that public surface (plus ``labd.sim`` for the simulated lab).
"""

from __future__ import annotations

import inspect
import json
import threading
from typing import Any

import numpy as np
import pytest

import labd as ld
import labd.sim

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


# -- the seed example, DESIGN.md section 2 -----------------------------------------------------
# Pasted unchanged; the `...` are filled with the obvious code, and the cancel check sits in
# the loop the first `...` opens.


class WavelengthSweep:
    def __init__(self, task_id, laser_id, detector_id, start_wl, stop_wl, steps, **kwargs):
        self.task_id = task_id
        self.laser_id, self.detector_id = laser_id, detector_id
        self.start_wl, self.stop_wl, self.steps = start_wl, stop_wl, steps
        self.device_ids = [laser_id, detector_id]

    def run(self, context):
        laser = context.daemon.get_device(self.laser_id)
        detector = context.daemon.get_device(self.detector_id)
        laser.set_output(True)
        results = []
        step = (self.stop_wl - self.start_wl) / max(self.steps - 1, 1)
        for i in range(self.steps):
            if context.cancel_event.is_set():
                return {"status": "cancelled", "results": results}
            wavelength = self.start_wl + i * step
            laser.set_wavelength(wavelength)
            results.append({"wavelength": wavelength, "power": detector.get_power()})
        return {"status": "completed", "results": results}


class GatedPowerMeter(labd.sim.SimPowerMeter):
    """The sim power meter, but its ``pause_after``-th reading waits for ``proceed``.

    It tells the test (``reached``) when the sweep is mid-way, from inside a device call.
    """

    def __init__(
        self,
        device_id: str,
        reached: threading.Event,
        proceed: threading.Event,
        pause_after: int,
        **params: Any,
    ) -> None:
        super().__init__(device_id, **params)
        self.reached, self.proceed, self.pause_after = reached, proceed, pause_after
        self.readings = 0

    def get_power(self) -> float:
        self.readings += 1
        if self.readings == self.pause_after:
            self.reached.set()
            self.proceed.wait(WAIT_S)
        return super().get_power()


@pytest.fixture
def seed_lab(daemon: ld.LabDaemon) -> ld.LabDaemon:
    # Registered first, so demo_lab keeps this class as "WavelengthSweep".
    daemon.register_plugins(tasks={"WavelengthSweep": WavelengthSweep})
    labd.sim.demo_lab(daemon, settling_time=0.0)
    assert daemon.task_class("WavelengthSweep") is WavelengthSweep
    return daemon


def test_seed_sweep_completes_with_one_result_per_step(seed_lab: ld.LabDaemon) -> None:
    handle = seed_lab.execute_task(
        "sweep1",
        "WavelengthSweep",
        laser_id="laser1",
        detector_id="pm1",
        start_wl=1549.0,
        stop_wl=1551.0,
        steps=21,
    )
    result = handle.wait(timeout=WAIT_S)
    assert result["status"] == "completed"
    assert len(result["results"]) == 21
    assert result["results"][0]["wavelength"] == pytest.approx(1549.0)
    assert result["results"][-1]["wavelength"] == pytest.approx(1551.0)
    powers = [point["power"] for point in result["results"]]
    assert min(powers) == powers[10]  # the simulated resonance dip at 1550 nm
    assert handle.status == "completed" and handle.exception() is None
    assert seed_lab.owner_of("laser1") is None and seed_lab.owner_of("pm1") is None


def test_seed_sweep_cancelled_mid_way_returns_partial_results(seed_lab: ld.LabDaemon) -> None:
    reached, proceed = threading.Event(), threading.Event()
    seed_lab.register_plugins(devices={"GatedPowerMeter": GatedPowerMeter})
    seed_lab.add_device(
        "gated_pm",
        "GatedPowerMeter",
        laser_id="laser1",
        reached=reached,
        proceed=proceed,
        pause_after=3,
    )
    seed_lab.connect_device("gated_pm")
    handle = seed_lab.execute_task(
        "sweep1",
        "WavelengthSweep",
        laser_id="laser1",
        detector_id="gated_pm",
        start_wl=1549.0,
        stop_wl=1551.0,
        steps=10,
    )
    try:
        assert reached.wait(WAIT_S), "the sweep never reached its third reading"
        handle.cancel()
    finally:
        proceed.set()
    with pytest.raises(ld.TaskCancelledError) as info:
        handle.wait(timeout=WAIT_S)
    partial = info.value.result
    assert partial["status"] == "cancelled"
    assert len(partial["results"]) == 3  # the reading in flight finished, then the check stopped it
    # Available without raising:
    assert handle.result == partial
    assert handle.status == "cancelled"
    assert handle.exception() is None
    assert not handle.is_running()


def test_seed_sweep_device_failure_fails_the_task_chained(seed_lab: ld.LabDaemon) -> None:
    # 1400 nm is outside the simulated laser's range: set_wavelength raises.
    handle = seed_lab.execute_task(
        "sweep1",
        "WavelengthSweep",
        laser_id="laser1",
        detector_id="pm1",
        start_wl=1400.0,
        stop_wl=1401.0,
        steps=3,
    )
    with pytest.raises(ld.TaskFailedError) as info:
        handle.wait(timeout=WAIT_S)
    original = handle.exception()
    assert isinstance(original, ld.DeviceConfigurationError)
    assert "out of range" in str(original)
    assert info.value.__cause__ is original
    assert "sweep1" in str(info.value) and "out of range" in str(info.value)
    assert handle.status == "failed"
    device_error = seed_lab.get_device_error("laser1")
    assert device_error is not None and device_error.origin == "device"
    assert seed_lab.owner_of("laser1") is None  # the claim was released anyway


def test_seed_sweep_with_the_sim_class_too(lab: ld.LabDaemon) -> None:
    # The filled-in sim version of the seed, as shipped in labd.sim.
    handle = lab.execute_task(
        None,
        "WavelengthSweep",
        laser_id="laser1",
        detector_id="pm1",
        start_wl=1549.0,
        stop_wl=1551.0,
        steps=5,
    )
    assert len(handle.wait(WAIT_S)["results"]) == 5


# -- names of DESIGN.md section 3 -----------------------------------------------------------------


def _defaults(fn: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not p.empty
    }


def test_lab_daemon_names_and_defaults() -> None:
    daemon_cls = ld.LabDaemon
    assert _defaults(daemon_cls)["completed_task_buffer"] == 20
    for name in (
        "register_plugins",
        "add_device",
        "connect_device",
        "disconnect_device",
        "get_device",
        "device_context",
        "execute_task",
        "task_context",
        "start_streaming",
        "stop_streaming",
        "shutdown",
    ):
        assert callable(getattr(daemon_cls, name)), name
    assert _defaults(daemon_cls.register_plugins) == {"devices": None, "tasks": None}
    assert _defaults(daemon_cls.connect_device) == {"timeout": None}
    assert _defaults(daemon_cls.disconnect_device) == {"timeout": None}
    assert _defaults(daemon_cls.stop_streaming) == {"timeout": 1.0}
    assert _defaults(daemon_cls.shutdown) == {"timeout": 2.0}
    for helper in ("save_json", "load_json", "save_hdf5", "load_hdf5", "capture_metadata"):
        assert callable(getattr(ld, helper)), helper


def test_exception_tree() -> None:
    assert issubclass(ld.DeviceError, ld.LabDaemonException)
    for cls in (
        ld.DeviceConnectionError,
        ld.DeviceNotConnectedError,
        ld.DeviceTimeoutError,
        ld.DeviceConfigurationError,
        ld.DeviceOperationError,
        ld.DeviceBusyError,
    ):
        assert issubclass(cls, ld.DeviceError), cls
    assert issubclass(ld.TaskError, ld.LabDaemonException)
    assert issubclass(ld.TaskCancelledError, ld.TaskError)
    assert issubclass(ld.TaskFailedError, ld.TaskError)
    assert issubclass(ld.LabDaemonException, Exception)
    for cls in (
        ld.UnknownDeviceError,
        ld.UnknownDeviceTypeError,
        ld.UnknownTaskError,
        ld.UnknownTaskTypeError,
        ld.InvalidArgumentError,
    ):
        assert issubclass(cls, ValueError) and issubclass(cls, ld.LabDaemonException), cls
    assert not issubclass(ld.DeviceError, ValueError)


def test_labdaemon_import_paths_work_with_labd() -> None:
    # Each `from labdaemon.X import Y` LabDaemon documents, with labd in place of labdaemon.
    from labd.context import TaskContext
    from labd.exceptions import (
        DeviceConfigurationError,
        DeviceConnectionError,
        DeviceError,
        DeviceNotConnectedError,
        DeviceOperationError,
        DeviceTimeoutError,
        LabDaemonException,
        TaskCancelledError,
        TaskError,
        TaskFailedError,
    )
    from labd.handlers import TaskHandle
    from labd.patterns import ensure_device, ensure_server
    from labd.server import LabDaemonServer, ServerAPI, SSEClient
    from labd.utils import LabDaemonJSONEncoder, load_json, save_json

    assert TaskContext is ld.TaskContext and TaskHandle is ld.TaskHandle
    assert (DeviceError, TaskError, LabDaemonException) == (
        ld.DeviceError, ld.TaskError, ld.LabDaemonException
    )
    assert issubclass(DeviceTimeoutError, DeviceError) and issubclass(TaskFailedError, TaskError)
    for cls in (DeviceConfigurationError, DeviceConnectionError, DeviceNotConnectedError,
                DeviceOperationError, TaskCancelledError):
        assert cls is getattr(ld, cls.__name__)
    assert (ld.ServerAPI, ld.SSEClient) == (ServerAPI, SSEClient)
    assert (ld.ensure_server, ld.ensure_device) == (ensure_server, ensure_device)
    assert callable(LabDaemonServer) and (save_json, load_json) == (ld.save_json, ld.load_json)
    assert issubclass(LabDaemonJSONEncoder, json.JSONEncoder)


def test_labdaemon_json_encoder_writes_numpy_arrays_and_scalars() -> None:
    from labd.utils import LabDaemonJSONEncoder

    data = {"wl": np.array([1.5, 2.5]), "grid": np.zeros((2, 1), dtype=np.int32),
            "n": np.int64(3), "gain": np.float32(0.5), "ok": np.bool_(True)}
    assert json.loads(json.dumps(data, cls=LabDaemonJSONEncoder)) == {
        "wl": [1.5, 2.5], "grid": [[0], [0]], "n": 3, "gain": 0.5, "ok": True
    }
    with pytest.raises(TypeError, match="object"):
        json.dumps({"x": object()}, cls=LabDaemonJSONEncoder)


# -- devices ----------------------------------------------------------------------------------


class Laser:
    def __init__(self, device_id: str, address: str = "GPIB0::1") -> None:
        self.device_id = device_id
        self.address = address
        self.connects = 0
        self.disconnects = 0

    def connect(self) -> None:
        self.connects += 1

    def disconnect(self) -> None:
        self.disconnects += 1

    def lock_is_held(self) -> bool:
        return self._ld_lock._is_owned()  # type: ignore[attr-defined]

    def nested(self) -> bool:
        return self.lock_is_held()

    def get_wavelength(self) -> float:
        return 1550.0


@pytest.fixture
def compat(daemon: ld.LabDaemon) -> ld.LabDaemon:
    daemon.register_plugins({"Laser": Laser})  # positional, LabDaemon style
    return daemon


def test_add_device_returns_the_usable_instance(compat: ld.LabDaemon) -> None:
    laser = compat.add_device("laser1", "Laser", address="GPIB0::5")
    assert isinstance(laser, Laser)
    assert laser.address == "GPIB0::5" and laser.device_id == "laser1"
    assert compat.get_device("laser1") is laser
    compat.connect_device(laser)  # by instance
    compat.connect_device("laser1")  # or by id
    assert laser.get_wavelength() == 1550.0


def test_ld_lock_is_a_reentrant_lock_held_during_method_calls(compat: ld.LabDaemon) -> None:
    laser = compat.add_device("laser1", "Laser")
    assert laser.lock_is_held() is True
    assert laser.nested() is True  # re-entrant: a method calling a method
    assert laser._ld_lock._is_owned() is False  # released after the call
    with laser._ld_lock, laser._ld_lock:  # re-entrant for the device's own threads
        assert laser.lock_is_held()


def test_ld_lock_serialises_the_device_s_own_thread_with_calls(compat: ld.LabDaemon) -> None:
    laser = compat.add_device("laser1", "Laser")
    inside, leave = threading.Event(), threading.Event()
    order: list[str] = []

    def background() -> None:
        # What a device's own acquisition thread does around its hardware access.
        with laser._ld_lock:
            order.append("background-in")
            inside.set()
            leave.wait(WAIT_S)
            order.append("background-out")

    worker = threading.Thread(target=background, name="device-own-thread")
    worker.start()
    caller = None
    try:
        assert inside.wait(WAIT_S)
        caller = threading.Thread(target=lambda: order.append(f"call {laser.get_wavelength()}"))
        caller.start()
        _wait_for_waiter(compat, "laser1")
        assert order == ["background-in"]
    finally:
        leave.set()
        worker.join(WAIT_S)
        if caller is not None:
            caller.join(WAIT_S)
    assert order == ["background-in", "background-out", "call 1550.0"]


def _wait_for_waiter(daemon: ld.LabDaemon, device_id: str) -> None:
    done = threading.Event()
    for _ in range(int(WAIT_S / 0.002)):
        if daemon.device_info(device_id)["lock"]["waiting"] >= 1:
            return
        done.wait(0.002)
    raise AssertionError(f"no caller queued on {device_id}'s lock within {WAIT_S} s")


class HangingConnect:
    def __init__(self, device_id: str, release: threading.Event) -> None:
        self.device_id = device_id
        self.release = release

    def connect(self) -> None:
        self.release.wait(WAIT_S)

    def disconnect(self) -> None:
        self.release.wait(WAIT_S)


def test_connect_timeout_raises_device_timeout_and_faults_the_device(compat: ld.LabDaemon) -> None:
    compat.register_plugins(devices={"Hanging": HangingConnect})
    release = threading.Event()
    compat.add_device("h1", "Hanging", release=release)
    try:
        with pytest.raises(ld.DeviceTimeoutError, match=r"'h1'.*connect\(\).*0\.1 s.*faulted"):
            compat.connect_device("h1", timeout=0.1)
        assert compat.device_info("h1")["state"] == "faulted"
        record = compat.get_device_error("h1")
        assert record is not None and record.type == "DeviceTimeoutError"
    finally:
        release.set()


def test_disconnect_timeout_is_logged_not_raised(compat: ld.LabDaemon) -> None:
    compat.register_plugins(devices={"Hanging": HangingConnect})
    release = threading.Event()
    release.set()
    compat.add_device("h1", "Hanging", release=release)
    compat.connect_device("h1", timeout=WAIT_S)
    release.clear()
    try:
        compat.disconnect_device("h1", timeout=0.1)
        assert compat.device_info("h1")["state"] == "faulted"
    finally:
        release.set()


class FailingConnect:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def connect(self) -> None:
        raise OSError("VISA: resource not found")


def test_connect_failure_is_a_connection_error_chained_from_the_driver(
    compat: ld.LabDaemon,
) -> None:
    compat.register_plugins(devices={"Failing": FailingConnect})
    compat.add_device("f1", "Failing")
    with pytest.raises(
        ld.DeviceConnectionError, match=r"'f1'.*connect\(\) failed.*resource"
    ) as info:
        compat.connect_device("f1")
    assert isinstance(info.value.__cause__, OSError)
    assert compat.device_info("f1")["state"] == "faulted"


def test_connect_timeout_must_be_positive(compat: ld.LabDaemon) -> None:
    laser = compat.add_device("laser1", "Laser")
    with pytest.raises(ld.InvalidArgumentError, match="timeout"):
        compat.connect_device("laser1", timeout=0)
    assert laser.connects == 0


def test_disconnect_is_idempotent(compat: ld.LabDaemon) -> None:
    laser = compat.add_device("laser1", "Laser")
    compat.disconnect_device("laser1")  # never connected: nothing to do
    assert laser.disconnects == 0
    compat.connect_device("laser1", timeout=WAIT_S)
    assert compat.device_info("laser1")["state"] == "connected"
    compat.disconnect_device("laser1", timeout=WAIT_S)
    compat.disconnect_device(laser)
    assert laser.disconnects == 1
    assert compat.device_info("laser1")["state"] == "disconnected"


def test_device_context_adds_connects_and_disconnects(compat: ld.LabDaemon) -> None:
    with compat.device_context("laser1", "Laser", address="USB0") as laser:
        assert isinstance(laser, Laser) and laser.address == "USB0"
        assert laser.connects == 1 and compat.device_info("laser1")["state"] == "connected"
    assert laser.disconnects == 1
    with (
        pytest.raises(RuntimeError, match="inside"),
        compat.device_context("laser2", "Laser") as other,
    ):
        raise RuntimeError("inside the block")
    assert other.disconnects == 1


class NoDeviceId:
    def __init__(self) -> None:
        self.ready = True

    def ping(self) -> str:
        return "pong"


class KeywordOnly:
    def __init__(self, port: str, baud: int = 9600) -> None:
        self.port, self.baud = port, baud


def test_device_class_whose_init_takes_no_device_id(compat: ld.LabDaemon) -> None:
    compat.register_plugins(devices={"NoDeviceId": NoDeviceId, "KeywordOnly": KeywordOnly})
    dev = compat.add_device("n1", "NoDeviceId")
    assert isinstance(dev, NoDeviceId) and dev.ping() == "pong"
    assert dev.device_id == "n1"  # set for the device's convenience
    serial = compat.add_device("k1", "KeywordOnly", port="COM3")
    assert (serial.port, serial.baud) == ("COM3", 9600)
    with pytest.raises(ld.InvalidArgumentError, match=r"'NoDeviceId'.*unexpected parameter 'bogus'"):
        compat.add_device("n2", "NoDeviceId", bogus=1)


class Counted:
    built = 0

    def __init__(self, device_id: str, wavelength: float = 1550.0, power_mw: float = 1.0) -> None:
        type(self).built += 1
        self.device_id, self.wavelength = device_id, wavelength


def test_a_misspelled_device_parameter_names_the_nearest_valid_one(compat: ld.LabDaemon) -> None:
    compat.register_plugins(devices={"Counted": Counted})
    before = Counted.built
    with pytest.raises(ValueError, match=(
        r"^Device type 'Counted': unexpected parameter 'wavelenght'; did you mean 'wavelength'\?"
    )) as info:
        compat.add_device("l1", "Counted", wavelenght=1550)
    assert isinstance(info.value, ld.InvalidArgumentError)
    assert "device_id" not in str(info.value).split("Its constructor")[0]
    assert Counted.built == before, "the constructor must not run on bad parameters"
    assert "l1" not in compat.device_ids()
    with pytest.raises(ld.InvalidArgumentError, match=r"unexpected parameter 'colour' \(its "
                       r"parameters: 'wavelength', 'power_mw'\)"):
        compat.add_device("l1", "Counted", colour="red")
    assert compat.add_device("l1", "Counted", wavelength=1310.0).wavelength == 1310.0


class OptionalFirst:
    def __init__(self, port: str = "COM1", baud: int = 9600) -> None:
        self.port, self.baud = port, baud


class PassThrough(Laser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def test_the_device_id_never_lands_in_an_optional_first_parameter(compat: ld.LabDaemon) -> None:
    compat.register_plugins(devices={"OptionalFirst": OptionalFirst, "PassThrough": PassThrough})
    serial = compat.add_device("s1", "OptionalFirst", baud=115200)
    assert (serial.port, serial.baud, serial.device_id) == ("COM1", 115200, "s1")
    # *args passes through to a parent that takes the id, as LabDaemon's cls(device_id, ...)
    laser = compat.add_device("p1", "PassThrough", address="GPIB0::7")
    assert (laser.device_id, laser.address) == ("p1", "GPIB0::7")


def test_a_misspelled_task_parameter_names_the_nearest_valid_one(compat: ld.LabDaemon) -> None:
    compat.register_plugins(tasks={"Sleeper": Sleeper})
    with pytest.raises(ld.InvalidArgumentError, match=(
        r"^Task type 'Sleeper': unexpected parameter 'seeen'; did you mean 'seen'\?"
    )) as info:
        compat.execute_task("t1", "Sleeper", seeen=[])
    assert "task_id" not in str(info.value).split("Its constructor")[0]
    with pytest.raises(ld.UnknownTaskError):
        compat.get_task("t1")  # nothing was created: the id is still free


def test_a_misspelled_task_parameter_taken_by_kwargs_names_the_missing_one(
    lab: ld.LabDaemon,
) -> None:
    # The sim sweep takes **kwargs, so 'stepz' is accepted and 'steps' is what is missing.
    with pytest.raises(ld.InvalidArgumentError, match=(
        r"missing required parameter 'steps' \(got 'stepz'; did you mean 'steps'\?\)"
    )):
        lab.execute_task("t1", "WavelengthSweep", laser_id="laser1", detector_id="pm1",
                         start_wl=1549.0, stop_wl=1551.0, stepz=3)


def test_owned_by_is_the_owner_s_id_as_labdaemon_gives_it(compat: ld.LabDaemon) -> None:
    # device_info is the shape of GET /devices/{id}; LabDaemon's clients read owned_by as an id.
    compat.register_plugins(tasks={"Sleeper": Sleeper})
    compat.add_device("laser1", "Laser")
    info = compat.device_info("laser1")
    assert (info["owned_by"], info["owner_kind"], info["owner_id"], info["owner_label"]) == (
        None, None, None, None
    )
    with compat.claim(["laser1"], owner="alice", ttl=30) as lease:
        info = compat.device_info("laser1")
        assert (info["owned_by"], info["owner_kind"], info["owner_id"], info["owner_label"]) == (
            "alice", "lease", lease.lease_id, f"lease {lease.lease_id!r} of 'alice'"
        )

    class Holder(Sleeper):
        device_ids = ["laser1"]

    compat.register_plugins(tasks={"Holder": Holder})
    started = threading.Event()
    with compat.task_context("sweep1", "Holder", started=started):
        assert started.wait(WAIT_S)
        info = compat.device_info("laser1")
        assert (info["owned_by"], info["owner_kind"], info["owner_id"], info["owner_label"]) == (
            "sweep1", "task", "sweep1", "task 'sweep1'"
        )


# -- tasks ------------------------------------------------------------------------------------


class Sleeper:
    def __init__(
        self, task_id: str, seen: list[Any] | None = None, started: threading.Event | None = None
    ) -> None:
        self.task_id = task_id
        self.seen = seen if seen is not None else []
        self.started = started or threading.Event()
        self.value = 0

    def set_parameter(self, key: str, value: Any) -> None:
        self.value = value

    def get_parameter(self, key: str) -> Any:
        return self.value

    def run(self, context: Any) -> Any:
        self.seen.append(context)
        self.started.set()
        while not context.cancel_event.is_set():
            context.resume_event.wait()
            context.cancel_event.wait(0.01)
        return {"status": "cancelled", "value": self.value}


def test_task_context_attributes(compat: ld.LabDaemon) -> None:
    compat.register_plugins(tasks={"Sleeper": Sleeper})
    seen: list[Any] = []
    started = threading.Event()
    with compat.task_context("t1", "Sleeper", seen=seen, started=started) as handle:
        assert started.wait(WAIT_S)
    [context] = seen
    assert isinstance(context, ld.TaskContext)
    assert context.daemon is compat
    assert context.task_id == "t1" == handle.task_id
    assert isinstance(context.cancel_event, threading.Event)
    assert isinstance(context.resume_event, threading.Event)
    assert context.cancel_event.is_set()  # task_context cancelled it on exit


def test_task_context_cancels_on_exit(compat: ld.LabDaemon) -> None:
    compat.register_plugins(tasks={"Sleeper": Sleeper})
    started = threading.Event()
    with compat.task_context("t1", "Sleeper", started=started) as handle:
        assert isinstance(handle, ld.TaskHandle)
        assert started.wait(WAIT_S)
        assert handle.is_running()
    with pytest.raises(ld.TaskCancelledError) as info:
        handle.wait(timeout=WAIT_S)
    assert info.value.result == {"status": "cancelled", "value": 0}


def test_task_handle_methods(compat: ld.LabDaemon) -> None:
    compat.register_plugins(tasks={"Sleeper": Sleeper})
    started = threading.Event()
    handle = compat.execute_task("t1", "Sleeper", started=started)
    assert started.wait(WAIT_S)
    assert handle.task_id == "t1"
    assert handle.is_running() and not handle.is_paused() and handle.exception() is None
    handle.pause()
    assert handle.is_paused()
    handle.resume()
    assert not handle.is_paused()
    handle.set_parameter("gain", 3)
    assert handle.get_parameter("gain") == 3
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.01)
    handle.pause()
    handle.cancel()  # also opens the pause gate, so the paused run can see the cancel
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(timeout=WAIT_S)
    assert not handle.is_running() and not handle.is_paused()
    assert handle.result == {"status": "cancelled", "value": 3}


# -- messages: LabDaemon's words first (its users match on them), then labd's diagnosis ------


class Boom:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def run(self, context: Any) -> Any:
        raise RuntimeError("boom")


def test_messages_start_with_labdaemon_s_text(compat: ld.LabDaemon) -> None:
    compat.register_plugins(tasks={"Sleeper": Sleeper, "Boom": Boom})
    compat.add_device("laser1", "Laser")

    def message(call: Any) -> str:
        with pytest.raises(Exception) as info:
            call()
        return str(info.value)

    expected = {
        "Unknown device type: 'Nope'. ": lambda: compat.add_device("x", "Nope"),
        "Device with ID 'laser1' already exists. ": lambda: compat.add_device("laser1", "Laser"),
        "No device found with ID: 'ghost'. ": lambda: compat.get_device("ghost"),
        "Unknown task type: 'Nope'. ": lambda: compat.execute_task("x", "Nope"),
        "Device 'laser1' does not support streaming. ": (
            lambda: compat.start_streaming("laser1", lambda data: None)
        ),
    }
    for prefix, call in expected.items():
        assert message(call).startswith(prefix), (prefix, message(call))

    started = threading.Event()
    handle = compat.execute_task("t1", "Sleeper", started=started)
    assert started.wait(WAIT_S)
    assert message(lambda: compat.execute_task("t1", "Sleeper")).startswith(
        "Task with ID 't1' is already running. "
    )
    assert message(lambda: handle.wait(timeout=0.01)).startswith("Wait timed out for task 't1'. ")
    handle.cancel()
    with pytest.raises(ld.TaskCancelledError):
        handle.wait(WAIT_S)
    assert message(lambda: compat.execute_task("t1", "Sleeper")).startswith(
        "Task ID 't1' has been used recently. "
    )
    failed = compat.execute_task("b1", "Boom")
    assert message(lambda: failed.wait(WAIT_S)).startswith("Task 'b1' failed during execution. ")
