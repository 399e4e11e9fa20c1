"""labd.patterns: ensure_server waits for /health or explains; ensure_device adds and connects."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import labd
from labd.client import RemoteDaemon, ServerAPI, ServerConnectionError, connect
from labd.patterns import ensure_device, ensure_server

pytestmark = pytest.mark.server


@pytest.fixture
def server() -> Iterator[Any]:
    from labd.testing import running_server

    with running_server(demo=True) as srv:
        yield srv


@pytest.fixture
def api(server: Any) -> Iterator[ServerAPI]:
    with ServerAPI(server.url) as client:
        yield client


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ensure_server_true_for_a_healthy_server(server: Any) -> None:
    assert ensure_server(server.url, timeout=5.0) is True


def test_ensure_server_times_out_with_a_message_that_says_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert ensure_server(url, timeout=0.3) is False  # LabDaemon's answer: no exception
    with pytest.raises(ServerConnectionError) as caught:
        ensure_server(url, timeout=0.3, raise_on_failure=True)
    # A bound, not a timing assertion: it gave up instead of waiting forever.
    assert time.monotonic() - started < 10.0
    message = str(caught.value)
    assert url in message and "labd serve" in message and "0.3" in message


def test_ensure_device_returns_an_existing_device_connected(api: ServerAPI) -> None:
    api.disconnect_device("laser1")
    info = ensure_device(api, "laser1", "SimLaser")
    assert info["device_id"] == "laser1" and info["connected"] is True


def test_ensure_device_adds_a_missing_device_with_params(api: ServerAPI) -> None:
    info = ensure_device(api, "laser2", "SimLaser", wavelength=1530.0, settling_time=0.0)
    assert info["connected"] is True and info["device_type"] == "SimLaser"
    assert api.call("laser2", "get_wavelength") == 1530.0
    # Idempotent: a second call finds it and adds nothing.
    assert ensure_device(api, "laser2", "SimLaser")["device_id"] == "laser2"


def test_ensure_device_without_connect_leaves_it_disconnected(api: ServerAPI) -> None:
    info = ensure_device(api, "laser3", "SimLaser", connect=False)
    assert info["connected"] is False


def test_ensure_device_refuses_an_existing_device_of_another_type(api: ServerAPI) -> None:
    with pytest.raises(labd.InvalidArgumentError, match="SimPowerMeter"):
        ensure_device(api, "pm1", "SimLaser")


def test_ensure_device_accepts_a_remote_daemon(server: Any) -> None:
    with connect(server.url) as lab:
        assert isinstance(lab, RemoteDaemon)
        assert ensure_device(lab, "laser4", "SimLaser")["connected"] is True
        assert lab.get_device("laser4").get_wavelength() == 1550.0


def test_ensure_device_reports_unknown_types(api: ServerAPI) -> None:
    with pytest.raises(labd.UnknownDeviceTypeError):
        ensure_device(api, "thing1", "NoSuchType")
