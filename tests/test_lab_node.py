"""Nodes of one lab inside one process: two daemons, each a LabNode, on one coordinator.

The same behaviour tests run on the in-process coordinator, on the Redis coordinator over
fakeredis and over a real redis-server: the directory, calls to another node's device (with
its errors), claims across nodes (all or none, refusals naming the node, queued claims),
fencing of a lost claim, leases, and an engine that is unreachable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import labd
from labd.errors import (
    DeviceBusyError,
    DeviceOperationError,
    DeviceTimeoutError,
    InvalidArgumentError,
    UnknownDeviceError,
)
from labd.lab import (
    ClaimLostError,
    DeviceIdConflictError,
    LabNode,
    LabTimings,
    LocalCoordinator,
)
from labd.lab.coordinator import Coordinator
from labd.testing import FakeDevice
from test_lab_support import RedisServer, free_port, needs_redis_server, wait_until

FAST = LabTimings(directory_ttl=1.0, heartbeat=0.2, claim_ttl=1.0, claim_renew=0.2,
                  waiter_ttl=1.0, claim_poll=0.02)


class Drive:
    """A task that sets ``target`` to 1, 2, 3, ... waiting for ``step`` before each next value."""

    steps: dict[str, threading.Event] = {}
    errors: dict[str, BaseException] = {}

    def __init__(self, task_id: str, device_ids: list[str], target: str) -> None:
        self.task_id = task_id
        self.device_ids = device_ids
        self.target = target

    def run(self, context: Any) -> dict[str, Any]:
        device = context.daemon.get_device(self.target)
        step = Drive.steps.setdefault(self.task_id, threading.Event())
        for value in range(1, 100):
            try:
                device.set_value(value)
            except Exception as exc:
                Drive.errors[self.task_id] = exc
                raise
            while not step.wait(0.02):
                if context.cancel_event.is_set():
                    return {"status": "cancelled", "last": value}
            step.clear()
        return {"status": "completed"}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["local", "fakeredis", pytest.param("redis-server", marks=needs_redis_server)])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[[], Coordinator]]:
    """A factory of coordinators that all reach the same engine (one per node)."""
    if request.param == "local":
        shared = LocalCoordinator()
        yield lambda: shared
        shared.close()
        return
    from labd.lab.redis_engine import RedisCoordinator

    if request.param == "fakeredis":
        import fakeredis

        server = fakeredis.FakeServer()
        yield lambda: RedisCoordinator("redis://fake:6379/0",
                                       client=fakeredis.FakeRedis(server=server))
        return
    real: RedisServer = request.getfixturevalue("redis_server")
    cleaner = RedisCoordinator(real.url)
    try:
        cleaner._client.flushall()
    finally:
        cleaner.close()
    yield lambda: RedisCoordinator(real.url)


class Lab:
    """Daemons joined as nodes; every one is shut down and leaves the lab at the end."""

    def __init__(self, connect: Callable[[], Coordinator]) -> None:
        self.connect = connect
        self.nodes: list[LabNode] = []

    def node(self, name: str, *device_ids: str, start: bool = True, **kw: Any) -> LabNode:
        """A started node serving ``device_ids`` (Fake); ``store=PATH`` keeps its run history."""
        daemon = labd.LabDaemon(store=kw.pop("store", None))
        daemon.register_plugins(devices={"Fake": FakeDevice}, tasks={"Drive": Drive})
        for device_id in device_ids:
            daemon.add_device(device_id, "Fake")
        coordinator = self.connect()
        node = LabNode(daemon, coordinator, name, timings=kw.pop("timings", FAST), workers=2,
                       own_coordinator=not isinstance(coordinator, LocalCoordinator), **kw)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.daemon.shutdown(timeout=2)
            node.close()


@pytest.fixture
def lab(connect: Callable[[], Coordinator]) -> Iterator[Lab]:
    Drive.steps.clear()
    Drive.errors.clear()
    instance = Lab(connect)
    yield instance
    instance.close()


def _see(node: LabNode, device_id: str) -> None:
    wait_until(lambda: node.knows(device_id), 5, f"node {node.name!r} to see {device_id!r}")


# -- directory ------------------------------------------------------------------------------------
def test_every_node_lists_the_other_nodes_devices(lab: Lab) -> None:
    a = lab.node("a", "laser")
    b = lab.node("b", "camera", "daq")
    a.refresh()
    assert set(a.nodes()) == {"a", "b"}
    assert {(d["device_id"], d["node"]) for d in a.remote_devices()} == {("camera", "b"), ("daq", "b")}
    assert a.node_of("camera") == "b" and b.knows("laser") and not a.knows("nothing")
    assert a.health()["connected"] is True


def test_a_device_id_served_by_another_live_node_is_refused_naming_it(lab: Lab) -> None:
    lab.node("a", "laser")
    late = lab.node("b", "laser", start=False)
    with pytest.raises(DeviceIdConflictError, match="'laser' is already served by live node 'a'"):
        late.start()


def test_a_closed_node_leaves_the_directory(lab: Lab) -> None:
    a = lab.node("a", "laser")
    b = lab.node("b", "camera")
    _see(a, "camera")
    b.daemon.shutdown()
    b.close()
    assert "b" not in a.nodes()


# -- calls ----------------------------------------------------------------------------------------
def test_calls_reach_a_device_on_another_node(lab: Lab) -> None:
    lab.node("a", "laser")
    b = lab.node("b")
    _see(b, "laser")
    b.daemon.call_device("laser", "set_value", [1550.5])
    assert b.daemon.call_device("laser", "get_value") == 1550.5
    proxy = b.daemon.get_device("laser")
    assert proxy.echo(1, x=[2, 3]) == {"args": [1], "kwargs": {"x": [2, 3]}}


def test_remote_errors_keep_their_type(lab: Lab) -> None:
    lab.node("a", "laser")
    b = lab.node("b")
    _see(b, "laser")
    with pytest.raises(DeviceOperationError, match="RuntimeError: boom") as fault:
        b.daemon.call_device("laser", "fail", ["boom"])
    assert fault.value.labd_context["cause_type"] == "RuntimeError"  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgumentError):
        b.daemon.call_device("laser", "_private")
    with pytest.raises(UnknownDeviceError, match="No device found with ID: 'ghost'"):
        b.daemon.call_device("ghost", "get_value")


def test_a_node_that_does_not_answer_gives_device_timeout_naming_it(lab: Lab) -> None:
    a = lab.node("a", "laser")
    b = lab.node("b", call_timeout=0.3)
    _see(b, "laser")
    a._workers.close()  # node a is alive in the directory but answers nothing
    with pytest.raises(DeviceTimeoutError, match=r"on node 'a'.*no answer within 0\.3 s"):
        b.daemon.call_device("laser", "get_value")


# -- claims across nodes --------------------------------------------------------------------------------
def test_a_run_claims_devices_on_two_nodes_and_others_are_refused(lab: Lab) -> None:
    a = lab.node("a", "laser")
    b = lab.node("b", "camera")
    c = lab.node("c")
    _see(a, "camera")
    _see(c, "camera")
    handle = a.daemon.execute_task("sweep", "Drive", device_ids=["laser", "camera"], target="camera")
    wait_until(lambda: b.daemon.device_slot("camera").instance.value == 1, 5, "the first command")
    # the engine holds both: a run on node c gets neither, told who owns them and where
    with pytest.raises(DeviceBusyError, match="task 'sweep' on node 'a'") as busy:
        c.daemon.execute_task("scan", "Drive", device_ids=["laser", "camera"], target="laser")
    assert {entry["device_id"] for entry in busy.value.busy} == {"laser", "camera"}
    # commands from elsewhere are refused on the device's own node, queries pass
    with pytest.raises(DeviceBusyError, match="task 'sweep' on node 'a'"):
        c.daemon.call_device("camera", "set_value", [99])
    with pytest.raises(DeviceBusyError, match="task 'sweep' on node 'a'"):
        b.daemon.call_device("camera", "set_value", [99], actor=labd.ownership.Actor(remote=True))
    assert c.daemon.call_device("camera", "get_value") == 1
    Drive.steps["sweep"].set()
    wait_until(lambda: b.daemon.device_slot("camera").instance.value == 2, 5, "the second command")
    handle.cancel()
    _wait_done(handle)
    # released everywhere: node c may claim them now
    wait_until(lambda: _claimable(c), 5, "the devices to be free for node c")


def _wait_done(handle: Any) -> None:
    wait_until(lambda: not handle.is_running(), 5, f"run {handle.task_id!r} to end")


def _claimable(node: LabNode) -> bool:
    try:
        lease = node.daemon.claim(["laser", "camera"], owner="carol")
    except DeviceBusyError:
        return False
    lease.release()
    return True


def test_a_queued_run_starts_when_the_other_nodes_run_ends(lab: Lab) -> None:
    a = lab.node("a", "laser")
    c = lab.node("c")
    _see(c, "laser")
    first = a.daemon.execute_task("first", "Drive", device_ids=["laser"], target="laser")
    wait_until(lambda: a.daemon.device_slot("laser").instance.value == 1, 5, "the first run")
    second = c.daemon.execute_task("second", "Drive", device_ids=["laser"], target="laser",
                                   wait_for_devices=True)
    assert second.status == "pending"
    first.cancel()
    _wait_done(first)
    wait_until(lambda: second.status == "running", 5, "the queued run to start")
    second.cancel()
    _wait_done(second)


def test_a_lease_on_another_nodes_device(lab: Lab) -> None:
    lab.node("a", "laser")
    c = lab.node("c")
    _see(c, "laser")
    with c.daemon.claim(["laser"], owner="alice", ttl=30):
        c.daemon.call_device("laser", "set_value", [7])  # acting as alice inside the block
        with pytest.raises(DeviceBusyError, match="lease 'lease-1' of 'alice' on node 'c'"):
            c.daemon.call_device("laser", "set_value", [8], actor=labd.ownership.Actor(remote=True, principal="bob"))
    assert c.daemon.call_device("laser", "get_value") == 7


# -- fencing ----------------------------------------------------------------------------------------
def test_a_run_that_cannot_renew_stops_sending_and_is_cancelled(lab: Lab) -> None:
    a = lab.node("a", "laser")
    b = lab.node("b", "camera")
    c = lab.node("c")
    _see(a, "camera")
    _see(c, "camera")
    handle = a.daemon.execute_task("sweep", "Drive", device_ids=["camera"], target="camera")
    wait_until(lambda: b.daemon.device_slot("camera").instance.value == 1, 5, "the first command")
    a.claims.close()  # node a's renewer stops, as if the node froze
    wait_until(lambda: c.coordinator.holder("camera") is None, 5, "a's claim to expire in the engine")
    lease = c.daemon.claim(["camera"], owner="carol")
    Drive.steps["sweep"].set()  # node a wakes: its next command must not reach the camera
    wait_until(lambda: "sweep" in Drive.errors, 5, "the run's next command to be refused")
    assert isinstance(Drive.errors["sweep"], ClaimLostError)
    assert "claim lost" in str(Drive.errors["sweep"])
    _wait_done(handle)
    assert handle.status in ("failed", "cancelled")
    assert b.daemon.device_slot("camera").instance.value == 1, "a fenced command moved the device"
    lease.release()


def test_the_devices_node_refuses_a_stale_token(lab: Lab) -> None:
    from labd.lab.calls import call_request, send_call

    lab.node("a", "laser")
    c = lab.node("c")
    _see(c, "laser")
    lease = c.daemon.claim(["laser"], owner="carol")
    token = c.claims.held()[0].token
    for stale in (token - 1, token + 1):
        with pytest.raises(ClaimLostError, match="claim lost"):
            send_call(c.coordinator, "a", "c", call_request(
                "laser", "set_value", [5], {}, stale, None, "task 'old'"), 5)
    send_call(c.coordinator, "a", "c", call_request(
        "laser", "set_value", [6], {}, token, None, "lease"), 5)
    lease.release()
    with pytest.raises(ClaimLostError, match="no live claim"):
        send_call(c.coordinator, "a", "c", call_request(
            "laser", "set_value", [5], {}, token, None, "lease"), 5)


# -- an engine that is unreachable -------------------------------------------------------------------------
def test_a_node_without_its_engine_serves_its_own_devices_and_says_degraded() -> None:
    from labd.lab.redis_engine import RedisCoordinator

    daemon = labd.LabDaemon()
    daemon.register_plugins(devices={"Fake": FakeDevice})
    daemon.add_device("laser", "Fake")
    node = LabNode(daemon, RedisCoordinator(f"redis://127.0.0.1:{free_port()}/0",
                                            socket_timeout=0.3), "a", timings=FAST, workers=1)
    try:
        node.start()
        assert node.health()["connected"] is False
        assert "did not answer" in (node.health()["engine_error"] or "")
        daemon.call_device("laser", "set_value", [3])
        assert daemon.call_device("laser", "get_value") == 3
    finally:
        daemon.shutdown()
        node.close()


def _lose_the_claim_then_step(a: LabNode, handle: Any, driver: str) -> None:
    """``driver`` (a Drive run) set the laser to 1; the claim on it is lost in the engine; the
    driver's next command must be refused with ClaimLostError and never reach the laser."""
    laser = a.daemon.device_slot("laser").instance
    wait_until(lambda: laser.value == 1, 5, "the first command")
    a.claims.close()  # the renewer stops, as in a node frozen past the claim TTL
    wait_until(lambda: a.coordinator.holder("laser") is None, 5, "the claim to expire in the engine")
    Drive.steps[driver].set()
    wait_until(lambda: driver in Drive.errors, 5, "the run's next command to be refused")
    assert isinstance(Drive.errors[driver], ClaimLostError)
    assert laser.value == 1, "a command under a lost claim reached the device"
    _wait_done(handle)


