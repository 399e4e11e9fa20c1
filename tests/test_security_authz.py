"""Issue 8's authorisation edges in the routes, over real HTTP on 127.0.0.1.

Viewers call queries but not commands (item 3); runs belong to who started them (4); the
stream is controlled only through the stream routes, and stopping it obeys ownership (5);
HTTP leases always expire and only their holder renews or releases them (7); stored
tracebacks are for admins (8); ``?timeout=`` is bounded and unknown ids are 404 at once (12).
Each test runs with tokens unless it says "without tokens" (then nothing may change).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import labd
from labd.server.auth import Token
from labd.testing import FakeDevice, FakeStreamer, RunningServer, gated_task, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0
VIEWER = "viewer-Zq7v-token"
ALICE = "alice-Kp2o-operator-token"
BOB = "bob-Wm9o-operator-token"
ADMIN = "carol-Xr4a-admin-token"
TOKENS: dict[str, Token | tuple[str, str]] = {
    VIEWER: Token("vic", "viewer"),
    ALICE: Token("alice", "operator"),
    BOB: Token("bob", "operator"),
    ADMIN: Token("carol", "admin"),
}


class Boom:
    """A task whose run raises, so the run keeps an error record with a traceback."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def run(self, context: Any) -> None:
        raise RuntimeError("the sweep blew up")


def make_param_task(release: threading.Event) -> type:
    class ParamTask:
        def __init__(self, task_id: str, gain: float = 1.0) -> None:
            self.task_id = task_id
            self.gain = gain

        def set_parameter(self, key: str, value: Any) -> None:
            self.gain = value

        def get_parameter(self, key: str) -> Any:
            return self.gain

        def run(self, context: Any) -> None:
            release.wait(WATCHDOG_S)

    return ParamTask


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def owner(name: str) -> dict[str, str]:
    return {"X-Labd-Owner": name}


