"""The engine over TLS (``rediss://``) with one ACL user per node, as docs/multi-host.md
sets it up: nodes work through it, and a wrong password or a user without the rights is a
clear ``degraded``, not a crash. A real redis-server with a CA and certificate made here."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import labd
from labd.lab import LabNode, LabTimings, connect_engine
from labd.testing import FakeDevice, running_server
from test_lab_support import REDIS_SERVER, free_port, needs_redis_server, wait_until

OPENSSL = shutil.which("openssl")
pytestmark = [needs_redis_server, pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")]
FAST = LabTimings(directory_ttl=1.0, heartbeat=0.2, claim_ttl=1.0, claim_renew=0.2)


def _certificates(folder: Path) -> Path:
    assert OPENSSL is not None

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=labd-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")
    return folder / "ca.crt"


@pytest.fixture
def tls_engine(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    assert REDIS_SERVER is not None
    ca = _certificates(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(tmp_path / "server.crt"), "--tls-key-file", str(tmp_path / "server.key"),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--user", "default", "off",
         "--user", "labd-a", "on", ">pw-a", "~labd:*", "&labd:*", "+@all", "-@admin", "-@dangerous",
         "--user", "labd-b", "on", ">pw-b", "~labd:*", "&labd:*", "+@all", "-@admin", "-@dangerous",
         "--user", "viewer", "on", ">pw-v", "~labd:*", "+@read"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        def answers() -> bool:
            try:
                client = redis.Redis.from_url(_url("labd-a", "pw-a", port, ca))
                try:
                    return bool(client.ping())
                finally:
                    client.close()
            except redis.exceptions.ConnectionError:
                return False

        wait_until(answers, 10, "the TLS redis-server")
        yield port, ca
    finally:
        proc.kill()
        proc.wait(10)


def _url(user: str, password: str, port: int, ca: Path) -> str:
    return f"rediss://{user}:{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"


def _node(name: str, url: str, *device_ids: str) -> LabNode:
    daemon = labd.LabDaemon()
    daemon.register_plugins(devices={"Fake": FakeDevice})
    for device_id in device_ids:
        daemon.add_device(device_id, "Fake")
    node = LabNode(daemon, connect_engine(url), name, timings=FAST, workers=1)
    node.start()
    return node


def _close(*nodes: LabNode) -> None:
    for node in nodes:
        node.daemon.shutdown()
        node.close()


def test_nodes_work_through_tls_with_their_own_acl_users(tls_engine: tuple[int, Path]) -> None:
    port, ca = tls_engine
    a = _node("a", _url("labd-a", "pw-a", port, ca), "laser")
    b = _node("b", _url("labd-b", "pw-b", port, ca))
    try:
        assert a.health()["connected"] and a.health()["engine"] == f"rediss://labd-a@127.0.0.1:{port}/0"
        wait_until(lambda: b.knows("laser"), 5, "node b to see the laser")
        b.daemon.call_device("laser", "set_value", [12])
        with b.daemon.claim(["laser"], owner="alice"):
            b.daemon.call_device("laser", "set_value", [13])
        assert a.daemon.call_device("laser", "get_value") == 13
        with running_server(b.daemon) as server:  # the server's loop has a TLS link of its own
            answer = httpx.post(server.url + "/devices/laser/call",
                                json={"method": "get_value"}, timeout=10)
        assert answer.json() == {"result": 13, "success": True}
    finally:
        _close(b, a)


def test_wrong_credentials_or_rights_leave_the_node_degraded_saying_why(
    tls_engine: tuple[int, Path],
) -> None:
    port, ca = tls_engine
    wrong = _node("a", _url("labd-a", "not-it", port, ca), "laser")
    reader = _node("v", _url("viewer", "pw-v", port, ca), "camera")
    try:
        assert "refused this node's credentials" in (wrong.health()["engine_error"] or "")
        assert "does not let this node's ACL user" in (reader.health()["engine_error"] or "")
        assert wrong.daemon.call_device("laser", "get_value") == 0.0  # its own devices still work
    finally:
        _close(reader, wrong)
