"""labd.client against a real labd server (labd.testing.running_server) and a scripted SSE peer.

The server runs the simulated lab (laser1, pm1, daq1; task type WavelengthSweep) on
127.0.0.1. Waits are bounded watchdogs on threading.Event/Condition handshakes; nothing
sleeps and then asserts.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import labd
from labd.client import (
    AsyncServerAPI,
    ClientClosedError,
    RemoteDaemon,
    RemoteDeviceBusyError,
    RemoteTaskHandle,
    ServerAPI,
    ServerAPIError,
    ServerConnectionError,
    SSEClient,
    connect,
)
from labd.client.api import Endpoints
from labd.client.errors import error_from_answer, exception_from_record

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0  # every wait below is bounded by this; a pass never comes near it

# A sweep that runs until cancelled (1000 points, 50 ms each): it owns laser1 and pm1.
LONG_SWEEP: dict[str, Any] = {"laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549.0,
              "stop_wl": 1551.0, "steps": 1000, "dwell": 0.05}
SHORT_SWEEP: dict[str, Any] = {"laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549.0,
               "stop_wl": 1551.0, "steps": 5}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def server() -> Iterator[Any]:
    from labd.testing import running_server

    with running_server(demo=True) as srv:
        yield srv


@pytest.fixture
def api(server: Any) -> Iterator[ServerAPI]:
    with ServerAPI(server.url, owner="tester") as client:
        yield client


@pytest.fixture
def lab(server: Any) -> Iterator[RemoteDaemon]:
    with connect(server.url, owner="tester") as remote:
        yield remote


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Recorder:
    """An SSE callback that keeps events and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], what: str) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.events), timeout=WATCHDOG_S)
        assert ok, f"watchdog: {what} did not happen within {WATCHDOG_S} s; got {self.events[-5:]}"


# ---------------------------------------------------------------------------- the endpoint tour
Step = tuple[str, tuple[Any, ...], dict[str, Any]]


def endpoint_tour() -> Generator[Step, Any, None]:
    """Every Endpoints method once, with checks; driven by the sync and the async client."""
    info = yield ("server_info", (), {})
    assert info["name"] == "labd"
    health = yield ("health", (), {})
    assert health["status"] == "healthy"
    metrics = yield ("metrics_text", (), {})
    assert isinstance(metrics, str) and "# TYPE" in metrics
    devices = yield ("list_devices", (), {})
    assert {"laser1", "pm1", "daq1"} <= {d["device_id"] for d in devices["devices"]}
    laser = yield ("get_device", ("laser1",), {})
    assert laser["device_type"] == "SimLaser" and laser["connected"] is True
    methods = yield ("get_device_methods", ("laser1",), {})
    assert {"set_wavelength", "get_wavelength"} <= {m["name"] for m in methods["methods"]}
    device_types = yield ("device_types", (), {})
    assert "SimLaser" in {t["name"] for t in device_types["device_types"]}
    task_types = yield ("task_types", (), {})
    assert "WavelengthSweep" in {t["name"] for t in task_types["task_types"]}
    added = yield ("add_device", ("laser9", "SimLaser"), {"settling_time": 0.0})
    assert added["device_id"] == "laser9" and added["connected"] is False
    connected = yield ("connect_device", ("laser9",), {"timeout": 5.0})
    assert connected["connected"] is True
    assert (yield ("call", ("laser9", "set_wavelength", [1551.5]), {})) is None
    assert (yield ("call", ("laser9", "get_wavelength"), {"timeout": 5.0})) == 1551.5
    labdaemon_shape = yield ("call_device_method", ("laser9", "get_wavelength"), {})
    assert labdaemon_shape == {"result": 1551.5, "success": True}
    assert (yield ("get_device_error", ("laser9",), {})) is None
    with_error = yield ("call", ("laser9", "set_wavelength"), {"kwargs": {"nm": 9e9}})
    assert isinstance(with_error, labd.DeviceConfigurationError)
    stored = yield ("get_device_error", ("laser9",), {})
    assert stored["error"]["type"] == "DeviceConfigurationError" and stored["error"]["traceback"]
    assert (yield ("clear_device_error", ("laser9",), {})) is None
    assert (yield ("get_device_error", ("laser9",), {})) is None
    disconnected = yield ("disconnect_device", ("laser9",), {})
    assert disconnected["connected"] is False
    stopped = yield ("stop_device_stream", ("daq1",), {})
    assert stopped["status"] == "stopped"
    started = yield ("execute_task", ("tour1", "WavelengthSweep", LONG_SWEEP), {})
    assert started["task_id"] == "tour1" and set(started["device_ids"]) == {"laser1", "pm1"}
    tasks = yield ("list_tasks", (), {})
    assert "tour1" in {t["task_id"] for t in tasks["tasks"]}
    assert (yield ("get_task", ("tour1",), {}))["task_type"] == "WavelengthSweep"
    assert (yield ("pause_task", ("tour1",), {}))["status"] == "paused"
    assert (yield ("get_task", ("tour1",), {"timeout": 5.0}))["paused"] is True
    assert (yield ("resume_task", ("tour1",), {}))["status"] == "resumed"
    assert (yield ("set_task_parameter", ("tour1", "dwell", 0.01), {}))["status"] == "parameter_set"
    assert (yield ("get_task_parameter", ("tour1", "dwell"), {})) == 0.01
    assert (yield ("cancel_task", ("tour1",), {}))["status"] == "cancellation_requested"
    assert (yield ("get_task_error", ("tour1",), {})) is None
    assert (yield ("clear_task_error", ("tour1",), {})) is None
    lease = yield ("claim", (["laser9"],), {"ttl": 30.0})
    assert lease["owner"] == "tester" and lease["device_ids"] == ["laser9"]
    leases = yield ("list_leases", (), {})
    assert lease["lease_id"] in {item["lease_id"] for item in leases["leases"]}
    yield ("renew_lease", (lease["lease_id"],), {"ttl": 60.0})
    yield ("release_lease", (lease["lease_id"],), {})
    assert lease["lease_id"] not in {item["lease_id"] for item in (yield ("list_leases", (), {}))["leases"]}


