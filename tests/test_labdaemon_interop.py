"""LabDaemon 1.0.1's own HTTP client, unchanged, against a labd server (DESIGN.md section 3).

A lab that switches its server to labd keeps its GUIs and scripts written against
``labdaemon.server.ServerAPI`` / ``SSEClient`` and ``labdaemon.patterns``: every method of them
is driven here against ``labd.testing.running_server`` with the simulated lab. The client is
the real ``labdaemon==1.0.1`` from PyPI (a dev dependency), so a shape labd changes and
LabDaemon's client cannot read fails here. Where they disagree, labd's answer is what changes.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import labdaemon
import labdaemon.exceptions
import labdaemon.patterns
import labdaemon.server
import labdaemon.utils
import pytest
from labdaemon.patterns import ensure_device, ensure_server
from labdaemon.server import ServerAPI, ServerAPIError, SSEClient
from loguru import logger

import labd
import labd.exceptions
import labd.patterns
import labd.server
import labd.utils
from labd.testing import RunningServer, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0  # every bounded wait; never reached when things work
SWEEP = {"laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549.0, "stop_wl": 1551.0}


@pytest.fixture(autouse=True)
def _quiet_labdaemon_logs() -> Iterator[None]:
    # LabDaemon's client logs every connect and stream line through loguru at INFO.
    logger.disable("labdaemon")
    yield
    logger.enable("labdaemon")


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    with running_server(demo=True) as running:
        yield running


@pytest.fixture
def api(srv: RunningServer) -> Iterator[ServerAPI]:
    client = ServerAPI(srv.url)
    yield client
    client.close()


def _public_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None) or list(vars(module))
    return [n for n in names if not n.startswith("_")
            and getattr(getattr(module, n), "__module__", "").startswith("labdaemon")]


@pytest.mark.parametrize(("theirs", "ours"), [
    (labdaemon, labd), (labdaemon.exceptions, labd.exceptions), (labdaemon.server, labd.server),
    (labdaemon.patterns, labd.patterns), (labdaemon.utils, labd.utils),
], ids=["labdaemon", "exceptions", "server", "patterns", "utils"])
def test_every_labdaemon_name_exists_under_labd(theirs: Any, ours: Any) -> None:
    missing = [n for n in _public_names(theirs) if not hasattr(ours, n)]
    assert not missing, f"{ours.__name__} lacks LabDaemon's {missing}"


def test_device_methods(api: ServerAPI) -> None:
    listed = api.list_devices()["devices"]
    assert [d["device_id"] for d in listed] == ["laser1", "pm1", "daq1"]
    laser = api.get_device("laser1")
    assert (laser["device_type"], laser["connected"], laser["owned_by"]) == ("SimLaser", True, None)
    methods = {m["name"]: m for m in api.get_device_methods("laser1")["methods"]}
    assert [p["name"] for p in methods["set_wavelength"]["parameters"]] == ["nm"]

    added = api.add_device("laser2", "SimLaser", wavelength=1555.0)
    assert (added["device_id"], added["connected"]) == ("laser2", False)
    assert api.connect_device("laser2")["connected"] is True
    assert api.call_device_method("laser2", "get_wavelength")["result"] == 1555.0
    assert api.call_device_method("laser2", "set_wavelength", args=[1560.0])["success"] is True
    api.call_device_method("laser2", "set_wavelength", kwargs={"nm": 1561.0})
    assert api.call_device_method("laser2", "get_wavelength")["result"] == 1561.0
    assert api.disconnect_device("laser2")["connected"] is False


def test_device_errors(api: ServerAPI) -> None:
    assert api.get_device_error("laser1") == {"error": None}
    with pytest.raises(ServerAPIError, match=r"^DeviceConfigurationError: .*out of range"):
        api.call_device_method("laser1", "set_wavelength", args=[99999.0])
    recorded = api.get_device_error("laser1")
    assert recorded is not None and "out of range" in recorded["error"]["message"]
    assert api.clear_device_error("laser1") is None  # it parses the answer: a 204 would fail
    assert api.get_device_error("laser1") == {"error": None}
    with pytest.raises(ServerAPIError, match=r"No device found with ID: 'ghost'"):
        api.get_device("ghost")


def test_task_methods(api: ServerAPI, srv: RunningServer) -> None:
    started = api.execute_task("sweep1", "WavelengthSweep",
                               params={**SWEEP, "steps": 100_000, "dwell": 0.001})
    assert (started["task_id"], started["device_ids"]) == ("sweep1", ["laser1", "pm1"])
    assert [t["task_id"] for t in api.list_tasks()["tasks"]] == ["sweep1"]
    assert api.get_task("sweep1")["running"] is True
    assert api.get_device("laser1")["owned_by"] == "sweep1"  # the task's id, as in LabDaemon
    with pytest.raises(ServerAPIError, match=r"^DeviceBusyError: .*'sweep1'"):
        api.call_device_method("laser1", "set_wavelength", args=[1550.0])

    assert api.pause_task("sweep1")["status"] == "paused"
    assert api.get_task("sweep1")["paused"] is True
    assert api.set_task_parameter("sweep1", "dwell", 0.0)["status"] == "parameter_set"
    assert srv.daemon.get_task("sweep1").get_parameter("dwell") == 0.0
    assert api.resume_task("sweep1")["status"] == "resumed"
    assert api.cancel_task("sweep1")["status"] == "cancellation_requested"
    with pytest.raises(labd.TaskCancelledError):
        srv.daemon.get_task("sweep1").wait(WATCHDOG_S)
    finished = api.get_task("sweep1")
    assert (finished["running"], finished["status"]) == (False, "cancelled")
    assert api.get_device("laser1")["owned_by"] is None


def test_task_errors(api: ServerAPI, srv: RunningServer) -> None:
    # The laser refuses 100 nm inside run(): the run fails and keeps the error record.
    api.execute_task("bad1", "WavelengthSweep",
                     params={**SWEEP, "start_wl": 100.0, "stop_wl": 101.0, "steps": 2})
    with pytest.raises(labd.TaskFailedError):
        srv.daemon.get_task("bad1").wait(WATCHDOG_S)
    recorded = api.get_task_error("bad1")
    assert recorded is not None and "out of range" in recorded["error"]["message"]
    assert api.clear_task_error("bad1") is None  # it parses the answer: a 204 would fail
    assert api.get_task_error("bad1") == {"error": None}
    with pytest.raises(ServerAPIError, match=r"^UnknownTaskTypeError: Unknown task type: 'Nope'"):
        api.execute_task("x1", "Nope")


def test_close_ends_the_session(srv: RunningServer) -> None:
    client = ServerAPI(srv.url)
    assert client.list_devices()["devices"]
    client.close()
    client.close()  # harmless again


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_ensure_server(srv: RunningServer) -> None:
    assert ensure_server(srv.url, timeout=WATCHDOG_S) is True
    assert ensure_server(_closed_port_url(), timeout=1.0) is False


def test_ensure_device(api: ServerAPI, srv: RunningServer) -> None:
    assert ensure_device(api, "laser1", "SimLaser")["connected"] is True  # there: as it is
    srv.daemon.disconnect_device("pm1")
    assert ensure_device(api, "pm1", "SimPowerMeter")["connected"] is True  # there: connected
    assert srv.daemon.device_info("pm1")["connected"] is True
    # LabDaemon 1.0.1 adds a missing device only if the error text contains "404"; its own
    # ServerAPI writes "<type>: <message>" without the status, against its own server too,
    # so there as here the missing device is an error that names it.
    with pytest.raises(ServerAPIError, match=r"No device found with ID: 'laser9'"):
        ensure_device(api, "laser9", "SimLaser")


def test_sse_client_streams_device_data(srv: RunningServer) -> None:
    events: list[dict[str, Any]] = []
    enough = threading.Event()

    def on_event(event: dict[str, Any]) -> None:  # on the client's thread
        events.append(event)
        if len(events) >= 3:
            enough.set()

    client = SSEClient(srv.url, on_event=on_event)
    client.start_device_stream("daq1")
    try:
        assert enough.wait(WATCHDOG_S), f"only {len(events)} events from daq1"
    finally:
        client.stop_stream(timeout=WATCHDOG_S)
        client._session.close()  # LabDaemon's SSEClient never closes its session itself
    first = events[0]
    assert first["event"] == "device_data"
    assert (first["data"]["device_id"], first["data"]["sequence"]) == ("daq1", int(first["id"]))
    assert isinstance(first["data"]["payload"], dict)  # the device's own block, as JSON
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
