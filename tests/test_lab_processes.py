"""A lab of real processes: a redis-server started here, `labd serve` nodes as child processes.

Three nodes on one machine stand in for three PCs. The failure table of issue 12, each with
real signals: a node killed with SIGKILL, a node frozen with SIGSTOP past its claim TTL and
woken (fencing refuses its commands), the engine restarted empty, the engine unreachable at
start. Timings are shortened through the config's [lab] table (the defaults are 15/5/30/5 s).
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labd.testing import LabdProcess
from test_lab_support import RedisServer, free_port, needs_redis_server, wait_until

pytestmark = [needs_redis_server, pytest.mark.server, pytest.mark.slow]

LAB_TABLE = """
[lab]
heartbeat = 0.3
directory_ttl = 1.5
claim_ttl = 1.5
claim_renew = 0.3
waiter_ttl = 1.5
"""
TASKS = '''
import time

class Drive:
    """Sets ``target`` to 1, 2, 3, ... every ``every`` seconds until cancelled."""

    def __init__(self, task_id, device_ids, target, every=0.05):
        self.task_id, self.device_ids, self.target, self.every = task_id, device_ids, target, every

    def run(self, context):
        device = context.daemon.get_device(self.target)
        value = 0
        while not context.cancel_event.is_set():
            value += 1
            device.set_value(value)
            context.progress(value, None, f"value {value}")
            context.sleep(self.every)
        return {"status": "cancelled", "last": value}
'''


class Node:
    """One `labd serve` node: its process and an HTTP client on it."""

    def __init__(self, name: str, proc: LabdProcess, port: int) -> None:
        self.name = name
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=15.0)

    def call(self, device_id: str, method: str, *args: Any) -> httpx.Response:
        return self.http.post(f"/devices/{device_id}/call", json={"method": method, "args": list(args)})

    def value(self, device_id: str) -> Any:
        answer = self.call(device_id, "get_value")
        assert answer.status_code == 200, answer.text
        return answer.json()["result"]

    def close(self) -> None:
        self.http.close()
        if self.proc.process.poll() is None:
            try:
                self.proc.stop(signal.SIGTERM)
            except Exception:
                self.proc.close()
        else:
            self.proc.close()


class Lab:
    def __init__(self, tmp_path: Path, engine: str) -> None:
        self.tmp_path = tmp_path
        self.engine = engine
        self.nodes: dict[str, Node] = {}
        (tmp_path / "labtasks.py").write_text(TASKS)

    def config(self, name: str, devices: tuple[str, ...]) -> Path:
        lines = ['[tasks]', 'Drive = "labtasks:Drive"']
        for device_id in devices:
            lines += [f"[devices.{device_id}]", 'type = "labd.testing:FakeDevice"']
        path = self.tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n" + LAB_TABLE)
        return path

    def start(self, *extra: str, **nodes: tuple[str, ...]) -> list[Node]:
        started = []
        for name, devices in nodes.items():
            port = free_port()
            proc = LabdProcess("serve", str(self.config(name, devices)), "--port", str(port),
                               "--no-db", "--engine", self.engine, "--node", name, *extra,
                               timeout=30)
            self.nodes[name] = node = Node(name, proc, port)
            started.append(node)
        for node in started:
            node.proc.wait_for("labd serving")
        return started

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


@pytest.fixture
def engine() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def lab(tmp_path: Path, engine: RedisServer) -> Iterator[Lab]:
    instance = Lab(tmp_path, engine.url)
    yield instance
    instance.close()


def _devices(node: Node) -> dict[str, str]:
    answer = node.http.get("/devices")
    assert answer.status_code == 200, answer.text
    return {d["device_id"]: d["node"] for d in answer.json()["devices"]}


def _task(node: Node, task_id: str) -> dict[str, Any]:
    answer = node.http.get(f"/tasks/{task_id}")
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _engine_client(engine: RedisServer) -> Any:
    import redis

    return redis.Redis.from_url(engine.url)


@pytest.mark.timeout(90)
def test_three_nodes_serve_the_whole_lab_and_a_run_owns_devices_on_two(lab: Lab) -> None:
    a, b, c = lab.start(a=("laser",), b=("camera",), c=())  # c: a gateway without devices
    for node in (a, b, c):
        wait_until(lambda node=node: _devices(node) == {"laser": "a", "camera": "b"}, 10,
                   f"node {node.name} to list the lab's devices")
    assert c.call("camera", "set_value", 4.5).status_code == 200
    assert b.value("camera") == 4.5 and a.value("camera") == 4.5
    info = c.http.get("/devices/camera")
    assert info.status_code == 200 and info.json()["node"] == "b", info.text
    connected = c.http.post("/devices/camera/connect", json={})
    assert connected.status_code == 200 and connected.json()["state"] == "connected", connected.text
    assert c.http.post("/devices/camera/disconnect").json()["state"] == "disconnected"
    methods = c.http.get("/devices/camera/methods").json()["methods"]
    assert {m["name"]: m["kind"] for m in methods}["set_value"] == "command"
    bad = c.call("camera", "set_value", "not a number")
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "ParameterValidationError"
    assert c.call("nowhere", "get_value").status_code == 404
    started = c.http.post("/tasks", json={"task_id": "sweep", "task_type": "Drive", "params": {
        "device_ids": ["laser", "camera"], "target": "camera"}})
    assert started.status_code == 201, started.text
    wait_until(lambda: b.value("camera") > 4.5 and b.value("camera") >= 2, 10, "the run to command the camera")
    for node, device_id in ((a, "laser"), (b, "camera"), (a, "camera")):
        refused = node.call(device_id, "set_value", 99)
        assert refused.status_code == 409, refused.text
        assert "task 'sweep' on node 'c'" in refused.json()["error"]["message"]
    busy = a.http.post("/leases", json={"device_ids": ["laser"], "owner": "alice"})
    assert busy.status_code == 409 and "on node 'c'" in busy.json()["error"]["message"]
    # the run is seen and cancelled from another node than the one that started it
    seen = a.http.get("/tasks/sweep")
    assert seen.status_code == 200 and seen.json()["node"] == "c", seen.text
    assert seen.json()["status"] == "running" and seen.json()["device_ids"] == ["laser", "camera"]
    assert a.http.get("/tasks/nothing").status_code == 404
    assert a.http.post("/tasks/sweep/pause").status_code == 200
    wait_until(lambda: _task(c, "sweep")["status"] == "paused", 10, "the run to pause")
    assert b.http.post("/tasks/sweep/resume").status_code == 200
    wait_until(lambda: _task(c, "sweep")["status"] == "running", 10, "the run to resume")
    assert b.http.post("/tasks/sweep/cancel").status_code == 200
    wait_until(lambda: _task(c, "sweep")["status"] == "cancelled", 10, "the run to end")
    assert a.http.get("/tasks/sweep").json()["status"] == "cancelled"
    lease = a.http.post("/leases", json={"device_ids": ["laser", "camera"], "owner": "alice"})
    assert lease.status_code in (200, 201), lease.text
    health = c.http.get("/health").json()
    assert health["status"] == "healthy" and health["lab"]["nodes"] == ["a", "b", "c"]
    with LabdProcess("lab", "nodes", "--url", c.url) as cli:
        assert cli.process.wait(30) == 0
        rows = [line.split("│")[1].strip() for line in cli.output().splitlines()
                if line.startswith("│")]
        assert rows == ["a", "b", "c"], cli.output()
    with LabdProcess("lab", "devices", "--url", a.url) as cli:
        assert cli.process.wait(30) == 0
        table = {tuple(cell.strip() for cell in line.split("│")[1:3])
                 for line in cli.output().splitlines() if line.startswith("│")}
        assert table == {("camera", "b"), ("laser", "a")}, cli.output()


@pytest.mark.timeout(90)
def test_a_killed_node_leaves_the_directory_and_its_claims_expire(lab: Lab, engine: RedisServer) -> None:
    a, b = lab.start(a=("laser",), b=("camera",))
    wait_until(lambda: "camera" in _devices(a), 10, "node a to see the camera")
    lease = b.http.post("/leases", json={"device_ids": ["laser"], "owner": "bob", "ttl": 600})
    assert lease.status_code in (200, 201), lease.text
    assert a.http.post("/leases", json={"device_ids": ["laser"], "owner": "alice"}).status_code == 409
    killed_at = time.monotonic()
    os.kill(b.proc.process.pid, signal.SIGKILL)
    b.proc.process.wait(10)
    wait_until(lambda: "camera" not in _devices(a), 10, "b's devices to leave the directory")
    left_after = time.monotonic() - killed_at
    assert left_after < 1.5 + 1.0, f"b's devices stayed {left_after:.1f} s (directory_ttl 1.5 s)"
    gone = a.call("camera", "get_value")
    assert gone.status_code in (404, 503), gone.text
    wait_until(lambda: a.http.post("/leases", json={"device_ids": ["laser"], "owner": "alice"}
                                   ).status_code in (200, 201), 10, "b's claim on laser to expire")
    assert time.monotonic() - killed_at < 1.5 + 0.3 + 1.5


@pytest.mark.timeout(90)
def test_a_frozen_node_is_fenced_when_it_wakes(lab: Lab, engine: RedisServer) -> None:
    b, c = lab.start(b=("camera",), c=())
    wait_until(lambda: "camera" in _devices(c), 10, "node c to see the camera")
    started = c.http.post("/tasks", json={"task_id": "sweep", "task_type": "Drive", "params": {
        "device_ids": ["camera"], "target": "camera", "every": 0.02}})
    assert started.status_code == 201, started.text
    wait_until(lambda: b.value("camera") >= 3, 10, "the run to command the camera")
    client = _engine_client(engine)
    try:
        os.kill(c.proc.process.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: not client.exists("labd:claim:camera"), 10,
                       "the frozen node's claim to expire")
            lease = b.http.post("/leases", json={"device_ids": ["camera"], "owner": "alice"})
            assert lease.status_code in (200, 201), lease.text
            assert b.http.post("/devices/camera/call", json={"method": "set_value", "args": [-1]},
                               headers={"X-Labd-Owner": "alice"}).status_code == 200
        finally:
            os.kill(c.proc.process.pid, signal.SIGCONT)
        wait_until(lambda: _task(c, "sweep")["status"] in ("cancelled", "failed"), 10,
                   "the woken run to cancel itself")
        # nothing the woken node sent moved the device alice now owns
        assert b.value("camera") == -1
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_an_engine_restarted_empty(lab: Lab, engine: RedisServer) -> None:
    _, c = lab.start(a=("laser",), c=())
    wait_until(lambda: "laser" in _devices(c), 10, "node c to see the laser")
    started = c.http.post("/tasks", json={"task_id": "sweep", "task_type": "Drive", "params": {
        "device_ids": ["laser"], "target": "laser"}})
    assert started.status_code == 201, started.text
    client = _engine_client(engine)
    try:
        wait_until(lambda: client.hget("labd:claim:laser", "token"), 10, "the claim")
        old_token = int(client.hget("labd:claim:laser", "token"))
    finally:
        client.close()
    engine.restart_empty()
    wait_until(lambda: _task(c, "sweep")["status"] in ("cancelled", "failed"), 10,
               "the run to cancel at its renew deadline")
    wait_until(lambda: "laser" in _devices(c), 10, "the directory to be rebuilt")
    lease = c.http.post("/leases", json={"device_ids": ["laser"], "owner": "alice"})
    assert lease.status_code in (200, 201), lease.text
    client = _engine_client(engine)
    try:
        assert int(client.hget("labd:claim:laser", "token")) > old_token
    finally:
        client.close()


@pytest.mark.timeout(90)
def test_a_node_whose_engine_is_unreachable_serves_its_devices_and_reconnects(tmp_path: Path) -> None:
    port = free_port()
    lab = Lab(tmp_path, f"redis://127.0.0.1:{port}/0")
    try:
        (a,) = lab.start(a=("laser",))
        health = a.http.get("/health").json()
        assert health["status"] == "degraded"
        assert health["lab"]["engine"] == f"redis://127.0.0.1:{port}/0"
        assert health["lab"]["connected"] is False
        assert a.call("laser", "set_value", 2).status_code == 200 and a.value("laser") == 2
        with RedisServer(port):
            wait_until(lambda: a.http.get("/health").json()["status"] == "healthy", 15,
                       "the node to reconnect")
            assert a.http.get("/lab/nodes").json()["nodes"][0]["node"] == "a"
    finally:
        lab.close()


def test_serve_refuses_an_unsafe_engine_and_a_clashing_device_id(lab: Lab) -> None:
    with LabdProcess("serve", "--port", "0", "--no-db", "--engine", "redis://10.1.2.3:6379/0") as proc:
        assert proc.process.wait(30) == 2
        assert "not on this PC and the URL carries no password" in proc.output()
    lab.start(a=("laser",))
    with LabdProcess("serve", str(lab.config("b", ("laser",))), "--port", "0", "--no-db",
                     "--engine", lab.engine, "--node", "b") as proc:
        assert proc.process.wait(30) == 1
        assert "'laser' is already served by live node 'a'" in proc.output()


@pytest.mark.timeout(90)
def test_lab_up_restarts_a_crashed_node_and_stops_all(tmp_path: Path, engine: RedisServer) -> None:
    lab = Lab(tmp_path, engine.url)
    lab.config("a", ("laser",))
    ports = {"a": free_port(), "b": free_port()}
    (tmp_path / "lab-servers.toml").write_text(textwrap.dedent(f"""
        engine = "{engine.url}"
        [servers.a]
        config = "a.toml"
        port = {ports['a']}
        args = ["--no-db"]
        [servers.b]
        port = {ports['b']}
        args = ["--no-db"]
    """))
    client = _engine_client(engine)
    with LabdProcess("lab", "up", str(tmp_path / "lab-servers.toml"), timeout=30) as up:
        try:
            wait_until(lambda: client.exists("labd:node:a") and client.exists("labd:node:b"), 20,
                       "both nodes to join")
            pid = _pid(client, "a")
            assert pid is not None
            up.wait_for("[a] labd serving")  # its first run's output, in its log file too
            os.kill(pid, signal.SIGKILL)
            up.wait_for("[a] exited with")
            wait_until(lambda: _pid(client, "a") not in (None, pid), 20, "node a to be restarted")
            # the restarted node's dashboard shows its launcher and the crashed run's output
            page = wait_until(lambda: _server_page(ports["a"]), 20, "node a to serve its pages")
            launcher = page.split('<h2 id="h-launcher">Launcher</h2>', 1)[1].split("</section>")[0]
            assert "<dt>Restarts</dt><dd>1</dd>" in launcher
            assert "exit code -9 (SIGKILL), then restarted" in launcher
            assert str(tmp_path / "labd-logs" / "a.log") in launcher
            first = launcher.index(f"[labd lab up] started (pid {pid}): ")
            serving = launcher.index("labd serving", first)
            exited = launcher.index(
                "[labd lab up] exited with -9 (SIGKILL); restarting in 1 s (restart 1)", serving)
            assert launcher.index(f"[labd lab up] started (pid {_pid(client, 'a')}, restart 1): ",
                                  exited)
            assert up.stop(signal.SIGINT) == 0
            assert "labd lab up: stopped" in up.output()
        finally:
            client.close()
    for node in ("a", "b"):
        log = (tmp_path / "labd-logs" / f"{node}.log").read_text(encoding="utf-8")
        assert log.endswith("[labd lab up] stopped: exit code 0\n"), log[-2000:]


def _server_page(port: int) -> str | None:
    """The dashboard's server page of the node on ``port``, once it answers."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/ui/server", timeout=10.0)
    except httpx.HTTPError:
        return None
    return answer.text if answer.status_code == 200 else None


