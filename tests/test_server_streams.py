"""labd.server Server-Sent Events: fan-out to many clients, slow clients, replay, shutdown.

Clients are real HTTP connections to a real uvicorn server. Each reader runs on its own
thread and reports through ``threading.Event``/``Condition`` handshakes; a device's items are
pushed on demand with ``labd.testing.FakeStreamer.push``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from labd.testing import FakeStreamer, RunningServer, gated_task, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0


class SSEReader(threading.Thread):
    """Reads one SSE stream on a thread; collects ``(event, data, id)`` and comment lines."""

    def __init__(self, url: str, *, stop_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(name=f"test-sse-reader-{url.rsplit('/', 1)[-1]}", daemon=True)
        self.url = url
        self.stop_after = stop_after
        self.headers = headers or {}
        self.connected = threading.Event()
        self.status: int | None = None
        self.events: list[tuple[str, Any, str | None]] = []
        self.comments: list[str] = []
        self.error: BaseException | None = None
        self._changed = threading.Condition()

    def run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(WATCHDOG_S)) as http, \
                    http.stream("GET", self.url, headers=self.headers) as answer:
                self.status = answer.status_code
                self.connected.set()
                self._read(answer)
        except BaseException as exc:  # reported by the test via .error
            self.error = exc
        finally:
            self.connected.set()
            with self._changed:
                self._changed.notify_all()

    def _read(self, answer: httpx.Response) -> None:
        event, data, event_id = "message", [], None
        for line in answer.iter_lines():
            if line.startswith(":"):
                with self._changed:
                    self.comments.append(line)
                    self._changed.notify_all()
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line == "" and data:
                with self._changed:
                    self.events.append((event, json.loads("\n".join(data)), event_id))
                    self._changed.notify_all()
                event, data, event_id = "message", [], None
                if self.stop_after is not None and len(self.events) >= self.stop_after:
                    return

    def wait_for(self, count: int, timeout: float = WATCHDOG_S) -> list[tuple[str, Any, str | None]]:
        """Block until ``count`` events arrived (or the stream ended); fail after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: len(self.events) >= count or not self.is_alive(), timeout
            ):
                pytest.fail(f"{self.url}: got {len(self.events)} of {count} events in {timeout} s")
            return list(self.events)

    def wait_for_comment(self, timeout: float = WATCHDOG_S) -> str:
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self.comments), timeout):
                pytest.fail(f"{self.url}: no keep-alive comment in {timeout} s")
            return self.comments[0]

    def finish(self) -> None:
        self.join(WATCHDOG_S)
        assert not self.is_alive(), f"reader of {self.url} did not end"


def handed_over(client_stats: Callable[[], dict[str, Any]], count: int) -> None:
    """Watchdog: wait until the server's loop has handed ``count`` items to an SSE client.

    A publish only queues the item for the loop; the loop hands it to each client's buffer
    when it next runs, so a test that counts a client's drops waits for that first.
    """
    deadline = time.monotonic() + WATCHDOG_S
    while True:
        stats = client_stats()
        if stats["delivered"] + stats["queued"] + stats["dropped"] >= count:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the server's loop handed {stats} of {count} items over in {WATCHDOG_S} s")
        time.sleep(0.0005)


def start_reader(url: str, **kwargs: Any) -> SSEReader:
    reader = SSEReader(url, **kwargs)
    reader.start()
    assert reader.connected.wait(WATCHDOG_S), f"{url}: no answer"
    assert reader.status == 200, (reader.status, reader.error)
    return reader


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    release = threading.Event()
    with running_server() as running:
        running.daemon.register_plugins(devices={"Streamer": FakeStreamer},
                                        tasks={"Hold": gated_task(release)})
        for device_id in ("s1", "s2"):
            running.daemon.add_device(device_id, "Streamer")
            running.daemon.connect_device(device_id)
        try:
            yield running
        finally:
            release.set()


def streamer(srv: RunningServer, device_id: str = "s1") -> FakeStreamer:
    device: FakeStreamer = srv.daemon.get_device(device_id)
    return device


