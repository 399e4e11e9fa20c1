"""labd.server.guards and what anonymous callers see, over real HTTP on 127.0.0.1.

The browser on the lab PC: a cross-site ``text/plain`` POST is refused with 415 before any
device code runs, and a DNS-rebinding page (``Host: evil.example``) gets 421. With tokens,
anonymous ``/health`` is status and counts only, the API description stays open and declares
the bearer scheme. The server's limits are settable from Python, ``labd serve`` and the config.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import labd
from labd.server import LabDaemonServer
from labd.server.auth import load_tokens, tokens_file_exposure
from labd.server.guards import HostGuard, host_name, json_media_type_problem
from labd.testing import FakeDevice, LabdProcess, RunningServer, gated_task, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0
TOKEN = "alice-Kp2o-operator-token"
CALL = b'{"method": "set_value", "args": [42.0]}'


def error_of(answer: httpx.Response) -> dict[str, Any]:
    record = answer.json()["error"]
    assert set(record) == {"type", "message", "origin", "timestamp", "traceback", "context"}
    return dict(record)


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    """A server (no tokens) with dev1, a connected FakeDevice, and a Hold task type."""
    release = threading.Event()
    daemon = labd.LabDaemon()
    try:
        daemon.register_plugins(devices={"Fake": FakeDevice}, tasks={"Hold": gated_task(release)})
        daemon.connect_device(daemon.add_device("dev1", "Fake"))
        with running_server(daemon) as running:
            try:
                yield running
            finally:
                release.set()
    finally:
        daemon.shutdown()


def device_calls(srv: RunningServer) -> list[str]:
    return [name for name, _, _ in srv.daemon.get_device("dev1").calls if name != "connect"]


# ---------------------------------------------------------------- 415: JSON bodies only
def test_a_cross_site_text_plain_call_is_refused_and_reaches_no_device(srv: RunningServer) -> None:
    # What <form enctype="text/plain"> or fetch(..., {mode: "no-cors"}) sends: no preflight.
    answer = httpx.post(f"{srv.url}/devices/dev1/call", content=CALL,
                        headers={"Content-Type": "text/plain"}, timeout=WATCHDOG_S)
    assert answer.status_code == 415
    record = error_of(answer)
    assert record["type"] == "UnsupportedMediaType"
    assert "'text/plain'" in record["message"] and "application/json" in record["message"]
    assert record["context"]["content_type"] == "text/plain"
    assert device_calls(srv) == []
    assert srv.daemon.get_device("dev1").value == 0.0
    text = httpx.get(f"{srv.url}/metrics", timeout=WATCHDOG_S).text
    assert 'labd_http_errors_total{status="415",type="UnsupportedMediaType"} 1.0' in text


@pytest.mark.parametrize("content_type", [
    None,  # a body without Content-Type
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "application/json-patch+json",
])
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/devices/dev1/call"),
    ("POST", "/tasks"),
    ("POST", "/leases"),
    ("POST", "/devices"),
    ("DELETE", "/devices/dev1/error"),
])
def test_every_state_changing_route_takes_only_json(
    srv: RunningServer, method: str, path: str, content_type: str | None,
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = httpx.request(method, f"{srv.url}{path}", content=CALL, headers=headers,
                           timeout=WATCHDOG_S)
    assert answer.status_code == 415, answer.text
    message = error_of(answer)["message"]
    assert (content_type or "no Content-Type") in message and "application/json" in message
    assert device_calls(srv) == [] and srv.daemon.list_tasks() == []
    assert srv.daemon.leases() == [] and srv.daemon.device_ids() == ["dev1"]


def test_a_declared_non_json_type_is_refused_even_with_an_empty_body(srv: RunningServer) -> None:
    # An empty HTML form posts Content-Type: application/x-www-form-urlencoded, length 0.
    answer = httpx.post(f"{srv.url}/devices/dev1/disconnect",
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                        timeout=WATCHDOG_S)
    assert answer.status_code == 415
    assert srv.daemon.get_device("dev1").connected


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON;Charset=\"UTF-8\"",
])
def test_json_with_or_without_charset_is_accepted(srv: RunningServer, content_type: str) -> None:
    answer = httpx.post(f"{srv.url}/devices/dev1/call", content=CALL,
                        headers={"Content-Type": content_type}, timeout=WATCHDOG_S)
    assert answer.status_code == 200, answer.text
    assert srv.daemon.get_device("dev1").value == 42.0


def test_bodiless_posts_stay_allowed(srv: RunningServer) -> None:
    task_id = srv.daemon.execute_task(None, "Hold").task_id
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as client:
        assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
        assert client.post("/devices/dev1/disconnect").status_code == 200
        assert client.post("/devices/dev1/connect", headers={"Content-Length": "0"}).status_code == 200


def test_json_media_type_problem() -> None:
    assert json_media_type_problem("application/json") is None
    assert json_media_type_problem("application/json ; charset=utf8") is None
    assert json_media_type_problem(None) == "no Content-Type"
    assert json_media_type_problem("text/plain") == "Content-Type 'text/plain'"
    assert "parameter 'boundary=x'" in str(json_media_type_problem("application/json; boundary=x"))


# ---------------------------------------------------------------- 421: the Host check
def get(url: str, host: str | None, path: str = "/health") -> httpx.Response:
    headers = {} if host is None else {"Host": host}
    return httpx.get(f"{url}{path}", headers=headers, timeout=WATCHDOG_S)


def test_a_rebinding_host_gets_421_with_how_to_allow_it(srv: RunningServer) -> None:
    answer = get(srv.url, "evil.example")
    assert answer.status_code == 421
    record = error_of(answer)
    assert record["type"] == "MisdirectedRequest"
    assert "'evil.example'" in record["message"]
    assert "--allow-host NAME or add it to allowed_hosts" in record["message"]
    assert record["context"] == {"host": "evil.example"}
    refused = httpx.post(f"{srv.url}/devices/dev1/call", json={"method": "set_value",
                         "args": [1.0]}, headers={"Host": "evil.example:80"}, timeout=WATCHDOG_S)
    assert refused.status_code == 421 and device_calls(srv) == []


def test_the_hosts_the_server_serves_are_answered(srv: RunningServer) -> None:
    port = srv.server.port
    for host in [f"localhost:{port}", "LocalHost", f"127.0.0.1:{port}", f"[::1]:{port}",
                 "::1", "localhost."]:
        assert get(srv.url, host).status_code == 200, host
    for host in ["evil.example", f"127.0.0.1.evil.example:{port}", "localhost.evil.example",
                 "10.0.0.1", "[::2]"]:
        assert get(srv.url, host).status_code == 421, host


def test_allowed_hosts_are_answered_port_and_case_ignored() -> None:
    with running_server(allowed_hosts=["LabPC.example.org", "lab-gw:8080"]) as running:
        assert get(running.url, "labpc.example.org:5000").status_code == 200
        assert get(running.url, "LAB-GW").status_code == 200
        assert get(running.url, "other.example.org").status_code == 421
        settings = running.server.app.state.labd.settings
        assert settings.allowed_hosts == ("labpc.example.org", "lab-gw")
    with running_server(allowed_hosts=["*"]) as any_host:
        assert get(any_host.url, "evil.example").status_code == 200


def test_a_request_without_host_is_answered(srv: RunningServer) -> None:
    # HTTP/1.0 allows it; browsers (and so rebinding pages) always send Host.
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=WATCHDOG_S) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_a_server_on_every_interface_checks_host_too(daemon: labd.LabDaemon,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="labd.server")
    with LabDaemonServer(daemon, "0.0.0.0", 0) as server:
        url = f"http://127.0.0.1:{server.port}"
        assert get(url, None).status_code == 200
        assert get(url, "evil.example").status_code == 421
    assert any("all interfaces" in r.getMessage() and "--allow-host NAME" in r.getMessage()
               for r in caplog.records)


def test_host_rule_the_address_a_request_arrived_at_is_served() -> None:
    guard = HostGuard(app=None, bind_host="0.0.0.0", allowed_hosts=["labpc"])  # type: ignore[arg-type]
    assert guard.allows("192.168.1.20:5000", local_address="192.168.1.20")
    assert guard.allows("192.168.1.20", local_address="::ffff:192.168.1.20")
    assert not guard.allows("192.168.1.21", local_address="192.168.1.20")
    assert guard.allows("LABPC:1") and not guard.allows("evil.example", local_address="10.0.0.1")
    assert host_name("[::1]:5000") == "::1" and host_name("LabPC.:80") == "labpc"


@pytest.mark.parametrize(("hosts", "fragment"), [
    ("labpc", "a list of host names"),
    (["http://labpc/"], "without scheme, path or spaces"),
    (["lab pc"], "without scheme, path or spaces"),
    ([""], "each entry must be a host name"),
    ([3], "each entry must be a host name"),
])
def test_bad_allowed_hosts_are_refused(daemon: labd.LabDaemon, hosts: Any, fragment: str) -> None:
    with pytest.raises(labd.InvalidArgumentError, match="allowed_hosts") as refused:
        LabDaemonServer(daemon, port=0, allowed_hosts=hosts)
    assert fragment in str(refused.value)


# ---------------------------------------------------------------- with tokens: open paths
@pytest.fixture
def secured() -> Iterator[RunningServer]:
    """A server with a token, dev1 and a faulted device whose error text is secret."""
    daemon = labd.LabDaemon()
    try:
        daemon.register_plugins(devices={"Fake": FakeDevice})
        daemon.add_device("dev1", "Fake")
        daemon.add_device("broken", "Fake", fail_connect=True)
        with pytest.raises(labd.LabDaemonException):
            daemon.connect_device("broken")
        with running_server(daemon, tokens={TOKEN: ("alice", "operator")}) as running:
            yield running
    finally:
        daemon.shutdown()


def test_anonymous_health_is_status_and_counts_only(secured: RunningServer) -> None:
    answer = httpx.get(f"{secured.url}/health", timeout=WATCHDOG_S)
    assert answer.status_code == 200
    assert answer.json() == {"status": "degraded", "devices": 2, "tasks_running": 0}
    assert "broken" not in answer.text and "simulated connection failure" not in answer.text
    for headers in [{"Authorization": "Bearer not-a-known-token"}, {"Authorization": "junk"}]:
        assert httpx.get(f"{secured.url}/health", headers=headers).json().keys() == {
            "status", "devices", "tasks_running"}


def test_health_with_a_token_is_the_full_body(secured: RunningServer) -> None:
    body = httpx.get(f"{secured.url}/health", headers={"Authorization": f"Bearer {TOKEN}"},
                     timeout=WATCHDOG_S).json()
    assert {"status", "timestamp", "uptime_s", "devices", "device_problems", "tasks_running",
            "store"} <= body.keys()
    assert "simulated connection failure" in body["device_problems"]["broken"]


def test_health_without_tokens_is_the_full_body(srv: RunningServer) -> None:
    assert "device_problems" in httpx.get(f"{srv.url}/health", timeout=WATCHDOG_S).json()


def test_api_docs_are_open_and_declare_the_bearer_scheme(secured: RunningServer) -> None:
    for path in ["/docs", "/redoc", "/openapi.json"]:
        assert httpx.get(f"{secured.url}{path}", timeout=WATCHDOG_S).status_code == 200, path
    spec = httpx.get(f"{secured.url}/openapi.json", timeout=WATCHDOG_S).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["type"] == "http"
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/health"]["get"]["security"] == [{}, {"bearerAuth": []}]
    assert "security" not in spec["paths"]["/devices"]["get"]  # the global requirement


def test_without_tokens_the_api_declares_no_security(srv: RunningServer) -> None:
    spec = httpx.get(f"{srv.url}/openapi.json", timeout=WATCHDOG_S).json()
    assert "security" not in spec and "securitySchemes" not in spec.get("components", {})


# ---------------------------------------------------------------- the tokens file's mode
def write_tokens(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[tokens]\n"{TOKEN}" = {{ user = "alice", role = "operator" }}\n')
    path.chmod(mode)
    return path


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_a_tokens_file_open_to_others_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = write_tokens(tmp_path, 0o644)
    with caplog.at_level(logging.WARNING, logger="labd.server"):
        assert len(load_tokens(path)) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and f"chmod 600 {path}" in warnings[0]
    assert "group and others (mode 0644)" in warnings[0] and TOKEN not in warnings[0]
    path.chmod(0o600)
    assert tokens_file_exposure(path) is None
    caplog.clear()
    load_tokens(path)
    assert not caplog.records


# ---------------------------------------------------------------- settings wiring
def test_server_limits_reach_the_settings(daemon: labd.LabDaemon) -> None:
    server = LabDaemonServer(
        daemon, "127.0.0.1", 0, stream_max_clients=3, stream_max_clients_total=7,
        stream_max_maxsize=50, max_request_timeout=60, lease_max_ttl=20, device_max_in_flight=2,
        device_workers=5, server_workers=3, allowed_hosts=["labpc"])
    settings = server.app.state.labd.settings
    assert (settings.stream_max_clients, settings.stream_max_clients_total,
            settings.stream_max_maxsize) == (3, 7, 50)
    assert (settings.max_request_timeout, settings.lease_max_ttl) == (60.0, 20.0)
    assert settings.lease_default_ttl == 20.0  # 30 s by default, but never above the maximum
    assert (settings.device_max_in_flight, settings.device_workers,
            settings.server_workers) == (2, 5, 3)
    assert settings.allowed_hosts == ("labpc",) and settings.bind_host == "127.0.0.1"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"stream_max_clients_total": 0}, "stream_max_clients_total must be a positive integer"),
    ({"stream_max_maxsize": 1.5}, "stream_max_maxsize must be a positive integer"),
    ({"device_max_in_flight": True}, "device_max_in_flight must be a positive integer"),
    ({"device_workers": -1}, "device_workers must be a positive integer"),
    ({"server_workers": 0}, "server_workers must be a positive integer"),
    ({"lease_max_ttl": float("inf")}, "lease_max_ttl must be a positive, finite number"),
    ({"lease_default_ttl": 0}, "lease_default_ttl must be a positive, finite number"),
    ({"lease_default_ttl": 100, "lease_max_ttl": 50}, "must not exceed lease_max_ttl"),
    ({"max_request_timeout": 10}, "at least request_timeout"),
    ({"max_request_timeout": "1h"}, "max_request_timeout must be a positive"),
])
def test_bad_limits_are_refused_naming_the_setting(
    daemon: labd.LabDaemon, kwargs: dict[str, Any], fragment: str,
) -> None:
    with pytest.raises(labd.InvalidArgumentError) as refused:
        LabDaemonServer(daemon, port=0, **kwargs)
    assert fragment in str(refused.value)


def invoke_serve(*args: str) -> Any:
    from labd.cli import app

    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    return runner.invoke(app, ["serve", "--port", "0", "--no-db", *args], catch_exceptions=False)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--stream-max-clients", "0"], "--stream-max-clients must be a positive whole number"),
    (["--device-max-in-flight", "-2"], "--device-max-in-flight must be a positive whole number"),
    (["--max-lease-ttl", "0"], "--max-lease-ttl must be a positive number of seconds"),
    (["--max-lease-ttl", "inf"], "--max-lease-ttl must be a positive number of seconds"),
    (["--allow-host", "http://labpc/"], "is not a host name"),
])
def test_serve_refuses_bad_limits_with_one_line(args: list[str], fragment: str) -> None:
    result = invoke_serve(*args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("labd: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert fragment in errors[0]


def test_serve_refuses_config_and_options_that_disagree(tmp_path: Path) -> None:
    config = tmp_path / "lab.toml"
    config.write_text("lease_default_ttl = 100\n")
    result = invoke_serve(str(config), "--max-lease-ttl", "50")
    assert result.exit_code == 2, result.output
    assert f"server settings (from {config} and the options)" in result.output
    assert "must not exceed lease_max_ttl" in result.output


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_serve_with_allow_host_config_limits_and_an_open_tokens_file(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path, 0o644)
    config = tmp_path / "lab.toml"
    config.write_text('allowed_hosts = ["labpc.example.org"]\nstream_max_clients = 2\n')
    args = ["serve", str(config), "--demo", "--port", "0", "--no-db", "--tokens", str(tokens),
            "--allow-host", "gateway.example.org", "--device-max-in-flight", "3",
            "--max-lease-ttl", "120"]
    with LabdProcess(*args) as proc:
        warning = proc.wait_for("chmod 600")
        assert str(tokens) in warning and "open to group and others" in warning
        url = proc.wait_for("labd serving").split(" at ")[-1].strip()
        hosts = proc.wait_for("hosts:")
        assert "labpc.example.org" in hosts and "gateway.example.org" in hosts
        for host, status in [("labpc.example.org:80", 200), ("GATEWAY.example.org", 200),
                             ("localhost", 200), ("evil.example", 421)]:
            answer = httpx.get(f"{url}/health", headers={"Host": host}, timeout=WATCHDOG_S)
            assert answer.status_code == status, (host, answer.text)
        assert proc.stop(signal.SIGINT) == 0
    assert TOKEN not in proc.output()


def test_serve_merges_config_and_options_the_options_winning(tmp_path: Path) -> None:
    from labd.cli.serve import _server_options
    from labd.config import load_config

    config = tmp_path / "lab.toml"
    config.write_text('allowed_hosts = ["LabPC"]\nstream_max_clients = 2\nlease_max_ttl = 600\n'
                      "device_max_in_flight = 8\n")
    options = _server_options("127.0.0.1", load_config(config), allow_host=["gw:80"],
                              lease_max_ttl=120.0, stream_max_clients=None,
                              device_max_in_flight=3)
    assert options == {"allowed_hosts": ("labpc", "gw"), "stream_max_clients": 2,
                       "lease_max_ttl": 120.0, "device_max_in_flight": 3}
    assert _server_options("127.0.0.1", None, allow_host=None, lease_max_ttl=None,
                           stream_max_clients=None, device_max_in_flight=None) == {}


# ---------------------------------------------------------------------- cross-site POSTs


def test_a_bodiless_cross_site_post_is_refused_and_changes_nothing(srv: RunningServer) -> None:
    """``fetch(url, {method: "POST", mode: "no-cors"})`` from another site carries no body (so
    the JSON rule lets it through) but always an Origin header: refused with 403."""
    srv.daemon.execute_task("t1", "Hold")
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as client:
        for path in ("/tasks/t1/cancel", "/devices/dev1/disconnect"):
            answer = client.post(path, headers={"Origin": "http://evil.example"})
            assert answer.status_code == 403, answer.text
            record = error_of(answer)
            assert record["type"] == "CrossSiteRequest"
            assert "evil.example" in record["message"] and "cors_origins" in record["message"]
    assert srv.daemon.get_task("t1").status == "running"
    assert srv.daemon.device_info("dev1")["state"] == "connected"


def test_a_page_of_another_port_on_the_same_pc_is_another_origin(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as client:
        answer = client.post("/devices/dev1/disconnect",
                             headers={"Origin": "http://localhost:8080"})
    assert answer.status_code == 403
    assert srv.daemon.device_info("dev1")["state"] == "connected"


def test_the_servers_own_origin_and_clients_without_origin_may_change_state(
    srv: RunningServer,
) -> None:
    port = srv.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as client:
        own = client.post("/devices/dev1/call", content=CALL, headers={
            "Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"})
        assert own.status_code == 200, own.text
        assert client.post("/devices/dev1/disconnect").status_code == 200  # no Origin: a script
    assert srv.daemon.device_info("dev1")["state"] == "disconnected"


def test_configured_cors_origins_may_change_state(daemon: labd.LabDaemon) -> None:
    daemon.register_plugins(devices={"Fake": FakeDevice})
    daemon.connect_device(daemon.add_device("dev1", "Fake"))
    with running_server(daemon, cors_origins=["http://gui.example:3000"]) as running, \
            httpx.Client(base_url=running.url, timeout=WATCHDOG_S) as client:
        answer = client.post("/devices/dev1/disconnect",
                             headers={"Origin": "http://gui.example:3000"})
        assert answer.status_code == 200, answer.text
