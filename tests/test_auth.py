"""Bearer tokens with roles (labd.server.auth) over real HTTP, the Python client, and ``labd serve``.

Each test gets its own server on 127.0.0.1 and a free port with four tokens: a viewer, two
operators (alice, bob) and an admin (carol). The matrix sends every endpoint without a token,
with each role too low, and with each role high enough, and checks 401, 403 and 2xx.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import labd
from labd.client import ServerAPI, ServerAuthError, SSEClient
from labd.server import LabDaemonServer
from labd.server.auth import ROLES, Token, TokenTable, load_tokens, required_role
from labd.testing import (
    FakeDevice,
    FakeStreamer,
    LabdProcess,
    RunningServer,
    gated_task,
    running_server,
)

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0
VIEWER_TOKEN = "viewer-Zq7v-token"
ALICE_TOKEN = "alice-Kp2o-operator-token"
BOB_TOKEN = "bob-Wm9o-operator-token"
ADMIN_TOKEN = "carol-Xr4a-admin-token"
ALL_TOKENS = (VIEWER_TOKEN, ALICE_TOKEN, BOB_TOKEN, ADMIN_TOKEN)
TOKENS: dict[str, Token | tuple[str, str]] = {
    VIEWER_TOKEN: Token("vic", "viewer"),
    ALICE_TOKEN: Token("alice", "operator"),
    BOB_TOKEN: ("bob", "operator"),
    ADMIN_TOKEN: ("carol", "admin"),
}
ROLE_TOKEN = {"viewer": VIEWER_TOKEN, "operator": ALICE_TOKEN, "admin": ADMIN_TOKEN}
ROLE_USER = {"viewer": "vic", "operator": "alice", "admin": "carol"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(answer: httpx.Response) -> dict[str, Any]:
    record = answer.json()["error"]
    assert set(record) == {"type", "message", "origin", "timestamp", "traceback", "context"}
    return dict(record)


def assert_no_token_in(text: str) -> None:
    for token in ALL_TOKENS:
        assert token not in text


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
            while not release.wait(0.02):
                if context.cancel_event.is_set():
                    return

    return ParamTask


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    """A server with dev1, dev2 (fakes), s1 (a streamer), a finished run done1, and tokens."""
    release, done = threading.Event(), threading.Event()
    done.set()
    daemon = labd.LabDaemon()
    try:
        daemon.register_plugins(
            devices={"Fake": FakeDevice, "Streamer": FakeStreamer},
            tasks={"Hold": gated_task(release), "Quick": gated_task(done),
                   "Params": make_param_task(release)},
        )
        for device_id, device_type in [("dev1", "Fake"), ("dev2", "Fake"), ("s1", "Streamer")]:
            daemon.connect_device(daemon.add_device(device_id, device_type))
        daemon.execute_task("done1", "Quick").wait(WATCHDOG_S)
        with running_server(daemon, tokens=TOKENS) as running:
            try:
                yield running
            finally:
                release.set()
    finally:
        daemon.shutdown()


# ---------------------------------------------------------------- the matrix
Prepare = Callable[[labd.LabDaemon, str], dict[str, str]]


def _end_leases(daemon: labd.LabDaemon) -> None:
    for lease in daemon.leases():
        lease.release()


def _own_lease(daemon: labd.LabDaemon, user: str) -> dict[str, str]:
    _end_leases(daemon)
    return {"lease": daemon.claim(["dev2"], owner=user).lease_id}


def _others_lease(daemon: labd.LabDaemon, user: str) -> dict[str, str]:
    return _own_lease(daemon, "dave")


def _task(task_type: str) -> Prepare:
    def start(daemon: labd.LabDaemon, user: str) -> dict[str, str]:
        return {"task": daemon.execute_task(None, task_type).task_id}

    return start


def _no_leases(daemon: labd.LabDaemon, user: str) -> dict[str, str]:
    _end_leases(daemon)
    return {}


@dataclass(frozen=True)
class Case:
    method: str
    path: str  # may name {task}, {lease}, {n}: filled by `prepare` and a counter
    role: str  # the least role allowed
    body: dict[str, Any] | None = None
    prepare: Prepare | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


CASES = [
    Case("GET", "/", "viewer"),
    Case("GET", "/devices", "viewer"),
    Case("GET", "/devices/dev1", "viewer"),
    Case("GET", "/devices/dev1/methods", "viewer"),
    Case("GET", "/devices/dev1/error", "viewer"),
    Case("GET", "/devices/dev1/errors/history", "viewer"),
    Case("GET", "/tasks", "viewer"),
    Case("GET", "/tasks/done1", "viewer"),
    Case("GET", "/tasks/done1/error", "viewer"),
    Case("GET", "/tasks/{task}/parameters/gain", "viewer", prepare=_task("Params")),
    Case("GET", "/leases", "viewer"),
    Case("GET", "/runs", "viewer"),
    Case("GET", "/runs/done1", "viewer"),
    Case("GET", "/runs/done1/events", "viewer"),
    Case("GET", "/metrics", "viewer"),
    Case("GET", "/stream/events", "viewer"),
    Case("GET", "/stream/tasks/done1", "viewer"),
    Case("GET", "/stream/devices/s1", "operator"),  # starts the stream; viewers only join one
    Case("POST", "/devices/dev1/connect", "operator"),
    Case("POST", "/devices/dev1/disconnect", "operator"),
    Case("POST", "/devices/dev1/call", "viewer", {"method": "get_value"}),  # a query
    Case("POST", "/devices/dev1/call", "operator", {"method": "set_value", "args": [1.0]}),
    Case("DELETE", "/devices/dev1/error", "operator"),
    Case("POST", "/devices/s1/stream/stop", "operator"),
    Case("POST", "/tasks", "operator", {"task_type": "Hold"}),
    Case("POST", "/tasks/{task}/cancel", "operator", prepare=_task("Hold")),
    Case("POST", "/tasks/{task}/pause", "operator", prepare=_task("Hold")),
    Case("POST", "/tasks/{task}/resume", "operator", prepare=_task("Hold")),
    Case("POST", "/tasks/{task}/parameters", "operator", {"key": "gain", "value": 2.0},
         prepare=_task("Params")),
    Case("DELETE", "/tasks/done1/error", "operator"),
    Case("POST", "/leases", "operator", {"device_ids": ["dev1"]}, prepare=_no_leases),
    Case("POST", "/leases/{lease}/renew", "operator", {"ttl": 60}, prepare=_own_lease),
    Case("DELETE", "/leases/{lease}", "operator", prepare=_own_lease),
    Case("POST", "/devices", "admin", {"device_id": "new{n}", "device_type": "Fake"}),
    Case("DELETE", "/leases/{lease}?reason=maintenance", "admin", prepare=_own_lease),
    Case("DELETE", "/leases/{lease}", "admin", prepare=_others_lease),
    Case("POST", "/leases/{lease}/renew", "admin", prepare=_others_lease),
]


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [_fill(item, names) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, names) for key, item in value.items()}
    return value


def _send(
    client: httpx.Client, case: Case, names: dict[str, str], role: str | None,
) -> int:
    headers = bearer(ROLE_TOKEN[role]) if role else {}
    path = _fill(case.path, names)
    if path.startswith("/stream/"):
        with client.stream("GET", path, headers=headers) as answer:
            if answer.status_code < 400:
                assert answer.headers["content-type"].startswith("text/event-stream")
                return answer.status_code
            answer.read()
    else:
        answer = client.request(case.method, path, json=_fill(case.body, names), headers=headers)
    if answer.status_code in (401, 403):
        record = error_of(answer)
        assert record["type"] == ("Unauthorized" if answer.status_code == 401 else "Forbidden")
        if answer.status_code == 401:
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        else:
            # Names the role needed: the case's, or the next gate (someone else's lease needs
            # admin, but a viewer is stopped first by needing operator).
            assert role is not None and record["context"]["role"] == role
            needed = record["context"]["required_role"]
            assert ROLES.index(role) < ROLES.index(needed) <= ROLES.index(case.role)
            assert f"needs the {needed!r} role" in record["message"]
        assert_no_token_in(answer.text)
    else:
        assert answer.status_code < 300, (answer.status_code, answer.text)
    return answer.status_code


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_endpoint_needs_a_token_and_its_role(srv: RunningServer, case: Case) -> None:
    counter = iter(range(100))
    expected: dict[str | None, int] = {None: 401}
    expected.update({
        role: 403 if ROLES.index(role) < ROLES.index(case.role) else 200 for role in ROLES})
    seen = {}
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as client:
        for role in [None, *ROLES]:
            user = ROLE_USER[role] if role else "nobody"
            names = {"n": str(next(counter)), **(case.prepare(srv.daemon, user) if case.prepare else {})}
            status = _send(client, case, names, role)
            seen[role] = 200 if 200 <= status < 300 else status
    assert seen == expected


def test_required_role_by_method_and_path() -> None:
    assert required_role("GET", "/health") is None
    assert required_role("GET", "/health/") is None
    assert required_role("OPTIONS", "/health") == "viewer"
    assert required_role("HEAD", "/devices") == "viewer"
    assert required_role("POST", "/devices") == "admin"
    assert required_role("POST", "/devices/") == "admin"
    # Queries are a viewer's: the call route itself refuses a viewer's commands (403).
    assert required_role("POST", "/devices/dev1/call") == "viewer"
    assert required_role("POST", "/devices/dev1/call/") == "viewer"
    assert required_role("POST", "/devices/dev1/connect") == "operator"
    assert required_role("DELETE", "/leases/lease-1") == "operator"  # the route decides more
    assert required_role("DELETE", "/leases/lease-1", b"reason=x") == "admin"
    assert required_role("DELETE", "/leases/lease-1", b"a=1&reason") == "admin"
    assert required_role("DELETE", "/devices/dev1/error", b"reason=x") == "operator"


# ---------------------------------------------------------------- 401 details
def test_health_and_api_docs_are_open_and_everything_else_is_401(srv: RunningServer) -> None:
    assert httpx.get(f"{srv.url}/health").json()["status"] == "healthy"
    assert httpx.get(f"{srv.url}/openapi.json").json()["paths"]  # Swagger UI fetches it tokenless
    assert httpx.get(f"{srv.url}/docs").status_code == 200
    for path in ["/devices", "/no/such/route", "/metrics"]:
        answer = httpx.get(f"{srv.url}{path}")
        assert answer.status_code == 401, path  # an unknown route is not revealed either
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="labd"'
        assert "Authorization: Bearer <token>" in error_of(answer)["message"]
    assert httpx.get(f"{srv.url}/no/such/route", headers=bearer(VIEWER_TOKEN)).status_code == 404


def test_a_wrong_or_malformed_token_is_401_without_echoing_it(srv: RunningServer) -> None:
    for headers in [bearer("not-a-known-token"), {"Authorization": ALICE_TOKEN},
                    {"Authorization": f"Basic {ALICE_TOKEN}"}, bearer(ALICE_TOKEN[:-1]),
                    {"Authorization": "Bearer"}]:
        answer = httpx.get(f"{srv.url}/devices", headers=headers)
        assert answer.status_code == 401
        assert error_of(answer)["type"] == "Unauthorized"
        assert_no_token_in(answer.text)
        assert "not-a-known-token" not in answer.text
    unknown = httpx.get(f"{srv.url}/devices", headers=bearer("not-a-known-token"))
    assert unknown.headers["WWW-Authenticate"] == 'Bearer realm="labd", error="invalid_token"'


def test_refused_requests_are_counted_in_metrics(srv: RunningServer) -> None:
    httpx.get(f"{srv.url}/devices")
    httpx.post(f"{srv.url}/devices/dev1/connect", headers=bearer(VIEWER_TOKEN))
    text = httpx.get(f"{srv.url}/metrics", headers=bearer(VIEWER_TOKEN)).text
    assert 'labd_http_errors_total{status="401",type="Unauthorized"} 1.0' in text
    assert 'labd_http_errors_total{status="403",type="Forbidden"} 1.0' in text


def test_a_refused_command_never_runs(srv: RunningServer) -> None:
    answer = httpx.post(f"{srv.url}/devices/dev1/call", json={"method": "set_value", "args": [7]},
                        headers=bearer(VIEWER_TOKEN))
    assert answer.status_code == 403
    assert error_of(answer)["context"].items() >= {
        "required_role": "operator", "role": "viewer", "user": "vic"}.items()
    assert srv.daemon.get_device("dev1").value == 0.0


def test_cors_preflight_needs_no_token_and_401_carries_cors_headers() -> None:
    origin = "http://localhost:3000"
    with running_server(tokens=TOKENS, cors_origins=[origin]) as running:
        preflight = httpx.options(f"{running.url}/devices", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = httpx.get(f"{running.url}/devices", headers={"Origin": origin})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == origin


# ---------------------------------------------------------------- SSE and ?access_token=
def test_access_token_in_the_query_works_for_get_and_is_stripped(srv: RunningServer) -> None:
    answer = httpx.get(f"{srv.url}/runs", params={"access_token": VIEWER_TOKEN, "limit": "1"})
    assert answer.status_code == 200 and answer.json()["limit"] == 1
    bad = httpx.get(f"{srv.url}/runs", params={"limit": "lots", "access_token": VIEWER_TOKEN})
    assert bad.status_code == 400  # the route never saw the token, so cannot echo it
    assert_no_token_in(bad.text)
    post = httpx.post(f"{srv.url}/devices/dev1/call", params={"access_token": ALICE_TOKEN},
                      json={"method": "set_value", "args": [1]})
    assert post.status_code == 401
    assert "GET requests only" in error_of(post)["message"]
    assert srv.daemon.get_device("dev1").value == 0.0


def _read_stream(url: str, **kw: Any) -> str:
    with httpx.stream("GET", url, timeout=WATCHDOG_S, **kw) as answer:
        assert answer.status_code == 200
        return answer.read().decode()


def test_sse_with_the_token_header_and_with_access_token(srv: RunningServer) -> None:
    # A finished run's stream sends `state` and `finished`, then ends by itself.
    by_header = _read_stream(f"{srv.url}/stream/tasks/done1", headers=bearer(VIEWER_TOKEN))
    by_query = _read_stream(f"{srv.url}/stream/tasks/done1",
                            params={"access_token": VIEWER_TOKEN})
    for text in (by_header, by_query):
        assert "event: state" in text and "event: finished" in text
    with httpx.stream("GET", f"{srv.url}/stream/tasks/done1") as refused:
        assert refused.status_code == 401


def test_sse_client_with_token_receives_and_without_token_stops_with_auth_error(
    srv: RunningServer,
) -> None:
    events: list[str] = []
    with SSEClient(srv.url, lambda name, data: events.append(name), token=VIEWER_TOKEN) as client:
        client.start_task_stream("done1")
        assert client.join(WATCHDOG_S), "the task stream did not end after `finished`"
    assert events[0] == "state" and events[-1] == "finished"
    with SSEClient(srv.url, lambda name, data: None) as anonymous:
        anonymous.start_event_stream()
        assert anonymous.join(WATCHDOG_S), "a refused stream must not retry"
    assert isinstance(anonymous.error, ServerAuthError)
    assert anonymous.error.status_code == 401


# ---------------------------------------------------------------- principal from the token
def test_the_principal_is_the_tokens_user_and_x_labd_owner_is_ignored(srv: RunningServer) -> None:
    as_bob = {**bearer(ALICE_TOKEN), "X-Labd-Owner": "bob"}
    lease = httpx.post(f"{srv.url}/leases", json={"device_ids": ["dev1"]}, headers=as_bob)
    assert lease.status_code == 201 and lease.json()["owner"] == "alice"
    started = httpx.post(f"{srv.url}/tasks", json={"task_id": "t1", "task_type": "Hold"},
                         headers=as_bob)
    assert started.status_code == 201
    assert srv.daemon.get_task("t1").info()["owner"] == "alice"

    command = {"method": "set_value", "args": [5]}
    bob_as_alice = {**bearer(BOB_TOKEN), "X-Labd-Owner": "alice"}
    refused = httpx.post(f"{srv.url}/devices/dev1/call", json=command, headers=bob_as_alice)
    assert refused.status_code == 409 and error_of(refused)["type"] == "DeviceBusyError"
    assert srv.daemon.get_device("dev1").value == 0.0
    allowed = httpx.post(f"{srv.url}/devices/dev1/call", json=command, headers=bearer(ALICE_TOKEN))
    assert allowed.status_code == 200
    assert srv.daemon.get_device("dev1").value == 5


def test_a_lease_cannot_be_claimed_for_someone_else(srv: RunningServer) -> None:
    for token in (ALICE_TOKEN, ADMIN_TOKEN):
        answer = httpx.post(f"{srv.url}/leases", json={"device_ids": ["dev1"], "owner": "dave"},
                            headers=bearer(token))
        assert answer.status_code == 403 and error_of(answer)["type"] == "Forbidden"
        assert "dave" in error_of(answer)["message"]
    assert srv.daemon.leases() == []
    same = httpx.post(f"{srv.url}/leases", json={"device_ids": ["dev1"], "owner": "alice"},
                      headers=bearer(ALICE_TOKEN))
    assert same.status_code == 201


def test_only_the_holder_renews_or_releases_and_an_admin_breaks(srv: RunningServer) -> None:
    lease_id = httpx.post(f"{srv.url}/leases", json={"device_ids": ["dev1"], "ttl": 30},
                          headers=bearer(ALICE_TOKEN)).json()["lease_id"]
    for method, path in [("POST", f"/leases/{lease_id}/renew"), ("DELETE", f"/leases/{lease_id}")]:
        answer = httpx.request(method, f"{srv.url}{path}", headers=bearer(BOB_TOKEN))
        assert answer.status_code == 403, (method, path)
        assert "'admin'" in error_of(answer)["message"] and "alice" in error_of(answer)["message"]
    own = httpx.delete(f"{srv.url}/leases/{lease_id}", params={"reason": "mine"},
                       headers=bearer(ALICE_TOKEN))
    assert own.status_code == 403  # ?reason= breaks, which is an admin's move
    assert httpx.post(f"{srv.url}/leases/{lease_id}/renew", json={"ttl": 60},
                      headers=bearer(ALICE_TOKEN)).json()["ttl"] == 60

    broken = httpx.delete(f"{srv.url}/leases/{lease_id}", headers=bearer(ADMIN_TOKEN)).json()
    assert broken["status"] == "broken" and "carol" in broken["reason"]
    command = {"method": "set_value", "args": [3]}
    assert httpx.post(f"{srv.url}/devices/dev1/call", json=command,
                      headers=bearer(BOB_TOKEN)).status_code == 200


def test_admin_breaks_with_a_reason(srv: RunningServer) -> None:
    lease = srv.daemon.claim(["dev2"], owner="alice")
    broken = httpx.delete(f"{srv.url}/leases/{lease.lease_id}", params={"reason": "maintenance"},
                          headers=bearer(ADMIN_TOKEN)).json()
    assert broken["status"] == "broken" and broken["reason"] == "maintenance"


# ---------------------------------------------------------------- the Python client
def test_server_api_with_tokens_end_to_end(srv: RunningServer) -> None:
    with ServerAPI(srv.url, token=ALICE_TOKEN, timeout=WATCHDOG_S) as api:
        assert {d["device_id"] for d in api.list_devices()["devices"]} == {"dev1", "dev2", "s1"}
        assert api.claim(["dev1"])["owner"] == "alice"
        api.call("dev1", "set_value", [2.5])
        with pytest.raises(ServerAuthError) as forbidden:
            api.add_device("dev9", "Fake")
        assert forbidden.value.status_code == 403 and forbidden.value.error_type == "Forbidden"
    with ServerAPI(srv.url, timeout=WATCHDOG_S) as anonymous:
        assert anonymous.health()["status"] == "healthy"
        with pytest.raises(ServerAuthError) as unauthorised:
            anonymous.list_devices()
        assert unauthorised.value.status_code == 401
        assert_no_token_in(str(unauthorised.value))
    with ServerAPI(srv.url, token=ADMIN_TOKEN, timeout=WATCHDOG_S) as admin:
        assert admin.add_device("dev9", "Fake")["device_id"] == "dev9"


def test_labd_connect_with_a_token(srv: RunningServer) -> None:
    with labd.connect(srv.url, token=ALICE_TOKEN, owner="alice", timeout=WATCHDOG_S) as lab:
        dev1 = lab.get_device("dev1")
        with lab.claim(["dev1"], ttl=30) as lease:
            assert lease.owner == "alice"
            dev1.set_value(4.0)
        assert lab.execute_task("r1", "Quick").wait(WATCHDOG_S) == {
            "status": "completed", "result": None}
        assert lab.get_task("r1").info()["owner"] == "alice"
    assert srv.daemon.get_device("dev1").value == 4.0
    with labd.connect(srv.url, token=VIEWER_TOKEN, timeout=WATCHDOG_S) as viewer:
        assert viewer.device_info("dev1")["connected"] is True
        # A viewer may call queries; commands need an operator.
        assert viewer.get_device("dev1").get_value() == 4.0
        with pytest.raises(ServerAuthError):
            viewer.get_device("dev1").set_value(5.0)
    bob = labd.connect(srv.url, token=BOB_TOKEN, owner="alice", timeout=WATCHDOG_S)
    with bob, pytest.raises(ServerAuthError):  # cannot claim in alice's name
        bob.claim(["dev2"])


# ---------------------------------------------------------------- secrets stay secret
def test_no_token_appears_in_logs(srv: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in [{}, bearer("not-a-known-token"), bearer(VIEWER_TOKEN), bearer(ALICE_TOKEN)]:
        httpx.post(f"{srv.url}/devices", json={"device_id": "x1", "device_type": "Fake"},
                   headers=headers)
        httpx.get(f"{srv.url}/devices/ghost", headers=headers)
    httpx.get(f"{srv.url}/runs", params={"limit": "bad", "access_token": VIEWER_TOKEN})
    with ServerAPI(srv.url, token=BOB_TOKEN) as api, pytest.raises(ServerAuthError):
        api.add_device("x2", "Fake")
    # httpx's own log lines (the test's client) print the URLs the test asked for.
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name == "labd.server" and "refused" in r.getMessage() for r in server_side)
    assert_no_token_in("\n".join(r.getMessage() for r in server_side))


def test_reprs_and_settings_hide_tokens(srv: RunningServer) -> None:
    settings = srv.server.app.state.labd.settings
    assert_no_token_in(repr(settings))
    assert repr(settings.tokens) == "<TokenTable 4 tokens (roles: 1 admin, 2 operator, 1 viewer)>"


# ---------------------------------------------------------------- tokens in, bad input out
def test_token_table_lookup() -> None:
    table = TokenTable({"abcdefgh-1": ("a", "viewer"), "abcdefgh-2": Token("b", "admin")})
    assert table.lookup("abcdefgh-2") == Token("b", "admin")
    assert table.lookup("abcdefgh-") is None and table.lookup("") is None
    assert len(table) == 2 and TokenTable.coerce(table) is table


@pytest.mark.parametrize(("tokens", "fragment"), [
    ({}, "tokens is empty"),
    ({"short": ("a", "viewer")}, "at least 8 characters"),
    ({"has a space in it": ("a", "viewer")}, "at least 8 characters"),
    ({"abcdefgh-1": ("a", "root")}, "not one of viewer, operator, admin"),
    ({"abcdefgh-1": ("", "viewer")}, "user must be"),
    ({"abcdefgh-1": ("al ice", "viewer")}, "user must be"),
    ({"abcdefgh-1": "alice"}, "Token(user, role)"),
    ([("abcdefgh-1", ("a", "viewer"))], "must map token strings"),
])
def test_bad_tokens_are_refused_without_echoing_them(
    daemon: labd.LabDaemon, tokens: Any, fragment: str,
) -> None:
    with pytest.raises(labd.InvalidArgumentError) as refused:
        LabDaemonServer(daemon, port=0, tokens=tokens)
    assert fragment in str(refused.value)
    for secret in ("short", "has a space in it", "abcdefgh-1"):
        assert secret not in str(refused.value)


# ---------------------------------------------------------------- labd serve --tokens
TOKENS_TOML = f"""
[tokens]
"{ALICE_TOKEN}" = {{ user = "alice", role = "operator" }}
"{ADMIN_TOKEN}" = {{ user = "carol", role = "admin" }}
"""


def test_load_tokens_reads_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS_TOML)
    table = load_tokens(path)
    assert table.lookup(ALICE_TOKEN) == Token("alice", "operator")
    assert table.describe() == "2 tokens (roles: 1 admin, 1 operator)"


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "cannot read it"),
    ("[tokens\n", "not valid TOML"),
    ('[other]\nx = 1\n', "expected only a [tokens] table"),
    ('[tokens]\n"abcdefgh-secret" = { user = "a", role = "root" }\n', "token #1"),
    ('[tokens]\n"abcdefgh-secret" = { user = "a" }\n', "exactly those two keys"),
    ('[tokens]\n"tiny" = { user = "a", role = "viewer" }\n', "at least 8 characters"),
    ("[tokens]\n", "tokens is empty"),
])
def test_serve_with_a_bad_tokens_file_exits_2_with_one_line(
    tmp_path: Path, content: str | None, fragment: str,
) -> None:
    from labd.cli import app

    path = tmp_path / "tokens.toml"
    if content is not None:
        path.write_text(content)
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    result = runner.invoke(app, ["serve", "--port", "0", "--no-db", "--tokens", str(path)],
                           catch_exceptions=False)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("labd: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert fragment in errors[0] and str(path) in errors[0]
    assert "abcdefgh-secret" not in result.output and '"tiny"' not in result.output


def test_serve_reads_labd_tokens_file_from_the_environment(tmp_path: Path) -> None:
    from labd.cli import app

    missing = tmp_path / "nowhere.toml"
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "LABD_TOKENS_FILE": str(missing)})
    result = runner.invoke(app, ["serve", "--port", "0", "--no-db"], catch_exceptions=False)
    assert result.exit_code == 2 and str(missing) in result.output


def test_banner_warns_about_a_network_address_without_tokens(
    daemon: labd.LabDaemon, capsys: pytest.CaptureFixture[str],
) -> None:
    from labd.cli.serve import _print_banner

    _print_banner(daemon, "http://0.0.0.0:5000", "0.0.0.0", None, None)
    out, err = capsys.readouterr()
    assert "auth:      off" in out and "0.0.0.0 with no --tokens" in err
    _print_banner(daemon, "http://0.0.0.0:5000", "0.0.0.0", None,
                  TokenTable({ALICE_TOKEN: ("alice", "operator")}))
    out, err = capsys.readouterr()
    assert "auth:      1 token (roles: 1 operator)" in out and err == ""


def test_serve_subprocess_with_tokens_answers_401_then_200(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS_TOML)
    with LabdProcess("serve", "--demo", "--port", "0", "--no-db", "--tokens", str(path)) as proc:
        url = proc.wait_for("labd serving").split(" at ")[-1].strip()
        assert "2 tokens (roles: 1 admin, 1 operator)" in proc.wait_for("auth:")
        assert httpx.get(f"{url}/devices", timeout=WATCHDOG_S).status_code == 401
        answer = httpx.get(f"{url}/devices", headers=bearer(ALICE_TOKEN), timeout=WATCHDOG_S)
        assert answer.status_code == 200
        with ServerAPI(url, token=ALICE_TOKEN, timeout=WATCHDOG_S) as api:
            assert api.call("laser1", "get_wavelength") == 1550.0
        assert proc.stop(signal.SIGINT) == 0
    output = proc.output()
    assert "Traceback" not in output and "labd stopped" in output
    assert_no_token_in(output)