def test_ten_clients_receive_the_same_sequence_numbers(srv: RunningServer) -> None:
    readers = [start_reader(f"{srv.url}/stream/devices/s1", stop_after=50) for _ in range(10)]
    device = streamer(srv)
    assert device.started.is_set()
    assert srv.daemon.stream_hub("s1").stats()["subscribers"] == 10  # type: ignore[union-attr]
    for i in range(50):
        device.push({"i": i, "samples": np.arange(3.0) * i})
    expected = list(range(1, 51))
    for reader in readers:
        events = reader.wait_for(50)
        assert [body["sequence"] for _, body, _ in events] == expected
        assert [event_id for _, _, event_id in events] == [str(n) for n in expected]
        event, body, _ = events[7]
        assert event == "device_data"
        assert body["device_id"] == "s1"
        assert body["payload"] == {"i": 7, "samples": [0.0, 7.0, 14.0]}
        assert body["timestamp"].endswith("Z")
        reader.finish()
    # The last client left, so the stream the clients started stopped.
    assert device.stopped.wait(WATCHDOG_S)


def test_a_client_that_stops_reading_loses_only_its_own_items(srv: RunningServer) -> None:
    reader = start_reader(f"{srv.url}/stream/devices/s1")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", srv.server.port))
    try:
        stalled.sendall(b"GET /stream/devices/s1?maxsize=8 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:  # read the headers, then never read again
            head += stalled.recv(1)
        assert head.startswith(b"HTTP/1.1 200")
        hub = srv.daemon.stream_hub("s1")
        assert hub is not None

        def stalled_stats() -> dict[str, Any]:  # the server's SSE clients share one subscription
            return next(client for sub in hub.stats()["subscriptions"]
                        for client in sub.get("receiver_stats", ()) if client["maxsize"] == 8)

        device, payload, pushed = streamer(srv), "x" * 32_768, 0
        while stalled_stats()["dropped"] == 0:
            assert pushed < 900, "the stalled client never dropped anything"
            device.push(payload)
            pushed += 1
            handed_over(stalled_stats, pushed)
            assert stalled_stats()["queued"] <= 8  # bounded memory for the stalled client
        events = reader.wait_for(pushed)
        assert [body["sequence"] for _, body, _ in events] == list(range(1, pushed + 1))
        assert all(body["payload"] == payload for _, body, _ in events)
        assert stalled_stats()["delivered"] < pushed
    finally:
        stalled.close()
    srv.daemon.stop_streaming("s1")
    reader.finish()


def test_last_event_id_replays_what_the_client_missed(srv: RunningServer) -> None:
    # A pinned subscriber keeps the stream (and its history) alive between the clients.
    keeper = srv.daemon.start_streaming("s1", lambda item: None)
    try:
        first = start_reader(f"{srv.url}/stream/devices/s1", stop_after=3)
        device = streamer(srv)
        for i in range(3):
            device.push(i)
        assert [body["payload"] for _, body, _ in first.wait_for(3)] == [0, 1, 2]
        first.finish()
        for i in range(3, 6):
            device.push(i)
        again = start_reader(f"{srv.url}/stream/devices/s1", stop_after=4,
                             headers={"Last-Event-ID": "2"})
        device.push(6)
        events = again.wait_for(4)
        assert [body["sequence"] for _, body, _ in events] == [3, 4, 5, 6]
        again.finish()
        by_query = start_reader(f"{srv.url}/stream/devices/s1?last_event_id=5", stop_after=1)
        assert [body["payload"] for _, body, _ in by_query.wait_for(1)] == [5]
        by_query.finish()
    finally:
        keeper.close()


def test_stopping_the_device_stream_ends_every_client_stream(srv: RunningServer) -> None:
    readers = [start_reader(f"{srv.url}/stream/devices/s1") for _ in range(3)]
    streamer(srv).push("last")
    answer = httpx.post(f"{srv.url}/devices/s1/stream/stop").json()
    assert answer["status"] == "stopped" and answer["device_id"] == "s1"
    for reader in readers:
        reader.finish()
        assert reader.error is None
        assert [body["payload"] for _, body, _ in reader.events] == ["last"]
    assert httpx.get(f"{srv.url}/devices/s1").json()["streaming"] is False


def test_unserialisable_items_become_stream_errors_and_the_stream_goes_on(srv: RunningServer) -> None:
    reader = start_reader(f"{srv.url}/stream/devices/s1", stop_after=3)
    device = streamer(srv)
    device.push(1.5)
    device.push(object())
    device.push(float("nan"))
    events = reader.wait_for(3)
    assert [event for event, _, _ in events] == ["device_data", "stream_error", "device_data"]
    assert events[1][1]["error"]["type"] == "UnserializableResult"
    assert events[2][1]["payload"] is None
    reader.finish()


def test_large_payloads_are_sent_intact(srv: RunningServer) -> None:
    reader = start_reader(f"{srv.url}/stream/devices/s1", stop_after=2)
    block = np.linspace(0.0, 1.0, 100_000)
    device = streamer(srv)
    device.push(block)
    device.push({"block": block[::2]})
    events = reader.wait_for(2)
    assert events[0][1]["payload"] == block.tolist()
    assert events[1][1]["payload"]["block"] == block[::2].tolist()
    reader.finish()


def test_a_streaming_error_answer_is_json_not_a_stream(srv: RunningServer) -> None:
    answer = httpx.get(f"{srv.url}/stream/devices/ghost")
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "UnknownDeviceError"
    assert httpx.head(f"{srv.url}/stream/devices/s1").status_code == 405
    assert streamer(srv).is_streaming() is False  # a probe does not start the instrument


def test_task_stream_starts_with_state_and_ends_after_finished(srv: RunningServer) -> None:
    release = threading.Event()
    srv.daemon.register_plugins(tasks={"Hold2": gated_task(release)})
    task_id = httpx.post(f"{srv.url}/tasks", json={"task_type": "Hold2"}).json()["task_id"]
    reader = start_reader(f"{srv.url}/stream/tasks/{task_id}")
    first = reader.wait_for(1)[0]
    assert first[0] == "state"
    assert first[1]["status"] in ("pending", "running") and first[1]["task_id"] == task_id
    httpx.post(f"{srv.url}/tasks/{task_id}/pause")
    release.set()
    httpx.post(f"{srv.url}/tasks/{task_id}/resume")
    reader.finish()  # the stream ended by itself after "finished"
    names = [event for event, _, _ in reader.events]
    assert names[-1] == "finished"
    assert reader.events[-1][1]["status"] == "completed"
    assert "state" in names[1:]
    sequences = [body["sequence"] for _, body, _ in reader.events[1:]]
    assert sequences == sorted(sequences)


def test_task_stream_of_a_finished_run_sends_state_and_finished(srv: RunningServer) -> None:
    release = threading.Event()
    release.set()
    srv.daemon.register_plugins(tasks={"Quick": gated_task(release)})
    handle = srv.daemon.execute_task("quick1", "Quick")
    handle.wait(WATCHDOG_S)
    reader = start_reader(f"{srv.url}/stream/tasks/quick1")
    reader.finish()
    assert [(event, body["status"]) for event, body, _ in reader.events] == [
        ("state", "completed"), ("finished", "completed")]


def test_events_stream_reports_daemon_events(srv: RunningServer) -> None:
    reader = start_reader(f"{srv.url}/stream/events")
    httpx.post(f"{srv.url}/devices", json={"device_id": "s3", "device_type": "Streamer"})
    events = reader.wait_for(1)
    assert events[0][0] == "device_added"
    assert events[0][1]["device_id"] == "s3"
    assert int(events[0][2] or 0) == events[0][1]["sequence"]
    replayed = start_reader(f"{srv.url}/stream/events?last_event_id=0", stop_after=1)
    assert replayed.wait_for(1)[0][0] == "device_added"
    replayed.finish()
    srv.server.stop()
    reader.finish()


def test_keep_alive_comments() -> None:
    with running_server(stream_ping=0.05) as running:
        reader = start_reader(f"{running.url}/stream/events")
        assert reader.wait_for_comment().startswith(": ping")
        running.server.stop()
        reader.finish()


def test_stop_returns_quickly_with_ten_clients_and_frees_the_port(srv: RunningServer) -> None:
    readers = [start_reader(f"{srv.url}/stream/devices/s{1 + i % 2}") for i in range(8)]
    readers += [start_reader(f"{srv.url}/stream/events") for _ in range(2)]
    port = srv.server.port
    began = time.monotonic()
    srv.server.stop()
    elapsed = time.monotonic() - began
    assert elapsed < 2.0, f"stop() took {elapsed:.2f} s with 10 SSE clients"
    for reader in readers:
        reader.finish()
        assert reader.error is None, reader.error
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    assert not streamer(srv, "s1").is_streaming()
    assert not streamer(srv, "s2").is_streaming()


class BrokenStreamer(FakeStreamer):
    def start_streaming(self, callback: Any, **params: Any) -> None:
        raise OSError("DAQ card not found")


def test_a_device_that_fails_to_stream_is_502(srv: RunningServer) -> None:
    srv.daemon.register_plugins(devices={"Broken": BrokenStreamer})
    srv.daemon.add_device("b1", "Broken")
    answer = httpx.get(f"{srv.url}/stream/devices/b1")
    assert answer.status_code == 502
    record = answer.json()["error"]
    assert record["type"] == "DeviceOperationError"
    assert record["context"]["cause_type"] == "OSError"
    assert 'labd_sse_clients{kind="device"} 0.0' in httpx.get(f"{srv.url}/metrics").text


class ProgressTask:
    """Waits for ``go``, then reports three steps of progress and data."""

    go = threading.Event()

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def run(self, context: Any) -> dict[str, Any]:
        if not ProgressTask.go.wait(WATCHDOG_S):
            return {"status": "failed", "error": "never told to go"}
        for i in range(3):
            context.progress(i + 1, 3, f"step {i}")
            context.emit({"i": i, "trace": np.arange(2.0) * i})
        return {"status": "completed"}


def test_task_stream_carries_progress_and_data(srv: RunningServer) -> None:
    ProgressTask.go.clear()
    srv.daemon.register_plugins(tasks={"Progress": ProgressTask})
    httpx.post(f"{srv.url}/tasks", json={"task_id": "prog1", "task_type": "Progress"})
    reader = start_reader(f"{srv.url}/stream/tasks/prog1")
    reader.wait_for(1)
    ProgressTask.go.set()
    reader.finish()
    progress = [body for event, body, _ in reader.events if event == "progress"]
    data = [body for event, body, _ in reader.events if event == "data"]
    assert [(p["done"], p["total"], p["message"]) for p in progress] == [
        (1, 3, "step 0"), (2, 3, "step 1"), (3, 3, "step 2")]
    assert progress[-1]["fraction"] == 1.0 and progress[0]["task_id"] == "prog1"
    assert [d["data"] for d in data] == [{"i": i, "trace": [0.0, float(i)]} for i in range(3)]
    assert reader.events[-1][0] == "finished"


# -- one loop wake-up per publish, capped clients and buffers (issue 7, item 12) --------------


def watch_until(condition: Any, what: str) -> None:
    """A watchdog: wait (bounded) for a condition the server reaches on its own thread."""
    deadline = time.monotonic() + WATCHDOG_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {WATCHDOG_S} s")
        time.sleep(0.005)


@contextlib.contextmanager
def lab_server(**server_kw: Any) -> Iterator[RunningServer]:
    """A running server (``server_kw`` go to LabDaemonServer) with one FakeStreamer ``s1``."""
    with running_server(**server_kw) as running:
        running.daemon.register_plugins(devices={"Streamer": FakeStreamer})
        running.daemon.add_device("s1", "Streamer")
        running.daemon.connect_device("s1")
        yield running


def test_sse_clients_of_a_stream_share_one_subscription(srv: RunningServer) -> None:
    readers = [start_reader(f"{srv.url}/stream/devices/s1", stop_after=20) for _ in range(10)]
    hub = srv.daemon.stream_hub("s1")
    assert hub is not None
    # One subscription, so a publish wakes the server's loop once, not once per client.
    assert len(hub.subscriptions) == 1
    assert hub.stats()["subscribers"] == 10
    device = streamer(srv)
    for i in range(20):
        device.push(i)
    for reader in readers:
        assert [body["sequence"] for _, body, _ in reader.wait_for(20)] == list(range(1, 21))
        reader.finish()
    assert device.stopped.wait(WATCHDOG_S), "the last client left but the stream kept running"


def test_a_stream_takes_at_most_stream_max_clients_and_answers_503_beyond() -> None:
    with lab_server(stream_max_clients=2) as running:
        url = f"{running.url}/stream/devices/s1"
        readers = [start_reader(url, stop_after=1) for _ in range(2)]
        answer = httpx.get(url, timeout=WATCHDOG_S)
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["type"] == "StreamFull"
        assert "/stream/devices/s1" in error["message"]
        assert "stream_max_clients=2" in error["message"]
        assert error["context"] == {"stream": "/stream/devices/s1", "max_clients": 2}
        # The cap is per stream: another stream still takes clients.
        events = start_reader(f"{running.url}/stream/events")
        # A client that leaves frees its place.
        streamer(running).push("bye")
        for reader in readers:
            reader.wait_for(1)
            reader.finish()
        hub = running.daemon.stream_hub("s1")
        watch_until(lambda: hub is None or hub.stats()["subscribers"] == 0,
                    "the server did not notice that its clients left")
        again = start_reader(url)
        running.server.stop()
        again.finish()
        events.finish()


def test_a_stalled_clients_buffer_is_capped_in_bytes_as_well_as_items() -> None:
    with lab_server(stream_max_bytes=100_000) as running:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", running.server.port))
        try:
            stalled.sendall(b"GET /stream/devices/s1?maxsize=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:  # read the headers, then never read again
                head += stalled.recv(1)
            assert head.startswith(b"HTTP/1.1 200")
            hub = running.daemon.stream_hub("s1")
            assert hub is not None

            def stalled_stats() -> dict[str, Any]:
                return next(client for sub in hub.stats()["subscriptions"]
                            for client in sub.get("receiver_stats", ()))

            device, payload, pushed = streamer(running), "x" * 32_768, 0
            while stalled_stats()["dropped"] == 0:
                assert pushed < 900, "the stalled client never dropped anything"
                device.push(payload)
                pushed += 1
                handed_over(stalled_stats, pushed)
                stats = stalled_stats()
                assert stats["bytes"] <= 100_000 + 32_768, stats  # the newest always fits
            assert stalled_stats()["queued"] < 1000  # the bytes cap, not the items cap, bit
            assert hub.stats()["dropped"] >= stalled_stats()["dropped"] > 0
        finally:
            stalled.close()


def test_a_burst_of_publishes_wakes_the_loop_once_however_many_clients_listen() -> None:
    import asyncio

    from labd.server.fanout import FanoutTable, StreamFanout
    from labd.streaming import StreamHub

    hub = StreamHub("burst", history=0)
    producer_wakes: list[int] = []

    async def scenario() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            producer_wakes.append(1)
            return plain(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
        table = FanoutTable(max_clients=100)

        async def open_subscription(fanout: StreamFanout) -> None:
            fanout.adopt(hub.subscribe(on_ready=fanout.on_ready, maxsize=1000))

        clients = [await table.join("burst", "burst", open_subscription, 1000, 2**20)
                   for _ in range(50)]
        assert len(hub.subscriptions) == 1
        for i in range(100):  # the loop does not run in between: one dispatch is pending
            hub.publish(i)
        assert len(producer_wakes) == 1
        for client in clients:
            await asyncio.wait_for(client.wake.wait(), WATCHDOG_S)
        received = [[item.sequence for item in client.drain(1000)] for client in clients]
        for client in clients:
            client.leave()
        return received

    received = asyncio.run(scenario())
    assert received == [list(range(1, 101))] * 50
    assert not hub.subscriptions, "the last client left but the fan-out kept its subscription"


def test_client_buffers_drop_their_oldest_items_beyond_either_cap() -> None:
    from labd.server.fanout import ClientBuffer, payload_bytes
    from labd.streaming import StreamItem

    def batch(*sizes: int) -> list[tuple[StreamItem, int]]:
        return [(StreamItem(n, 0.0, n), size) for n, size in enumerate(sizes, 1)]

    by_bytes = ClientBuffer(None, maxsize=100, max_bytes=1000)  # type: ignore[arg-type]
    by_bytes.put(batch(400, 400, 400, 5000))
    assert (len(by_bytes), by_bytes.dropped, by_bytes.bytes) == (1, 3, 5000)  # newest kept
    assert [item.sequence for item in by_bytes.drain(10)] == [4]
    by_items = ClientBuffer(None, maxsize=2, max_bytes=10**9)  # type: ignore[arg-type]
    by_items.put(batch(1, 1, 1))
    assert [item.sequence for item in by_items.drain(10)] == [2, 3]
    assert by_items.dropped == 1
    assert payload_bytes(np.zeros(1000)) == 8000
    assert payload_bytes("x" * 300) == 300
    assert 7_000 < payload_bytes({"samples": [0.5] * 1000, "t": 1.0}) < 9_000
