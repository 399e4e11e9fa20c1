"""labd.server over real HTTP: every endpoint, ownership, no blocking, timeouts, bad input.

Each test gets its own server on 127.0.0.1 and a free port (``labd.testing.running_server``)
and talks to it with httpx, like any client would. Concurrency tests synchronise on
``threading.Event`` handshakes of the fake devices; bounded waits are watchdogs.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

import labd
import labd.server
from labd.server import LabDaemonServer, ServerState, create_app
from labd.testing import (
    BlockingDevice,
    FakeDevice,
    FakeStreamer,
    RunningServer,
    gated_task,
    running_server,
)

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package for its TestClient; httpx still works and is
    # what labd depends on. Only this import-time notice is silenced.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WATCHDOG_S) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` (a watchdog)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@dataclasses.dataclass
class Reading:
    value: float
    unit: str
    _raw: bytes = b"secret"


class ArrayDevice:
    """Returns NumPy data, dataclasses and non-finite floats."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def get_array(self) -> Any:
        return np.array([1.0, np.nan, np.inf, -2.5])

    def get_strided(self) -> Any:
        return np.arange(10.0)[::3]

    def get_reading(self) -> Reading:
        return Reading(1.5, "mW")

    def get_nested(self) -> dict[str, Any]:
        return {"n": np.int64(3), "f": np.float32(0.5), "s": {2}, "t": (1, 2)}


class ParamTask:
    """A task with set_parameter/get_parameter that waits on a shared event."""

    release = threading.Event()

    def __init__(self, task_id: str, gain: float = 1.0) -> None:
        self.task_id = task_id
        self.params: dict[str, Any] = {"gain": gain}

    def set_parameter(self, key: str, value: Any) -> None:
        if key not in self.params:
            raise KeyError(f"unknown parameter {key!r}")
        self.params[key] = value

    def get_parameter(self, key: str) -> Any:
        return self.params[key]

    def run(self, context: Any) -> dict[str, Any]:
        while not ParamTask.release.wait(0.02):
            if context.cancel_event.is_set():
                return {"status": "cancelled"}
        return {"status": "completed", "gain": self.params["gain"]}


class FailingTask:
    def __init__(self, task_id: str, fail_in_init: bool = False) -> None:
        if fail_in_init:
            raise ValueError("bad configuration")
        self.task_id = task_id

    def run(self, context: Any) -> None:
        raise RuntimeError("sweep exploded")


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def _populate(daemon: labd.LabDaemon, release: threading.Event) -> None:
    daemon.register_plugins(
        devices={"Fake": FakeDevice, "Blocking": BlockingDevice, "Streamer": FakeStreamer,
                 "Arrays": ArrayDevice},
        tasks={"Hold": gated_task(release), "Params": ParamTask, "Failing": FailingTask},
    )
    for device_id, device_type, params in [
        ("dev1", "Fake", {}), ("dev2", "Fake", {"value": 2.0}), ("slow", "Blocking", {"max_block": 10.0}),
        ("arr", "Arrays", {}),
    ]:
        daemon.add_device(device_id, device_type, **params)
        daemon.connect_device(device_id)


@pytest.fixture
def srv(release: threading.Event) -> Iterator[RunningServer]:
    ParamTask.release.clear()
    with running_server() as running:
        _populate(running.daemon, release)
        slow = running.daemon.get_device("slow")
        try:
            yield running
        finally:
            slow.release.set()  # let any blocked worker finish before the server stops
            release.set()
            ParamTask.release.set()


@pytest.fixture
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
        yield http


def error_of(answer: httpx.Response) -> dict[str, Any]:
    body = answer.json()
    assert set(body) == {"error"}, body
    record: dict[str, Any] = body["error"]
    assert set(record) == {"type", "message", "origin", "timestamp", "traceback", "context"}
    assert record["traceback"] is None
    return record


# ---------------------------------------------------------------- meta
def test_root_names_the_server_and_lists_endpoints(client: httpx.Client) -> None:
    body = client.get("/").json()
    assert body["name"] == "labd"
    assert body["version"] == labd.__version__
    assert body["endpoints"]["call_device"] == "POST /devices/{device_id}/call"
    assert body["endpoints"]["stream_events"] == "GET /stream/events"