def test_a_run_whose_claim_is_lost_cannot_command_its_own_nodes_device(lab: Lab) -> None:
    a = lab.node("a", "laser")
    handle = a.daemon.execute_task("sweep", "Drive", device_ids=["laser"], target="laser")
    _lose_the_claim_then_step(a, handle, "sweep")


# -- streams ------------------------------------------------------------------------------------------
def _daq_on_a(lab: Lab) -> tuple[LabNode, LabNode]:
    """Node a with a FakeStreamer ``daq``, and node b that sees it."""
    from labd.testing import FakeStreamer

    a = lab.node("a")
    a.daemon.register_plugins(devices={"Streamer": FakeStreamer})
    a.daemon.add_device("daq", "Streamer")
    a.refresh()
    b = lab.node("b")
    _see(b, "daq")
    return a, b


def test_a_device_stream_reaches_subscribers_on_another_node(lab: Lab) -> None:
    a, b = _daq_on_a(lab)
    first = b.daemon.subscribe("daq", maxsize=1000)
    second = b.daemon.subscribe("daq", maxsize=1000)
    try:
        streamer = a.daemon.device_slot("daq").instance
        wait_until(lambda: a.stream_stats()["relays"], 5, "the relay to start on node a")
        for i in range(200):
            streamer.push({"i": i, "samples": [i, i + 1]})
        got: list[Any] = []
        wait_until(lambda: got.extend(first.drain()) or len(got) >= 200, 10, "200 items on node b")
        assert [item.payload["i"] for item in got] == list(range(200))
        assert got[5].payload == {"i": 5, "samples": [5, 6]}
        wait_until(lambda: len(second) >= 200, 10, "the second subscriber's items")
        (reader,) = b.stream_stats()["readers"]
        assert reader["gaps"] == 0 and reader["received"] == 200 and reader["subscribers"] == 2
    finally:
        first.close()
        second.close()
    # nobody reads it here any more: the reader stops and the device's node ends the relay
    wait_until(lambda: not b.stream_stats()["readers"], 10, "node b's reader to stop")
    wait_until(lambda: not a.stream_stats()["relays"], 10, "node a's relay to end")


