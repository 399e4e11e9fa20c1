"""Run history over HTTP: ``/runs``, error history, ``/health``'s store, the client methods.

The acceptance test runs ``labd serve --demo --db`` as a real process, kills it with SIGKILL
in the middle of a sweep, restarts it on the same file and checks through HTTP that history
survived. The other tests use an in-process daemon with a store behind a real server on
127.0.0.1 (``labd.testing.running_server``). Waits are bounded polls of a condition.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import labd as ld
from labd.client import AsyncServerAPI, RemoteUnknownTaskError, ServerAPI
from labd.store import RunStore
from labd.testing import LabdProcess, running_server

pytestmark = pytest.mark.server

WATCHDOG_S = 30.0
SWEEP = {"laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549.0, "stop_wl": 1551.0}


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WATCHDOG_S) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` (a watchdog)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Trivial:
    def __init__(self, task_id: str, **params: object) -> None:
        self.task_id = task_id

    def run(self, context: ld.TaskContext) -> dict[str, object]:
        return {"status": "completed", "n": 1}


class BigResult:
    def __init__(self, task_id: str, size: int) -> None:
        self.size = size

    def run(self, context: ld.TaskContext) -> dict[str, object]:
        context.progress(1, 1, "done")
        return {"trace": np.linspace(0.0, 1.0, self.size), "nan": float("nan")}


class Failing:
    def __init__(self, task_id: str) -> None:
        pass

    def run(self, context: ld.TaskContext) -> None:
        raise RuntimeError("laser interlock open")


class Broken:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def fire(self) -> None:
        raise OSError("GPIB timeout")


@contextmanager
def recorded(tmp_path: Path, **daemon_kw: Any) -> Iterator[Any]:
    """A daemon with a run store in ``tmp_path`` behind a real server; both stopped after."""
    daemon = ld.LabDaemon(store=tmp_path / "runs.db", **daemon_kw)
    try:
        daemon.register_plugins(
            devices={"Broken": Broken},
            tasks={"Trivial": Trivial, "BigResult": BigResult, "Failing": Failing},
        )
        with running_server(daemon) as srv:
            yield srv
    finally:
        daemon.shutdown()


# ---------------------------------------------------------------------- the acceptance test
class Serve(LabdProcess):
    """``labd serve --demo --db DB --port 0`` as a child process; ``url`` once it serves."""

    def __init__(self, db: Path) -> None:
        super().__init__("serve", "--demo", "--db", str(db), "--port", "0",
                         env={"LABD_DB": None}, timeout=WATCHDOG_S)
        self.url = self.wait_for("labd serving").split(" at ")[-1].strip()


def _finished(api: ServerAPI, task_id: str) -> dict[str, Any] | None:
    info: dict[str, Any] = api.get_task(task_id)
    return info if info["status"] in ("completed", "failed", "cancelled") else None


def _before_the_crash(api: ServerAPI) -> tuple[list[Any], int]:
    """A completed sweep, a device error and a long sweep in progress, all committed."""
    api.execute_task("sweep1", "WavelengthSweep", {**SWEEP, "steps": 7})
    wait_until(lambda: _finished(api, "sweep1") is not None, "sweep1 to finish")
    sweep1 = api.get_task("sweep1")
    assert sweep1["status"] == "completed"
    with pytest.raises(ld.DeviceConfigurationError, match="9999"):
        api.call("laser1", "set_wavelength", [9999.0])  # before the long run owns the laser
    # The history endpoints flush the store first: once listed, the error is on disk.
    wait_until(lambda: any("9999" in e["message"] for e in
                           api.get_device_error_history("laser1")["errors"]),
               "the device error to reach the run store")
    api.execute_task("long", "WavelengthSweep", {**SWEEP, "steps": 100_000, "dwell": 0.005})
    wait_until(lambda: (api.get_task("long")["progress"] or {}).get("done", 0) >= 3,
               "the long sweep to report progress")
    seen = int(api.get_task("long")["progress"]["done"])
    wait_until(lambda: (api.get_run("long")["progress"] or {}).get("done", 0) >= seen,
               f"progress {seen} of the long sweep to reach the run store")
    return sweep1["result"]["results"], seen


def test_history_survives_kill_9_of_labd_serve(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = Serve(db)
    try:
        with ServerAPI(first.url, timeout=10.0) as api:
            wait_until(lambda: api.health()["status"] == "healthy", "the first server's /health")
            results, seen = _before_the_crash(api)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        first.close()

    second = Serve(db)
    try:
        with ServerAPI(second.url, timeout=10.0) as api:
            sweep1 = api.get_run("sweep1")
            long = api.get_run("long")
            errors = api.get_device_error_history("laser1")["errors"]
            interrupted = api.list_runs(status="interrupted")["runs"]
            health = api.health()
        assert second.stop(signal.SIGINT) == 0
    finally:
        second.close()
    assert sweep1["status"] == "completed"
    assert sweep1["result"]["results"] == results and len(results) == 7
    assert long["status"] == "interrupted" and long["finished_at"] is not None
    assert long["progress"]["done"] >= seen
    assert long["events"][-1]["body"]["status"] == "interrupted"
    assert any("9999" in e["message"] and e["origin"] == "device" for e in errors)
    assert [r["task_id"] for r in interrupted] == ["long"]
    assert health["status"] == "healthy" and health["store"]["runs"] == 2
    output = second.output()
    assert "1 run(s) were active when labd last stopped" in output
    assert f"history:   {db}" in output and "Traceback" not in output


# ---------------------------------------------------------------------- scale
@pytest.mark.timeout(300)  # a watchdog only: nothing below asserts on time
def test_ten_thousand_runs_are_listed_and_paginated_over_http(tmp_path: Path) -> None:
    with recorded(tmp_path, completed_task_buffer=5) as srv, httpx.Client(
        base_url=srv.url, timeout=WATCHDOG_S
    ) as http:
        for i in range(10_000):
            srv.daemon.execute_task(f"t{i}", "Trivial").wait(timeout=10)
        started = time.perf_counter()
        page = http.get("/runs", params={"limit": 50}).json()
        latency = time.perf_counter() - started
        health = http.get("/health").json()
        last = http.get("/runs", params={"limit": 50, "offset": 9950}).json()
        beyond = http.get("/runs", params={"offset": 10_000}).json()
        everything: list[str] = []
        offset: int | None = 0
        while offset is not None:
            chunk = http.get("/runs", params={"limit": 1000, "offset": offset}).json()
            everything += [r["task_id"] for r in chunk["runs"]]
            offset = chunk["next_offset"]
    print(f"\n10,000 runs over HTTP: GET /runs?limit=50 took {latency * 1000:.1f} ms; database "
          f"{health['store']['size_bytes'] / 1e6:.1f} MB")
    assert health["store"]["runs"] == 10_000
    assert [r["task_id"] for r in page["runs"]] == [f"t{i}" for i in range(9999, 9949, -1)]
    assert (page["limit"], page["offset"], page["next_offset"]) == (50, 0, 50)
    assert [r["task_id"] for r in last["runs"]][-1] == "t0" and last["next_offset"] is None
    assert beyond["runs"] == [] and beyond["next_offset"] is None
    assert len(everything) == len(set(everything)) == 10_000


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("query", "field", "hint"),
    [
        ({"status": "bogus"}, "status", "interrupted"),
        ({"limit": "0"}, "limit", "greater than or equal to 1"),
        ({"limit": "5000"}, "limit", "less than or equal to 1000"),
        ({"limit": "abc"}, "limit", "valid integer"),
        ({"offset": "-1"}, "offset", "greater than or equal to 0"),
        ({"since": "garbage"}, "since", "ISO 8601"),
        ({"since": "nan"}, "since", "finite"),
    ],
)
def test_bad_query_values_are_400_naming_the_parameter(
    tmp_path: Path, query: dict[str, str], field: str, hint: str
) -> None:
    with recorded(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
        srv.daemon.execute_task("t1", "Trivial").wait(timeout=10)
        answer = http.get("/runs", params=query)
        health = http.get("/health")
        still = http.get("/runs").json()
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "InvalidArgumentError" and error["traceback"] is None
    assert field in error["message"] and hint in error["message"]
    assert [e["field"] for e in error["context"]["errors"]] == [f"query.{field}"]
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert [r["task_id"] for r in still["runs"]] == ["t1"]


def test_unknown_runs_and_bad_ids(tmp_path: Path) -> None:
    with recorded(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
        unknown = http.get("/runs/nope")
        events = http.get("/runs/nope/events")
        bad_id = http.get("/runs/bad%20id")
        bad_limit = http.get("/devices/gun/errors/history", params={"limit": 0})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "UnknownTaskError"
    assert "'nope'" in unknown.json()["error"]["message"]
    assert events.status_code == 404
    assert bad_id.status_code == 400 and bad_limit.status_code == 400


# ---------------------------------------------------------------------- records
def test_full_record_with_side_file_arrays_error_traceback_and_events(tmp_path: Path) -> None:
    with recorded(tmp_path) as srv, ServerAPI(srv.url, timeout=WATCHDOG_S) as api:
        srv.daemon.execute_task("big", "BigResult", size=100_000).wait(timeout=30)
        with pytest.raises(ld.TaskFailedError):
            srv.daemon.execute_task("bad", "Failing").wait(timeout=30)
        gun = srv.daemon.add_device("gun", "Broken")
        with pytest.raises(OSError):
            gun.fire()
        big = api.get_run("big")
        bad = api.get_run("bad")
        events = api.get_run_events("big", limit=2)["events"]
        errors = api.get_device_error_history("gun")["errors"]
        failed = api.list_runs(status="failed")
        by_type = api.list_runs(task_type="BigResult")
    assert list(Path(f"{tmp_path / 'runs.db'}.files").rglob("*.npy")), "no side file written"
    np.testing.assert_array_equal(big["result"]["trace"], np.linspace(0.0, 1.0, 100_000))
    assert big["result"]["nan"] is None  # NaN is null in plain JSON answers
    assert big["params"] == {"size": 100_000} and big["progress"]["message"] == "done"
    assert {"task_id", "task_type", "status", "params", "device_ids", "owner", "progress",
            "result", "error", "created_at", "started_at", "finished_at", "events"} <= set(big)
    assert bad["status"] == "failed" and "laser interlock open" in bad["error"]["traceback"]
    assert [e["kind"] for e in events] == ["progress", "state"]
    assert events[-1]["body"] == {"status": "completed"}
    assert errors[0]["message"] == "GPIB timeout" and "Traceback" in errors[0]["traceback"]
    assert [r["task_id"] for r in failed["runs"]] == ["bad"]
    assert [r["task_id"] for r in by_type["runs"]] == ["big"]


def test_since_filters_by_creation_time_in_every_spelling(tmp_path: Path) -> None:
    with recorded(tmp_path) as srv, ServerAPI(srv.url, timeout=WATCHDOG_S) as api:
        srv.daemon.execute_task("old", "Trivial").wait(timeout=10)
        created = datetime.fromisoformat(api.get_run("old")["created_at"].replace("Z", "+00:00"))
        later = created + timedelta(seconds=1)
        for since in (later, later.timestamp(), later.isoformat(),
                      later.astimezone(UTC).replace(tzinfo=None).isoformat()):
            assert api.list_runs(since=since)["runs"] == [], since
        earlier = created - timedelta(seconds=1)
        assert [r["task_id"] for r in api.list_runs(since=earlier.isoformat())["runs"]] == ["old"]


def test_without_a_store_the_retained_runs_are_served(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Broken": Broken}, tasks={"Trivial": Trivial})
    daemon.execute_task("t1", "Trivial").wait(timeout=10)
    gun = daemon.add_device("gun", "Broken")
    with pytest.raises(OSError):
        gun.fire()
    with running_server(daemon) as srv, ServerAPI(srv.url, timeout=WATCHDOG_S) as api:
        page = api.list_runs()
        record = api.get_run("t1")
        events = api.get_run_events("t1")
        errors = api.get_device_error_history("gun")["errors"]
        health = api.health()
        with pytest.raises(ld.UnknownDeviceError):
            api.get_device_error_history("nope")
    assert [r["task_id"] for r in page["runs"]] == ["t1"] and page["next_offset"] is None
    assert record["status"] == "completed" and record["result"] == {"status": "completed", "n": 1}
    assert events == {"task_id": "t1", "events": []}
    assert [e["message"] for e in errors] == ["GPIB timeout"]
    assert health["store"] is None and health["status"] == "healthy"


# ---------------------------------------------------------------------- health
def test_health_reports_the_store_and_turns_degraded_when_the_disk_is_full(tmp_path: Path) -> None:
    with recorded(tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
        store: RunStore | None = srv.daemon.store
        assert store is not None
        before = http.get("/health").json()
        # Simulate a full disk: SQLite may not grow the file any further.
        pages = store._writer_conn.execute("PRAGMA page_count").fetchone()[0]
        store._writer_conn.execute(f"PRAGMA max_page_count = {pages}")
        for batch in range(20):  # bounded: the file cannot grow, so this fills it quickly
            for i in range(100):
                srv.daemon.execute_task(f"fill{batch}-{i}", "BigResult", size=10).wait(timeout=10)
            store.flush()
            if store.degraded_reason is not None:
                break
        after = http.get("/health")
        listing = http.get("/runs")
    assert before["status"] == "healthy"
    assert before["store"] == {"path": str(tmp_path / "runs.db"), "size_bytes": before["store"][
        "size_bytes"], "runs": 0, "degraded": False, "degraded_reason": None, "dropped_records": 0}
    assert after.status_code == 200
    body = after.json()
    assert body["status"] == "degraded"
    assert body["store"]["degraded"] is True and "full" in body["store"]["degraded_reason"]
    assert body["store"]["dropped_records"] > 0
    assert listing.status_code == 200


# ---------------------------------------------------------------------- clients
def test_remote_daemon_and_async_client_read_history(tmp_path: Path) -> None:
    with recorded(tmp_path) as srv:
        for i in range(3):
            srv.daemon.execute_task(f"t{i}", "Trivial").wait(timeout=10)
        with ld.connect(srv.url, timeout=WATCHDOG_S) as lab:
            runs = lab.runs(limit=2)
            older = lab.runs(limit=2, offset=2)
            record = lab.get_run("t1")
            with pytest.raises(RemoteUnknownTaskError):
                lab.get_run("nope")
            with pytest.raises(ld.InvalidArgumentError, match="limit must be an integer"):
                lab.runs(limit=True)

        async def read() -> tuple[Any, Any]:
            async with AsyncServerAPI(srv.url, timeout=WATCHDOG_S) as api:
                return await api.list_runs(status="completed"), await api.get_run_events("t0")

        page, events = asyncio.run(read())
    assert [r["task_id"] for r in runs] == ["t2", "t1"]
    assert [r["task_id"] for r in older] == ["t0"]
    assert record["result"] == {"status": "completed", "n": 1}
    assert [r["task_id"] for r in page["runs"]] == ["t2", "t1", "t0"]
    assert events["events"][-1]["body"] == {"status": "completed"}