def test_health_reports_devices_and_running_tasks(client: httpx.Client, srv: RunningServer) -> None:
    body = client.get("/health").json()
    assert body["status"] == "healthy"
    assert body["devices"] == 4
    assert body["tasks_running"] == 0
    assert body["uptime_s"] >= 0
    assert body["timestamp"].endswith("Z")


def test_openapi_describes_request_bodies_and_no_422(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"CallRequest", "AddDeviceRequest", "TaskRequest", "LeaseRequest"} <= set(schemas)
    call = spec["paths"]["/devices/{device_id}/call"]["post"]
    assert call["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CallRequest")
    assert all("422" not in op["responses"] for path in spec["paths"].values() for op in path.values())
    assert schemas["CallRequest"]["additionalProperties"] is False


def test_the_app_works_with_starlette_testclient(daemon: labd.LabDaemon) -> None:
    daemon.register_plugins(devices={"Fake": FakeDevice})
    daemon.add_device("dev1", "Fake", value=2.0)
    with TestClient(create_app(daemon)) as test_client:
        assert test_client.get("/health").status_code == 200
        answer = test_client.post("/devices/dev1/call", json={"method": "get_value"})
        assert answer.json() == {"result": 2.0, "success": True}
        missing = test_client.post("/devices/nope/call", json={"method": "get_value"})
        assert missing.status_code == 404


def test_metrics_count_calls_errors_and_tasks(client: httpx.Client, srv: RunningServer,
                                              release: threading.Event) -> None:
    client.post("/devices/dev1/call", json={"method": "get_value"})
    client.post("/devices/dev1/call", json={"method": "fail"})
    client.post("/devices/dev1/call", json={"method": "no_such_method"})
    task_id = client.post("/tasks", json={"task_type": "Hold"}).json()["task_id"]
    running = client.get("/metrics").text
    assert 'labd_tasks_running 1.0' in running
    release.set()
    srv.daemon.get_task(task_id).wait(WATCHDOG_S)
    wait_until(lambda: 'labd_task_finishes_total{status="completed",task_type="Hold"} 1.0'
               in client.get("/metrics").text, "the task finish to be counted")
    text = client.get("/metrics").text
    assert 'labd_device_calls_total{device="dev1",method="get_value",outcome="ok"} 1.0' in text
    assert 'labd_device_calls_total{device="dev1",method="fail",outcome="DeviceOperationError"} 1.0' in text
    assert 'method="(unknown)",outcome="UnknownNameError"' in text
    assert 'labd_http_errors_total{status="502",type="DeviceOperationError"} 1.0' in text
    assert 'labd_task_starts_total{task_type="Hold"} 1.0' in text


# ---------------------------------------------------------------- devices
def test_list_and_get_devices_have_the_device_info_shape(client: httpx.Client) -> None:
    devices = client.get("/devices").json()["devices"]
    assert [d["device_id"] for d in devices] == ["dev1", "dev2", "slow", "arr"]
    info = client.get("/devices/dev2").json()
    assert set(info) >= {"device_id", "device_type", "state", "connected", "streaming", "owned_by",
                         "owner_kind", "owner_id", "owned_since", "unresponsive", "last_error",
                         "params", "call_timeout", "lock", "stream"}
    assert info["params"] == {"value": 2.0}
    assert info["connected"] is True
    assert info["unresponsive"] is False


def test_device_methods_describe_kind_and_parameters(client: httpx.Client) -> None:
    methods = {m["name"]: m for m in client.get("/devices/dev1/methods").json()["methods"]}
    assert methods["get_value"]["kind"] == "query"
    assert methods["set_value"]["kind"] == "command"
    assert methods["set_value"]["parameters"][0]["name"] == "value"
    assert not any(name.startswith("_") for name in methods)