def test_a_stream_item_that_is_not_json_is_a_gap_and_the_relay_goes_on(lab: Lab) -> None:
    a, b = _daq_on_a(lab)
    sub = b.daemon.subscribe("daq", maxsize=100)
    try:
        streamer = a.daemon.device_slot("daq").instance
        wait_until(lambda: a.stream_stats()["relays"], 5, "the relay to start on node a")
        streamer.push({"i": 0})
        streamer.push({"i": 1, "handle": object()})  # a driver object: not JSON
        streamer.push({"i": 2, "by_channel": {3: 0.5}})
        got: list[Any] = []
        wait_until(lambda: got.extend(sub.drain()) or len(got) >= 2, 10, "the items after it")
        assert [item.payload for item in got] == [{"i": 0}, {"i": 2, "by_channel": {"3": 0.5}}]
        (relay,) = a.stream_stats()["relays"]
        assert relay["dropped"] == 1
    finally:
        sub.close()


# -- run history ---------------------------------------------------------------------------------------
def test_the_run_history_of_every_node_merged_naming_each_runs_node(lab: Lab) -> None:
    a = lab.node("a", "laser")
    b = lab.node("b", "camera")
    for node, device_id, task_id in ((a, "laser", "first"), (b, "camera", "second"),
                                     (a, "laser", "third")):
        handle = node.daemon.execute_task(task_id, "Drive", device_ids=[device_id], target=device_id)
        handle.cancel()
        _wait_done(handle)
    a.refresh()
    b.refresh()
    runs = b.runs(None, None, None, 10, 0)
    assert [(run["task_id"], run["node"]) for run in runs] == [
        ("third", "a"), ("second", "b"), ("first", "a")]
    assert [run["task_id"] for run in a.runs(None, None, None, 1, 1)] == ["second"]


