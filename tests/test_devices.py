"""Device calls through the daemon: per-device locking, query/command kinds, call_timeout,
method descriptions, call-by-name checks and device error records.

Concurrency is proven with Event handshakes: a "holder" thread parks inside a device method
(so it holds that device's lock) until the test releases it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import labd as ld

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` until true (a watchdog, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        threading.Event().wait(0.002)


class Gate:
    """A fake instrument whose ``hold()`` parks inside the device lock until released."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.entered = threading.Event()
        self.release = threading.Event()
        self.log: list[str] = []

    def hold(self) -> None:
        self.log.append("hold-in")
        self.entered.set()
        self.release.wait(WAIT_S)
        self.log.append("hold-out")

    def note(self, text: str) -> str:
        self.log.append(text)
        return text

    def get_value(self) -> int:
        self.log.append("get_value")
        return 42

    def is_ready(self) -> bool:
        self.log.append("is_ready")
        return True

    def configure(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.log.append("configure")
        return args + tuple(sorted(kwargs.items()))

    def move(self, x: float, /, y: float = 0.0, *, speed: int = 1) -> float:
        self.log.append("move")
        return x + y + speed

    @classmethod
    def model(cls) -> str:
        return cls.__name__


@pytest.fixture
def gates(daemon: ld.LabDaemon) -> tuple[Gate, Gate]:
    daemon.register_plugins(devices={"Gate": Gate})
    return daemon.add_device("g1", "Gate"), daemon.add_device("g2", "Gate")


@contextmanager
def holding(device: Gate, name: str = "holder-thread") -> Iterator[threading.Thread]:
    """Run ``device.hold()`` on a named thread; inside the block that thread holds the lock."""
    thread = threading.Thread(target=device.hold, name=name)
    thread.start()
    try:
        assert device.entered.wait(WAIT_S), "hold() never started"
        yield thread
    finally:
        device.release.set()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "holder thread did not finish"


def call_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="second-caller")
    thread.start()
    return thread, outcome


# -- serialisation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "call", "expected"),
    [
        ("note", lambda d: d.note("b"), "b"),
        ("get_value", lambda d: d.get_value(), 42),
        ("is_ready", lambda d: d.is_ready(), True),
        ("configure", lambda d: d.configure(1, k=2), (1, ("k", 2))),
        ("move", lambda d: d.move(1.0, y=2.0, speed=3), 6.0),
    ],
)
def test_every_public_method_waits_for_the_device_lock(
    daemon: ld.LabDaemon,
    gates: tuple[Gate, Gate],
    method: str,
    call: Callable[[Gate], Any],
    expected: Any,
) -> None:
    g1, _ = gates
    with holding(g1):
        thread, outcome = call_in_thread(lambda: call(g1))
        # Positive proof of waiting: the lock reports a queued caller, and it has not run.
        wait_until(
            lambda: daemon.device_info("g1")["lock"]["waiting"] == 1,
            f"the second caller of {method} to queue on g1's lock",
        )
        assert daemon.device_info("g1")["lock"]["holder"] == "holder-thread"
        assert g1.log == ["hold-in"]
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert outcome == {"value": expected}
    assert g1.log[:2] == ["hold-in", "hold-out"]  # the second call ran only after hold() left


def test_different_devices_never_wait_for_each_other(gates: tuple[Gate, Gate]) -> None:
    g1, g2 = gates
    with holding(g1):
        thread, outcome = call_in_thread(lambda: g2.note("free"))
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a call on g2 waited for g1's lock"
        assert outcome == {"value": "free"}
        assert g1.log == ["hold-in"]  # g1 is still held while g2 answered


class Nested:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def outer(self) -> tuple[bool, int]:
        # Calls its own public (locked) method while holding the lock: must not deadlock.
        return self._ld_lock._is_owned(), self.inner()  # type: ignore[attr-defined]

    def inner(self) -> int:
        return 7