def _pid(client: Any, node: str) -> int | None:
    import json

    raw = client.get(f"labd:node:{node}")
    return None if raw is None else int(json.loads(raw)["pid"])


@pytest.mark.timeout(90)
def test_a_device_stream_over_sse_on_another_node(lab: Lab) -> None:
    import json

    config = lab.config("a", ())
    config.write_text(config.read_text().replace(
        "[lab]", '[devices.daq]\ntype = "labd.testing:FakeStreamer"\n\n[lab]'))
    port = free_port()
    proc = LabdProcess("serve", str(config), "--port", str(port), "--no-db", "--engine",
                       lab.engine, "--node", "a", timeout=30)
    lab.nodes["a"] = a = Node("a", proc, port)
    a.proc.wait_for("labd serving")
    (b,) = lab.start(b=())
    wait_until(lambda: "daq" in _devices(b), 10, "node b to see the daq")
    payloads: list[Any] = []
    with b.http.stream("GET", "/stream/devices/daq") as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        wait_until(lambda: a.http.get("/health").json()["lab"]["streams"]["relays"], 10,
                   "node a to relay the stream")
        for i in range(5):
            assert a.call("daq", "push", {"i": i, "trace": [i] * 4}).status_code == 200
        for line in lines:
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("event") == "device_data":
                    payloads.append(event["payload"])
            if len(payloads) == 5:
                break
        assert payloads == [{"i": i, "trace": [i] * 4} for i in range(5)]
        # stopped on its own node: the stream ends for the client on node b too
        assert a.http.post("/devices/daq/stream/stop").status_code == 200
        for _ in lines:
            pass  # returns once node b ends the response