def test_a_stream_stopped_on_its_node_ends_for_subscribers_elsewhere(lab: Lab) -> None:
    a, b = _daq_on_a(lab)
    sub = b.daemon.subscribe("daq", maxsize=100)
    try:
        streamer = a.daemon.device_slot("daq").instance
        wait_until(lambda: a.stream_stats()["relays"], 5, "the relay to start")
        streamer.push(1)
        wait_until(lambda: len(sub) == 1, 5, "the first item on node b")
        a.daemon.stop_streaming("daq")
        wait_until(lambda: sub.closed, 5, "the subscription on node b to end")
        # the readers' keep-alives never restart a stream someone stopped
        b.refresh()
        wait_until(lambda: not b.stream_stats()["readers"], 5, "node b's reader to go")
        wait_until(lambda: not a.stream_stats()["relays"], 5, "node a to drop the ended relay")
        assert not streamer.is_streaming()
    finally:
        sub.close()


def test_another_nodes_device_checks_arguments_and_describes_itself(lab: Lab) -> None:
    from labd.signatures import ParameterValidationError

    a = lab.node("a", "laser")
    b = lab.node("b")
    _see(b, "laser")
    with pytest.raises(ParameterValidationError, match=r"laser\.set_value\(\)") as bad:
        b.daemon.call_device("laser", "set_value", ["not a number"])
    assert bad.value.errors and bad.value.errors[0]["parameter"] == "value"
    b.daemon.call_device("laser", "set_value", ["2.5"])  # lax: converted, as over HTTP
    assert a.daemon.call_device("laser", "get_value") == 2.5
    methods = {m["name"]: m["kind"] for m in b.ask("laser", "methods")}
    assert methods["set_value"] == "command" and methods["get_value"] == "query"
    assert b.ask("laser", "info")["device_type"] == "Fake"


