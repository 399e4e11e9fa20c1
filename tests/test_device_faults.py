"""Devices under faults: a connect() that outlives its timeout is undone and refused.

Issue 7, item 3: LabDaemon calls disconnect() to clean up after a connect timeout; labd does
the same once the late connect() returns, and refuses calls with DeviceNotConnectedError
until a later connect succeeds. Every wait is bounded by a watchdog.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import labd as ld

WAIT_S = 10.0


class SlowToConnect:
    """connect() blocks until ``release`` is set (the first time only)."""

    def __init__(self, device_id: str, release: threading.Event) -> None:
        self.device_id = device_id
        self.release = release
        self.calls: list[str] = []
        self.disconnected = threading.Event()
        self.value = 0

    def connect(self) -> None:
        self.calls.append("connect")
        self.release.wait(WAIT_S)

    def disconnect(self) -> None:
        self.calls.append("disconnect")
        self.disconnected.set()

    def set_value(self, value: int) -> None:
        self.value = value

    def get_value(self) -> int:
        return self.value


@pytest.fixture
def daemon() -> Iterator[ld.LabDaemon]:
    d = ld.LabDaemon()
    d.register_plugins(devices={"SlowToConnect": SlowToConnect})
    yield d
    d.shutdown(timeout=5)


def test_a_late_connect_is_undone_and_the_device_refuses_calls(daemon: ld.LabDaemon) -> None:
    release = threading.Event()
    device = daemon.add_device("slow", "SlowToConnect", release=release)
    with pytest.raises(ld.DeviceTimeoutError, match="did not finish within"):
        daemon.connect_device("slow", timeout=0.05)
    assert daemon.device_info("slow")["state"] == "faulted"

    release.set()  # the instrument answers at last
    assert device.disconnected.wait(WAIT_S), "disconnect() was never called after the late connect"
    assert device.calls == ["connect", "disconnect"]
    assert daemon.device_info("slow")["state"] == "faulted"
    for call in (lambda: device.set_value(1), device.get_value):
        with pytest.raises(ld.DeviceNotConnectedError, match=r"slow.*connect"):
            call()
    assert device.value == 0  # nothing reached the instrument

    daemon.connect_device("slow", timeout=WAIT_S)  # a later connect succeeds
    assert daemon.device_info("slow")["state"] == "connected"
    device.set_value(2)
    assert device.get_value() == 2
