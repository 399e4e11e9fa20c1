"""The run store: history that survives restarts and crashes, and never blocks a task."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import labd as ld
import labd.sim
from labd.store import SCHEMA_VERSION, RunStore, StoreError


class Trivial:
    def __init__(self, task_id: str, **params: object) -> None:
        self.task_id = task_id

    def run(self, context: ld.TaskContext) -> dict[str, object]:
        return {"status": "completed", "n": 1}


class BigResult:
    def __init__(self, task_id: str, size: int) -> None:
        self.size = size

    def run(self, context: ld.TaskContext) -> dict[str, object]:
        context.emit({"preview": np.arange(4.0)})
        return {"trace": np.linspace(0.0, 1.0, self.size), "nan": float("nan")}


class Emitter:
    """Reports progress ``steps`` times as fast as it can."""

    def __init__(self, task_id: str, steps: int) -> None:
        self.steps = steps

    def run(self, context: ld.TaskContext) -> int:
        for i in range(self.steps):
            context.progress(i + 1, self.steps)
        return self.steps


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


def make_daemon(db: Path, **kw: object) -> ld.LabDaemon:
    daemon = ld.LabDaemon(store=db, **kw)  # type: ignore[arg-type]
    daemon.register_plugins(
        devices={"Broken": Broken},
        tasks={"Trivial": Trivial, "BigResult": BigResult, "Emitter": Emitter, "Failing": Failing},
    )
    return daemon


def test_completed_run_is_recorded_with_params_result_and_events(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with ld.LabDaemon(store=db) as daemon:
        labd.sim.demo_lab(daemon)
        daemon.execute_task("sweep1", "WavelengthSweep", laser_id="laser1", detector_id="pm1",
                            start_wl=1549.0, stop_wl=1551.0, steps=5).wait(timeout=30)
        record = daemon.get_run("sweep1")
    assert record["status"] == "completed"
    assert record["params"]["steps"] == 5
    assert record["device_ids"] == ["laser1", "pm1"]
    assert len(record["result"]["results"]) == 5
    assert record["progress"]["done"] == 5
    kinds = [e["kind"] for e in record["events"]]
    assert kinds.count("progress") == 5 and kinds.count("data") == 5
    states = [e["body"]["status"] for e in record["events"] if e["kind"] == "state"]
    assert states == ["running", "running", "completed"] or states == ["pending", "running", "completed"]
    assert record["started_at"] and record["finished_at"]


def test_history_survives_a_restart_and_large_arrays_go_to_side_files(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    daemon = make_daemon(db)
    daemon.execute_task("big", "BigResult", size=100_000).wait(timeout=30)
    handle = daemon.execute_task("bad", "Failing")
    with pytest.raises(ld.TaskFailedError):
        handle.wait(timeout=30)
    daemon.shutdown()

    again = make_daemon(db)
    try:
        big = again.get_run("big")
        assert isinstance(big["result"]["trace"], np.ndarray)
        np.testing.assert_array_equal(big["result"]["trace"], np.linspace(0.0, 1.0, 100_000))
        assert np.isnan(big["result"]["nan"])
        assert list(Path(f"{db}.files").rglob("*.npy")), "large array was not written to a side file"
        bad = again.get_run("bad")
        assert bad["status"] == "failed"
        assert bad["error"]["type"] == "RuntimeError"
        assert "laser interlock open" in bad["error"]["traceback"]
        assert [r["task_id"] for r in again.runs()] == ["bad", "big"]
        assert [r["task_id"] for r in again.runs(status="failed")] == ["bad"]
        assert [r["task_id"] for r in again.runs(task_type="BigResult")] == ["big"]
    finally:
        again.shutdown()


def test_device_errors_and_leases_are_recorded(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with make_daemon(db) as daemon:
        dev = daemon.add_device("gun", "Broken")
        with pytest.raises(OSError):
            dev.fire()
        with daemon.claim(["gun"], owner="alice", ttl=30):
            pass
        assert daemon.store is not None
        daemon.store.flush()
        errors = daemon.store.device_errors("gun")
        leases = daemon.store.lease_events()
    assert errors[0]["message"] == "GPIB timeout" and errors[0]["origin"] == "device"
    assert [e["event"] for e in reversed(leases)] == ["granted", "released"]


def test_concurrent_progress_writers_lose_no_record(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    steps = 1000
    with make_daemon(db) as daemon:
        handles = [daemon.execute_task(f"emit{i}", "Emitter", steps=steps) for i in range(8)]
        for handle in handles:
            assert handle.wait(timeout=60) == steps
        assert daemon.store is not None
        assert daemon.store.flush(timeout=30)
        conn = sqlite3.connect(db)
        try:
            count = conn.execute("SELECT COUNT(*) FROM run_events WHERE kind='progress'").fetchone()[0]
        finally:
            conn.close()
    assert count == 8 * steps


def test_ten_thousand_runs_history_is_complete_and_paginates(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with make_daemon(db, completed_task_buffer=5) as daemon:
        for i in range(10_000):
            daemon.execute_task(f"t{i}", "Trivial").wait(timeout=10)
        started = time.perf_counter()
        page = daemon.runs(limit=50)
        elapsed = time.perf_counter() - started
        older = daemon.runs(limit=50, offset=50)
        assert daemon.store is not None
        stats = daemon.store.stats()
    assert stats["runs"] == 10_000
    assert [r["task_id"] for r in page][:2] == ["t9999", "t9998"] and len(page) == 50
    assert older[0]["task_id"] == "t9949"
    print(f"\n10,000 runs: runs(limit=50) took {elapsed * 1000:.1f} ms; database "
          f"{stats['size_bytes'] / 1e6:.1f} MB")


def test_disk_full_later_degrades_without_failing_tasks(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with make_daemon(db) as daemon:
        store = daemon.store
        assert store is not None
        daemon.execute_task("before", "Trivial").wait(timeout=10)
        store.flush()
        # Simulate a full disk: SQLite may not grow the file any further.
        pages = store._writer_conn.execute("PRAGMA page_count").fetchone()[0]
        store._writer_conn.execute(f"PRAGMA max_page_count = {pages}")
        finished = 0
        for batch in range(20):  # bounded: the file cannot grow, so this fills it quickly
            for i in range(100):
                daemon.execute_task(f"after{batch}-{i}", "BigResult", size=10).wait(timeout=10)
                finished += 1
            store.flush()
            if store.stats()["degraded"]:
                break
        assert finished >= 100  # every task completed although nothing could be written
        assert store.stats()["degraded"] is True
        assert "full" in (store.degraded_reason or "")
        assert store.dropped_records > 0


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("missing/dir/runs.db", "does not exist"),
        ("/proc/labd-test.db", "not writable"),
    ],
)
def test_bad_paths_give_one_clear_error(tmp_path: Path, path: str, expected: str) -> None:
    target = tmp_path / path if not path.startswith("/") else Path(path)
    with pytest.raises(StoreError, match=expected):
        ld.LabDaemon(store=target)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this labd understands"):
        RunStore(db)


def test_prune_removes_old_runs_and_their_files(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with make_daemon(db) as daemon:
        daemon.execute_task("big", "BigResult", size=100_000).wait(timeout=30)
        daemon.execute_task("small", "Trivial").wait(timeout=10)
        store = daemon.store
        assert store is not None
        assert store.prune(older_than=3600) == 0
        assert store.prune(older_than=0) == 2
        assert daemon.runs() == []
        assert not list(Path(f"{db}.files").rglob("*.npy"))


_CRASHER = textwrap.dedent(
    """
    import sys, threading
    import labd as ld, labd.sim

    class Slow:
        def __init__(self, task_id, gate_steps):
            self.gate_steps = gate_steps
        def run(self, context):
            for i in range(10**6):
                context.progress(i + 1, None, f"step {i + 1}")
                if i + 1 == self.gate_steps:
                    print("READY", flush=True)
                context.sleep(0.001)

    daemon = ld.LabDaemon(store=sys.argv[1])
    labd.sim.demo_lab(daemon)
    daemon.register_plugins(tasks={"Slow": Slow})
    daemon.execute_task("sweep1", "WavelengthSweep", laser_id="laser1", detector_id="pm1",
                        start_wl=1549.0, stop_wl=1551.0, steps=7).wait(timeout=60)
    try:
        daemon.get_device("laser1").set_wavelength(9999.0)
    except ld.DeviceError:
        pass
    daemon.execute_task("long", "Slow", gate_steps=25)
    threading.Event().wait()
    """
)


def _progress_committed(db: Path, task_id: str, done: int) -> bool:
    conn = sqlite3.connect(db, timeout=5)
    try:
        row = conn.execute("SELECT progress FROM runs WHERE task_id=?", (task_id,)).fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return False
    finally:
        conn.close()
    return bool(row and row[0]) and ld.io.loads_json(row[0])["done"] >= done


def test_kill_9_keeps_completed_runs_and_marks_the_active_one_interrupted(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    script = tmp_path / "crasher.py"
    script.write_text(_CRASHER)
    proc = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"child did not get ready: {line!r}"
        # Progress 25 was reported before READY; wait until the writer has committed it.
        deadline = time.monotonic() + 20
        while not _progress_committed(db, "long", 25):
            assert time.monotonic() < deadline, "progress 25 never reached the database"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    with ld.LabDaemon(store=db) as daemon:
        first = daemon.get_run("sweep1")
        second = daemon.get_run("long")
        assert daemon.store is not None
        errors = daemon.store.device_errors("laser1")
        assert daemon.store.interrupted == 1
    assert first["status"] == "completed" and len(first["result"]["results"]) == 7
    assert second["status"] == "interrupted"
    assert second["progress"]["done"] >= 25
    assert second["finished_at"] is not None
    assert any("9999" in e["message"] for e in errors)


def test_store_writes_never_run_on_the_task_thread(tmp_path: Path) -> None:
    """A stalled writer (the disk hangs) must not stall the task: records just queue up."""
    db = tmp_path / "runs.db"
    with make_daemon(db) as daemon:
        store = daemon.store
        assert store is not None
        hold = threading.Event()
        entered = threading.Event()
        original = store._write_batch

        def stalled(batch: list[Any]) -> None:
            entered.set()
            hold.wait(30)
            original(batch)

        store._write_batch = stalled  # type: ignore[method-assign]
        daemon.execute_task("warmup", "Trivial")
        assert entered.wait(10)
        handle = daemon.execute_task("emit", "Emitter", steps=2000)
        assert handle.wait(timeout=30) == 2000  # finished while the writer is stuck
        hold.set()
        store._write_batch = original  # type: ignore[method-assign]
        assert store.flush(timeout=30)
        assert daemon.get_run("emit")["progress"]["done"] == 2000


def test_size_cap_deletes_the_oldest_finished_runs(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db, max_bytes=256 * 1024)
    with ld.LabDaemon(store=store) as daemon:
        daemon.register_plugins(tasks={"Emitter": Emitter})
        for i in range(60):
            daemon.execute_task(f"e{i}", "Emitter", steps=200).wait(timeout=30)
        store.flush()
        store._last_cap_check = 0.0
        store._enforce_cap()  # what the writer does every few seconds
        kept = [r["task_id"] for r in daemon.runs(limit=100)]
        assert store._file_bytes() <= 256 * 1024
        assert kept and kept[0] == "e59" and "e0" not in kept
    store.close()


def test_size_cap_must_be_sensible(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="at least 65536"):
        RunStore(tmp_path / "x.db", max_bytes=10)


def test_a_store_file_has_one_writer_at_a_time(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = RunStore(db)
    try:
        with pytest.raises(StoreError, match=f"in use by labd process {os.getpid()}"):
            RunStore(db)
    finally:
        first.close()
    RunStore(db).close()  # free again once closed
