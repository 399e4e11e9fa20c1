"""Issue 8, the server's resource edges and the core's secrets, against a real server on 127.0.0.1.

- secret-named device and task parameters are "***" in every answer and in the run store;
- a viewer joins a running device stream but never starts one; starting obeys ownership;
- device work runs on a bounded pool with a per-device cap on calls in flight (503 beyond);
- SSE clients are capped over all streams, and a client's buffer size is bounded (422).

Concurrency is driven by ``threading.Event`` handshakes; every bounded wait is a watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import labd as ld
from labd.secrets import REDACTED, is_secret_name, redact
from labd.server.auth import Token
from labd.server.context import ServerContext, ServerSettings
from labd.server.fanout import fanout_table
from labd.server.offload import Offloader
from labd.server.shutdown import ShutdownSignal
from labd.testing import BlockingDevice, FakeStreamer, RunningServer, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 10.0
PASSWORD = "hunter2-Qv8x"
API_KEY = "ak-live-7d1e9f"


def watch_until(condition: Callable[[], bool], what: str) -> None:
    """Watchdog: poll ``condition`` until true; fail naming ``what`` after WATCHDOG_S."""
    deadline = time.monotonic() + WATCHDOG_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {WATCHDOG_S} s")
        time.sleep(0.005)


def error_of(answer: httpx.Response) -> dict[str, Any]:
    record = answer.json()["error"]
    assert set(record) == {"type", "message", "origin", "timestamp", "traceback", "context"}
    return dict(record)


# ------------------------------------------------------------------------------ secrets
class SecretInstrument:
    """A device whose constructor needs credentials (they must reach it unchanged)."""

    def __init__(self, device_id: str, address: str = "", password: str = "",
                 cloud: dict[str, Any] | None = None) -> None:
        self.device_id = device_id
        self.address = address
        self.password = password
        self.cloud = cloud or {}

    def get_password_length(self) -> int:
        return len(self.password)


class SecretTask:
    def __init__(self, task_id: str, steps: int = 1, api_key: str = "",
                 auth: dict[str, str] | None = None) -> None:
        self.task_id = task_id
        self.steps = steps
        self.api_key = api_key
        self.auth = auth or {}

    def run(self, context: Any) -> dict[str, Any]:
        return {"status": "completed", "key_length": len(self.api_key)}


def test_secret_names_match_words_and_substrings_case_insensitively() -> None:
    for name in ("password", "DB_PASSWORD", "passwd", "clientSecret", "token", "refresh_token",
                 "api_key", "API-Key", "apikey", "aws_access_key_id", "private_key",
                 "credentials", "Credential", "auth", "http_auth", "authHeader",
                 "Authorization"):
        assert is_secret_name(name), name
    for other in ("address", "gain", "key", "author", "authority", "steps", 3, None):
        assert not is_secret_name(other), other
    original = {"password": "x", "nested": {"Token": "y", "ok": 1}, "list": [{"secret": 2}, 3]}
    assert redact(original) == {"password": REDACTED, "nested": {"Token": REDACTED, "ok": 1},
                                "list": [{"secret": REDACTED}, 3]}
    assert original["password"] == "x", "redact must not change its argument"


@pytest.fixture
def secret_lab(tmp_path: Path) -> Iterator[RunningServer]:
    daemon = ld.LabDaemon(store=tmp_path / "runs.db")
    try:
        daemon.register_plugins(devices={"Secret": SecretInstrument}, tasks={"SecretTask": SecretTask})
        with running_server(daemon) as running:
            yield running
    finally:
        daemon.shutdown()


def test_secret_device_params_are_hidden_but_reach_the_device(secret_lab: RunningServer) -> None:
    daemon = secret_lab.daemon
    device = daemon.add_device("vault", "Secret", address="GPIB0::5", password=PASSWORD,
                               cloud={"region": "eu", "api_key": API_KEY})
    assert device.password == PASSWORD and device.cloud["api_key"] == API_KEY
    expected = {"address": "GPIB0::5", "password": REDACTED,
                "cloud": {"region": "eu", "api_key": REDACTED}}
    assert daemon.device_info("vault")["params"] == expected
    for url in (f"{secret_lab.url}/devices/vault", f"{secret_lab.url}/devices"):
        answer = httpx.get(url, timeout=WATCHDOG_S)
        assert answer.status_code == 200
        assert PASSWORD not in answer.text and API_KEY not in answer.text
    assert httpx.get(f"{secret_lab.url}/devices/vault",
                     timeout=WATCHDOG_S).json()["params"] == expected


def test_a_device_added_over_http_shows_its_secrets_as_stars(secret_lab: RunningServer) -> None:
    answer = httpx.post(f"{secret_lab.url}/devices", timeout=WATCHDOG_S, json={
        "device_id": "vault2", "device_type": "Secret",
        "params": {"address": "COM3", "password": PASSWORD}})
    assert answer.status_code in (200, 201), answer.text
    assert PASSWORD not in answer.text
    called = httpx.post(f"{secret_lab.url}/devices/vault2/call", timeout=WATCHDOG_S,
                        json={"method": "get_password_length"})
    assert called.json()["result"] == len(PASSWORD), "the device must get the real password"


def test_secret_task_params_are_hidden_in_answers_and_in_the_run_store(
    secret_lab: RunningServer, tmp_path: Path,
) -> None:
    started = httpx.post(f"{secret_lab.url}/tasks", timeout=WATCHDOG_S, json={
        "task_id": "t1", "task_type": "SecretTask",
        "params": {"steps": 3, "api_key": API_KEY, "auth": {"user": "u", "password": PASSWORD}}})
    assert started.status_code in (200, 201, 202), started.text
    handle = secret_lab.daemon.get_task("t1")
    assert handle.wait(timeout=WATCHDOG_S)["key_length"] == len(API_KEY)
    expected = {"steps": 3, "api_key": REDACTED, "auth": REDACTED}
    assert handle.info()["params"] == expected
    for path in ("/tasks/t1", "/tasks", "/runs/t1", "/runs"):
        answer = httpx.get(f"{secret_lab.url}{path}", timeout=WATCHDOG_S)
        assert answer.status_code == 200, (path, answer.text)
        assert API_KEY not in answer.text and PASSWORD not in answer.text, path
    assert httpx.get(f"{secret_lab.url}/tasks/t1", timeout=WATCHDOG_S).json()["params"] == expected
    assert httpx.get(f"{secret_lab.url}/runs/t1", timeout=WATCHDOG_S).json()["params"] == expected
    store = secret_lab.daemon.store
    assert store is not None and store.flush(timeout=WATCHDOG_S)
    with contextlib.closing(sqlite3.connect(tmp_path / "runs.db")) as db:
        rows = db.execute("SELECT params FROM runs").fetchall()
        dump = "\n".join(db.iterdump())
    assert rows, "the run was not stored"
    assert API_KEY not in dump and PASSWORD not in dump
    # Not even in the raw bytes of the database, its WAL or side files.
    for stored in tmp_path.rglob("*"):
        if stored.is_file():
            raw = stored.read_bytes()
            assert API_KEY.encode() not in raw and PASSWORD.encode() not in raw, stored


class TunableTask:
    """A task that holds until released and takes parameter updates."""

    def __init__(self, task_id: str, release: threading.Event) -> None:
        self.task_id = task_id
        self.release = release
        self.values: dict[str, Any] = {}

    def set_parameter(self, key: str, value: Any) -> None:
        self.values[key] = value

    def get_parameter(self, key: str) -> Any:
        return self.values.get(key)

    def run(self, context: Any) -> dict[str, Any]:
        if not self.release.wait(WATCHDOG_S):
            return {"status": "failed"}
        return {"status": "completed", "password_length": len(self.values.get("password", ""))}


def test_a_secret_parameter_update_goes_out_on_the_task_stream_as_stars() -> None:
    release = threading.Event()
    daemon = ld.LabDaemon()
    try:
        daemon.register_plugins(tasks={"Tunable": TunableTask})
        handle = daemon.execute_task("tune", "Tunable", release=release)
        sub = daemon.subscribe_task("tune")
        handle.set_parameter("password", PASSWORD)
        handle.set_parameter("gain", 2)
        release.set()
        assert handle.wait(timeout=WATCHDOG_S)["password_length"] == len(PASSWORD)
        updates = [item.payload for item in sub.drain()
                   if isinstance(item.payload, dict) and item.payload.get("event") == "parameter"]
        sub.close()
        assert [(u["key"], u["value"]) for u in updates] == [("password", REDACTED), ("gain", 2)]
    finally:
        daemon.shutdown()


def test_reading_a_secret_task_parameter_over_http_gives_stars() -> None:
    release = threading.Event()
    daemon = ld.LabDaemon()
    try:
        daemon.register_plugins(tasks={"Tunable": TunableTask})
        handle = daemon.execute_task("tune", "Tunable", release=release)
        handle.set_parameter("api_key", PASSWORD)
        handle.set_parameter("gain", 2)
        with running_server(daemon) as running, \
                httpx.Client(base_url=running.url, timeout=WATCHDOG_S) as client:
            secret = client.get("/tasks/tune/parameters/api_key")
            plain = client.get("/tasks/tune/parameters/gain")
        assert secret.status_code == 200 and secret.json() == {"key": "api_key", "value": REDACTED}
        assert PASSWORD not in secret.text
        assert plain.json() == {"key": "gain", "value": 2}
        assert handle.get_parameter("api_key") == PASSWORD  # the task itself keeps the value
        release.set()
        handle.wait(timeout=WATCHDOG_S)
    finally:
        daemon.shutdown()


# --------------------------------------------------------------- bounded device work (10)
CAP = ServerSettings().device_max_in_flight
POOL = ServerSettings().device_workers
# Threads the test process may add besides the server's device workers: asyncio's default
# executor (getaddrinfo for the async client), the server's general pool, metrics.
SLACK = 16


def context_of(running: RunningServer) -> ServerContext:
    context: ServerContext = running.server.app.state.labd
    return context


@contextlib.contextmanager
def hung_lab(count: int) -> Iterator[tuple[RunningServer, list[BlockingDevice]]]:
    """A server with ``count`` BlockingDevices ``h0``..; all released (and drained) on exit."""
    with running_server() as running:
        running.daemon.register_plugins(devices={"Blocking": BlockingDevice})
        devices = [running.daemon.add_device(f"h{i}", "Blocking", max_block=2 * WATCHDOG_S)
                   for i in range(count)]
        try:
            yield running, devices
        finally:
            for device in devices:
                device.release.set()
            context = context_of(running)
            watch_until(lambda: all(context.in_flight(f"h{i}") == 0 for i in range(count)),
                        "the blocked calls to drain after the release")


async def _fire(url: str, calls: list[tuple[str, str]], *, until_done: int,
                ) -> tuple[list[asyncio.Task[httpx.Response]], httpx.AsyncClient]:
    """Start every ``(device_id, query)`` call at once; return when ``until_done`` answered."""
    http = httpx.AsyncClient(base_url=url, timeout=3 * WATCHDOG_S,
                             limits=httpx.Limits(max_connections=len(calls) + 8))
    tasks = [asyncio.create_task(http.post(f"/devices/{device_id}/call{query}",
                                           json={"method": "block"}))
             for device_id, query in calls]
    deadline = time.monotonic() + WATCHDOG_S
    while sum(task.done() for task in tasks) < until_done:
        if time.monotonic() > deadline:
            pytest.fail(f"only {sum(t.done() for t in tasks)} of {until_done} calls answered")
        await asyncio.wait([t for t in tasks if not t.done()], timeout=0.05,
                           return_when=asyncio.FIRST_COMPLETED)
    return tasks, http


def test_a_hung_device_takes_at_most_its_cap_of_threads_and_answers_503_beyond() -> None:
    with hung_lab(1) as (running, (device,)):
        context = context_of(running)
        assert httpx.post(f"{running.url}/devices/h0/call", json={"method": "get_status"},
                          timeout=WATCHDOG_S).json()["result"] == "ok"
        baseline = threading.active_count()

        async def scenario() -> None:
            tasks, http = await _fire(running.url, [("h0", "")] * 50, until_done=50 - CAP)
            try:
                refused = [t.result() for t in tasks if t.done()]
                assert len(refused) == 50 - CAP
                for answer in refused:
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["Retry-After"].isdigit()
                    error = error_of(answer)
                    assert error["type"] == "DeviceOverloaded"
                    assert "'h0'" in error["message"]
                    assert f"device_max_in_flight={CAP}" in error["message"]
                    assert error["context"] == {"device_id": "h0", "max_in_flight": CAP}
                assert device.entered.wait(WATCHDOG_S)
                assert context.in_flight("h0") == CAP
                assert threading.active_count() <= baseline + CAP + SLACK, \
                    [t.name for t in threading.enumerate()]
                device.release.set()
                answers = await asyncio.wait_for(asyncio.gather(*tasks), WATCHDOG_S)
                assert sorted(a.status_code for a in answers) == [200] * CAP + [503] * (50 - CAP)
            finally:
                await http.aclose()

        asyncio.run(scenario())
        watch_until(lambda: context.in_flight("h0") == 0, "the in-flight count to drop to 0")
        after = httpx.post(f"{running.url}/devices/h0/call", json={"method": "block"},
                           timeout=WATCHDOG_S)
        assert after.json()["result"] == "released"


def test_many_hung_devices_never_take_more_than_the_device_pool() -> None:
    count = POOL // CAP + 1  # more calls in flight than the pool has threads
    with hung_lab(count) as (running, devices):
        context = context_of(running)
        baseline = threading.active_count()
        calls = [(f"h{i}", "") for i in range(count) for _ in range(CAP + 1)]

        async def scenario() -> None:
            tasks, http = await _fire(running.url, calls, until_done=count)
            try:
                assert sorted(t.result().status_code for t in tasks if t.done()) == [503] * count
                watch_until(lambda: context.offloader.stats()["device"]["queued"]
                            == count * CAP - POOL, "the calls beyond the pool to queue")
                stats = context.offloader.stats()["device"]
                assert stats["threads"] == stats["busy"] == POOL
                assert threading.active_count() <= baseline + POOL + SLACK
                for device in devices:
                    device.release.set()
                answers = await asyncio.wait_for(asyncio.gather(*tasks), WATCHDOG_S)
                assert [a.status_code for a in answers].count(200) == count * CAP
            finally:
                await http.aclose()

        asyncio.run(scenario())


def test_a_call_answered_504_still_counts_in_flight_until_its_thread_returns() -> None:
    with hung_lab(1) as (running, (device,)):
        context = context_of(running)

        async def scenario() -> None:
            tasks, http = await _fire(running.url, [("h0", "?timeout=0.05")] * CAP,
                                      until_done=CAP)
            try:
                assert [t.result().status_code for t in tasks] == [504] * CAP
                assert context.in_flight("h0") == CAP
                refused = await http.post("/devices/h0/call", json={"method": "get_status"})
                assert refused.status_code == 503 and "Retry-After" in refused.headers
            finally:
                await http.aclose()

        asyncio.run(scenario())
        device.release.set()
        watch_until(lambda: context.in_flight("h0") == 0, "the abandoned calls to return")
        assert httpx.post(f"{running.url}/devices/h0/call", json={"method": "get_status"},
                          timeout=WATCHDOG_S).status_code == 200


def test_a_job_that_waited_out_its_timeout_in_the_pool_queue_never_runs() -> None:
    shutdown = ShutdownSignal()
    offloader = Offloader(shutdown, device_workers=1)
    release, ran, exits = threading.Event(), [], []

    def hold() -> str:
        ran.append("hold")
        return "held" if release.wait(WATCHDOG_S) else "gave up"

    async def scenario() -> None:
        first = asyncio.create_task(offloader.run(hold, timeout=None, what="hold", device=True,
                                                  on_exit=lambda: exits.append("hold")))
        await asyncio.sleep(0)  # `first` submits `hold` (FIFO: the one worker takes it)
        with pytest.raises(ld.DeviceTimeoutError, match="was not started"):
            await offloader.run(lambda: ran.append("late"), timeout=0.01, what="late",
                                device=True, on_exit=lambda: exits.append("late"))
        assert exits == ["late"], "a job taken out of the queue leaves the pool at once"
        assert offloader.stats()["device"] == {"threads": 1, "busy": 1, "queued": 0,
                                               "max_workers": 1}
        release.set()
        assert await asyncio.wait_for(first, WATCHDOG_S) == "held"

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        assert offloader.close(timeout=WATCHDOG_S) == []
    assert ran == ["hold"] and exits == ["late", "hold"]


# ----------------------------------------------------- device streams: join vs start (6)
VIEWER_TOKEN = "viewer-Hc4u-token"
ALICE_TOKEN = "alice-Tn6e-operator-token"
BOB_TOKEN = "bob-Lp3w-operator-token"
TOKENS = {VIEWER_TOKEN: Token("vic", "viewer"), ALICE_TOKEN: Token("alice", "operator"),
          BOB_TOKEN: Token("bob", "operator")}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def stream_lab(**server_kw: Any) -> Iterator[tuple[RunningServer, FakeStreamer]]:
    """A running server with one connected FakeStreamer ``s1`` (not streaming)."""
    with running_server(**server_kw) as running:
        running.daemon.register_plugins(devices={"Streamer": FakeStreamer})
        device = running.daemon.add_device("s1", "Streamer")
        running.daemon.connect_device("s1")
        yield running, device


def first_item(url: str, headers: dict[str, str], push: Callable[[], object]) -> dict[str, Any]:
    """Open ``url`` as SSE, ``push()`` once it is open, and return the first ``device_data``."""
    with httpx.stream("GET", url, headers=headers, timeout=WATCHDOG_S) as answer:
        assert answer.status_code == 200, answer.read()
        push()
        for line in answer.iter_lines():
            if line.startswith("data: "):
                body: dict[str, Any] = json.loads(line[6:])
                return body
    pytest.fail(f"{url}: the stream ended without data")


def refused(url: str, headers: dict[str, str]) -> httpx.Response:
    answer = httpx.get(url, headers=headers, timeout=WATCHDOG_S)
    assert answer.status_code >= 400
    return answer


def test_a_viewer_cannot_start_a_device_stream_and_the_device_is_not_touched() -> None:
    with stream_lab(tokens=TOKENS) as (running, device):
        answer = refused(f"{running.url}/stream/devices/s1", bearer(VIEWER_TOKEN))
        assert answer.status_code == 403
        error = error_of(answer)
        assert error["type"] == "Forbidden"
        assert "starting the stream of 's1' needs the 'operator' role" in error["message"].lower()
        assert "it is not running" in error["message"]
        assert error["context"]["required_role"] == "operator"
        assert not device.started.is_set() and running.daemon.stream_hub("s1") is None


def test_a_viewer_cannot_start_the_stream_of_a_device_leased_to_someone_else() -> None:
    with stream_lab(tokens=TOKENS) as (running, device), \
            running.daemon.claim(["s1"], owner="alice", ttl=60):
        assert refused(f"{running.url}/stream/devices/s1", bearer(VIEWER_TOKEN)).status_code == 403
        assert not device.started.is_set()


def test_an_operator_who_does_not_hold_the_lease_gets_409_and_the_holder_starts_it() -> None:
    with stream_lab(tokens=TOKENS) as (running, device):
        with running.daemon.claim(["s1"], owner="alice", ttl=60):
            answer = refused(f"{running.url}/stream/devices/s1", bearer(BOB_TOKEN))
            assert answer.status_code == 409
            error = error_of(answer)
            assert error["type"] == "DeviceBusyError"
            assert "alice" in error["context"]["busy"][0]["owner"]
            assert not device.started.is_set()
            body = first_item(f"{running.url}/stream/devices/s1", bearer(ALICE_TOKEN),
                              lambda: device.push("from alice"))
            assert body["payload"] == "from alice"
        assert device.stopped.wait(WATCHDOG_S), "the stream alice's client started must stop"


def test_a_viewer_joins_a_running_stream_even_on_a_leased_device() -> None:
    with stream_lab(tokens=TOKENS) as (running, device):
        local = running.daemon.start_streaming("s1", lambda item: None)
        try:
            with running.daemon.claim(["s1"], owner="alice", ttl=60):
                body = first_item(f"{running.url}/stream/devices/s1", bearer(VIEWER_TOKEN),
                                  lambda: device.push(42))
                assert body["payload"] == 42
        finally:
            local.close()
            running.daemon.stop_streaming("s1")


def test_without_tokens_starting_is_allowed_but_obeys_ownership() -> None:
    with stream_lab() as (running, device):
        url = f"{running.url}/stream/devices/s1"
        with running.daemon.claim(["s1"], owner="alice", ttl=60):
            answer = refused(url, {"X-Labd-Owner": "bob"})
            assert answer.status_code == 409 and error_of(answer)["type"] == "DeviceBusyError"
            assert refused(url, {}).status_code == 409, "an anonymous remote caller owns nothing"
            assert not device.started.is_set()
            assert first_item(url, {"X-Labd-Owner": "alice"}, lambda: device.push(1))["payload"] == 1
        assert device.stopped.wait(WATCHDOG_S)
        device.stopped.clear()
        assert first_item(url, {}, lambda: device.push(2))["payload"] == 2


# -------------------------------------------------------------------- SSE caps (11)
@pytest.mark.parametrize("path", ["/stream/devices/s1", "/stream/tasks/nope", "/stream/events"])
@pytest.mark.parametrize("maxsize", [0, -1, ServerSettings().stream_max_maxsize + 1, 1_000_000,
                                     10**30])
def test_a_client_buffer_outside_the_allowed_range_is_422_naming_it(path: str, maxsize: int) -> None:
    with stream_lab() as (running, device):
        answer = refused(f"{running.url}{path}?maxsize={maxsize}", {})
        assert answer.status_code == 422, answer.text
        error = error_of(answer)
        most = ServerSettings().stream_max_maxsize
        assert f"1 to {most}" in error["message"] and "maxsize" in error["message"]
        assert error["context"] == {"parameter": "maxsize", "minimum": 1, "maximum": most}
        assert not device.started.is_set()


def test_sse_clients_over_all_streams_are_capped_with_503() -> None:
    with stream_lab(stream_max_clients_total=2) as (running, device):
        context = context_of(running)
        url = f"{running.url}/stream/devices/s1"
        readers = [httpx.stream("GET", u, timeout=WATCHDOG_S)
                   for u in (url, f"{running.url}/stream/events")]
        with contextlib.ExitStack() as stack:
            opened = [stack.enter_context(reader) for reader in readers]
            assert [answer.status_code for answer in opened] == [200, 200]
            for other in ("/stream/devices/s1", "/stream/events"):
                answer = refused(f"{running.url}{other}", {})
                assert answer.status_code == 503 and answer.headers["Retry-After"].isdigit()
                error = error_of(answer)
                assert error["type"] == "StreamFull"
                assert "stream_max_clients_total=2" in error["message"]
                assert error["context"] == {"stream": other, "max_clients_total": 2}
        # Both clients left: their places are free again (the server notices on its loop).
        device.stopped.wait(WATCHDOG_S)
        watch_until(lambda: fanout_table(context, 0, 0).clients_total == 0,
                    "the server to give the clients' places back")
        body = first_item(url, {}, lambda: device.push("again"))
        assert body["payload"] == "again"
