"""Another node's runs, records and devices through HTTP on this node: the owning node's answers.

Node ``a`` serves the device ``laser``, runs the tasks and keeps a run store; node ``b`` serves
nothing. Every request is sent to both nodes' servers (the same tokens on each) and the two
answers must match, error bodies included (``timestamp`` aside); changes made through ``b``
are checked on ``a``. The tests run on the three engines of ``test_lab_node``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import test_lab_node
from labd.lab import LabNode
from labd.lab.coordinator import Coordinator
from labd.server.auth import Token
from labd.testing import FakeDevice, running_server
from test_lab_node import Lab
from test_lab_support import wait_until

# The three engines of test_lab_node (in-process, fakeredis, a real redis-server) for these too.
connect = test_lab_node.connect
redis_server = test_lab_node.redis_server

TOKENS = {
    "alice-token": Token("alice", "operator"),
    "bob-token-1": Token("bob", "operator"),
    "viewer-token": Token("val", "viewer"),
    "admin-token": Token("root", "admin"),
}
ALICE, BOB, VIEWER, ADMIN = "alice-token", "bob-token-1", "viewer-token", "admin-token"


class Tunable:
    """A run with parameters until cancelled: ``gain`` must be a number >= 0; ``password``
    is secret; any other key is refused."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.device_ids: list[str] = []
        self.params: dict[str, Any] = {"gain": 1.0, "password": "hunter2"}

    def run(self, context: Any) -> dict[str, Any]:
        context.cancel_event.wait(60)
        return {"status": "cancelled"}

    def set_parameter(self, key: str, value: Any) -> None:
        if key not in self.params:
            raise KeyError(f"no parameter {key!r}; known: gain, password")
        if key == "gain" and not (isinstance(value, int | float) and value >= 0):
            raise ValueError(f"gain must be a number >= 0, got {value!r}")
        self.params[key] = value

    def get_parameter(self, key: str) -> Any:
        return self.params[key]


class Broken:
    """A run that fails at once (its error record has a traceback)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.device_ids: list[str] = []

    def run(self, context: Any) -> None:
        context.progress(0.5, 1.0, "warming up")
        raise RuntimeError("the lamp blew")


def _without_timestamps(value: Any) -> Any:
    """``value`` without the ``timestamp`` keys of error records (the time of each answer)."""
    if isinstance(value, dict):
        return {k: _without_timestamps(v) for k, v in value.items() if k != "timestamp"}
    if isinstance(value, list):
        return [_without_timestamps(v) for v in value]
    return value


class TwoNodes:
    """Nodes ``a`` (device ``laser``, the tasks, a run store) and ``b``, each serving HTTP."""

    def __init__(self, a: LabNode, b: LabNode, urls: dict[str, str]) -> None:
        self.a, self.b, self.urls = a, b, urls

    def send(
        self, node: str, method: str, path: str, token: str, body: Any = None,
    ) -> tuple[int, Any]:
        """One request to ``node``'s server: the status and the JSON answer."""
        answer = httpx.request(method, self.urls[node] + path, json=body, timeout=20,
                               headers={"Authorization": f"Bearer {token}"})
        return answer.status_code, answer.json()

    def same(
        self, method: str, path: str, token: str, body: Any = None, *, node: str | None = None,
    ) -> tuple[int, Any]:
        """The same request to ``a`` and to ``b``: the answer, which must be the same on both
        (``node`` is the one field an answer from another node adds: it names that node)."""
        status_a, answer_a = self.send("a", method, path, token, body)
        status_b, answer_b = self.send("b", method, path, token, body)
        if node is not None and isinstance(answer_b, dict):
            assert answer_b.pop("node") == node
        assert (status_b, _without_timestamps(answer_b)) == (status_a, _without_timestamps(answer_a))
        return status_a, answer_a


@pytest.fixture
def two(connect: Callable[[], Coordinator], tmp_path: Path) -> Iterator[TwoNodes]:
    lab = Lab(connect)
    with contextlib.ExitStack() as stack:
        stack.callback(lab.close)
        a = lab.node("a", "laser", store=tmp_path / "a-runs.db")
        a.daemon.register_plugins(tasks={"Tunable": Tunable, "Broken": Broken})
        b = lab.node("b")
        wait_until(lambda: b.knows("laser") and "a" in b.nodes(), 5, "node b to see node a")
        urls = {node.name: stack.enter_context(running_server(node.daemon, tokens=TOKENS)).url
                for node in (a, b)}
        yield TwoNodes(a, b, urls)


def _tunable_run_of_alice(two: TwoNodes) -> str:
    status, started = two.send("a", "POST", "/tasks", ALICE,
                               {"task_id": "tune", "task_type": "Tunable"})
    assert status == 201, started
    return "tune"