def error_of(answer: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """The error record of ``answer``, checked to be ``status`` and ``kind`` in labd's shape."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    body = answer.json()
    assert set(body) == {"error"}, body
    record: dict[str, Any] = body["error"]
    assert set(record) == {"type", "message", "origin", "timestamp", "traceback", "context"}
    assert record["type"] == kind and record["traceback"] is None, record
    return record


def _daemon(release: threading.Event, store: Path | None = None) -> labd.LabDaemon:
    daemon = labd.LabDaemon(store=store) if store is not None else labd.LabDaemon()
    daemon.register_plugins(
        devices={"Fake": FakeDevice, "Streamer": FakeStreamer},
        tasks={"Hold": gated_task(release), "Params": make_param_task(release), "Boom": Boom},
    )
    for device_id, device_type in [("dev1", "Fake"), ("s1", "Streamer")]:
        daemon.connect_device(daemon.add_device(device_id, device_type))
    return daemon


def _serve(tmp_path: Path | None, tokens: bool) -> Iterator[RunningServer]:
    release = threading.Event()
    daemon = _daemon(release, tmp_path / "runs.db" if tmp_path is not None else None)
    try:
        with running_server(daemon, tokens=TOKENS if tokens else None) as running:
            try:
                yield running
            finally:
                release.set()
    finally:
        daemon.shutdown()


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    """dev1 (a fake), s1 (a streamer), tasks Hold, Params and Boom; four tokens."""
    yield from _serve(None, tokens=True)


@pytest.fixture
def open_srv() -> Iterator[RunningServer]:
    """The same without tokens (one PC)."""
    yield from _serve(None, tokens=False)


@pytest.fixture
def client(srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
        yield http


@pytest.fixture
def open_client(open_srv: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=open_srv.url, timeout=WATCHDOG_S) as http:
        yield http


# ---------------------------------------------------------------- item 3: viewers and /call
def test_a_viewer_may_call_a_query(client: httpx.Client, srv: RunningServer) -> None:
    srv.daemon.get_device("dev1").value = 7.0
    answer = client.post("/devices/dev1/call", json={"method": "get_value"}, headers=bearer(VIEWER))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"result": 7.0, "success": True}


def test_a_viewers_command_is_403_naming_the_method_and_operator(
    client: httpx.Client, srv: RunningServer,
) -> None:
    answer = client.post("/devices/dev1/call", json={"method": "set_value", "args": [3.0]},
                         headers=bearer(VIEWER))
    record = error_of(answer, 403, "Forbidden")
    assert "set_value" in record["message"] and "'operator'" in record["message"]
    assert record["context"]["required_role"] == "operator"
    assert record["context"]["role"] == "viewer" and record["context"]["user"] == "vic"
    assert srv.daemon.get_device("dev1").value == 0.0  # nothing ran
    operator = client.post("/devices/dev1/call", json={"method": "set_value", "args": [3.0]},
                           headers=bearer(ALICE))
    assert operator.status_code == 200 and srv.daemon.get_device("dev1").value == 3.0


# ---------------------------------------------------------------- item 4: runs have owners
def _start(client: httpx.Client, token: str, task_type: str = "Hold") -> str:
    answer = client.post("/tasks", json={"task_type": task_type}, headers=bearer(token))
    assert answer.status_code == 201, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


RUN_ACTIONS = [
    ("cancel", None), ("pause", None), ("resume", None),
    ("parameters", {"key": "gain", "value": 2.0}),
]


@pytest.mark.parametrize(("action", "body"), RUN_ACTIONS, ids=[a for a, _ in RUN_ACTIONS])
def test_only_the_runs_owner_or_an_admin_acts_on_it(
    client: httpx.Client, srv: RunningServer, action: str, body: dict[str, Any] | None,
) -> None:
    task_id = _start(client, ALICE, "Params")
    assert srv.daemon.get_task(task_id).info()["owner"] == "alice"
    refused = client.post(f"/tasks/{task_id}/{action}", json=body, headers=bearer(BOB))
    record = error_of(refused, 403, "Forbidden")
    assert "'alice'" in record["message"] and "admin" in record["message"]
    assert record["context"]["owner"] == "alice" and record["context"]["user"] == "bob"
    handle = srv.daemon.get_task(task_id)
    assert handle.is_running() and not handle.is_paused()  # bob changed nothing
    assert handle.get_parameter("gain") == 1.0
    for token in (ALICE, ADMIN):
        allowed = client.post(f"/tasks/{task_id}/{action}", json=body, headers=bearer(token))
        assert allowed.status_code == 200, (token, allowed.text)


def test_a_run_nobody_owns_is_anyones(client: httpx.Client, srv: RunningServer) -> None:
    handle = srv.daemon.execute_task(None, "Hold")  # started in-process: no principal
    assert client.post(f"/tasks/{handle.task_id}/cancel", headers=bearer(BOB)).status_code == 200
    with pytest.raises(labd.TaskCancelledError):
        handle.wait(WATCHDOG_S)


def test_without_tokens_anyone_acts_on_any_run(open_client: httpx.Client) -> None:
    started = open_client.post("/tasks", json={"task_type": "Params"}, headers=owner("alice"))
    task_id = started.json()["task_id"]
    for action, body in RUN_ACTIONS:
        answer = open_client.post(f"/tasks/{task_id}/{action}", json=body, headers=owner("bob"))
        assert answer.status_code == 200, (action, answer.text)


# ---------------------------------------------------------------- item 5: stream control
@pytest.mark.parametrize("method", ["start_streaming", "stop_streaming"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "no-tokens"])
def test_stream_control_is_never_callable_through_call(
    method: str, tokens: bool, request: pytest.FixtureRequest,
) -> None:
    running: RunningServer = request.getfixturevalue("srv" if tokens else "open_srv")
    keeper = running.daemon.start_streaming("s1", lambda item: None) \
        if method == "stop_streaming" else None
    try:
        answer = httpx.post(f"{running.url}/devices/s1/call", json={"method": method, "args": []},
                            headers=bearer(ADMIN) if tokens else {}, timeout=WATCHDOG_S)
        record = error_of(answer, 400, "InvalidArgumentError")
        assert "GET /stream/devices/s1" in record["message"]
        assert "POST /devices/s1/stream/stop" in record["message"]
        streamer = running.daemon.get_device("s1")
        assert streamer.is_streaming() is (keeper is not None)  # nothing started or stopped
    finally:
        if keeper is not None:
            running.daemon.stop_streaming("s1")


def test_is_streaming_stays_callable(client: httpx.Client) -> None:
    answer = client.post("/devices/s1/call", json={"method": "is_streaming"}, headers=bearer(ALICE))
    assert answer.status_code == 200 and answer.json()["result"] is False


def _stop_as_non_owner_is_409(
    running: RunningServer, refused_headers: dict[str, str], holder_headers: dict[str, str],
) -> None:
    running.daemon.start_streaming("s1", lambda item: None)
    streamer = running.daemon.get_device("s1")
    try:
        with httpx.Client(base_url=running.url, timeout=WATCHDOG_S) as http:
            refused = http.post("/devices/s1/stream/stop", headers=refused_headers)
            record = error_of(refused, 409, "DeviceBusyError")
            assert "alice" in record["message"] and "stop_streaming" in record["message"]
            assert streamer.is_streaming()  # still running for its subscribers
            stopped = http.post("/devices/s1/stream/stop", headers=holder_headers)
            assert stopped.status_code == 200, stopped.text
            assert not streamer.is_streaming()
    finally:
        running.daemon.stop_streaming("s1")


def test_stream_stop_checks_ownership_like_a_command(srv: RunningServer) -> None:
    lease = httpx.post(f"{srv.url}/leases", json={"device_ids": ["s1"]}, headers=bearer(ALICE))
    assert lease.status_code == 201
    _stop_as_non_owner_is_409(srv, bearer(BOB), bearer(ALICE))


def test_without_tokens_stream_stop_checks_the_lease_holder(open_srv: RunningServer) -> None:
    open_srv.daemon.claim(["s1"], owner="alice", ttl=60)
    _stop_as_non_owner_is_409(open_srv, owner("bob"), owner("alice"))


# ---------------------------------------------------------------- item 7: leases expire
def test_an_http_lease_without_ttl_gets_the_default(client: httpx.Client, srv: RunningServer) -> None:
    lease = client.post("/leases", json={"device_ids": ["dev1"]}, headers=bearer(ALICE)).json()
    assert lease["ttl"] == 30 and lease["expires_at"] is not None
    assert srv.daemon.get_lease(lease["lease_id"]).ttl == 30


def test_a_lease_ttl_above_the_maximum_is_400_naming_it(
    client: httpx.Client, srv: RunningServer,
) -> None:
    too_long = client.post("/leases", json={"device_ids": ["dev1"], "ttl": 3601},
                           headers=bearer(ALICE))
    record = error_of(too_long, 400, "InvalidArgumentError")
    assert "3600" in record["message"] and "lease_max_ttl" in record["message"]
    assert record["context"]["errors"][0]["field"] == "body.ttl"
    assert srv.daemon.leases() == []
    lease_id = client.post("/leases", json={"device_ids": ["dev1"], "ttl": 60},
                           headers=bearer(ALICE)).json()["lease_id"]
    renewal = client.post(f"/leases/{lease_id}/renew", json={"ttl": 1e9}, headers=bearer(ALICE))
    assert "3600" in error_of(renewal, 400, "InvalidArgumentError")["message"]
    assert srv.daemon.get_lease(lease_id).ttl == 60  # unchanged
    at_max = client.post(f"/leases/{lease_id}/renew", json={"ttl": 3600}, headers=bearer(ALICE))
    assert at_max.status_code == 200 and at_max.json()["ttl"] == 3600


def test_renewing_without_ttl_gives_a_lease_without_one_the_default(
    client: httpx.Client, srv: RunningServer,
) -> None:
    lease = srv.daemon.claim(["dev1"], owner="alice")  # in-process: no ttl
    renewed = client.post(f"/leases/{lease.lease_id}/renew", headers=bearer(ALICE)).json()
    assert renewed["ttl"] == 30 and renewed["expires_at"] is not None


@pytest.mark.parametrize("action", ["renew", "release"])
def test_without_tokens_another_x_labd_owner_cannot_renew_or_release(
    open_client: httpx.Client, open_srv: RunningServer, action: str,
) -> None:
    lease_id = open_client.post("/leases", json={"device_ids": ["dev1"]},
                                headers=owner("alice")).json()["lease_id"]

    def send(headers: dict[str, str]) -> httpx.Response:
        if action == "renew":
            return open_client.post(f"/leases/{lease_id}/renew", json={"ttl": 60}, headers=headers)
        return open_client.delete(f"/leases/{lease_id}", headers=headers)

    record = error_of(send(owner("bob")), 403, "Forbidden")
    assert "'alice'" in record["message"] and "X-Labd-Owner" in record["message"]
    assert record["context"]["holder"] == "alice" and record["context"]["principal"] == "bob"
    lease = open_srv.daemon.get_lease(lease_id)
    assert lease.active and lease.ttl == 30  # untouched
    assert send(owner("alice")).status_code == 200


def test_with_tokens_another_operator_cannot_renew_or_release(client: httpx.Client) -> None:
    lease_id = client.post("/leases", json={"device_ids": ["dev1"]},
                           headers=bearer(ALICE)).json()["lease_id"]
    for answer in (client.post(f"/leases/{lease_id}/renew", headers=bearer(BOB)),
                   client.delete(f"/leases/{lease_id}", headers=bearer(BOB))):
        record = error_of(answer, 403, "Forbidden")
        assert "'alice'" in record["message"] and "'admin'" in record["message"]


# ---------------------------------------------------------------- item 8: tracebacks
def _fail_everything(running: RunningServer, headers: dict[str, str]) -> str:
    with httpx.Client(base_url=running.url, timeout=WATCHDOG_S) as http:
        failed = http.post("/devices/dev1/call", json={"method": "fail"}, headers=headers)
        assert failed.status_code == 502
        task_id: str = http.post("/tasks", json={"task_type": "Boom"},
                                 headers=headers).json()["task_id"]
    with pytest.raises(labd.TaskFailedError):
        running.daemon.get_task(task_id).wait(WATCHDOG_S)
    return task_id


def _stored_errors(running: RunningServer, task_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """Every stored error record an HTTP client can read, by route."""
    with httpx.Client(base_url=running.url, timeout=WATCHDOG_S, headers=headers) as http:
        runs = http.get("/runs").json()["runs"]
        return {
            "device error": http.get("/devices/dev1/error").json()["error"],
            "task error": http.get(f"/tasks/{task_id}/error").json()["error"],
            "run": http.get(f"/runs/{task_id}").json()["error"],
            "runs list": next(run["error"] for run in runs if run["task_id"] == task_id),
            "device history": http.get("/devices/dev1/errors/history").json()["errors"][0],
        }


@pytest.fixture
def stored_srv(tmp_path: Path) -> Iterator[RunningServer]:
    """Like ``srv``, with a run store (so run records keep their error's traceback)."""
    yield from _serve(tmp_path, tokens=True)


def test_tracebacks_over_http_are_for_admins_only(stored_srv: RunningServer) -> None:
    task_id = _fail_everything(stored_srv, bearer(ALICE))
    for token in (VIEWER, ALICE):
        for route, record in _stored_errors(stored_srv, task_id, bearer(token)).items():
            assert record["type"] and record["message"], (token, route)
            assert record["traceback"] is None, (token, route)
    for route, record in _stored_errors(stored_srv, task_id, bearer(ADMIN)).items():
        assert "Traceback" in record["traceback"] and "RuntimeError" in record["traceback"], route


@pytest.fixture
def open_stored_srv(tmp_path: Path) -> Iterator[RunningServer]:
    """A run store and no tokens."""
    yield from _serve(tmp_path, tokens=False)


def test_without_tokens_tracebacks_stay_visible(open_stored_srv: RunningServer) -> None:
    task_id = _fail_everything(open_stored_srv, {})
    for route, record in _stored_errors(open_stored_srv, task_id, {}).items():
        assert "Traceback" in record["traceback"], route


# ---------------------------------------------------------------- item 12: timeouts, ids
TIMEOUT_ROUTES = [
    ("GET", "/devices", None),
    ("GET", "/devices/dev1", None),
    ("POST", "/devices/dev1/call", {"method": "get_value"}),
    ("POST", "/devices/dev1/connect", None),
    ("POST", "/devices/dev1/disconnect", None),
    ("POST", "/devices/s1/stream/stop", None),
    ("GET", "/tasks", None),
    ("POST", "/tasks", {"task_type": "Hold"}),
]


@pytest.mark.parametrize("timeout", ["5e-324", "0.0009", "0", "3600.5", "1e9", "nan", "inf"])
@pytest.mark.parametrize(("method", "path", "body"), TIMEOUT_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in TIMEOUT_ROUTES])
def test_a_timeout_outside_the_range_is_400_naming_it(
    client: httpx.Client, srv: RunningServer, method: str, path: str, body: Any, timeout: str,
) -> None:
    answer = client.request(method, path, params={"timeout": timeout}, json=body,
                            headers=bearer(ADMIN))
    record = error_of(answer, 400, "InvalidArgumentError")
    assert "0.001" in record["message"] and "3600" in record["message"], record["message"]
    assert record["context"]["errors"][0]["field"] == "query.timeout"
    assert srv.daemon.task_handles() == []  # nothing started


@pytest.mark.parametrize(("method", "path", "body"), TIMEOUT_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in TIMEOUT_ROUTES])
def test_a_timeout_inside_the_range_is_accepted(
    client: httpx.Client, method: str, path: str, body: Any,
) -> None:
    answer = client.request(method, path, params={"timeout": "3600"}, json=body,
                            headers=bearer(ADMIN))
    assert answer.status_code < 300, answer.text


