"""Typed remote interfaces over a real server: 422 for arguments that do not fit the annotations
(calls, task and device parameters), JSON Schemas in /methods, /device-types and /task-types."""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from typing import Any, Literal, cast

import httpx
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner, Result

import labd
from labd.cli import app
from labd.client import ServerAPI
from labd.testing import FakeDevice, RunningServer, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0


class Speed(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Point(BaseModel):
    x: float
    y: float = 0.0


class TypedLaser:
    """A laser whose methods are annotated; it records what reached it."""

    def __init__(self, device_id: str, wavelength: float = 1550.0, port: str = "COM1") -> None:
        self.device_id = device_id
        self.wavelength = wavelength
        self.port = port
        self.received: list[tuple[str, Any]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def set_wavelength(self, wavelength: float) -> float:
        """Tune the laser (nm)."""
        self.received.append(("set_wavelength", wavelength))
        self.wavelength = wavelength
        return wavelength

    def get_wavelength(self) -> float:
        return self.wavelength

    def get_settings(self) -> dict[str, float]:
        return {"wavelength": self.wavelength}

    def set_mode(self, mode: Literal["fast", "slow"], speed: Speed = Speed.FAST) -> str:
        self.received.append(("set_mode", (mode, speed)))
        return f"{mode}/{speed.value}"

    def set_curve(self, points: list[float], gain: float | None = None) -> list[float]:
        self.received.append(("set_curve", (points, gain)))
        return points

    def set_label(self, label: str) -> str:
        return label

    def configure(self, enabled: bool, count: int, label: str) -> None:
        self.received.append(("configure", (enabled, count, label)))

    def move(self, to: Point) -> float:
        self.received.append(("move", to))
        return to.x + to.y

    def hold(self) -> None:
        """Hold the device lock until the test releases it."""
        self.entered.set()
        self.release.wait(WATCHDOG_S)


class TypedSweep:
    """A sweep with annotated parameters."""

    def __init__(self, task_id: str, start: float, steps: int, mode: Speed = Speed.FAST,
                 name: str = "", **kwargs: Any) -> None:
        self.task_id = task_id
        self.start, self.steps, self.mode, self.name = start, steps, mode, name

    def run(self, context: Any) -> dict[str, Any]:
        return {"start": self.start, "steps": self.steps, "mode": self.mode.value,
                "name": self.name}


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    with running_server() as running:
        running.daemon.register_plugins(
            devices={"TypedLaser": TypedLaser, "Fake": FakeDevice},
            tasks={"TypedSweep": TypedSweep})
        running.daemon.add_device("laser1", "TypedLaser")
        running.daemon.add_device("dev1", "Fake")
        yield running


def _call(srv: RunningServer, device: str, method: str, *args: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/devices/{device}/call",
                      json={"method": method, "args": list(args), "kwargs": kwargs})


def _errors(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["type"] == "ParameterValidationError"
    assert error["traceback"] is None
    errors: list[dict[str, Any]] = error["context"]["errors"]
    return errors


def _laser(srv: RunningServer) -> TypedLaser:
    return cast("TypedLaser", srv.daemon.device_slot("laser1").instance)


# ------------------------------------------------------------------ item 1: /call
@pytest.mark.parametrize("value", ["abc", None, [1, 2]])
def test_a_call_with_a_value_that_is_no_float_is_422_and_reaches_nothing(
    srv: RunningServer, value: Any,
) -> None:
    (entry,) = _errors(_call(srv, "dev1", "set_value", value))
    assert entry["parameter"] == "value" and entry["expected"] == "float"
    assert entry["schema"] == {"type": "number"} and entry["received"] == value
    assert "'value' expects float" in entry["message"]
    fake = cast("FakeDevice", srv.daemon.device_slot("dev1").instance)
    assert [c for c in fake.calls if c[0] == "set_value"] == []


def test_an_infinite_float_is_refused(srv: RunningServer) -> None:
    answer = httpx.post(f"{srv.url}/devices/laser1/call",
                        content=b'{"method": "set_wavelength", "args": [1e999]}',
                        headers={"Content-Type": "application/json"})
    (entry,) = _errors(answer)
    assert entry["parameter"] == "wavelength" and "finite" in entry["message"]
    assert _laser(srv).received == []


def test_an_int_widens_to_a_float(srv: RunningServer) -> None:
    answer = _call(srv, "laser1", "set_wavelength", 1551)
    assert answer.status_code == 200, answer.text
    assert _laser(srv).received == [("set_wavelength", 1551.0)]
    assert isinstance(_laser(srv).received[0][1], float)


def test_every_bad_parameter_is_named(srv: RunningServer) -> None:
    errors = _errors(_call(srv, "laser1", "configure", "maybe", 1.5, label=7))
    assert [e["parameter"] for e in errors] == ["enabled", "count", "label"]
    assert [e["received"] for e in errors] == ["maybe", 1.5, 7]
    assert _laser(srv).received == []


def test_literal_enum_list_optional_and_model_arguments_convert(srv: RunningServer) -> None:
    assert _call(srv, "laser1", "set_mode", "slow", speed="slow").json()["result"] == "slow/slow"
    assert _errors(_call(srv, "laser1", "set_mode", "medium"))[0]["schema"] == {
        "enum": ["fast", "slow"], "type": "string"}
    assert _call(srv, "laser1", "set_curve", [1, 2.5]).json()["result"] == [1.0, 2.5]
    assert _call(srv, "laser1", "set_curve", [1], gain=None).status_code == 200
    assert _errors(_call(srv, "laser1", "set_curve", [1, "x"]))[0]["parameter"] == "points"
    assert _call(srv, "laser1", "move", {"x": 1, "y": 2}).json()["result"] == 3.0
    assert _errors(_call(srv, "laser1", "move", {"y": 2}))[0]["parameter"] == "to"


def test_unannotated_parameters_take_any_json_value(srv: RunningServer) -> None:
    answer = _call(srv, "dev1", "echo", {"a": [1, None]}, "x", k=True)
    assert answer.json()["result"] == {"args": [{"a": [1, None]}, "x"], "kwargs": {"k": True}}


def test_a_misspelt_keyword_names_the_nearest_parameter(srv: RunningServer) -> None:
    errors = _errors(_call(srv, "laser1", "set_wavelength", wavelenght=1550))
    messages = [e["message"] for e in errors]
    assert "unexpected parameter 'wavelenght'; did you mean 'wavelength'?" in messages
    assert "missing required parameter 'wavelength'" in messages


def test_validation_happens_before_the_device_lock(srv: RunningServer) -> None:
    laser = _laser(srv)
    holder = threading.Thread(target=_call, args=(srv, "laser1", "hold"))
    holder.start()
    try:
        assert laser.entered.wait(WATCHDOG_S), "hold() never started"
        answer = httpx.post(f"{srv.url}/devices/laser1/call?timeout=2",
                            json={"method": "set_wavelength", "args": ["abc"]})
        assert answer.status_code == 422, answer.text  # not 504: the lock was never waited for
    finally:
        laser.release.set()
        holder.join(WATCHDOG_S)


def test_connect_proxies_get_the_same_422(srv: RunningServer) -> None:
    with labd.connect(srv.url) as lab:
        laser = lab.get_device("laser1")
        with pytest.raises(labd.InvalidArgumentError, match="'wavelength' expects float") as info:
            laser.set_wavelength("abc")
        assert info.value.status_code == 422  # type: ignore[attr-defined]
        assert laser.set_wavelength(1552) == 1552.0
    assert _laser(srv).received == [("set_wavelength", 1552.0)]


# ------------------------------------------------------------------ item 2: tasks, devices
def test_a_task_parameter_of_the_wrong_type_is_422_and_no_run_exists(srv: RunningServer) -> None:
    answer = httpx.post(f"{srv.url}/tasks", json={
        "task_id": "sweep1", "task_type": "TypedSweep", "params": {"start": "abc", "steps": 3}})
    (entry,) = _errors(answer)
    assert entry["parameter"] == "start" and entry["received"] == "abc"
    assert "task type 'TypedSweep'" in answer.json()["error"]["message"]
    assert httpx.get(f"{srv.url}/tasks/sweep1").status_code == 404
    assert httpx.get(f"{srv.url}/tasks").json()["tasks"] == []


def test_task_parameters_convert_and_misspellings_are_named(srv: RunningServer) -> None:
    errors = _errors(httpx.post(f"{srv.url}/tasks", json={
        "task_type": "TypedSweep", "params": {"start": 1, "stpes": 3}}))
    assert {e["parameter"] for e in errors} == {"steps"}  # **kwargs takes 'stpes'
    answer = httpx.post(f"{srv.url}/tasks", json={
        "task_id": "sweep2", "task_type": "TypedSweep",
        "params": {"start": 1, "steps": 3, "mode": "slow"}})
    assert answer.status_code == 201, answer.text
    assert srv.daemon.get_task("sweep2").wait(WATCHDOG_S) == {
        "start": 1.0, "steps": 3, "mode": "slow", "name": ""}


def test_a_device_parameter_of_the_wrong_type_is_422_and_nothing_is_added(
    srv: RunningServer,
) -> None:
    answer = httpx.post(f"{srv.url}/devices", json={
        "device_id": "laser2", "device_type": "TypedLaser", "params": {"wavelength": "red"}})
    (entry,) = _errors(answer)
    assert entry["parameter"] == "wavelength"
    errors = _errors(httpx.post(f"{srv.url}/devices", json={
        "device_id": "laser2", "device_type": "TypedLaser", "params": {"wavelenght": 1}}))
    assert errors[0]["message"] == "unexpected parameter 'wavelenght'; did you mean 'wavelength'?"
    assert "laser2" not in srv.daemon.device_ids()
    answer = httpx.post(f"{srv.url}/devices", json={
        "device_id": "laser2", "device_type": "TypedLaser", "params": {"wavelength": 1500}})
    assert answer.status_code == 201, answer.text
    assert cast("TypedLaser", srv.daemon.device_slot("laser2").instance).wavelength == 1500.0


# ------------------------------------------------------------------ items 4, 5: schemas
def test_methods_describe_parameters_with_json_schemas(srv: RunningServer) -> None:
    methods = {m["name"]: m for m in
               httpx.get(f"{srv.url}/devices/laser1/methods").json()["methods"]}
    tune = methods["set_wavelength"]
    assert tune["query"] is False and tune["kind"] == "command"
    assert tune["doc"] == "Tune the laser (nm)." and tune["returns"] == {"type": "number"}
    assert tune["parameters"] == [{
        "name": "wavelength", "required": True, "default": None, "annotation": "float",
        "kind": "positional_or_keyword", "schema": {"type": "number"}, "type": "number"}]
    assert methods["get_wavelength"]["query"] is True
    mode, speed = methods["set_mode"]["parameters"]
    assert mode["schema"] == {"enum": ["fast", "slow"], "type": "string"}
    assert speed["default"] == "fast" and speed["required"] is False
    points = methods["set_curve"]["parameters"][0]
    assert points["schema"] == {"type": "array", "items": {"type": "number"}}
    fake = {m["name"]: m for m in httpx.get(f"{srv.url}/devices/dev1/methods").json()["methods"]}
    assert fake["echo"]["parameters"][0]["schema"] == {}


def test_device_and_task_types_list_constructor_parameters(srv: RunningServer) -> None:
    with ServerAPI(srv.url) as api:
        devices = {t["name"]: t for t in api.device_types()["device_types"]}
        tasks = {t["name"]: t for t in api.task_types()["task_types"]}
    assert sorted(devices) == ["Fake", "TypedLaser"]
    laser = devices["TypedLaser"]
    assert laser["doc"].startswith("A laser whose methods are annotated")
    assert [(p["name"], p["schema"], p["default"]) for p in laser["parameters"]] == [
        ("wavelength", {"type": "number"}, 1550.0), ("port", {"type": "string"}, "COM1")]
    sweep = tasks["TypedSweep"]
    assert [p["name"] for p in sweep["parameters"]] == ["start", "steps", "mode", "name"]
    assert sweep["parameters"][1] == {
        "name": "steps", "required": True, "default": None, "annotation": "int",
        "kind": "positional_or_keyword", "schema": {"type": "integer"}, "type": "integer"}
    assert sweep["parameters"][2]["schema"]["enum"] == ["fast", "slow"]


# ------------------------------------------------------------------ item 6: the CLI
def _labd(*words: str) -> Result:
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb", "LABD_URL": None})
    return runner.invoke(app, list(words), catch_exceptions=False)


def test_labd_call_converts_words_through_the_schema(srv: RunningServer) -> None:
    result = _labd("call", "laser1", "set_label", "1550", "--url", srv.url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "1550"  # a str parameter keeps the word as text
    result = _labd("call", "laser1", "set_wavelength", "1550", "--url", srv.url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "1550.0"
    result = _labd("call", "laser1", "set_mode", "slow", "speed=slow", "--url", srv.url)
    assert result.output.strip() == "slow/slow", result.output


def test_labd_call_with_a_bad_value_is_one_line_naming_the_parameter(srv: RunningServer) -> None:
    result = _labd("call", "laser1", "set_wavelength", "abc", "--url", srv.url)
    assert result.exit_code != 0 and "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("labd: error:")]
    assert "'wavelength' expects float" in line
    assert _laser(srv).received == []


def test_labd_run_converts_task_parameters_through_the_schema(srv: RunningServer) -> None:
    result = _labd("run", "TypedSweep", "start=1", "steps=3", "name=42", "--id", "cli1",
                   "--url", srv.url)
    assert result.exit_code == 0, result.output
    assert srv.daemon.get_task("cli1").wait(WATCHDOG_S) == {
        "start": 1.0, "steps": 3, "mode": "fast", "name": "42"}


def test_labd_methods_and_types_show_parameter_types(srv: RunningServer) -> None:
    result = _labd("methods", "laser1", "--url", srv.url)
    assert result.exit_code == 0, result.output
    assert "wavelength: float" in result.output
    assert "dict[str, float]" in result.output  # text, not rich markup
    assert "mode: Literal['fast', 'slow'], speed: Speed='fast'" in result.output
    result = _labd("types", "--url", srv.url)
    assert result.exit_code == 0, result.output
    assert "TypedLaser" in result.output and "wavelength: float=1550.0, port: str='COM1'" in result.output
    assert "TypedSweep" in result.output and "steps: int" in result.output