def test_add_device_answers_201_and_can_connect(client: httpx.Client, srv: RunningServer) -> None:
    answer = client.post("/devices", json={"device_id": "dev3", "device_type": "Fake",
                                           "params": {"value": 7.0}, "connect": True})
    assert answer.status_code == 201
    assert answer.json()["state"] == "connected"
    assert srv.daemon.get_device("dev3").value == 7.0
    again = client.post("/devices", json={"device_id": "dev3", "device_type": "Fake"})
    assert again.status_code == 400
    assert error_of(again)["type"] == "InvalidArgumentError"


def test_connect_and_disconnect_change_state(client: httpx.Client) -> None:
    assert client.post("/devices/dev1/disconnect").json()["state"] == "disconnected"
    assert client.post("/devices/dev1/connect", json={"timeout": 5}).json()["state"] == "connected"
    assert client.post("/devices/dev1/connect").json()["connected"] is True


def test_connect_failure_is_502_and_the_stored_error_keeps_the_traceback(client: httpx.Client) -> None:
    client.post("/devices", json={"device_id": "bad", "device_type": "Fake",
                                  "params": {"fail_connect": True}})
    answer = client.post("/devices/bad/connect")
    assert answer.status_code == 502
    record = error_of(answer)
    assert record["type"] == "DeviceConnectionError"
    assert record["context"]["cause_type"] == "ConnectionError"
    stored = client.get("/devices/bad/error").json()["error"]
    assert "simulated connection failure" in stored["message"]
    assert "Traceback" in stored["traceback"]
    cleared = client.delete("/devices/bad/error")  # 200 with JSON: LabDaemon's client parses it
    assert (cleared.status_code, cleared.json()) == (200, {"status": "cleared", "device_id": "bad"})
    assert client.get("/devices/bad/error").json() == {"error": None}


def test_call_passes_args_and_kwargs_and_returns_result(client: httpx.Client) -> None:
    answer = client.post("/devices/dev1/call",
                         json={"method": "echo", "args": [1, "a"], "kwargs": {"k": [1.5]}})
    assert answer.json() == {"result": {"args": [1, "a"], "kwargs": {"k": [1.5]}}, "success": True}
    assert client.post("/devices/dev1/call", json={"method": "set_value", "args": [3]}).status_code == 200
    assert client.post("/devices/dev1/call", json={"method": "get_value"}).json()["result"] == 3.0


def test_numpy_results_become_lists_and_non_finite_floats_null(client: httpx.Client) -> None:
    def call(method: str) -> Any:
        return client.post("/devices/arr/call", json={"method": method}).json()["result"]

    assert call("get_array") == [1.0, None, None, -2.5]
    assert call("get_strided") == [0.0, 3.0, 6.0, 9.0]
    assert call("get_reading") == {"value": 1.5, "unit": "mW"}  # no private field
    assert call("get_nested") == {"n": 3, "f": 0.5, "s": [2], "t": [1, 2]}


def test_unserialisable_result_is_502_naming_the_type_without_leaking(client: httpx.Client) -> None:
    answer = client.post("/devices/dev1/call", json={"method": "get_object"})
    assert answer.status_code == 502
    record = error_of(answer)
    assert record["type"] == "UnserializableResult"
    assert "_Opaque" in record["message"]
    assert "must never be sent" not in answer.text


def test_device_exception_is_502_with_its_class_and_stored_traceback(client: httpx.Client) -> None:
    answer = client.post("/devices/dev1/call", json={"method": "fail", "args": ["laser on fire"]})
    assert answer.status_code == 502
    record = error_of(answer)
    assert record["type"] == "DeviceOperationError"
    assert record["context"]["cause_type"] == "RuntimeError"
    assert "laser on fire" in record["message"]
    stored = client.get("/devices/dev1/error").json()["error"]
    assert stored["type"] == "RuntimeError" and "Traceback" in stored["traceback"]


