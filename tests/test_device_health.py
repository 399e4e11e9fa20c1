"""``/health`` names every device that needs attention; a hung connect() never blocks serving.

Issue 7, item 4: ``labd serve lab.toml`` with a device whose ``connect()`` hangs printed
nothing and never served, and ``/health`` said ``healthy`` while a device was unresponsive
(a call past its request timeout) or stuck connecting. Now the config's ``connect_timeout``
(``--connect-timeout``, default 10 s) bounds each connect: the device is served as
``faulted`` with the reason, and ``/health`` says ``degraded`` and names it.

Waits are events or bounded polls (watchdogs); no test depends on how fast anything runs.
"""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import labd as ld
from labd.testing import LabdProcess, RunningServer, running_server

WATCHDOG_S = 10.0  # every bounded wait; never reached when things work
SERVE_START_TIMEOUT_S = 30.0  # the child process imports labd, connects, then serves


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WATCHDOG_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {WATCHDOG_S} s"
        time.sleep(0.01)


class Gate:
    """A device whose ``block()`` and ``connect()`` wait until the test opens the gate."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.entered = threading.Event()
        self.opened = threading.Event()

    def connect(self) -> None:
        self.entered.set()
        assert self.opened.wait(WATCHDOG_S), "the test never opened the gate"

    def block(self) -> str:
        self.entered.set()
        assert self.opened.wait(WATCHDOG_S), "the test never opened the gate"
        return "opened"

    def get_value(self) -> int:
        return 1


@pytest.fixture
def served() -> Iterator[RunningServer]:
    daemon = ld.LabDaemon()
    daemon.register_plugins(devices={"Gate": Gate})
    daemon.add_device("gate", "Gate")
    daemon.add_device("other", "Gate")
    try:
        with running_server(daemon) as server:
            yield server
    finally:
        for device_id in ("gate", "other"):
            daemon.get_device(device_id).opened.set()
        daemon.shutdown(timeout=2)


def health(server: RunningServer) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/health", timeout=WATCHDOG_S)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_health_is_healthy_with_no_device_problems(served: RunningServer) -> None:
    body = health(served)
    assert body["status"] == "healthy"
    assert body["device_problems"] == {}


def test_health_is_degraded_naming_an_unresponsive_device_until_its_call_ends(
    served: RunningServer,
) -> None:
    gate = served.daemon.get_device("gate")
    answer = httpx.post(f"{served.url}/devices/gate/call", params={"timeout": 0.2},
                        json={"method": "block"}, timeout=WATCHDOG_S)
    assert answer.status_code == 504  # the server now flags the device unresponsive
    assert gate.entered.is_set()

    body = health(served)
    assert body["status"] == "degraded"
    assert list(body["device_problems"]) == ["gate"]
    assert "unresponsive" in body["device_problems"]["gate"]
    assert "request timeout" in body["device_problems"]["gate"]

    gate.opened.set()
    wait_until(lambda: health(served)["status"] == "healthy",
               "/health to say healthy again after the late call ended")
    assert health(served)["device_problems"] == {}


def test_health_is_degraded_naming_a_device_stuck_connecting(served: RunningServer) -> None:
    gate = served.daemon.get_device("gate")
    connecting = threading.Thread(target=lambda: served.daemon.connect_device("gate"),
                                  name="test-connect")
    connecting.start()
    try:
        assert gate.entered.wait(WATCHDOG_S), "connect() never started"
        body = health(served)
        assert body["status"] == "degraded"
        assert body["device_problems"] == {"gate": "connecting: its connect() has not returned yet"}
    finally:
        gate.opened.set()
        connecting.join(WATCHDOG_S)
    assert not connecting.is_alive()
    body = health(served)
    assert (body["status"], body["device_problems"]) == ("healthy", {})


def test_health_names_a_device_whose_connect_timed_out(served: RunningServer) -> None:
    with pytest.raises(ld.DeviceTimeoutError):
        served.daemon.connect_device("gate", timeout=0.1)
    body = health(served)
    assert body["status"] == "degraded"
    reason = body["device_problems"]["gate"]
    assert reason.startswith("faulted: ") and "connect() did not finish within 0.1 s" in reason
    assert "other" not in body["device_problems"]


# -- labd serve with a connect() that never returns ----------------------------------------

HANGING_DRIVERS = '''
import threading


class Hangs:
    """connect() never returns: an instrument that takes the connection and never answers."""

    def __init__(self, device_id):
        self.device_id = device_id

    def connect(self):
        threading.Event().wait()

    def get_value(self):
        return 1


class Fine:
    def __init__(self, device_id):
        self.device_id = device_id

    def connect(self):
        pass

    def get_value(self):
        return 2
'''


@pytest.mark.parametrize("where", ["config", "option"])
def test_serve_with_a_connect_that_hangs_serves_and_reports_the_device_faulted(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "hanging_drivers.py").write_text(HANGING_DRIVERS)
    timeout_line = "connect_timeout = 0.5\n" if where == "config" else ""
    config = tmp_path / "lab.toml"
    config.write_text(timeout_line + textwrap.dedent('''
        connect = true
        [devices.stuck]
        type = "hanging_drivers:Hangs"
        [devices.ok]
        type = "hanging_drivers:Fine"
    '''))
    args = ["serve", str(config), "--port", "0", "--no-db"]
    if where == "option":
        args += ["--connect-timeout", "0.5"]

    with LabdProcess(*args, timeout=SERVE_START_TIMEOUT_S) as proc:
        proc.wait_for("connecting 2 device(s)")  # says what it waits for before serving
        url = proc.wait_for("labd serving").split(" at ")[-1].strip()
        with httpx.Client(base_url=url, timeout=WATCHDOG_S) as http:
            body = http.get("/health").json()
            device = http.get("/devices/stuck").json()
            ok = http.get("/devices/ok").json()
            value = http.post("/devices/ok/call", json={"method": "get_value"}).json()
        assert proc.stop(signal.SIGINT) == 0  # Ctrl-C still stops it
    output = proc.output()

    assert body["status"] == "degraded", body
    assert list(body["device_problems"]) == ["stuck"], body
    assert "connect() did not finish within 0.5 s" in body["device_problems"]["stuck"]
    assert device["state"] == "faulted"
    assert device["last_error"]["type"] == "DeviceTimeoutError"
    assert "connect() did not finish within 0.5 s" in device["last_error"]["message"]
    assert ok["state"] == "connected" and value["result"] == 2
    assert "device 'stuck' is faulted" in output
    assert "Traceback" not in output and "labd stopped" in output