def test_reentrant_calls_from_inside_a_method_work(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Nested": Nested})
    dev = daemon.add_device("n1", "Nested")
    thread, outcome = call_in_thread(dev.outer)
    thread.join(WAIT_S)
    assert not thread.is_alive(), "a re-entrant call deadlocked"
    assert outcome == {"value": (True, 7)}


def test_classmethods_are_callable_through_the_wrapper(gates: tuple[Gate, Gate]) -> None:
    g1, _ = gates
    assert g1.model() == "Gate"


class WithProperty:
    evaluations = 0

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.plain = "attr"

    @property
    def temperature(self) -> float:
        # A real driver would query the instrument here; add_device must not trigger that.
        type(self).evaluations += 1
        return 21.5

    def read(self) -> str:
        return "ok"


def test_add_device_does_not_evaluate_properties(daemon: ld.LabDaemon) -> None:
    WithProperty.evaluations = 0
    daemon.register_plugins(devices={"WithProperty": WithProperty})
    dev = daemon.add_device("p1", "WithProperty")
    assert WithProperty.evaluations == 0
    assert [m["name"] for m in daemon.device_methods("p1")] == ["read"]
    assert WithProperty.evaluations == 0
    assert dev.temperature == 21.5  # attribute reads still work
    assert dev.plain == "attr"
    assert WithProperty.evaluations == 1


class Slotted:
    __slots__ = ("device_id",)

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def ping(self) -> str:
        return "pong"


class SlottedWithDict:
    __slots__ = ("__dict__", "device_id")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def ping(self) -> str:
        return "pong"


def test_slots_class_without_dict_is_refused_clearly(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Slotted": Slotted, "SlottedWithDict": SlottedWithDict})
    with pytest.raises(ld.InvalidArgumentError, match=r"'Slotted'.*__slots__.*'__dict__'"):
        daemon.add_device("s1", "Slotted")
    assert daemon.device_ids() == []
    assert daemon.add_device("s2", "SlottedWithDict").ping() == "pong"


# -- query / command classification ------------------------------------------------------------


class Classified:
    labd_queries = {"read_raw"}

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def get_x(self) -> int:
        return 1

    def is_on(self) -> bool:
        return True

    def has_fault(self) -> bool:
        return False

    def list_modes(self) -> list[str]:
        return []

    def set_x(self, x: int) -> None:
        pass

    def fire(self) -> None:
        pass

    def read_raw(self) -> int:
        return 3

    @ld.query
    def wavelength(self) -> float:
        return 1550.0

    @ld.command
    def get_and_reset_counter(self) -> int:
        return 0


def test_methods_are_classified_by_decorator_then_labd_queries_then_prefix(
    daemon: ld.LabDaemon,
) -> None:
    daemon.register_plugins(devices={"Classified": Classified})
    daemon.add_device("c1", "Classified")
    kinds = {m["name"]: m["kind"] for m in daemon.device_methods("c1")}
    assert kinds == {
        "fire": "command",
        "get_and_reset_counter": "command",  # @ld.command beats the get_ prefix
        "get_x": "query",
        "has_fault": "query",
        "is_on": "query",
        "list_modes": "query",
        "read_raw": "query",  # labd_queries
        "set_x": "command",
        "wavelength": "query",  # @ld.query
    }


def test_owned_device_allows_queries_and_refuses_commands_by_kind() -> None:
    with ld.LabDaemon(strict_ownership=True) as daemon:
        daemon.register_plugins(devices={"Classified": Classified})
        dev = daemon.add_device("c1", "Classified")
        lease = daemon.claim(["c1"], owner="alice")
        try:
            assert dev.read_raw() == 3  # labd_queries
            assert dev.wavelength() == 1550.0  # @ld.query
            assert dev.get_x() == 1  # prefix
            with pytest.raises(ld.DeviceBusyError, match="get_and_reset_counter"):
                dev.get_and_reset_counter()  # @ld.command
            with pytest.raises(ld.DeviceBusyError, match="alice"):
                dev.fire()
        finally:
            lease.release()
        dev.fire()  # free again


# -- call_timeout ------------------------------------------------------------------------------


def test_set_call_timeout_raises_device_timeout_naming_the_holder(
    daemon: ld.LabDaemon,
    gates: tuple[Gate, Gate],
) -> None:
    g1, _ = gates
    daemon.set_call_timeout("g1", 0.2)
    with holding(g1, name="stuck-holder"):
        with pytest.raises(ld.DeviceTimeoutError) as info:
            g1.note("late")
        message = str(info.value)
        assert "'g1'" in message and "stuck-holder" in message and "call_timeout=0.2" in message
        assert isinstance(info.value, ld.DeviceError)
    assert "late" not in g1.log
    assert daemon.get_device_error("g1") is None  # waiting too long is not the device's fault
    assert g1.note("now") == "now"  # the lock was left in a usable state


class SlowToAnswer(Gate):
    labd_call_timeout = 0.2


def test_class_attribute_labd_call_timeout(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"SlowToAnswer": SlowToAnswer})
    dev = daemon.add_device("s1", "SlowToAnswer")
    assert daemon.device_info("s1")["call_timeout"] == 0.2
    with (
        holding(dev, name="class-timeout-holder"),
        pytest.raises(ld.DeviceTimeoutError, match="class-timeout-holder"),
    ):
        dev.note("late")


def test_set_call_timeout_rejects_bad_values(
    daemon: ld.LabDaemon, gates: tuple[Gate, Gate]
) -> None:
    for bad in (0, -1, "1"):
        with pytest.raises(ld.InvalidArgumentError, match="call_timeout"):
            daemon.set_call_timeout("g1", bad)  # type: ignore[arg-type]
    assert daemon.device_info("g1")["call_timeout"] is None
    with pytest.raises(ld.UnknownDeviceError, match=r"'nope'.*'g1', 'g2'"):
        daemon.set_call_timeout("nope", 1.0)


# -- method descriptions and call-by-name ------------------------------------------------------


class Stage:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def move(self, x: float, y: float = 0.0, *, speed: int = 1) -> str:
        """Move to (x, y).

        Longer explanation.
        """
        self.calls.append(("move", (x, y, speed)))
        return f"{x},{y}@{speed}"

    def home(self) -> None:
        self.calls.append(("home", ()))

    def _secret(self) -> None:
        self.calls.append(("_secret", ()))


@pytest.fixture
def stage(daemon: ld.LabDaemon) -> Stage:
    daemon.register_plugins(devices={"Stage": Stage})
    return daemon.add_device("stage1", "Stage")


def test_device_methods_describe_parameters(daemon: ld.LabDaemon, stage: Stage) -> None:
    methods = {m["name"]: m for m in daemon.device_methods("stage1")}
    assert sorted(methods) == ["home", "move"]
    move = methods["move"]
    assert move["kind"] == "command"
    assert move["doc"].startswith("Move to (x, y).")
    assert move["query"] is False
    assert move["returns"] == {"type": "string"}
    assert move["returns_annotation"] == "str"
    assert move["parameters"] == [
        {
            "name": "x",
            "required": True,
            "default": None,
            "annotation": "float",
            "kind": "positional_or_keyword",
            "schema": {"type": "number"},
            "type": "number",
        },
        {
            "name": "y",
            "required": False,
            "default": 0.0,
            "annotation": "float",
            "kind": "positional_or_keyword",
            "schema": {"type": "number"},
            "type": "number",
        },
        {
            "name": "speed",
            "required": False,
            "default": 1,
            "annotation": "int",
            "kind": "keyword_only",
            "schema": {"type": "integer"},
            "type": "integer",
        },
    ]
    assert methods["home"]["parameters"] == []


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "error", "match"),
    [
        ("_secret", None, None, ld.InvalidArgumentError, r"'_secret'.*private.*'home', 'move'"),
        ("__init__", ["x"], None, ld.InvalidArgumentError, "private"),
        ("__class__", None, None, ld.InvalidArgumentError, "private"),
        ("nope", None, None, ld.UnknownNameError, r"no method 'nope'.*'home', 'move'"),
        ("", None, None, ld.InvalidArgumentError, "method name"),
        (None, None, None, ld.InvalidArgumentError, "method name"),
        ("move", [], None, ld.InvalidArgumentError, r"stage1\.move.*missing.*'x'"),
        ("move", [1, 2, 3], None, ld.InvalidArgumentError, "too many positional"),
        ("move", [1], {"bogus": 1}, ld.InvalidArgumentError, "bogus"),
        ("home", [1], None, ld.InvalidArgumentError, "too many positional"),
        ("move", "12", None, ld.InvalidArgumentError, "args must be a list"),
        ("move", None, [1], ld.InvalidArgumentError, "kwargs"),
    ],
)
def test_call_device_rejects_bad_calls_without_touching_the_device(
    daemon: ld.LabDaemon,
    stage: Stage,
    method: Any,
    args: Any,
    kwargs: Any,
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        daemon.call_device("stage1", method, args, kwargs)
    assert stage.calls == []
    assert daemon.get_device_error("stage1") is None


def test_call_device_unknown_names_are_value_errors(daemon: ld.LabDaemon, stage: Stage) -> None:
    with pytest.raises(ValueError, match="nope"):
        daemon.call_device("stage1", "nope")
    with pytest.raises(ValueError, match=r"'ghost'.*'stage1'"):
        daemon.call_device("ghost", "home")


def test_call_device_calls_through_the_lock(daemon: ld.LabDaemon, stage: Stage) -> None:
    assert daemon.call_device("stage1", "move", [1.5], {"speed": 2}) == "1.5,0.0@2"
    assert daemon.call_device("stage1", "home") is None
    assert stage.calls == [("move", (1.5, 0.0, 2)), ("home", ())]


# -- device error records ----------------------------------------------------------------------


class Faulty:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def read(self) -> float:
        raise ld.DeviceOperationError("ADC overrange on channel 3")

    def ok(self) -> int:
        return 1


def test_device_errors_become_records_with_origin_device_and_traceback(
    daemon: ld.LabDaemon,
) -> None:
    daemon.register_plugins(devices={"Faulty": Faulty})
    dev = daemon.add_device("f1", "Faulty")
    assert daemon.get_device_error("f1") is None
    with pytest.raises(ld.DeviceOperationError, match="overrange") as info:
        dev.read()
    record = daemon.get_device_error("f1")
    assert record is not None
    assert record.type == "DeviceOperationError"
    assert record.message == "ADC overrange on channel 3"
    assert record.origin == "device"
    assert record.context == {"device_id": "f1", "method": "read"}
    assert record.traceback is not None
    assert "in read" in record.traceback and "overrange" in record.traceback
    assert record.timestamp.endswith("Z")
    as_dict = record.to_dict()
    assert set(as_dict) == {"type", "message", "origin", "timestamp", "traceback", "context"}
    assert daemon.device_info("f1")["last_error"]["message"] == "ADC overrange on channel 3"
    assert info.value.__traceback__ is not None  # the caller got the device's own exception

    assert dev.ok() == 1  # a later success does not clear the record
    assert daemon.get_device_error("f1") == record
    daemon.clear_device_error("f1")
    assert daemon.get_device_error("f1") is None
    assert daemon.device_info("f1")["last_error"] is None


def test_errors_through_call_device_are_recorded_too(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Faulty": Faulty})
    daemon.add_device("f1", "Faulty")
    with pytest.raises(ld.DeviceOperationError):
        daemon.call_device("f1", "read")
    record = daemon.get_device_error("f1")
    assert record is not None and record.origin == "device"


def test_error_listeners_hear_device_errors(daemon: ld.LabDaemon) -> None:
    heard: list[ld.ErrorRecord] = []
    daemon.add_error_listener(heard.append)
    daemon.register_plugins(devices={"Faulty": Faulty})
    dev = daemon.add_device("f1", "Faulty")
    with pytest.raises(ld.DeviceOperationError):
        dev.read()
    assert [r.message for r in heard] == ["ADC overrange on channel 3"]
