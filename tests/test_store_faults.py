"""The run store under faults: bad values, reused buffers, a full disk, power loss, kill -9.

Each test here failed before the fix it names (issue 7, items 13 to 19). Faults are real:
SQLite files in ``tmp_path`` (a full disk is ``PRAGMA max_page_count``), real ``labd serve``
processes killed with SIGKILL. A stalled disk is the writer held inside its batch by an
event (:func:`held_writer`). Bounded waits are watchdogs only; nothing asserts on time.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

import labd as ld
from labd.cli import app
from labd.client import ServerAPI
from labd.io import load_hdf5
from labd.store import RunStore, StoreWriteError
from labd.store_history import HistoryFile
from labd.testing import LabdProcess, running_server

WATCHDOG_S = 30.0
BIG = 100_000  # float64 values: 800 kB, above the store's 256 KiB side-file threshold
SWEEP = {"laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549.0, "stop_wl": 1551.0}


# ---------------------------------------------------------------------- tasks and helpers
class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class Opaque:
    """Emits and returns objects that JSON cannot hold."""

    def __init__(self, task_id: str) -> None:
        pass

    def run(self, context: ld.TaskContext) -> dict[str, object]:
        context.emit({"step": 1, "handle": object()})
        return {"n": 2, "socket": Unprintable(), "values": [1.0, object()]}


class Refill:
    """An acquisition loop: one buffer, refilled in place and emitted after each fill."""

    def __init__(self, task_id: str, size: int) -> None:
        self.size = size

    def run(self, context: ld.TaskContext) -> None:
        buffer = np.zeros(self.size)
        for value in (1.0, 2.0, 3.0):
            buffer[:] = value
            context.emit({"trace": buffer})


class Fresh:
    """Emits three large arrays, a new one each time."""

    def __init__(self, task_id: str) -> None:
        pass

    def run(self, context: ld.TaskContext) -> None:
        for value in (1.0, 2.0, 3.0):
            context.emit(np.full(BIG, value))


class Big:
    def __init__(self, task_id: str) -> None:
        pass

    def run(self, context: ld.TaskContext) -> dict[str, object]:
        return {"trace": np.linspace(0.0, 1.0, BIG)}


class Trivial:
    def __init__(self, task_id: str) -> None:
        pass

    def run(self, context: ld.TaskContext) -> int:
        return 1


class EmitThenWait:
    """Reports progress and emits three times, then waits to be cancelled."""

    emitted = threading.Event()

    def __init__(self, task_id: str, gain: float) -> None:
        self.gain = gain

    def run(self, context: ld.TaskContext) -> None:
        for i in range(3):
            context.progress(i + 1, 10, f"point {i + 1}")
            context.emit({"i": i, "signal": [self.gain * i, self.gain * (i + 1)]})
        type(self).emitted.set()
        context.cancel_event.wait(WATCHDOG_S)
        context.checkpoint()


def make_daemon(store: RunStore | Path) -> ld.LabDaemon:
    daemon = ld.LabDaemon(store=store)
    daemon.register_plugins(tasks={"Opaque": Opaque, "Refill": Refill, "Fresh": Fresh, "Big": Big,
                                   "Trivial": Trivial, "EmitThenWait": EmitThenWait})
    return daemon


@contextmanager
def held_writer(store: RunStore) -> Iterator[None]:
    """The writer takes its next batch and waits inside it for the block to end (a stalled
    disk): everything recorded inside the block queues up and lands as one batch after it."""
    entered, release = threading.Event(), threading.Event()
    original = store._write_batch

    def stalled(batch: list[Any]) -> None:
        if not release.is_set():
            entered.set()
            release.wait(WATCHDOG_S)
        original(batch)

    store._write_batch = stalled  # type: ignore[method-assign]
    flusher = threading.Thread(target=store.flush, args=(WATCHDOG_S,), name="test-flusher")
    flusher.start()
    try:
        assert entered.wait(WATCHDOG_S), "the writer never took a batch"
        yield
    finally:
        release.set()
        flusher.join(WATCHDOG_S)
        store._write_batch = original  # type: ignore[method-assign]


def created(store: RunStore, task_id: str) -> int:
    uid = store.new_uid()
    store.run_created(uid, {"task_id": task_id, "task_type": "Manual", "status": "running",
                            "params": {"gain": 2.0}, "device_ids": []})
    return uid


def side_files(db: Path) -> list[Path]:
    return sorted(Path(f"{db}.files").rglob("*.npy"))


def data_events(record: dict[str, Any]) -> list[Any]:
    return [e["body"] for e in record["events"] if e["kind"] == "data"]


def fill_the_disk(store: RunStore, spare_pages: int) -> None:
    """Let the database grow by ``spare_pages`` pages at most (call while the writer is held)."""
    pages = store._writer_conn.execute("PRAGMA page_count").fetchone()[0]
    store._writer_conn.execute(f"PRAGMA max_page_count = {pages + spare_pages}")


# ---------------------------------------------------------------------- item 13
def test_a_value_json_cannot_hold_is_stored_as_its_repr_and_the_writer_lives_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "runs.db"
    with caplog.at_level(logging.WARNING, logger="labd.store"), make_daemon(db) as daemon:
        daemon.execute_task("opaque", "Opaque").wait(timeout=WATCHDOG_S)
        daemon.execute_task("after", "Trivial").wait(timeout=WATCHDOG_S)
        store = daemon.store
        assert store is not None
        assert store.flush(WATCHDOG_S), "the writer stopped writing"
        opaque, after, stats = store.get_run("opaque"), store.get_run("after"), store.stats()
    assert opaque is not None and after is not None
    assert opaque["status"] == "completed" and after["status"] == "completed"
    result = opaque["result"]
    assert result["n"] == 2
    assert result["socket"] == "<Unprintable object; repr() failed: RuntimeError>"
    assert result["values"][0] == 1.0 and result["values"][1].startswith("<object object at")
    [emitted] = data_events(opaque)
    assert emitted["step"] == 1 and emitted["handle"].startswith("<object object at")
    assert stats["degraded"] is False and stats["dropped_records"] == 0
    assert stats["repr_values"] == 2
    warnings = [r.getMessage() for r in caplog.records if "stored as repr()" in r.getMessage()]
    assert any("result of run" in w and "Unprintable" in w for w in warnings), warnings


def test_a_write_that_fails_is_reported_to_flush_and_in_health(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    Path(f"{db}.files").write_text("a file where the side-file directory belongs")
    daemon = make_daemon(db)
    try:
        with running_server(daemon) as srv, httpx.Client(base_url=srv.url, timeout=WATCHDOG_S) as http:
            store = daemon.store
            assert store is not None
            small = daemon.execute_task("small", "Trivial")
            small.wait(timeout=WATCHDOG_S)
            assert small._run.persisted.result(WATCHDOG_S) is True
            assert store.flush(WATCHDOG_S) is True
            big_run = daemon.execute_task("big", "Big")  # its result's side file fails
            big_run.wait(timeout=WATCHDOG_S)
            with pytest.raises(StoreWriteError, match=r"Run 'big' .* was not completely saved .*File exists"):
                big_run._run.persisted.result(WATCHDOG_S)  # the run's own "persisted" signal
            flushed = store.flush(WATCHDOG_S)
            health = http.get("/health").json()
            big = store.get_run("big")
    finally:
        daemon.shutdown()
    assert flushed is False, "a lost record was acknowledged"
    assert health["status"] == "degraded"
    assert health["store"]["degraded"] is True
    assert "runs.db.files" in health["store"]["degraded_reason"]
    assert health["store"]["dropped_records"] == 1
    assert big is not None and big["status"] == "running"  # its end was not written: not faked


# ---------------------------------------------------------------------- item 14
def test_every_large_array_a_run_emits_gets_its_own_side_file(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with make_daemon(db) as daemon:
        daemon.execute_task("fresh", "Fresh").wait(timeout=WATCHDOG_S)
        record = daemon.get_run("fresh")
    emitted = data_events(record)
    assert [float(a[0]) for a in emitted] == [1.0, 2.0, 3.0]
    assert all(isinstance(a, np.ndarray) and a.shape == (BIG,) for a in emitted)
    assert len(side_files(db)) == 3


# ---------------------------------------------------------------------- item 15
@pytest.mark.parametrize("size", [8, BIG], ids=["json", "side-file"])
def test_emit_records_the_buffer_as_it_was_at_the_call(tmp_path: Path, size: int) -> None:
    db = tmp_path / "runs.db"
    with make_daemon(db) as daemon:
        store = daemon.store
        assert store is not None
        with held_writer(store):  # nothing is written until the task has refilled its buffer
            daemon.execute_task("refill", "Refill", size=size).wait(timeout=WATCHDOG_S)
        assert store.flush(WATCHDOG_S)
        record = daemon.get_run("refill")
    firsts = [float(np.asarray(body["trace"])[0]) for body in data_events(record)]
    assert firsts == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------- item 16
def test_a_full_disk_loses_only_the_record_that_does_not_fit_and_says_so(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db, max_emit_bytes=16 * 1024 * 1024)
    try:
        ok_done: Future[bool] = Future()
        lost_done: Future[bool] = Future()
        with held_writer(store):  # the records below land in one batch
            fill_the_disk(store, spare_pages=40)
            ok = created(store, "fits")
            store.run_progress(ok, {"done": 1, "total": 1})
            store.run_data(ok, {"trace": np.ones(BIG)})
            store.run_finished(ok, "completed", {"n": 1}, None, time.time(), ok_done)
            lost = created(store, "too-big")
            store.run_data(lost, {"trace": np.ones(BIG), "log": "x" * 2_000_000})
            store.run_finished(lost, "completed", None, None, time.time(), lost_done)
        flushed = store.flush(WATCHDOG_S)
        stats = store.stats()
        fits, too_big = store.get_run("fits"), store.get_run("too-big")
        with pytest.raises(StoreWriteError, match=r"Run 'too-big' .* not completely saved .*full"):
            lost_done.result(WATCHDOG_S)
        assert ok_done.result(WATCHDOG_S) is True
        # Space again: the store recovers, and a later flush reports only later records.
        store._writer_conn.execute("PRAGMA max_page_count = 1073741823")
        created(store, "later")
        assert store.flush(WATCHDOG_S) is True
        recovered = store.stats()
    finally:
        store.close()
    assert flushed is False
    assert stats["degraded"] is True and "full" in stats["degraded_reason"]
    assert stats["dropped_records"] == 1
    assert fits is not None and fits["status"] == "completed" and fits["result"] == {"n": 1}
    assert [e["kind"] for e in fits["events"]] == ["state", "progress", "data", "state"]
    assert too_big is not None and data_events(too_big) == []
    # The failed record's side file is gone; the committed one's is there.
    [kept] = side_files(db)
    assert kept.parent.name == f"run-{ok}"
    assert recovered["degraded"] is False and recovered["last_write_error"] == stats["degraded_reason"]


def test_a_full_disk_keeps_every_record_that_fits_among_many_runs(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db, max_emit_bytes=16 * 1024 * 1024)
    try:
        with held_writer(store):  # one batch: 20 runs, every other one emits too much
            fill_the_disk(store, spare_pages=60)
            uids = [created(store, f"r{i}") for i in range(20)]
            for i, uid in enumerate(uids):
                store.run_data(uid, {"i": i, "log": "x" * (2_000_000 if i % 2 else 10)})
                store.run_finished(uid, "completed", {"i": i}, None, time.time())
        assert store.flush(WATCHDOG_S) is False
        records = {r["task_id"]: store.get_run(r["task_id"]) for r in store.runs(limit=100)}
        dropped = store.dropped_records
    finally:
        store.close()
    assert sorted(records) == sorted(f"r{i}" for i in range(20))
    for i in range(20):
        record = records[f"r{i}"]
        assert record is not None and record["status"] == "completed" and record["result"] == {"i": i}
        assert [d["i"] for d in data_events(record)] == ([] if i % 2 else [i]), i
    assert dropped == 10


# ---------------------------------------------------------------------- item 17
def test_commits_survive_power_loss(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    try:
        assert store.flush(WATCHDOG_S)
        level = store._writer_conn.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        store.close()
    assert level == 2, "synchronous must be FULL: an acknowledged run must survive power loss"


def test_side_files_and_their_directories_are_fsynced_before_the_row_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db)
    order: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        order.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    try:
        uid = created(store, "t")
        assert store.flush(WATCHDOG_S)
        monkeypatch.setattr(os, "fsync", recording_fsync)
        store._writer_conn.set_trace_callback(order.append)  # SQL as the writer runs it
        store.run_data(uid, np.ones(BIG))
        assert store.flush(WATCHDOG_S)
        store._writer_conn.set_trace_callback(None)
    finally:
        store.close()
    [npy] = side_files(db)
    commit = max(i for i, line in enumerate(order) if line == "COMMIT")
    insert = next(i for i, line in enumerate(order) if line.startswith("INSERT INTO run_events"))
    file_synced = order.index(f"fsync {npy}")
    run_dir_synced = order.index(f"fsync {npy.parent}")
    files_dir_synced = order.index(f"fsync {npy.parent.parent}")  # run-N/ is a new entry there
    assert max(file_synced, run_dir_synced, files_dir_synced) < commit and insert < commit


def test_close_writes_everything_queued_before_it_even_from_a_stalled_disk(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db)
    uid = created(store, "finishing")
    done: Future[bool] = Future()
    with held_writer(store):
        store.run_finished(uid, "completed", {"n": 1}, None, time.time(), done)
        store.close(timeout=0.1)  # the disk is stuck: close gives up waiting, never writing
    store._thread.join(WATCHDOG_S)
    assert not store._thread.is_alive()
    assert done.result(0) is True
    again = RunStore(db)
    try:
        record = again.get_run("finishing")
        interrupted = again.interrupted
    finally:
        again.close()
    assert record is not None and record["status"] == "completed" and record["result"] == {"n": 1}
    assert interrupted == 0


def test_a_record_after_close_is_refused_not_lost_silently(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    uid = created(store, "late")
    store.close()
    done: Future[bool] = Future()
    store.run_finished(uid, "completed", None, None, time.time(), done)
    with pytest.raises(StoreWriteError, match="was closed first"):
        done.result(0)
    assert store.dropped_records == 1


# ---------------------------------------------------------------------- item 18
def serve(db: Path) -> LabdProcess:
    return LabdProcess("serve", "--demo", "--db", str(db), "--port", "0",
                       env={"LABD_DB": None}, timeout=WATCHDOG_S)


def test_labd_serve_restarts_on_its_store_right_after_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with serve(db) as first:
        first.wait_for("labd serving")
        # Not reaped yet: a zombie with its pid, as under a supervisor that restarts at once.
        os.kill(first.process.pid, signal.SIGKILL)
        with serve(db) as second:
            url = second.wait_for("labd serving").split(" at ")[-1].strip()
            with ServerAPI(url, timeout=WATCHDOG_S) as api:
                health = api.health()
            assert second.stop(signal.SIGINT) == 0
    assert health["status"] == "healthy" and health["store"]["path"] == str(db)


def test_labd_runs_reads_a_history_file_while_labd_serve_writes_it(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    h5 = tmp_path / "sweep1.h5"
    runner = CliRunner(env={"LABD_DB": None, "COLUMNS": "200", "NO_COLOR": "1"})
    with serve(db) as server:
        url = server.wait_for("labd serving").split(" at ")[-1].strip()
        with ServerAPI(url, timeout=WATCHDOG_S) as api:
            api.execute_task("sweep1", "WavelengthSweep", {**SWEEP, "steps": 3})
            deadline = time.monotonic() + WATCHDOG_S
            while api.get_run("sweep1")["status"] != "completed":  # reading it flushes the store
                assert time.monotonic() < deadline, "sweep1 did not complete"
                time.sleep(0.02)
        with LabdProcess("runs", "--db", str(db), env={"LABD_DB": None}) as listing:
            assert listing.process.wait(WATCHDOG_S) == 0
            listing.close()
            listed = listing.output()
        shown = runner.invoke(app, ["runs", "show", "sweep1", "--db", str(db)])
        exported = runner.invoke(app, ["runs", "export", "sweep1", "--db", str(db), "--hdf5", str(h5)])
        assert server.stop(signal.SIGINT) == 0
    assert "sweep1" in listed and "completed" in listed and f"runs in {db}" in listed
    assert shown.exit_code == 0 and "run 'sweep1'" in shown.output, shown.output
    assert exported.exit_code == 0, exported.output
    data, meta = load_hdf5(h5, return_metadata=True)
    assert len(data["results"]) == 3 and len(data["emitted"]) == 3 and meta["status"] == "completed"


def test_labd_runs_db_names_a_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["runs", "--db", str(tmp_path / "nope.db")])
    assert result.exit_code == 2 and "No run store at" in result.output


# ---------------------------------------------------------------------- item 19
def test_export_of_a_cancelled_run_keeps_what_it_emitted(tmp_path: Path) -> None:
    h5 = tmp_path / "cancelled.h5"
    EmitThenWait.emitted.clear()
    daemon = make_daemon(tmp_path / "runs.db")
    try:
        with running_server(daemon) as srv:
            handle = daemon.execute_task("partial", "EmitThenWait", gain=2.0)
            assert EmitThenWait.emitted.wait(WATCHDOG_S)
            handle.cancel()
            with pytest.raises(ld.TaskCancelledError):
                handle.wait(timeout=WATCHDOG_S)
            result = CliRunner().invoke(
                app, ["runs", "export", "partial", "--hdf5", str(h5), "--url", srv.url])
    finally:
        daemon.shutdown()
    assert result.exit_code == 0, result.output
    data, meta = load_hdf5(h5, return_metadata=True)
    assert [e["i"] for e in data["emitted"]] == [0, 1, 2]
    np.testing.assert_array_equal(data["emitted"][2]["signal"], [4.0, 6.0])
    np.testing.assert_array_equal(data["progress_history"]["done"], [1.0, 2.0, 3.0])
    assert data["progress_history"]["message"] == ["point 1", "point 2", "point 3"]
    assert meta["status"] == "cancelled" and meta["params"] == {"gain": 2.0}


def test_export_of_an_interrupted_run_from_the_file(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    h5 = tmp_path / "interrupted.h5"
    store = RunStore(db)
    uid = created(store, "cut")
    store.run_progress(uid, {"done": 1, "total": 4, "fraction": 0.25, "message": None})
    store.run_data(uid, {"trace": np.arange(3.0)})
    store.run_data(uid, {"trace": np.arange(BIG, dtype=float)})  # a side file
    store.close()  # the run never ended: the next open marks it interrupted
    RunStore(db).close()
    with HistoryFile(db) as history:
        assert history.runs()[0]["status"] == "interrupted"
    result = CliRunner().invoke(app, ["runs", "export", "cut", "--db", str(db), "--hdf5", str(h5)])
    assert result.exit_code == 0, result.output
    data, meta = load_hdf5(h5, return_metadata=True)
    np.testing.assert_array_equal(data["emitted"][0]["trace"], np.arange(3.0))
    np.testing.assert_array_equal(data["emitted"][1]["trace"], np.arange(BIG, dtype=float))
    assert data["progress_history"]["total"][0] == 4.0
    assert meta["status"] == "interrupted" and meta["params"] == {"gain": 2.0}
    assert meta["progress"]["done"] == 1


def test_history_file_reads_without_the_writer_lock(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = RunStore(db)
    try:
        created(store, "open")
        assert store.flush(WATCHDOG_S)
        with HistoryFile(db) as history:  # the store still holds its lock
            assert [r["task_id"] for r in history.runs()] == ["open"]
    finally:
        store.close()