def test_a_second_process_under_a_live_nodes_name_is_refused(lab: Lab) -> None:
    from labd.lab import NodeNameConflictError

    lab.node("a", "laser")
    twin = lab.node("a", "camera", start=False)
    with pytest.raises(NodeNameConflictError, match="'a' is already used"):
        twin.start()


def test_a_run_is_found_and_cancelled_from_another_node(lab: Lab) -> None:
    from labd.errors import UnknownTaskError

    a = lab.node("a", "laser")
    b = lab.node("b")
    handle = a.daemon.execute_task("sweep", "Drive", device_ids=["laser"], target="laser")
    b.refresh()
    node, info = b.find_run("sweep")
    assert node == "a" and info["node"] == "a" and info["status"] in ("running", "paused")
    b.control_run(node, "sweep", "pause")
    wait_until(lambda: handle.is_paused(), 5, "the run to pause")
    b.control_run(node, "sweep", "resume")
    wait_until(lambda: not handle.is_paused(), 5, "the run to resume")
    with pytest.raises(InvalidArgumentError, match="action must be one of"):
        b.control_run(node, "sweep", "explode")
    b.control_run(node, "sweep", "cancel")
    _wait_done(handle)
    assert handle.status == "cancelled"
    with pytest.raises(UnknownTaskError, match="'ghost' on this node or any live node"):
        b.find_run("ghost")


def test_directory_changes_reach_other_nodes_before_their_next_heartbeat(lab: Lab) -> None:
    slow = LabTimings(directory_ttl=30.0, heartbeat=10.0)  # a heartbeat the test never waits for
    a = lab.node("a", "laser", timings=slow)
    b = lab.node("b", "camera", timings=slow)
    wait_until(lambda: a.node_of("camera") == "b", 5, "node a to hear of node b's devices")
    b.daemon.add_device("daq", "Fake")  # added at run time: registered and announced at once
    wait_until(lambda: a.node_of("daq") == "b", 5, "node a to hear of the new device")
    b.daemon.shutdown()
    b.close()
    wait_until(lambda: a.node_of("camera") is None, 5, "node a to hear that node b left")