def test_parameters_of_another_nodes_run_answer_as_on_its_node(two: TwoNodes) -> None:
    run = _tunable_run_of_alice(two)
    try:
        answer = two.send("b", "POST", f"/tasks/{run}/parameters", ALICE, {"key": "gain", "value": 2.5})
        assert answer == (200, {"status": "parameter_set", "key": "gain", "value": 2.5})
        assert two.same("GET", f"/tasks/{run}/parameters/gain", VIEWER) == (
            200, {"key": "gain", "value": 2.5})
        assert two.same("GET", f"/tasks/{run}/parameters/password", VIEWER) == (
            200, {"key": "password", "value": "***"})
        # refused by the task: 400 naming the cause; nothing changed
        status, refused = two.same("POST", f"/tasks/{run}/parameters", ALICE,
                                   {"key": "gain", "value": -1})
        assert status == 400 and "gain must be a number >= 0" in refused["error"]["message"]
        assert refused["error"]["context"] == {"cause_type": "ValueError"}
        status, unknown_key = two.same("GET", f"/tasks/{run}/parameters/colour", VIEWER)
        assert status == 400 and unknown_key["error"]["type"] == "InvalidArgumentError"
        # another operator's run: 403 naming its owner, the same on both nodes
        status, forbidden = two.same("POST", f"/tasks/{run}/parameters", BOB,
                                     {"key": "gain", "value": 9})
        assert status == 403 and forbidden["error"]["context"]["owner"] == "alice"
        assert two.send("b", "POST", f"/tasks/{run}/parameters", ADMIN,
                        {"key": "gain", "value": 4})[0] == 200
        assert two.a.daemon.get_task(run).get_parameter("gain") == 4
        # pause and resume keep the same rule (the owning node checks it)
        status, refused = two.same("POST", f"/tasks/{run}/pause", BOB)
        assert status == 403 and refused["error"]["message"] == forbidden["error"]["message"].replace(
            "set parameters of", "pause")
        status, missing = two.send("b", "POST", "/tasks/ghost/parameters", ALICE, {"key": "gain"})
        assert status == 404 and missing["error"]["type"] == "UnknownTaskError"
        assert two.send("b", "GET", "/tasks/ghost/parameters/gain", VIEWER)[0] == 404
    finally:
        two.a.daemon.get_task(run).cancel()


def test_the_runs_own_node_decides_who_may_act_on_it(two: TwoNodes) -> None:
    """The caller's node checks too, but the run's node decides (a request sent straight)."""
    run = _tunable_run_of_alice(two)
    handle = two.a.daemon.get_task(run)
    try:
        assert two.b.control_run("a", run, "pause", {"user": "bob", "admin": False}) == {
            "refused_owner": "alice"}
        assert two.b.control_run("a", run, "pause", {"user": "root", "admin": True}) is None
        wait_until(handle.is_paused, 5, "the run to pause")
        assert two.b.control_run("a", run, "resume", {"user": "alice", "admin": False}) is None
        wait_until(lambda: not handle.is_paused(), 5, "the run to resume")
    finally:
        handle.cancel()


def _failed_run(two: TwoNodes) -> str:
    handle = two.a.daemon.execute_task("broken", "Broken")
    wait_until(lambda: handle.status == "failed", 10, "the run to fail")
    return "broken"


def test_error_records_of_another_nodes_run_and_device(two: TwoNodes) -> None:
    run = _failed_run(two)
    assert two.send("a", "POST", "/devices/laser/call", ADMIN, {"method": "fail"})[0] == 502
    for path in (f"/tasks/{run}/error", "/devices/laser/error"):
        status, seen = two.same("GET", path, VIEWER)
        assert status == 200 and seen["error"]["traceback"] is None
        status, seen = two.same("GET", path, ADMIN)
        assert status == 200 and "RuntimeError" in seen["error"]["traceback"]
    assert two.send("b", "DELETE", f"/tasks/{run}/error", BOB) == (
        200, {"status": "cleared", "task_id": run})
    assert two.a.daemon.get_task_error(run) is None
    assert two.send("b", "DELETE", "/devices/laser/error", BOB) == (
        200, {"status": "cleared", "device_id": "laser"})
    assert two.a.daemon.get_device_error("laser") is None
    for method in ("GET", "DELETE"):
        status, missing = two.send("b", method, "/tasks/ghost/error", ADMIN)
        assert status == 404 and missing["error"]["type"] == "UnknownTaskError"
        status, missing = two.send("b", method, "/devices/ghost/error", ADMIN)
        assert status == 404 and missing["error"]["type"] == "UnknownDeviceError"