# ---------------------------------------------------------------- tasks
def test_task_lifecycle_over_http(client: httpx.Client, srv: RunningServer,
                                  release: threading.Event) -> None:
    started = client.post("/tasks", json={"task_id": "hold1", "task_type": "Hold",
                                          "params": {"device_ids": ["dev1"], "result": [1, 2]}},
                          headers={"X-Labd-Owner": "alice"})
    assert started.status_code == 201
    assert started.json() == {"task_id": "hold1", "task_type": "Hold", "device_ids": ["dev1"],
                              "status": started.json()["status"]}
    assert client.post("/tasks/hold1/pause").json() == {"status": "paused", "task_id": "hold1"}
    assert client.get("/tasks/hold1").json()["paused"] is True
    assert client.post("/tasks/hold1/resume").json() == {"status": "resumed", "task_id": "hold1"}
    info = client.get("/tasks/hold1").json()
    assert info["owner"] == "alice" and info["device_ids"] == ["dev1"]
    release.set()
    srv.daemon.get_task("hold1").wait(WATCHDOG_S)
    done = client.get("/tasks/hold1").json()
    assert done["status"] == "completed"
    assert done["result"] == {"status": "completed", "result": [1, 2]}
    assert [t["task_id"] for t in client.get("/tasks").json()["tasks"]] == ["hold1"]


def test_cancel_task(client: httpx.Client, srv: RunningServer) -> None:
    task_id = client.post("/tasks", json={"task_type": "Hold"}).json()["task_id"]
    answer = client.post(f"/tasks/{task_id}/cancel")
    assert answer.json() == {"status": "cancellation_requested", "task_id": task_id}
    with pytest.raises(labd.TaskCancelledError):
        srv.daemon.get_task(task_id).wait(WATCHDOG_S)
    assert client.get(f"/tasks/{task_id}").json()["status"] == "cancelled"


def test_task_parameters(client: httpx.Client, srv: RunningServer) -> None:
    client.post("/tasks", json={"task_id": "p1", "task_type": "Params", "params": {"gain": 2.0}})
    answer = client.post("/tasks/p1/parameters", json={"key": "gain", "value": 4.5})
    assert answer.json() == {"status": "parameter_set", "key": "gain", "value": 4.5}
    assert client.get("/tasks/p1/parameters/gain").json() == {"key": "gain", "value": 4.5}
    unknown = client.post("/tasks/p1/parameters", json={"key": "nope", "value": 1})
    assert unknown.status_code == 400
    assert error_of(unknown)["context"]["cause_type"] == "KeyError"
    ParamTask.release.set()
    assert srv.daemon.get_task("p1").wait(WATCHDOG_S)["gain"] == 4.5


def test_task_without_set_parameter_is_409_task_error(client: httpx.Client) -> None:
    client.post("/tasks", json={"task_id": "h2", "task_type": "Hold"})
    answer = client.post("/tasks/h2/parameters", json={"key": "x", "value": 1})
    assert answer.status_code == 409
    assert error_of(answer)["type"] == "TaskError"
    assert client.get("/tasks/h2/parameters/x").status_code == 409


def test_failed_task_error_endpoints(client: httpx.Client, srv: RunningServer) -> None:
    client.post("/tasks", json={"task_id": "f1", "task_type": "Failing"})
    with pytest.raises(labd.TaskFailedError):
        srv.daemon.get_task("f1").wait(WATCHDOG_S)
    info = client.get("/tasks/f1").json()
    assert info["status"] == "failed" and info["error"]["traceback"] is None
    stored = client.get("/tasks/f1/error").json()["error"]
    assert stored["type"] == "RuntimeError" and "sweep exploded" in stored["traceback"]
    cleared = client.delete("/tasks/f1/error")  # 200 with JSON: LabDaemon's client parses it
    assert (cleared.status_code, cleared.json()) == (200, {"status": "cleared", "task_id": "f1"})
    assert client.get("/tasks/f1/error").json() == {"error": None}


def test_task_constructor_error_is_400_and_starts_nothing(client: httpx.Client) -> None:
    answer = client.post("/tasks", json={"task_type": "Failing", "params": {"fail_in_init": True}})
    assert answer.status_code == 400
    record = error_of(answer)
    assert record["context"]["cause_type"] == "ValueError"
    assert "bad configuration" in record["message"]
    assert client.get("/tasks").json() == {"tasks": []}


