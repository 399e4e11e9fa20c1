"""A node's log file from ``labd lab up`` (labd/lab/launcher_log.py) and where it is shown.

The writer and reader on real files (a full disk is ``/dev/full``); ``labd lab up`` refusing
a log directory it cannot write; ``labd serve`` as a real process showing, on its dashboard
server page, the launcher's facts it finds in its environment, and nothing without them.
The whole path through ``labd lab up`` and a crash is in tests/test_lab_processes.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from labd.lab.launcher_log import (
    ENV_LOG,
    LaunchInfo,
    NodeLog,
    describe_exit,
    read_tail,
    rotated_path,
)
from labd.testing import LabdProcess
from test_lab_support import free_port

TIMEOUT = 10.0
LAUNCHER_ENV = ("LABD_LAUNCHER_LOG", "LABD_LAUNCHER_PID", "LABD_LAUNCHER_SERVERS",
                "LABD_LAUNCHER_RESTARTS", "LABD_LAUNCHER_LAST_EXIT")


# ---------------------------------------------------------------------- writing
def test_the_node_log_is_bounded_and_keeps_one_older_file(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    problems: list[str] = []
    log = NodeLog(path, max_bytes=2000, on_problem=problems.append)
    try:
        for n in range(200):
            log.line(f"line {n:03d} " + "x" * 30)
        log.note("exited with -9 (SIGKILL); restarting in 1 s (restart 1)")
    finally:
        log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "a.log.1"]
    assert path.stat().st_size <= 2000 and rotated_path(path).stat().st_size <= 2000
    assert problems == []
    lines = read_tail(path).lines
    # whole lines, oldest first, across the rotation: the .1 file then the current one
    numbers = [int(line.split("line ")[1][:3]) for line in lines[:-1]]
    assert numbers == list(range(numbers[0], 200)) and numbers[0] < 200 - 2000 // 60
    assert lines[-1].endswith("[labd lab up] exited with -9 (SIGKILL); restarting in 1 s (restart 1)")


def test_the_tail_is_read_from_the_end_within_its_bounds(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    last = b"caf\xe9 " + "\u00e9\n".encode()  # a byte that is not UTF-8, then one that is
    path.write_bytes(b"".join(b"line %05d\n" % n for n in range(20_000)) + last)
    tail = read_tail(path, max_lines=50, max_bytes=4096)
    assert tail.error is None and len(tail.lines) == 50
    assert tail.lines[0] == "line 19951" and tail.lines[-1] == "caf\ufffd \u00e9"
    # 100 bytes from the end: the last line (8 bytes), 8 whole lines of 11, a piece left out
    short = read_tail(path, max_lines=1000, max_bytes=100)
    assert short.lines == [*(f"line {n}" for n in range(19992, 20_000)), "caf\ufffd \u00e9"]


def test_a_missing_log_file_is_an_answer_not_an_exception(tmp_path: Path) -> None:
    tail = read_tail(tmp_path / "gone.log")
    assert tail.lines == []
    assert tail.error is not None and "cannot read the log file" in tail.error
    assert str(tmp_path / "gone.log") in tail.error and "No such file" in tail.error


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_costs_lines_never_the_writer() -> None:
    problems: list[str] = []
    log = NodeLog(Path("/dev/full"), on_problem=problems.append)
    try:
        log.open()  # opening works on a full disk; writing does not
        for n in range(3):
            log.line(f"line {n}")  # never raises
        log.note("exited with 1")
    finally:
        log.close()
    assert problems == ["cannot write /dev/full: No space left on device; the lines are still "
                        "printed here, and writing is retried with each line"]
    assert log.lost == 4


def test_writing_resumes_and_says_how_many_lines_were_lost(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    problems: list[str] = []
    log = NodeLog(directory / "a.log", on_problem=problems.append)
    try:
        log.line("lost 1")
        log.line("lost 2")
        directory.mkdir()
        log.line("kept")
    finally:
        log.close()
    assert len(problems) == 2 and "No such file or directory" in problems[0]
    assert problems[1] == f"writing {directory / 'a.log'} again (2 line(s) were lost)"
    assert [line.split("  ", 1)[1] for line in read_tail(directory / "a.log").lines] == ["kept"]


def test_a_broken_reporter_does_not_stop_the_writer(tmp_path: Path) -> None:
    def broken(message: str) -> None:
        raise OSError("the terminal is gone")

    log = NodeLog(tmp_path / "missing" / "a.log", on_problem=broken)
    log.line("dropped")  # would raise if the reporter's error escaped
    log.close()


def test_colour_sequences_are_left_out_of_the_file(tmp_path: Path) -> None:
    log = NodeLog(tmp_path / "a.log")
    log.line("\x1b[31mred\x1b[0m plain")
    log.close()
    assert read_tail(tmp_path / "a.log").lines[0].endswith("  red plain")


# ---------------------------------------------------------------------- the launcher's facts
def test_the_launch_facts_travel_through_the_environment(tmp_path: Path) -> None:
    facts = LaunchInfo(tmp_path / "a.log", launcher_pid=123, servers_file="/lab/servers.toml",
                       restarts=2, last_exit=-signal.SIGKILL)
    assert LaunchInfo.from_environ(facts.environ()) == facts
    assert facts.last_exit_text == "-9 (SIGKILL)"
    assert LaunchInfo.from_environ({}) is None
    odd = LaunchInfo.from_environ({ENV_LOG: "a.log", "LABD_LAUNCHER_RESTARTS": "many"})
    assert odd == LaunchInfo(Path("a.log"))
    assert describe_exit(1) == "1" and describe_exit(-200) == "-200 (signal 200)"


# ---------------------------------------------------------------------- labd lab up
def _servers_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "lab-servers.toml"
    path.write_text(f'{extra}\n[servers.a]\nport = {free_port()}\nargs = ["--no-db"]\n')
    return path


@pytest.mark.server
def test_lab_up_refuses_a_log_dir_it_cannot_write(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "taken"
    not_a_dir.write_text("a file, not a directory\n")
    with LabdProcess("lab", "up", str(_servers_file(tmp_path)), "--log-dir",
                     str(not_a_dir / "logs")) as up:
        assert up.process.wait(30) == 2
        output = " ".join(up.output().split())
        assert f"cannot write the node logs in {not_a_dir / 'logs'} (--log-dir)" in output
        assert "pass --log-dir with a directory this user may write" in output
        assert "starting" not in output
    with LabdProcess("lab", "up", str(_servers_file(tmp_path, 'log_dir = "taken"'))) as up:
        assert up.process.wait(30) == 2
        output = " ".join(up.output().split())
        assert f"cannot write the node logs in {not_a_dir} (log_dir in " in output
    with LabdProcess("lab", "up", str(_servers_file(tmp_path, "log_dir = 5"))) as up:
        assert up.process.wait(30) == 2
        assert "log_dir must be a directory path string" in up.output()


@pytest.mark.server
def test_lab_up_refuses_a_node_name_unfit_for_a_file_name(tmp_path: Path) -> None:
    path = tmp_path / "lab-servers.toml"
    path.write_text(f'[servers."../a"]\nport = {free_port()}\n')
    with LabdProcess("lab", "up", str(path)) as up:
        assert up.process.wait(30) == 2
        assert "servers.../a: a node name is 1 to 64 letters, digits or _ - ." in up.output()
    assert not (tmp_path / "labd-logs").exists()


@pytest.mark.server
def test_lab_up_does_not_restart_a_server_that_refuses_its_config(tmp_path: Path) -> None:
    """``labd serve`` exiting with the usage code would fail the same way forever: the node
    stays stopped, saying what to fix, and with nothing left to run ``labd lab up`` ends."""
    (tmp_path / "a.toml").write_text('[devices.x]\ntype = "no_such_module:Nope"\n')
    path = tmp_path / "lab-servers.toml"
    path.write_text(f'[servers.a]\nconfig = "a.toml"\nport = {free_port()}\nargs = ["--no-db"]\n')
    with LabdProcess("lab", "up", str(path), timeout=30) as up:
        assert up.process.wait(30) == 2, "a server that refuses its config was restarted"
        output = " ".join(up.output().split())
    assert "cannot import module 'no_such_module'" in output
    assert "a restart cannot fix that, so it stays stopped" in output
    assert f"Fix {tmp_path / 'a.toml'} and run labd lab up again" in output
    assert "every server refused its options or config" in output
    log = (tmp_path / "labd-logs" / "a.log").read_text()
    assert log.count("[labd lab up] started") == 1 and "restarting" not in log
    assert "a restart cannot fix that, so it stays stopped" in log


# ---------------------------------------------------------------------- the server page
@contextmanager
def _serve(env: dict[str, str | None]) -> Iterator[str]:
    port = free_port()
    with LabdProcess("serve", "--port", str(port), "--no-db", env=env, timeout=30) as proc:
        proc.wait_for("labd serving")
        yield f"http://127.0.0.1:{port}"
        assert proc.stop(signal.SIGINT) == 0


@pytest.mark.server
@pytest.mark.slow
def test_the_server_page_shows_a_launchers_facts_and_log_and_only_then(tmp_path: Path) -> None:
    with _serve(dict.fromkeys(LAUNCHER_ENV)) as url:
        page = httpx.get(f"{url}/ui/server", timeout=TIMEOUT)
        assert page.status_code == 200 and "Recent log lines" in page.text
        assert "Launcher" not in page.text and "labd lab up" not in page.text
    log_file = tmp_path / "a.log"
    env: dict[str, str | None] = {
        ENV_LOG: str(log_file), "LABD_LAUNCHER_PID": str(os.getpid()),
        "LABD_LAUNCHER_SERVERS": "/lab/lab-servers.toml", "LABD_LAUNCHER_RESTARTS": "2",
        "LABD_LAUNCHER_LAST_EXIT": "1"}
    with _serve(env) as url:
        page = httpx.get(f"{url}/ui/server", timeout=TIMEOUT)
        assert page.status_code == 200, page.text
        assert '<h2 id="h-launcher">Launcher</h2>' in page.text
        assert f"<code>labd lab up</code> (pid {os.getpid()})" in page.text
        assert "<dt>Restarts</dt><dd>2</dd>" in page.text
        assert "exit code 1, then restarted" in page.text and "/lab/lab-servers.toml" in page.text
        assert f"cannot read the log file {log_file}: No such file or directory" in page.text
        log_file.write_text("Traceback (most recent call last):\n<script>alert(1)</script>\n")
        page = httpx.get(f"{url}/ui/server", timeout=TIMEOUT)
        assert page.status_code == 200 and "cannot read" not in page.text
        assert "Traceback (most recent call last):" in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