def public_endpoints() -> set[str]:
    return {
        name for name, value in vars(Endpoints).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }


def _call_sync(api: ServerAPI, step: Step) -> Any:
    name, args, kwargs = step
    try:
        return getattr(api, name)(*args, **kwargs)
    except ServerAPIError as exc:  # the tour checks expected errors as values
        return exc


async def _call_async(api: AsyncServerAPI, step: Step) -> Any:
    name, args, kwargs = step
    try:
        return await getattr(api, name)(*args, **kwargs)
    except ServerAPIError as exc:
        return exc


def test_sync_client_drives_every_endpoint(api: ServerAPI) -> None:
    called: set[str] = set()
    tour = endpoint_tour()
    step = next(tour)
    try:
        while True:
            called.add(step[0])
            step = tour.send(_call_sync(api, step))
    except StopIteration:
        pass
    missing = public_endpoints() - called
    assert not missing, f"endpoint_tour() does not call {sorted(missing)}"


def test_async_client_drives_every_endpoint(server: Any) -> None:
    async def main() -> None:
        async with AsyncServerAPI(server.url, owner="tester") as api:
            tour = endpoint_tour()
            step = next(tour)
            try:
                while True:
                    step = tour.send(await _call_async(api, step))
            except StopIteration:
                pass
        assert api.closed

    asyncio.run(main())
# ---------------------------------------------------------------------------- errors
def test_busy_device_is_catchable_as_device_busy_error_and_server_api_error(api: ServerAPI) -> None:
    api.execute_task("busy1", "WavelengthSweep", LONG_SWEEP)
    try:
        with pytest.raises(labd.DeviceBusyError) as caught:
            api.call("laser1", "set_wavelength", [1550.5])
        exc = caught.value
        assert isinstance(exc, RemoteDeviceBusyError)  # a ServerAPIError and a DeviceBusyError
        with pytest.raises(ServerAPIError):
            api.call("laser1", "set_wavelength", [1550.5])
        assert exc.status_code == 409 and exc.error["type"] == "DeviceBusyError"
        assert [entry["device_id"] for entry in exc.busy] == ["laser1"]
        assert "busy1" in str(exc) and "409" in str(exc)
        # Queries are always allowed, even on an owned device.
        assert isinstance(api.call("laser1", "get_wavelength"), float)
        # A second run on the same devices is refused the same way.
        with pytest.raises(labd.DeviceBusyError):
            api.execute_task("busy2", "WavelengthSweep", SHORT_SWEEP)
    finally:
        api.cancel_task("busy1")