# ---------------------------------------------------------------- ownership
def test_twenty_concurrent_task_starts_claim_the_device_exactly_once(
    client: httpx.Client, srv: RunningServer, release: threading.Event,
) -> None:
    gate = threading.Barrier(20)

    def start(_: int) -> httpx.Response:
        with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as own:
            gate.wait(WATCHDOG_S)
            return own.post("/tasks", json={"task_type": "Hold", "params": {"device_ids": ["dev1"]}})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(start, range(20)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] + [409] * 19
    winner = next(a.json()["task_id"] for a in answers if a.status_code == 201)
    busy = error_of(next(a for a in answers if a.status_code == 409))
    assert busy["type"] == "DeviceBusyError"
    assert busy["context"]["busy"][0]["device_id"] == "dev1"
    assert busy["context"]["busy"][0]["owner_id"] == winner

    owned = client.get("/devices/dev1").json()
    assert (owned["owned_by"], owned["owner_kind"], owned["owner_id"], owned["owner_label"]) == (
        winner, "task", winner, f"task {winner!r}"  # owned_by: LabDaemon's shape, the task id
    )
    assert client.post("/devices/dev1/call", json={"method": "get_value"}).status_code == 200
    refused = client.post("/devices/dev1/call", json={"method": "set_value", "args": [1.0]})
    assert refused.status_code == 409
    assert winner in error_of(refused)["message"]
    assert srv.daemon.get_device("dev1").value == 0.0  # the refused command never ran

    release.set()
    srv.daemon.get_task(winner).wait(WATCHDOG_S)
    assert client.get("/devices/dev1").json()["owned_by"] is None
    assert client.post("/devices/dev1/call", json={"method": "set_value", "args": [1.0]}).status_code == 200


def test_leases_let_their_holder_command_and_refuse_others(client: httpx.Client) -> None:
    created = client.post("/leases", json={"device_ids": ["dev1"], "owner": "alice", "ttl": 30})
    assert created.status_code == 201
    lease = created.json()
    assert lease["owner"] == "alice" and lease["status"] == "active"
    assert [entry["lease_id"] for entry in client.get("/leases").json()["leases"]] == [lease["lease_id"]]
    command = {"method": "set_value", "args": [5]}
    assert client.post("/devices/dev1/call", json=command,
                       headers={"X-Labd-Owner": "bob"}).status_code == 409
    assert client.post("/devices/dev1/call", json=command).status_code == 409
    assert client.post("/devices/dev1/call", json=command,
                       headers={"X-Labd-Owner": "alice"}).status_code == 200
    renewed = client.post(f"/leases/{lease['lease_id']}/renew", json={"ttl": 60}).json()
    assert renewed["ttl"] == 60
    released = client.delete(f"/leases/{lease['lease_id']}").json()
    assert released["status"] == "released"
    assert client.post("/devices/dev1/call", json=command).status_code == 200
    assert client.get("/leases").json() == {"leases": []}


def test_lease_owner_defaults_to_the_header_and_admin_can_break(client: httpx.Client) -> None:
    lease = client.post("/leases", json={"device_ids": ["dev2"]},
                        headers={"X-Labd-Owner": "carol"}).json()
    assert lease["owner"] == "carol"
    busy = client.post("/leases", json={"device_ids": ["dev2"], "owner": "dave"})
    assert busy.status_code == 409 and error_of(busy)["type"] == "DeviceBusyError"
    broken = client.delete(f"/leases/{lease['lease_id']}", params={"reason": "maintenance"}).json()
    assert broken["status"] == "broken" and broken["reason"] == "maintenance"
    assert client.delete(f"/leases/{lease['lease_id']}").status_code == 404
    no_owner = client.post("/leases", json={"device_ids": ["dev2"]})
    assert no_owner.status_code == 400 and "owner" in error_of(no_owner)["message"]


