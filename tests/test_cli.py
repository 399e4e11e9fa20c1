"""The ``labd`` command against a real server on 127.0.0.1 (typer's CliRunner, and a subprocess for serve)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from labd.cli import app
from labd.cli.args import parse_call_args, parse_params, parse_value
from labd.cli.errors import CliError
from labd.cli.output import sparkline
from labd.errors import TaskCancelledError
from labd.testing import LabdProcess

pytestmark = pytest.mark.server

# Wide, colourless output: rich wraps at 80 columns and adds escape codes otherwise.
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "LABD_URL": None}
SERVE_START_TIMEOUT_S = 30.0
TASK_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env=ENV)


@pytest.fixture
def lab() -> Iterator[Any]:
    """A running server with the simulated lab (laser1, pm1, daq1), stopped after the test."""
    from labd.testing import running_server

    with running_server(demo=True) as running:
        yield running


def invoke(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """Exit non-zero with exactly one ``labd: error:`` line and no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("labd: error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], f"{fragment!r} not in {error_lines[0]!r}"


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose port is bound but not listening: connecting is refused, deterministically."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


# ---------------------------------------------------------------------- parsing
def test_words_become_json_values_or_strings() -> None:
    assert parse_value("1550") == 1550
    assert parse_value("-1.5e-3") == -1.5e-3
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("GPIB0::1") == "GPIB0::1"
    assert parse_call_args(["1550", '"a=b"', "unit=nm", "fast=true"]) == (
        [1550, "a=b"],
        {"unit": "nm", "fast": True},
    )
    assert parse_params(["steps=40", "laser_id=laser1"]) == {"steps": 40, "laser_id": "laser1"}
    with pytest.raises(CliError, match="key=value"):
        parse_params(["steps"])
    with pytest.raises(CliError, match="follows keyword"):
        parse_call_args(["a=1", "2"])


def test_sparkline_spans_lowest_to_highest() -> None:
    assert sparkline([1, 2, 3, 2, 1]) == "▁▅█▅▁"
    assert sparkline([float("nan"), 0.0]) == " ▄"


def test_version(runner: CliRunner) -> None:
    result = invoke(runner, "version")
    assert result.exit_code == 0
    assert result.output.startswith("labd ")


# ---------------------------------------------------------------------- remote commands
def test_devices_table_lists_the_demo_lab(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "devices", "--url", lab.url)
    assert result.exit_code == 0, result.output
    for device_id, device_type in (
        ("laser1", "SimLaser"),
        ("pm1", "SimPowerMeter"),
        ("daq1", "SimDAQ"),
    ):
        assert device_id in result.output
        assert device_type in result.output
    assert "connected" in result.output


def test_url_from_environment(runner: CliRunner, lab: Any) -> None:
    result = runner.invoke(app, ["devices"], env={**ENV, "LABD_URL": lab.url})
    assert result.exit_code == 0, result.output
    assert "laser1" in result.output


def test_call_set_then_get_wavelength(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "call", "laser1", "set_wavelength", "1550", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "null"
    result = invoke(runner, "call", "laser1", "get_wavelength", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert float(result.output) == 1550.0
    result = invoke(runner, "call", "laser1", "set_wavelength", "nm=1549.5", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert lab.daemon.get_device("laser1").get_wavelength() == 1549.5


def test_methods_table(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "methods", "laser1", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert "set_wavelength" in result.output
    assert "command" in result.output and "query" in result.output


def test_run_follow_completes_and_prints_the_result(runner: CliRunner, lab: Any) -> None:
    result = invoke(
        runner,
        "run",
        "WavelengthSweep",
        "laser_id=laser1",
        "detector_id=pm1",
        "start_wl=1549",
        "stop_wl=1551",
        "steps=5",
        "--id",
        "sweepA",
        "--follow",
        "--url",
        lab.url,
    )
    assert result.exit_code == 0, result.output
    assert "started task 'sweepA'" in result.output
    assert "completed" in result.output
    assert "wavelength" in result.output and "power" in result.output
    assert "1551" in result.output
    tasks = invoke(runner, "tasks", "--url", lab.url)
    assert tasks.exit_code == 0, tasks.output
    assert "sweepA" in tasks.output and "completed" in tasks.output


def test_run_then_cancel(runner: CliRunner, lab: Any) -> None:
    result = invoke(
        runner,
        "run",
        "WavelengthSweep",
        "laser_id=laser1",
        "detector_id=pm1",
        "start_wl=1545",
        "stop_wl=1555",
        "steps=100000",
        "dwell=0.01",
        "--id",
        "long1",
        "--url",
        lab.url,
    )
    assert result.exit_code == 0, result.output
    assert "labd cancel long1" in result.output
    result = invoke(runner, "cancel", "long1", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert "cancellation_requested" in result.output
    handle = lab.daemon.get_task("long1")
    with pytest.raises(Exception, match="cancel"):
        handle.wait(timeout=TASK_TIMEOUT_S)
    tasks = invoke(runner, "tasks", "--url", lab.url)
    assert "long1" in tasks.output and "cancelled" in tasks.output


def test_command_to_a_device_owned_by_a_task_is_refused(runner: CliRunner, lab: Any) -> None:
    handle = lab.daemon.execute_task(
        "owner1",
        "WavelengthSweep",
        laser_id="laser1",
        detector_id="pm1",
        start_wl=1545.0,
        stop_wl=1555.0,
        steps=100000,
        dwell=0.01,
    )
    try:
        result = invoke(runner, "call", "laser1", "set_wavelength", "1550", "--url", lab.url)
        assert_one_line_error(result, "owner1")
        # Queries stay allowed for everyone.
        assert invoke(runner, "call", "laser1", "get_wavelength", "--url", lab.url).exit_code == 0
    finally:
        handle.cancel()
    with pytest.raises(Exception, match="cancel"):
        handle.wait(timeout=TASK_TIMEOUT_S)


def test_unknown_device_is_one_line(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "call", "nope", "get_power", "--url", lab.url)
    assert result.exit_code == 1
    assert_one_line_error(result, "nope", "laser1")


def test_unknown_method_and_bad_arguments(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "call", "laser1", "get_colour", "--url", lab.url)
    assert_one_line_error(result, "get_colour", "get_wavelength")
    result = invoke(runner, "call", "laser1", "set_wavelength", "1", "2", "3", "--url", lab.url)
    assert_one_line_error(result, "set_wavelength")
    result = invoke(runner, "call", "laser1", "set_wavelength", "abc", "--url", lab.url)
    assert_one_line_error(result, "abc")


def test_bad_task_words_and_unknown_task_type(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "run", "WavelengthSweep", "steps", "--url", lab.url)
    assert result.exit_code == 2
    assert_one_line_error(result, "key=value", "'steps'")
    result = invoke(runner, "run", "NoSuchTask", "--url", lab.url)
    assert_one_line_error(result, "NoSuchTask", "WavelengthSweep")


def test_server_down_is_one_clear_line(runner: CliRunner, refused_url: str) -> None:
    for args in (["devices"], ["tasks"], ["call", "laser1", "get_wavelength"], ["cancel", "x"]):
        result = invoke(runner, *args, "--url", refused_url)
        assert result.exit_code == 1
        assert_one_line_error(result, f"cannot reach labd at {refused_url}", "`labd serve`")


def test_watch_polls_a_query(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "watch", "pm1", "--count", "3", "--interval", "0.01", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert "get_power()" in result.output
    assert "pm1: 3 updates" in result.output


def test_watch_follows_a_stream(runner: CliRunner, lab: Any) -> None:
    result = invoke(runner, "watch", "daq1", "--count", "3", "--url", lab.url)
    assert result.exit_code == 0, result.output
    assert "/stream/devices/daq1" in result.output
    assert "daq1: 3 updates" in result.output
    assert "samples" in result.output


def test_watch_unknown_device(runner: CliRunner, lab: Any) -> None:
    assert_one_line_error(invoke(runner, "watch", "ghost", "--url", lab.url), "ghost")


# ---------------------------------------------------------------------- demo
def test_demo_no_wait_sweeps_through_the_client(runner: CliRunner) -> None:
    result = invoke(runner, "demo", "--port", "0", "--steps", "21", "--dwell", "0", "--no-wait")
    assert result.exit_code == 0, result.output
    assert "resonance at 1550.000 nm" in result.output
    assert "overview:  http://127.0.0.1:" in result.output
    assert "/docs" in result.output
    assert any(char in result.output for char in "▁▂▃")


def test_demo_moves_off_a_busy_port(runner: CliRunner, busy_port: int) -> None:
    result = invoke(
        runner, "demo", "--port", str(busy_port), "--steps", "3", "--dwell", "0", "--no-wait"
    )
    assert result.exit_code == 0, result.output
    assert f"port {busy_port} is busy" in result.output
    assert f"127.0.0.1:{busy_port}" not in result.output


# ---------------------------------------------------------------------- serve
def test_serve_bad_config_exits_2_with_one_line(runner: CliRunner, tmp_path: Path) -> None:
    config = tmp_path / "lab.toml"
    config.write_text('[devices.laser1]\ntype = "nosuchpkg_cli.drivers:Laser"\n')
    result = invoke(runner, "serve", str(config), "--port", "0")
    assert result.exit_code == 2
    assert_one_line_error(result, str(config), "devices.laser1.type", "nosuchpkg_cli")


def test_serve_busy_port_exits_1(runner: CliRunner, busy_port: int) -> None:
    result = invoke(runner, "serve", "--demo", "--port", str(busy_port))
    assert result.exit_code == 1
    assert_one_line_error(result, f"127.0.0.1:{busy_port}", "already in use", "--port")


def test_serve_subprocess_answers_then_stops_on_sigint() -> None:
    from labd.client import ServerAPI

    with LabdProcess("serve", "--demo", "--port", "0", timeout=SERVE_START_TIMEOUT_S) as proc:
        banner = proc.wait_for("labd serving")
        url = banner.split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        with ServerAPI(url, timeout=10.0) as api:
            assert api.health()["status"] == "healthy"
            assert api.call("laser1", "get_wavelength") == 1550.0
        assert proc.stop(signal.SIGINT) == 0
    output = proc.output()
    assert "Traceback" not in output
    assert "labd stopped" in output


def test_ctrl_c_while_following_cancels_the_run(lab: Any) -> None:
    args = ["run", "WavelengthSweep", "laser_id=laser1", "detector_id=pm1", "start_wl=1545",
            "stop_wl=1555", "steps=100000", "dwell=0.01", "--id", "followed1", "--follow",
            "--url", lab.url]
    with LabdProcess(*args, env={"LABD_URL": None}, timeout=SERVE_START_TIMEOUT_S) as proc:
        proc.wait_for("started task 'followed1'")
        # stdin is not a terminal, so Ctrl-C cancels without asking.
        assert proc.stop(signal.SIGINT) == 130
    output = proc.output()
    assert "Traceback" not in output
    assert "Cancellation of task 'followed1' requested" in output
    # The CLI exits once the cancel was accepted; the run ends at its next step.
    handle = lab.daemon.get_task("followed1")
    with pytest.raises(TaskCancelledError):
        handle.wait(SERVE_START_TIMEOUT_S)
    assert handle.info()["status"] == "cancelled"


# ---------------------------------------------------------------------- runs (history)
class _FailingTask:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def run(self, context: Any) -> None:
        raise RuntimeError("laser interlock open")


class _ArrayTask:
    def __init__(self, task_id: str, size: int = 1000) -> None:
        self.size = size

    def run(self, context: Any) -> dict[str, Any]:
        import numpy as np

        return {"trace": np.linspace(0.0, 1.0, self.size), "gain": 2.5}


def _recorded_lab(db: Path) -> Any:
    """The simulated lab with a run store at ``db`` behind a real server (a context manager)."""
    from contextlib import contextmanager

    import labd
    from labd.testing import running_server

    @contextmanager
    def lab_with_history() -> Iterator[Any]:
        daemon = labd.LabDaemon(store=db)
        try:
            daemon.register_plugins(tasks={"Failing": _FailingTask, "Arrays": _ArrayTask})
            with running_server(daemon, demo=True) as running:
                yield running
        finally:
            daemon.shutdown()

    return lab_with_history()


def _record_runs(daemon: Any) -> None:
    import labd

    daemon.execute_task("sweep1", "WavelengthSweep", laser_id="laser1", detector_id="pm1",
                        start_wl=1549.0, stop_wl=1551.0, steps=5).wait(timeout=TASK_TIMEOUT_S)
    with pytest.raises(labd.TaskFailedError):
        daemon.execute_task("bad", "Failing").wait(timeout=TASK_TIMEOUT_S)
    daemon.execute_task("arrays", "Arrays", size=1000).wait(timeout=TASK_TIMEOUT_S)


def test_runs_table_filters_and_show(runner: CliRunner, tmp_path: Path) -> None:
    with _recorded_lab(tmp_path / "runs.db") as running:
        _record_runs(running.daemon)
        table = invoke(runner, "runs", "--url", running.url)
        failed = invoke(runner, "runs", "--status", "failed", "--url", running.url)
        one = invoke(runner, "runs", "--limit", "1", "--url", running.url)
        sweep = invoke(runner, "runs", "show", "sweep1", "--url", running.url)
        bad = invoke(runner, "runs", "show", "bad", "--url", running.url)
        arrays = invoke(runner, "runs", "show", "arrays", "--events", "0", "--url", running.url)
        unknown = invoke(runner, "runs", "show", "nope", "--url", running.url)
        bad_since = invoke(runner, "runs", "--since", "7x", "--url", running.url)
    assert table.exit_code == 0, table.output
    for word in ("sweep1", "WavelengthSweep", "completed", "5/5", "bad", "failed",
                 "RuntimeError: laser interlock open", "arrays", "duration"):
        assert word in table.output, word
    assert "bad" in failed.output and "sweep1" not in failed.output
    assert "arrays" in one.output and "more runs: labd runs --offset 1" in one.output
    assert sweep.exit_code == 0, sweep.output
    for text in ("run 'sweep1'", "completed", "laser1, pm1", "start_wl", "1549",
                 "result['results']: 5 rows", "last 10 events", "progress"):
        assert text in sweep.output, text
    assert "error: RuntimeError: laser interlock open" in bad.output
    assert "Traceback (most recent call last)" in bad.output
    assert "array float64 shape (1000,): [0, 0.001001, 0.002002, …, 0.997998, 0.998999, 1]" in (
        arrays.output)
    assert "gain" in arrays.output and "events" not in arrays.output
    assert unknown.exit_code == 1
    assert_one_line_error(unknown, "nope")
    assert bad_since.exit_code == 2
    assert_one_line_error(bad_since, "--since", "'7x'", "units s, m, h, d, w")


def test_runs_export_to_hdf5_and_json_round_trips(runner: CliRunner, tmp_path: Path) -> None:
    import numpy as np

    from labd.io import load_hdf5, load_json

    h5, js, h5_arrays = tmp_path / "sweep1.h5", tmp_path / "sweep1.json", tmp_path / "arr.h5"
    with _recorded_lab(tmp_path / "runs.db") as running:
        _record_runs(running.daemon)
        expected = running.daemon.get_run("sweep1")
        done = invoke(runner, "runs", "export", "sweep1", "--hdf5", str(h5), "--json", str(js),
                      "--url", running.url)
        again = invoke(runner, "runs", "export", "sweep1", "--hdf5", str(h5), "--url", running.url)
        forced = invoke(runner, "runs", "export", "sweep1", "--hdf5", str(h5), "--force",
                        "--url", running.url)
        arrays = invoke(runner, "runs", "export", "arrays", "--hdf5", str(h5_arrays),
                        "--url", running.url)
        nowhere = invoke(runner, "runs", "export", "sweep1", "--url", running.url)
    assert done.exit_code == 0, done.output
    assert f"written to {h5}" in done.output and f"written to {js}" in done.output
    data, meta = load_hdf5(h5, return_metadata=True)
    assert data["results"] == expected["result"]["results"] and data["status"] == "completed"
    for key in ("task_id", "task_type", "status", "params", "device_ids", "progress",
                "created_at", "finished_at"):
        assert meta[key] == expected[key], key
    assert meta["error"] is None and "labd_version" in meta
    record = load_json(js)
    assert record["result"] == expected["result"] and record["events"] == expected["events"]
    assert again.exit_code == 2
    assert_one_line_error(again, str(h5), "already exists", "--force")
    assert forced.exit_code == 0, forced.output
    assert arrays.exit_code == 0, arrays.output
    np.testing.assert_array_equal(load_hdf5(h5_arrays)["trace"], np.linspace(0.0, 1.0, 1000))
    assert nowhere.exit_code == 2
    assert_one_line_error(nowhere, "--hdf5 FILE", "--json FILE")


def test_runs_prune_deletes_old_runs_from_a_local_db(runner: CliRunner, tmp_path: Path) -> None:
    import labd
    from labd.store import RunStore

    db = tmp_path / "runs.db"
    with labd.LabDaemon(store=db) as daemon:
        daemon.register_plugins(tasks={"Arrays": _ArrayTask})
        for i in range(3):
            daemon.execute_task(f"a{i}", "Arrays", size=100_000).wait(timeout=TASK_TIMEOUT_S)
    kept = invoke(runner, "runs", "prune", "--older-than", "90d", "--db", str(db))
    pruned = runner.invoke(app, ["runs", "prune", "--older-than", "0s"],
                           env={"LABD_DB": str(db)}, catch_exceptions=False)
    assert kept.exit_code == 0, kept.output
    assert "deleted 0 run(s)" in kept.output
    assert pruned.exit_code == 0, pruned.output
    assert "deleted 3 run(s)" in pruned.output and "pruning" in pruned.output
    sizes = pruned.output.split("size ")[-1].split(" -> ")
    assert sizes[0].endswith("MB") and sizes[0] != sizes[1].strip()
    assert not list(Path(f"{db}.files").rglob("*.npy"))
    store = RunStore(db)
    try:
        assert store.runs() == []
    finally:
        store.close()


def test_runs_prune_bad_values_and_a_store_in_use(runner: CliRunner, tmp_path: Path) -> None:
    from labd.store import RunStore

    db = tmp_path / "runs.db"
    RunStore(db).close()
    bad_unit = invoke(runner, "runs", "prune", "--older-than", "90x", "--db", str(db))
    bad_size = invoke(runner, "runs", "prune", "--max-size", "1XB", "--db", str(db))
    nothing = invoke(runner, "runs", "prune", "--db", str(db))
    missing = invoke(runner, "runs", "prune", "--older-than", "1d", "--db", str(tmp_path / "x.db"))
    # A live writer (here: this process) holds the store's lock.
    holder = RunStore(db)
    try:
        in_use = invoke(runner, "runs", "prune", "--older-than", "1d", "--db", str(db))
    finally:
        holder.close()
    assert bad_unit.exit_code == 2
    assert_one_line_error(bad_unit, "--older-than", "'90x'", "valid units: s, m, h, d, w")
    assert bad_size.exit_code == 2
    assert_one_line_error(bad_size, "--max-size", "'1XB'", "MB")
    assert nothing.exit_code == 2
    assert_one_line_error(nothing, "--older-than 90d", "--max-size 1GB")
    assert missing.exit_code == 2
    assert_one_line_error(missing, "no run store", "x.db")
    assert in_use.exit_code == 1
    assert_one_line_error(in_use, "in use by labd process", str(os.getpid()))
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    ("db", "fragment"),
    [
        ("{tmp}/missing/dir/runs.db", "does not exist"),
        ("/proc/labd-cli-test.db", "not writable"),
    ],
)
def test_serve_with_an_unusable_db_exits_2_with_one_line(
    runner: CliRunner, tmp_path: Path, db: str, fragment: str
) -> None:
    path = db.format(tmp=tmp_path)
    result = invoke(runner, "serve", "--demo", "--port", "0", "--db", path)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, path, fragment, "--db")
    assert not (tmp_path / "missing").exists()


def test_serve_rejects_a_tiny_size_cap(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "serve", "--port", "0", "--db", str(tmp_path / "r.db"),
                    "--db-max-size", "10KB")
    assert result.exit_code == 2
    assert_one_line_error(result, "--db-max-size", "'10KB'", "64KiB")


def test_demo_records_its_sweep_and_says_where(runner: CliRunner, tmp_path: Path) -> None:
    from labd.store import RunStore

    db = tmp_path / "demo.db"
    recorded = invoke(runner, "demo", "--port", "0", "--steps", "3", "--dwell", "0", "--no-wait",
                      "--db", str(db))
    memory = invoke(runner, "demo", "--port", "0", "--steps", "3", "--dwell", "0", "--no-wait",
                    "--no-db")
    assert recorded.exit_code == 0, recorded.output
    assert f"history:   {db}" in recorded.output
    assert memory.exit_code == 0, memory.output
    assert "history:   in memory only" in memory.output
    store = RunStore(db)
    try:
        runs = store.runs()
    finally:
        store.close()
    assert [(r["task_type"], r["status"]) for r in runs] == [("WavelengthSweep", "completed")]