def test_unknown_ids_are_value_errors_with_404(api: ServerAPI) -> None:
    with pytest.raises(ValueError) as caught:
        api.get_device("nope")
    assert isinstance(caught.value, labd.UnknownDeviceError)
    assert isinstance(caught.value, ServerAPIError) and caught.value.status_code == 404
    assert "laser1" in str(caught.value)  # the message lists what exists
    with pytest.raises(labd.UnknownTaskError):
        api.get_task("no-such-run")
    with pytest.raises(labd.UnknownDeviceTypeError):
        api.add_device("laser7", "NoSuchType")
    with pytest.raises(labd.UnknownNameError):
        api.call("laser1", "no_such_method")


def test_bad_input_is_invalid_argument_error(api: ServerAPI) -> None:
    with pytest.raises(labd.InvalidArgumentError) as caught:
        api.call("laser1", "_emission")
    assert isinstance(caught.value, ServerAPIError) and caught.value.status_code == 400
    with pytest.raises(labd.InvalidArgumentError):
        api.call("laser1", "set_wavelength", ["a", "b", "c"])
    with pytest.raises(labd.InvalidArgumentError):  # refused before sending: '..' is no id
        api.get_device("..")
    with pytest.raises(labd.InvalidArgumentError):  # not JSON: refused before sending
        api.call("laser1", "set_wavelength", [object()])
    with pytest.raises(labd.InvalidArgumentError):
        api.add_device("laser8", "SimLaser", {"settling_time": 0.0}, settling_time=0.0)
    with pytest.raises(labd.InvalidArgumentError):
        api.claim("laser1")
    with pytest.raises(labd.InvalidArgumentError, match="list"):
        api.call("laser1", "set_wavelength", "1550")
    with pytest.raises(labd.InvalidArgumentError, match="positive"):
        api.call("laser1", "get_wavelength", timeout=-1)


def test_device_failure_is_the_device_error_subclass(api: ServerAPI) -> None:
    with pytest.raises(labd.DeviceConfigurationError) as caught:
        api.call("laser1", "set_wavelength", [9999.0])
    assert isinstance(caught.value, ServerAPIError) and caught.value.status_code == 502
    assert api.call("laser1", "get_wavelength") != 9999.0  # state unchanged
    api.clear_device_error("laser1")


def test_slow_call_is_a_device_timeout_error_and_a_driver_fault_an_operation_error() -> None:
    from labd.testing import BlockingDevice, FakeDevice, running_server

    with running_server() as srv:
        srv.daemon.register_plugins(devices={"Blocking": BlockingDevice, "Fake": FakeDevice})
        blocking = srv.daemon.add_device("slow1", "Blocking")
        srv.daemon.add_device("fake1", "Fake")
        with ServerAPI(srv.url) as api:
            try:
                with pytest.raises(labd.DeviceTimeoutError) as caught:
                    api.call("slow1", "block", timeout=0.2)
                assert isinstance(caught.value, ServerAPIError) and caught.value.status_code == 504
            finally:
                blocking.release.set()
            with pytest.raises(labd.DeviceOperationError) as fault:
                api.call("fake1", "fail", ["overheated"])
            assert isinstance(fault.value, ServerAPIError)
            assert fault.value.error["context"]["cause_type"] == "RuntimeError"
            assert "overheated" in str(fault.value)


def test_error_table_falls_back_on_status_codes() -> None:
    proxy = error_from_answer(504, b"<html>gateway</html>", "GET", "http://127.0.0.1:1/x")
    assert isinstance(proxy, labd.DeviceTimeoutError) and "gateway" in str(proxy)
    assert isinstance(error_from_answer(409, b"", "POST", "u"), labd.DeviceBusyError)
    assert isinstance(error_from_answer(404, b"{}", "GET", "u"), ValueError)
    assert isinstance(error_from_answer(502, b"", "GET", "u"), labd.DeviceOperationError)
    assert type(error_from_answer(418, b"", "GET", "u")) is ServerAPIError
    body = b'{"error": {"type": "LeaseError", "message": "expired"}}'
    lease_error = error_from_answer(409, body, "POST", "u")
    assert isinstance(lease_error, labd.LeaseError) and str(lease_error).startswith("expired")