def test_task_routes_bound_the_timeout_too(client: httpx.Client) -> None:
    task_id = _start(client, ALICE, "Params")
    for method, path, body in [
        ("GET", f"/tasks/{task_id}", None),
        ("POST", f"/tasks/{task_id}/parameters", {"key": "gain", "value": 2.0}),
        ("GET", f"/tasks/{task_id}/parameters/gain", None),
    ]:
        answer = client.request(method, path, params={"timeout": "5e-324"}, json=body,
                                headers=bearer(ALICE))
        assert "0.001" in error_of(answer, 400, "InvalidArgumentError")["message"], path


UNKNOWN_IDS = [
    ("GET", "/devices/ghost", None, "UnknownDeviceError"),
    ("POST", "/devices/ghost/call", {"method": "get_value"}, "UnknownDeviceError"),
    ("POST", "/devices/ghost/connect", None, "UnknownDeviceError"),
    ("POST", "/devices/ghost/disconnect", None, "UnknownDeviceError"),
    ("POST", "/devices/ghost/stream/stop", None, "UnknownDeviceError"),
    ("GET", "/tasks/ghost", None, "UnknownTaskError"),
    ("POST", "/tasks/ghost/parameters", {"key": "gain", "value": 1}, "UnknownTaskError"),
    ("GET", "/tasks/ghost/parameters/gain", None, "UnknownTaskError"),
]


@pytest.mark.parametrize(("method", "path", "body", "kind"), UNKNOWN_IDS,
                         ids=[f"{m} {p}" for m, p, _, _ in UNKNOWN_IDS])
def test_an_unknown_id_is_404_before_any_work_is_offloaded(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch, method: str, path: str, body: Any,
    kind: str,
) -> None:
    # Offloaded, the lookup raced the request timeout (a 504 with a tiny one): the route must
    # answer from the loop. Count what reaches the context's two offload entry points.
    ctx = srv.server.app.state.labd
    offloaded: list[str] = []
    for name in ("run", "run_for_device"):
        def counting(*args: Any, _inner: Any = getattr(ctx, name), **kwargs: Any) -> Any:
            offloaded.append(kwargs.get("what", "?"))
            return _inner(*args, **kwargs)

        monkeypatch.setattr(ctx, name, counting)
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
        answer = http.request(method, path, params={"timeout": "0.001"}, json=body,
                              headers=bearer(ADMIN))
    assert "ghost" in error_of(answer, 404, kind)["message"]
    assert offloaded == []