def test_another_nodes_device_is_connected_and_disconnected_from_here(lab: Lab) -> None:
    from labd.ownership import Actor

    a = lab.node("a", "laser")
    b = lab.node("b")
    _see(b, "laser")
    remote = Actor(remote=True)
    info = b.act("laser", "connect", remote)
    assert info["node"] == "a" and info["state"] == "connected"
    assert a.daemon.device_slot("laser").instance.connected
    with b.daemon.claim(["laser"], owner="alice"), pytest.raises(
            DeviceBusyError, match="lease 'lease-1' of 'alice' on node 'b'"):
        b.act("laser", "stop_streaming", Actor(remote=True, principal="bob"))
    assert b.act("laser", "disconnect", remote)["state"] == "disconnected"
    with pytest.raises(InvalidArgumentError, match="action must be one of"):
        b.act("laser", "explode", remote)


class Outer:
    """A task that runs ``Drive`` on ``target`` as its child, inside its own claim."""

    def __init__(self, task_id: str, device_ids: list[str], target: str) -> None:
        self.task_id = task_id
        self.device_ids = device_ids
        self.target = target

    def run(self, context: Any) -> Any:
        child = context.daemon.execute_task(f"{self.task_id}-child", "Drive",
                                            device_ids=[self.target], target=self.target)
        return child.wait(30)


def test_a_child_run_under_a_lost_claim_cannot_command_its_own_nodes_device(lab: Lab) -> None:
    """The child holds the device inside its parent's claim (no engine claim of its own):
    once the parent's engine claim is lost, the child's next command is refused too."""
    a = lab.node("a", "laser")
    a.daemon.register_plugins(tasks={"Outer": Outer})
    handle = a.daemon.execute_task("outer", "Outer", device_ids=["laser"], target="laser")
    _lose_the_claim_then_step(a, handle, "outer-child")


def test_get_tasks_on_any_node_lists_every_nodes_runs(lab: Lab) -> None:
    import httpx

    from labd.testing import running_server

    a = lab.node("a", "laser")
    b = lab.node("b", "camera")
    running = b.daemon.execute_task("on-b", "Drive", device_ids=["camera"], target="camera")
    a.refresh()
    try:
        with running_server(a.daemon) as server:
            tasks = httpx.get(server.url + "/tasks", timeout=10).json()["tasks"]
        assert [(t["task_id"], t["node"], t["status"]) for t in tasks] == [
            ("on-b", "b", "running")]
        assert [t["task_id"] for t in a.tasks() if t["node"] == "a"] == []
    finally:
        running.cancel()
        _wait_done(running)


def test_the_dashboard_shows_every_nodes_runs_and_opens_another_nodes_run(
    lab: Lab, tmp_path: Path,
) -> None:
    """The history, the running tasks, a run's page and its download on node a include node
    b's runs, each naming its node (issue 12: the dashboard's history merges the lab's)."""
    import httpx

    from labd.testing import running_server

    a = lab.node("a", "laser", store=tmp_path / "a.db")
    b = lab.node("b", "camera", store=tmp_path / "b.db")
    done = b.daemon.execute_task("sweep-on-b", "Drive", device_ids=["camera"], target="camera")
    done.cancel()
    _wait_done(done)
    running = b.daemon.execute_task("live-on-b", "Drive", device_ids=["camera"], target="camera")
    a.refresh()
    try:
        with running_server(a.daemon) as server, httpx.Client(base_url=server.url,
                                                               timeout=15) as http:
            history = http.get("/ui/runs").text
            assert 'data-run="sweep-on-b"' in history and "<th scope=\"col\">Node</th>" in history
            assert 'data-label="Node">b</td>' in history
            tasks = http.get("/ui/tasks").text
            assert "/ui/runs/live-on-b" in tasks and "on node b" in tasks
            page = http.get("/ui/runs/sweep-on-b")
            assert page.status_code == 200, page.text
            assert '<span data-field="node">b</span>' in page.text
            download = http.get("/ui/runs/sweep-on-b/download.json")
            assert download.status_code == 200 and download.json()["task_id"] == "sweep-on-b"
            assert http.get("/ui/runs/no-such-run").status_code == 404
    finally:
        running.cancel()
        _wait_done(running)