def test_run_history_of_another_node(two: TwoNodes) -> None:
    run = _failed_run(two)
    assert two.send("a", "POST", "/devices/laser/call", ADMIN, {"method": "fail"})[0] == 502
    for token in (VIEWER, ADMIN):  # tracebacks for admins only, on either node
        status, record = two.same("GET", f"/runs/{run}", token, node="a")
        assert status == 200 and record["status"] == "failed" and record["events"]
        assert (record["error"]["traceback"] is None) == (token == VIEWER)
        status, errors = two.same("GET", "/devices/laser/errors/history?limit=5", token)
        assert status == 200 and [e["type"] for e in errors["errors"]] == ["RuntimeError"]
    status, events = two.same("GET", f"/runs/{run}/events?limit=2", VIEWER)
    assert status == 200 and len(events["events"]) == 2
    for path in ("/runs/ghost", "/runs/ghost/events"):
        status, missing = two.send("b", "GET", path, VIEWER)
        assert status == 404 and missing["error"]["type"] == "UnknownTaskError"
    assert two.same("GET", f"/runs/{run}/events?limit=0", VIEWER)[0] == 400


def test_a_device_is_added_to_another_node(two: TwoNodes) -> None:
    two.a.daemon.register_plugins(devices={"OnlyOnA": FakeDevice})
    status, added = two.send("b", "POST", "/devices", ADMIN, {
        "device_id": "probe", "device_type": "OnlyOnA", "params": {"value": 3}, "node": "a"})
    assert status == 201, added
    assert added["node"] == "a" and added["device_type"] == "OnlyOnA"
    assert two.a.daemon.call_device("probe", "get_value") == 3.0
    # b answers for it at once (the reply came after node a registered it)
    assert two.send("b", "GET", "/devices/probe", VIEWER)[1]["node"] == "a"
    # parameters are checked against the constructor on node a, as node a itself does
    bad = {"device_id": "probe2", "device_type": "OnlyOnA", "params": {"value": "high"}, "node": "a"}
    status, refused = two.same("POST", "/devices", ADMIN, bad)
    assert status == 422 and refused["error"]["type"] == "ParameterValidationError"
    assert "probe2" not in two.a.daemon.device_ids()
    status, taken = two.same("POST", "/devices", ADMIN, {**bad, "device_id": "laser", "params": {}})
    assert status == 400 and "laser" in taken["error"]["message"]
    status, nowhere = two.send("b", "POST", "/devices", ADMIN, {**bad, "node": "ghost"})
    assert status == 404 and "'a', 'b'" in nowhere["error"]["message"]
    assert two.send("b", "POST", "/devices", BOB, {**bad, "params": {}})[0] == 403  # admins only
    # this node's own name, or none: added here
    assert two.send("b", "POST", "/devices", ADMIN, {
        "device_id": "here", "device_type": "Fake", "node": "b"})[1].get("node") is None
    assert "here" in two.b.daemon.device_ids()


def test_a_node_that_does_not_answer_gives_the_errors_of_other_requests(two: TwoNodes) -> None:
    run = _failed_run(two)
    two.a._workers.close()  # node a is alive in the directory but answers nothing
    with running_server(two.b.daemon, tokens=TOKENS, request_timeout=1.0) as impatient:
        two.urls["b"] = impatient.url
        status, late = two.send("b", "GET", "/devices/laser/error", VIEWER)
        assert status == 504 and late["error"]["type"] == "DeviceTimeoutError"
        # node a named either way: by the lab request's own bound or the server's, just after
        assert "node 'a'" in late["error"]["message"]
        # a run is looked for on every live node, as GET /tasks/{id} looks for it
        status, lost = two.send("b", "GET", f"/tasks/{run}", VIEWER)
        assert status == 504 and lost["error"]["type"] == "DeviceTimeoutError"
        for method, path in (("GET", f"/tasks/{run}/error"), ("DELETE", f"/tasks/{run}/error"),
                             ("GET", f"/runs/{run}")):
            status, late = two.send("b", method, path, ADMIN)
            assert (status, late["error"]["type"]) == (504, "DeviceTimeoutError"), path
        # the requests abandoned at 504 end by their own bounds (2 s per node asked)
        offloader = impatient.server.app.state.labd.offloader
        wait_until(lambda: not any(pool["busy"] for pool in offloader.stats().values()), 10,
                   "the abandoned requests to node a to end")


def test_a_server_without_a_lab_refuses_a_node_for_a_new_device() -> None:
    with running_server() as server:
        server.daemon.register_plugins(devices={"Fake": FakeDevice})
        answer = httpx.post(server.url + "/devices", timeout=10, json={
            "device_id": "probe", "device_type": "Fake", "node": "a"})
        assert answer.status_code == 400
        assert "not a node of a lab" in answer.json()["error"]["message"]
        assert server.daemon.device_ids() == []