def test_exception_from_record_rebuilds_builtin_and_labd_types() -> None:
    rebuilt = exception_from_record({"type": "AttributeError", "message": "no set_output"})
    assert type(rebuilt) is AttributeError and str(rebuilt) == "no set_output"
    assert isinstance(exception_from_record({"type": "DeviceBusyError", "message": "m"}),
                      labd.DeviceBusyError)
    custom = exception_from_record({"type": "GPIBError", "message": "bus fault"})
    assert isinstance(custom, ServerAPIError) and "GPIBError" in str(custom)


def test_unreachable_server_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with ServerAPI(url, timeout=2.0) as api, pytest.raises(ServerConnectionError) as caught:
        api.list_devices()
    exc = caught.value
    assert isinstance(exc, ServerAPIError) and isinstance(exc, ConnectionError)
    assert url in str(exc) and "labd serve" in str(exc)
    with pytest.raises(ServerConnectionError):
        connect(url, timeout=2.0)


def test_closed_client_says_so(server: Any) -> None:
    api = ServerAPI(server.url)
    api.close()
    api.close()  # idempotent
    assert api.closed
    with pytest.raises(ClientClosedError, match="closed"):
        api.health()


def test_async_client_mirrors_errors(server: Any) -> None:
    async def main() -> None:
        async with AsyncServerAPI(server.url) as api:
            with pytest.raises(labd.UnknownDeviceError):
                await api.get_device("nope")
        with pytest.raises(ClientClosedError):
            await api.health()

    asyncio.run(main())


def test_owner_header_and_leases_decide_who_may_command(server: Any) -> None:
    with ServerAPI(server.url, owner="alice") as alice, ServerAPI(server.url, owner="bob") as bob:
        lease = alice.claim(["laser1"], ttl=30.0)
        try:
            assert lease["owner"] == "alice"
            alice.call("laser1", "set_wavelength", [1552.0])
            with pytest.raises(labd.DeviceBusyError):
                bob.call("laser1", "set_wavelength", [1553.0])
            assert bob.call("laser1", "get_wavelength") == 1552.0
        finally:
            alice.release_lease(lease["lease_id"])
        bob.call("laser1", "set_wavelength", [1553.0])


# ---------------------------------------------------------------------------- remote proxies
def test_remote_device_feels_local(lab: RemoteDaemon) -> None:
    laser = lab.get_device("laser1")
    laser.set_wavelength(1550.25)
    assert laser.get_wavelength() == 1550.25
    laser.set_wavelength(nm=1550.5)
    assert laser.get_wavelength() == 1550.5
    assert isinstance(lab.get_device("pm1").get_power(), float)
    assert "set_wavelength" in dir(laser) and "set_wavelength" in laser.method_names
    assert "nm" in inspect.signature(laser.set_wavelength).parameters
    assert laser.set_wavelength.__doc__ and laser.set_wavelength.kind == "command"
    assert laser.device_id == "laser1"
    with pytest.raises(AttributeError, match="get_wavelength"):  # lists the methods
        laser.get_wavelenght()
    with pytest.raises(AttributeError):
        laser.wavelength = 3
    with pytest.raises(labd.DeviceConfigurationError):
        laser.set_wavelength(1.0)
    with pytest.raises(ValueError):
        lab.get_device("nope")


def test_remote_daemon_lists_adds_and_connects(lab: RemoteDaemon) -> None:
    assert {"laser1", "pm1", "daq1"} <= {d["device_id"] for d in lab.list_devices()}
    laser = lab.add_device("laser5", "SimLaser", settling_time=0.0)
    assert lab.device_info("laser5")["connected"] is False
    lab.connect_device(laser)
    laser.set_wavelength(1560.0)
    assert lab.call_device("laser5", "get_wavelength") == 1560.0
    lab.disconnect_device("laser5")
    with pytest.raises(labd.DeviceNotConnectedError):
        laser.get_wavelength()
    assert any(m["name"] == "get_power" for m in lab.device_methods("pm1"))
    assert lab.health()["status"] == "healthy"


def test_remote_task_handle_completed(lab: RemoteDaemon) -> None:
    handle = lab.execute_task("run-ok", "WavelengthSweep", **SHORT_SWEEP)
    assert isinstance(handle, RemoteTaskHandle) and handle.task_id == "run-ok"
    result = handle.wait(timeout=WATCHDOG_S)
    assert result["status"] == "completed" and len(result["results"]) == 5
    assert handle.status == "completed" and not handle.is_running() and not handle.is_paused()
    assert handle.result == result and handle.exception() is None and handle.error is None
    assert handle.progress is not None and handle.progress["done"] == 5
    assert handle.task_type == "WavelengthSweep" and set(handle.device_ids) == {"laser1", "pm1"}
    assert "run-ok" in {t["task_id"] for t in lab.list_tasks()}
    assert lab.get_task("run-ok").wait(timeout=WATCHDOG_S) == result
    handle.cancel()  # no effect once finished, as locally