# ---------------------------------------------------------------- no blocking
def test_a_hung_device_blocks_neither_health_nor_other_devices(
    client: httpx.Client, srv: RunningServer,
) -> None:
    slow = srv.daemon.get_device("slow")
    answers: list[httpx.Response] = []

    def blocked_call() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as own:
            answers.append(own.post("/devices/slow/call", json={"method": "block"}))

    caller = threading.Thread(target=blocked_call, name="test-blocked-call")
    caller.start()
    try:
        assert slow.entered.wait(WATCHDOG_S), "the blocking call never reached the device"
        for _ in range(5):
            for method, path, body in [("GET", "/health", None), ("GET", "/devices/slow", None),
                                       ("POST", "/devices/dev2/call", {"method": "get_value"}),
                                       ("GET", "/metrics", None)]:
                began = time.monotonic()
                answer = client.request(method, path, json=body)
                elapsed = time.monotonic() - began
                assert answer.status_code == 200, answer.text
                assert elapsed < 1.0, f"{method} {path} took {elapsed:.2f} s while a device hung"
        assert client.get("/devices/slow").json()["lock"]["holder"] is not None
    finally:
        slow.release.set()
        caller.join(WATCHDOG_S)
    assert answers[0].json() == {"result": "released", "success": True}


def test_request_timeout_answers_504_and_flags_the_device_until_the_call_ends(
    client: httpx.Client, srv: RunningServer,
) -> None:
    slow = srv.daemon.get_device("slow")
    answer = client.post("/devices/slow/call", params={"timeout": 0.2}, json={"method": "block"})
    assert answer.status_code == 504
    record = error_of(answer)
    assert record["type"] == "DeviceTimeoutError"
    assert "slow.block()" in record["message"]
    assert slow.entered.is_set()
    assert client.get("/devices/slow").json()["unresponsive"] is True
    assert 'labd_device_unresponsive{device="slow"} 1.0' in client.get("/metrics").text
    slow.release.set()
    wait_until(lambda: client.get("/devices/slow").json()["unresponsive"] is False,
               "the unresponsive flag to clear after the late call ended")