@pytest.mark.timeout(90)
def test_a_run_is_followed_over_sse_from_another_node(lab: Lab) -> None:
    import json

    a, c = lab.start(a=("laser",), c=())
    wait_until(lambda: "laser" in _devices(c), 10, "node c to see the laser")
    started = c.http.post("/tasks", json={"task_id": "sweep", "task_type": "Drive", "params": {
        "device_ids": ["laser"], "target": "laser", "every": 0.05}})
    assert started.status_code == 201, started.text
    wait_until(lambda: a.http.get("/tasks/sweep").status_code == 200, 10, "node a to find the run")
    events: list[dict[str, Any]] = []
    with a.http.stream("GET", "/stream/tasks/sweep") as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            progress = [e for e in events if e.get("event") == "progress"]
            if len(progress) == 3:
                assert a.http.post("/tasks/sweep/cancel").status_code == 200
            if events[-1].get("event") == "finished":
                break
    assert events[0]["event"] == "state" and events[0]["status"] == "running"
    values = [e["done"] for e in events if e.get("event") == "progress"]
    assert len(values) >= 3 and values == sorted(values)
    assert events[-1]["status"] == "cancelled"


def test_a_viewer_on_another_node_may_query_but_not_command(lab: Lab) -> None:
    viewer, operator = "v" * 32, "o" * 32
    tokens = lab.tmp_path / "tokens.toml"
    tokens.write_text(f'''[tokens]
"{viewer}" = {{ user = "vera", role = "viewer" }}
"{operator}" = {{ user = "otto", role = "operator" }}
''')
    _, b = lab.start("--tokens", str(tokens), a=("laser",), b=())
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    as_operator = {"Authorization": f"Bearer {operator}"}
    wait_until(lambda: b.http.get("/devices", headers=as_viewer).json()["devices"], 10,
               "node b to see the laser")
    query = b.http.post("/devices/laser/call", json={"method": "get_value"}, headers=as_viewer)
    assert query.status_code == 200, query.text
    command = b.http.post("/devices/laser/call", json={"method": "set_value", "args": [1]},
                          headers=as_viewer)
    assert command.status_code == 403, command.text
    assert "set_value() is a command" in command.json()["error"]["message"]
    allowed = b.http.post("/devices/laser/call", json={"method": "set_value", "args": [1]},
                          headers=as_operator)
    assert allowed.status_code == 200, allowed.text