def test_remote_task_handle_cancelled_with_partial_result(lab: RemoteDaemon) -> None:
    handle = lab.execute_task("run-cancel", "WavelengthSweep", **LONG_SWEEP)
    try:
        with pytest.raises(TimeoutError, match="run-cancel"):
            handle.wait(timeout=0.05)
        assert handle.is_running()
        assert handle.get_parameter("dwell") == 0.05
        handle.set_parameter("dwell", 0.02)
        assert handle.get_parameter("dwell") == 0.02
        handle.pause()
        assert handle.is_paused() and handle.status == "paused"
        handle.resume()
        assert not handle.is_paused()
    finally:
        handle.cancel()
    with pytest.raises(labd.TaskCancelledError) as caught:
        handle.wait(timeout=WATCHDOG_S)
    assert isinstance(caught.value.result, dict) and caught.value.result["status"] == "cancelled"
    assert handle.status == "cancelled"


def test_remote_task_handle_failed_rebuilds_the_exception(lab: RemoteDaemon) -> None:
    # daq1 has no set_output: run() raises AttributeError on the server.
    handle = lab.execute_task(None, "WavelengthSweep", **{**SHORT_SWEEP, "laser_id": "daq1"})
    with pytest.raises(labd.TaskFailedError) as caught:
        handle.wait(timeout=WATCHDOG_S)
    assert isinstance(caught.value.__cause__, AttributeError)
    assert "set_output" in str(caught.value)
    assert isinstance(handle.exception(), AttributeError)
    assert handle.error is not None and handle.error["type"] == "AttributeError"
    assert handle.status == "failed"


def test_task_context_cancels_on_exit(lab: RemoteDaemon) -> None:
    with lab.task_context("run-ctx", "WavelengthSweep", **LONG_SWEEP) as handle:
        assert handle.is_running()
    with pytest.raises(labd.TaskCancelledError):
        handle.wait(timeout=WATCHDOG_S)


def test_remote_lease_acts_as_holder_inside_with(server: Any) -> None:
    with connect(server.url) as lab, connect(server.url, owner="bob") as other:
        laser = lab.get_device("laser1")
        with pytest.raises(labd.InvalidArgumentError, match="owner"):
            lab.claim(["laser1"])  # no owner anywhere
        with lab.claim(["laser1"], owner="alice", ttl=30.0) as lease:
            assert lease.owner == "alice" and lease.device_ids == ["laser1"] and lease.is_active()
            laser.set_wavelength(1554.0)  # acts as alice inside the block
            lease.renew(30.0)
            with pytest.raises(labd.DeviceBusyError):
                other.get_device("laser1").set_wavelength(1555.0)
            assert lease.lease_id in {item["lease_id"] for item in lab.list_leases()}
        assert not lease.is_active()
        lease.release()  # idempotent
        other.get_device("laser1").set_wavelength(1555.0)
        with pytest.raises(labd.LeaseError):
            lease.__enter__()


# ---------------------------------------------------------------------------- SSE, real server
def test_sse_device_stream_and_reconnect_after_server_side_stop(server: Any, api: ServerAPI) -> None:
    recorder = Recorder()
    client = SSEClient(server.url, recorder, backoff=0.05)
    client.start_device_stream("daq1")
    try:
        recorder.wait_for(lambda events: len(events) >= 3, "3 daq1 events")
        first = recorder.events[0]
        assert first["event"] == "device_data" and first["id"] == str(first["data"]["sequence"])
        assert first["data"]["device_id"] == "daq1" and isinstance(first["data"]["payload"], dict | list)
        assert client.connections == 1 and client.last_event_id is not None
        seen = len(recorder.events)
        api.stop_device_stream("daq1")  # ends every subscription: the SSE connection closes
        recorder.wait_for(lambda events: len(events) >= seen + 3, "events after reconnecting")
        assert client.reconnects >= 1 and client.connections >= 2
        assert client.received == len(recorder.events)
    finally:
        assert client.stop_stream(timeout=5.0)
    assert not client.is_running()