# ---------------------------------------------------------------- bad input
BAD_INPUT = [
    # (id, method, path, request kwargs, status, error type)
    ("malformed-json", "POST", "/devices/dev1/call",
     {"content": b'{"method": "get_value",', "headers": {"content-type": "application/json"}},
     400, "MalformedRequest"),
    ("body-not-object", "POST", "/devices/dev1/call", {"json": ["get_value"]}, 400, "InvalidArgumentError"),
    ("method-not-string", "POST", "/devices/dev1/call", {"json": {"method": 5}}, 400, "InvalidArgumentError"),
    ("args-not-list", "POST", "/devices/dev1/call", {"json": {"method": "echo", "args": {"a": 1}}},
     400, "InvalidArgumentError"),
    ("kwargs-not-object", "POST", "/devices/dev1/call", {"json": {"method": "echo", "kwargs": [1]}},
     400, "InvalidArgumentError"),
    ("unknown-field", "POST", "/devices/dev1/call", {"json": {"method": "get_value", "argz": []}},
     400, "InvalidArgumentError"),
    ("unknown-device", "POST", "/devices/nope/call", {"json": {"method": "get_value"}},
     404, "UnknownDeviceError"),
    ("unknown-method", "POST", "/devices/dev1/call", {"json": {"method": "explode"}},
     404, "UnknownNameError"),
    ("private-method", "POST", "/devices/dev1/call", {"json": {"method": "_record"}},
     400, "InvalidArgumentError"),
    ("dunder-method", "POST", "/devices/dev1/call", {"json": {"method": "__init__", "args": ["x"]}},
     400, "InvalidArgumentError"),
    ("too-many-args", "POST", "/devices/dev1/call", {"json": {"method": "get_value", "args": [1]}},
     422, "ParameterValidationError"),
    ("unknown-kwarg", "POST", "/devices/dev1/call",
     {"json": {"method": "set_value", "kwargs": {"volts": 1}}}, 422, "ParameterValidationError"),
    ("wrong-arg-type", "POST", "/devices/dev1/call", {"json": {"method": "set_value", "args": ["hi"]}},
     422, "ParameterValidationError"),
    ("invalid-device-id", "GET", "/devices/bad%20id", {}, 400, "InvalidArgumentError"),
    ("too-long-id", "GET", "/devices/" + "x" * 129, {}, 400, "InvalidArgumentError"),
    ("invalid-new-id", "POST", "/devices", {"json": {"device_id": "a b", "device_type": "Fake"}},
     400, "InvalidArgumentError"),
    ("unknown-device-type", "POST", "/devices", {"json": {"device_id": "d9", "device_type": "Nope"}},
     404, "UnknownDeviceTypeError"),
    ("reserved-device-param", "POST", "/devices",
     {"json": {"device_id": "d9", "device_type": "Fake", "params": {"device_id": "x"}}},
     400, "InvalidArgumentError"),
    ("device-ctor-bad-params", "POST", "/devices",
     {"json": {"device_id": "d9", "device_type": "Fake", "params": {"volts": 1}}},
     422, "ParameterValidationError"),
    ("connect-bad-timeout", "POST", "/devices/dev1/connect", {"json": {"timeout": -1}},
     400, "InvalidArgumentError"),
    ("bad-query-timeout", "POST", "/devices/dev1/call?timeout=abc", {"json": {"method": "get_value"}},
     400, "InvalidArgumentError"),
    ("negative-query-timeout", "GET", "/devices?timeout=-1", {}, 400, "InvalidArgumentError"),
    ("call-zero-timeout", "POST", "/devices/dev1/call?timeout=0", {"json": {"method": "get_value"}},
     400, "InvalidArgumentError"),
    ("call-huge-timeout", "POST", "/devices/dev1/call?timeout=1e9", {"json": {"method": "get_value"}},
     400, "InvalidArgumentError"),
    ("call-empty-body", "POST", "/devices/dev1/call", {"content": b""}, 400, "InvalidArgumentError"),
    ("call-bad-device-id", "POST", "/devices/bad%20id/call", {"json": {"method": "get_value"}},
     400, "InvalidArgumentError"),
    ("call-long-owner", "POST", "/devices/dev1/call",
     {"json": {"method": "get_value"}, "headers": {"X-Labd-Owner": "o" * 129}},
     400, "InvalidArgumentError"),
    ("unknown-task", "GET", "/tasks/nope", {}, 404, "UnknownTaskError"),
    ("unknown-task-type", "POST", "/tasks", {"json": {"task_type": "Nope"}}, 404, "UnknownTaskTypeError"),
    ("task-claims-unknown-device", "POST", "/tasks",
     {"json": {"task_type": "Hold", "params": {"device_ids": ["ghost"]}}}, 404, "UnknownDeviceError"),
    ("task-bad-wait", "POST", "/tasks", {"json": {"task_type": "Hold", "wait_for_devices": "yes"}},
     400, "InvalidArgumentError"),
    ("task-reserved-param", "POST", "/tasks",
     {"json": {"task_type": "Hold", "params": {"wait_for_devices": True}}}, 400, "InvalidArgumentError"),
    ("task-bad-param", "POST", "/tasks", {"json": {"task_type": "Hold", "params": {"speed": 1}}},
     422, "ParameterValidationError"),
    ("lease-bad-ttl", "POST", "/leases", {"json": {"device_ids": ["dev1"], "owner": "a", "ttl": 0}},
     400, "InvalidArgumentError"),
    ("lease-empty-devices", "POST", "/leases", {"json": {"device_ids": [], "owner": "a"}},
     400, "InvalidArgumentError"),
    ("lease-unknown-device", "POST", "/leases", {"json": {"device_ids": ["ghost"], "owner": "a"}},
     404, "UnknownDeviceError"),
    ("unknown-lease", "POST", "/leases/lease-99/renew", {}, 404, "UnknownLeaseError"),
    ("bad-last-event-id", "GET", "/stream/events", {"headers": {"Last-Event-ID": "abc"}},
     400, "InvalidArgumentError"),
    ("no-such-route", "GET", "/nope", {}, 404, "NotFound"),
    ("wrong-method", "DELETE", "/devices", {}, 405, "MethodNotAllowed"),
    ("oversize-declared", "POST", "/devices/dev1/call",
     {"content": b'{"method": "echo", "args": ["' + b"x" * 70_000 + b'"]}',
      "headers": {"content-type": "application/json"}}, 413, "PayloadTooLarge"),
    ("oversize-chunked", "POST", "/devices/dev1/call",
     {"content": iter([b'{"method": "echo", "args": ["', b"x" * 70_000, b'"]}']),
      "headers": {"content-type": "application/json"}}, 413, "PayloadTooLarge"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "error_type"),
                         [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_an_error_record_and_changes_nothing(
    method: str, path: str, kwargs: dict[str, Any], status: int, error_type: str,
    release: threading.Event,
) -> None:
    with running_server(max_body_bytes=64 * 1024) as running:
        _populate(running.daemon, release)
        before = (running.daemon.list_devices(), running.daemon.list_tasks(),
                  running.daemon.get_device("dev1").calls[:], running.daemon.leases())
        with httpx.Client(base_url=running.url, timeout=WATCHDOG_S) as http:
            answer = http.request(method, path, **kwargs)
            assert answer.status_code == status, answer.text
            record = error_of(answer)
            assert record["type"] == error_type
            assert record["message"]
            assert "Traceback" not in answer.text
            assert http.get("/health").status_code == 200
        devices, tasks, calls, leases = before
        assert [d["device_id"] for d in running.daemon.list_devices()] == [d["device_id"] for d in devices]
        assert running.daemon.list_tasks() == tasks
        assert running.daemon.leases() == leases
        assert running.daemon.get_device("dev1").value == 0.0
        new_calls = running.daemon.get_device("dev1").calls[len(calls):]
        assert new_calls in ([], [("set_value", ("hi",), {})]), new_calls  # refused before any change


def test_validation_errors_name_the_field(client: httpx.Client) -> None:
    record = error_of(client.post("/devices/dev1/call", json={"method": "echo", "args": 3}))
    assert "body.args" in record["message"]
    assert record["context"]["errors"][0]["field"] == "body.args"


def test_no_cors_headers_unless_configured(client: httpx.Client) -> None:
    answer = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in answer.headers
    with running_server(cors_origins=["http://lab.example"]) as running:
        allowed = httpx.get(f"{running.url}/health", headers={"Origin": "http://lab.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://lab.example"


# ---------------------------------------------------------------- lifecycle and packaging
def test_running_server_demo_has_the_simulated_lab() -> None:
    with running_server(demo=True) as running:
        ids = [d["device_id"] for d in httpx.get(f"{running.url}/devices").json()["devices"]]
        assert ids == ["laser1", "pm1", "daq1"]
        assert running.url == running.server.url
        assert running.server.port != 0
    assert running.daemon.closed


def test_running_server_leaves_a_given_daemon_running(daemon: labd.LabDaemon) -> None:
    with running_server(daemon) as running:
        assert running.daemon is daemon
    assert not daemon.closed


def test_start_twice_and_stop_twice(daemon: labd.LabDaemon) -> None:
    server = LabDaemonServer(daemon, port=0)
    assert server.state is ServerState.NEW
    server.start()
    try:
        assert server.running
        with pytest.raises(RuntimeError, match="starts once"):
            server.start()
    finally:
        server.stop()
    server.stop()
    assert server.state is ServerState.STOPPED


def test_a_busy_port_gives_a_clear_error(daemon: labd.LabDaemon) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = LabDaemonServer(daemon, port=port)
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1"):
            server.start()
        server.stop()


@pytest.mark.parametrize("kwargs", [{"port": -1}, {"port": "80"}, {"request_timeout": 0},
                                    {"max_body_bytes": -5}, {"host": ""}])
def test_bad_server_settings_are_refused(daemon: labd.LabDaemon, kwargs: dict[str, Any]) -> None:
    with pytest.raises(labd.InvalidArgumentError):
        LabDaemonServer(daemon, **kwargs)


def test_server_module_re_exports_the_client_lazily() -> None:
    import labd.client

    assert labd.server.ServerAPI is labd.client.ServerAPI
    assert labd.server.ServerAPIError is labd.client.ServerAPIError
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        labd.server.Nope  # noqa: B018