def test_sse_reconnects_to_a_server_restarted_on_the_same_port(daemon: labd.LabDaemon) -> None:
    from labd.server import LabDaemonServer
    from labd.sim import demo_lab

    demo_lab(daemon)
    first = LabDaemonServer(daemon, port=0)
    first.start()
    recorder = Recorder()
    client = SSEClient(first.url, recorder, backoff=0.02, max_backoff=0.2)
    second: LabDaemonServer | None = None
    try:
        client.start_device_stream("daq1")
        recorder.wait_for(lambda events: len(events) >= 2, "events from the first server")
        first.stop()
        seen = len(recorder.events)
        second = LabDaemonServer(daemon, port=first.port)
        second.start()
        recorder.wait_for(lambda events: len(events) >= seen + 2, "events from the restarted server")
        assert client.connections >= 2 and client.reconnects >= 1
    finally:
        assert client.stop_stream(timeout=5.0)
        first.stop()
        if second is not None:
            second.stop()


def test_sse_task_stream_ends_after_finished(server: Any, api: ServerAPI) -> None:
    api.execute_task("streamed", "WavelengthSweep", LONG_SWEEP)
    recorder = Recorder()
    # The two-argument callback form: on_event(name, data).
    client = SSEClient(server.url, lambda name, data: recorder({"event": name, "data": data}))
    client.start_task_stream("streamed")
    try:
        recorder.wait_for(lambda events: len(events) >= 1, "the first task event")
        api.cancel_task("streamed")
        assert client.join(timeout=WATCHDOG_S), "the task stream did not end after `finished`"
    finally:
        client.stop_stream()
    names = [event["event"] for event in recorder.events]
    assert names[0] == "state" and names[-1] == "finished"
    assert recorder.events[-1]["data"]["status"] == "cancelled"
    assert client.error is None and client.reconnects == 0


def test_sse_event_stream_sees_daemon_events(server: Any, api: ServerAPI) -> None:
    recorder = Recorder()
    with SSEClient(server.url, recorder) as client:
        client.start_event_stream()
        assert client.wait_connected(WATCHDOG_S)
        api.add_device("laser6", "SimLaser")
        recorder.wait_for(
            lambda events: any(e["event"] == "device_added" for e in events), "device_added"
        )
    assert not client.is_running()


def test_sse_unknown_device_ends_without_retrying(server: Any) -> None:
    client = SSEClient(server.url, Recorder())
    client.start_device_stream("nope")
    assert client.join(timeout=WATCHDOG_S)
    assert isinstance(client.error, labd.UnknownDeviceError) and client.reconnects == 0


# ---------------------------------------------------------------------------- SSE, scripted peer
class ScriptedSSE:
    """An HTTP server on 127.0.0.1 that answers each GET with the next scripted reply.

    A reply is an int (that error status, with a labd error body) or a list of byte chunks
    sent one write at a time; after the last chunk of the last reply the connection stays
    open until the test ends. Request headers are kept in ``requests``.
    """

    def __init__(self, replies: list[int | list[bytes]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers.items()))
                reply = outer.replies.pop(0) if outer.replies else []
                if isinstance(reply, int):
                    body = b'{"error": {"type": "UnknownDeviceError", "message": "scripted"}}'
                    self.send_response(reply)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for chunk in reply:
                    self.wfile.write(chunk)
                if not outer.replies:
                    outer.release.wait(WATCHDOG_S)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="scripted-sse"
        )
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(WATCHDOG_S)


@pytest.fixture
def scripted() -> Iterator[Callable[[list[int | list[bytes]]], ScriptedSSE]]:
    servers: list[ScriptedSSE] = []

    def make(replies: list[int | list[bytes]]) -> ScriptedSSE:
        servers.append(ScriptedSSE(replies))
        return servers[-1]

    yield make
    for srv in servers:
        srv.close()


def sse_event(sequence: int, *, crlf: bool = False) -> bytes:
    text = (f"id: {sequence}\nevent: device_data\n"
            f'data: {{"event": "device_data", "sequence": {sequence}, "payload": [{sequence}]}}\n\n')
    return text.replace("\n", "\r\n").encode() if crlf else text.encode()


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def test_sse_parses_split_chunks_counts_gaps_and_resumes_with_last_event_id(
    scripted: Callable[[list[int | list[bytes]]], ScriptedSSE],
) -> None:
    first = sse_event(1) + b": keep-alive\n\n" + sse_event(2, crlf=True) + sse_event(5)
    peer = scripted([bytewise(first), [sse_event(6)]])
    recorder = Recorder()
    client = SSEClient(peer.url, recorder, backoff=0.01)
    client.start_device_stream("daq1")
    try:
        recorder.wait_for(lambda events: len(events) >= 4, "4 scripted events")
    finally:
        assert client.stop_stream(timeout=5.0)
    assert [e["data"]["sequence"] for e in recorder.events] == [1, 2, 5, 6]
    assert recorder.events[0] == {"event": "device_data", "id": "1",
                                  "data": {"event": "device_data", "sequence": 1, "payload": [1]}}
    assert client.gaps == 2 and client.received == 4
    assert client.reconnects == 1 and client.connections == 2
    assert "last-event-id" not in {k.lower() for k in peer.requests[0]}
    assert {k.lower(): v for k, v in peer.requests[1].items()}["last-event-id"] == "5"


def test_sse_retries_server_errors_then_follows(
    scripted: Callable[[list[int | list[bytes]]], ScriptedSSE],
) -> None:
    peer = scripted([503, [sse_event(1)]])
    recorder = Recorder()
    with SSEClient(peer.url, recorder, backoff=0.01) as client:
        client.start_device_stream("daq1")
        recorder.wait_for(lambda events: len(events) == 1, "the event after a 503")
        assert client.reconnects == 1 and client.connections == 1


def test_sse_gives_up_after_max_retries() -> None:
    client = SSEClient(f"http://127.0.0.1:{free_port()}", Recorder(), max_retries=2, backoff=0.01)
    client.start_device_stream("daq1")
    assert client.join(timeout=WATCHDOG_S)
    assert isinstance(client.error, ServerConnectionError) and "2 reconnect" in str(client.error)
    assert client.reconnects == 2


def test_sse_without_reconnect_ends_at_the_first_drop(
    scripted: Callable[[list[int | list[bytes]]], ScriptedSSE],
) -> None:
    peer = scripted([[sse_event(1)], [sse_event(2)]])
    client = SSEClient(peer.url, Recorder(), reconnect=False)
    client.start_device_stream("daq1")
    assert client.join(timeout=WATCHDOG_S)
    assert client.received == 1 and client.reconnects == 0 and len(peer.requests) == 1


def test_sse_stop_returns_while_the_stream_is_silent(
    scripted: Callable[[list[int | list[bytes]]], ScriptedSSE],
) -> None:
    peer = scripted([[]])  # connected, then nothing at all
    client = SSEClient(peer.url, Recorder())
    client.start_device_stream("daq1")
    assert client.wait_connected(WATCHDOG_S)
    with pytest.raises(RuntimeError, match="already following"):
        client.start_device_stream("daq1")
    assert client.stop_stream(timeout=5.0)
    assert not client.is_running() and not client.is_connected()
    assert client.stop_stream() is True  # idempotent


def test_sse_stop_from_inside_the_callback(
    scripted: Callable[[list[int | list[bytes]]], ScriptedSSE],
) -> None:
    peer = scripted([[sse_event(1), sse_event(2)]])
    stopped: list[bool] = []

    def on_event(event: dict[str, Any]) -> None:
        stopped.append(client.stop_stream())

    client = SSEClient(peer.url, on_event)
    client.start_device_stream("daq1")
    assert client.join(timeout=WATCHDOG_S)
    assert stopped == [False]  # it could not join itself; the thread ended after the callback


def test_sse_callback_errors_are_counted_not_fatal(
    scripted: Callable[[list[int | list[bytes]]], ScriptedSSE],
) -> None:
    peer = scripted([[sse_event(1), sse_event(2)]])
    recorder = Recorder()

    def on_event(event: dict[str, Any]) -> None:
        recorder(event)
        raise RuntimeError("callback bug")

    with SSEClient(peer.url, on_event) as client:
        client.start_device_stream("daq1")
        recorder.wait_for(lambda events: len(events) == 2, "both events despite the errors")
        assert client.callback_errors == 2


def test_sse_rejects_callbacks_of_the_wrong_shape() -> None:
    with pytest.raises(labd.InvalidArgumentError, match="one argument"):
        SSEClient("http://127.0.0.1:1", lambda a, b, c: None)
