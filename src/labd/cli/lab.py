"""``labd lab nodes | devices | up``, and joining a lab from ``labd serve --engine``.

    labd serve lab-a.toml --engine redis://labd-a:PW@lab-engine:6379/0 --node pc-laser
    labd lab nodes --url http://pc-laser:5000       # every live node: version, heartbeat, devices
    labd lab devices                                # every device of the lab with its node
    labd lab up lab-servers.toml                    # start the nodes of one PC, keep them up

``lab-servers.toml`` names the servers to run on this PC::

    engine = "redis://127.0.0.1:6379/0"      # optional: --engine of every server
    log_dir = "labd-logs"                     # optional: the node logs (the default, next to this file)
    [servers.pc-laser]                        # the table name is the node name
    config = "lab-laser.toml"                 # the lab config it serves (relative to this file)
    port = 5001
    args = ["--no-db"]                        # optional: more `labd serve` options

``labd lab up`` starts one ``labd serve`` per server, prints each one's output as
``[node] line``, restarts one that exits (backoff 1 s doubling to 30 s; back to 1 s after
30 s of running) and stops all on Ctrl+C (SIGINT to each, killed after 10 s). Each node's
output, timestamped, goes with the launcher's notes about it (started with pid N, exited
with CODE, restarting, stopped) into ``<log_dir>/<node>.log`` (``--log-dir`` wins over
``log_dir``), kept across restarts and bounded at 1 MB plus one older ``<node>.log.1``. Each
node is told through its environment (``LABD_LAUNCHER_*``) who started it, how often it was
restarted, how its last run ended and where its log file is; its dashboard server page
(``/ui/server``) shows that, and the end of the file, the crashed runs' last lines
included. A log directory that cannot be written stops ``labd lab up`` before it starts
anything; a write failing later (a full disk) costs log lines, never the relaying, and is
reported once.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from labd.cli.errors import DEFAULT_URL, EXIT_USAGE, CliError, reports_errors
from labd.cli.output import console, print_note, status_text

if TYPE_CHECKING:
    from labd.lab import LabNode, LabSettings
    from labd.lab.launcher_log import NodeLog

__all__ = ["join_lab", "lab_app", "settings_for_serve"]

lab_app = typer.Typer(
    name="lab", help="A lab of several PCs: its nodes, its devices, and this PC's servers.",
    no_args_is_help=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="LABD_URL", help="Any node of the lab.")]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar="LABD_TOKEN", help="Bearer token, if wanted.")]


# ---------------------------------------------------------------------- serve --engine
def settings_for_serve(
    engine: str | None, node: str | None, table: Mapping[str, Any] | None,
) -> LabSettings | None:
    """The node's lab settings from ``--engine``/``--node``, ``LABD_ENGINE`` and ``[lab]``."""
    from labd.lab import EngineUrlError, lab_settings

    try:
        return lab_settings(engine, node, table)
    except EngineUrlError as exc:
        raise CliError(f"lab: {exc}", EXIT_USAGE) from None


def join_lab(daemon: Any, settings: LabSettings) -> LabNode:
    """Make ``daemon`` a node of the lab (registered before the server listens)."""
    from labd.lab import (
        DeviceIdConflictError,
        EngineUrlError,
        LabNode,
        NodeNameConflictError,
        connect_engine,
    )

    try:
        coordinator = connect_engine(settings.engine)
    except EngineUrlError as exc:
        raise CliError(f"lab: {exc}", EXIT_USAGE) from None
    node = LabNode(daemon, coordinator, settings.node, timings=settings.timings,
                   workers=settings.workers, stream_maxlen=settings.stream_maxlen,
                   own_coordinator=not settings.engine.startswith("memory://"))
    try:
        node.start()
    except (DeviceIdConflictError, NodeNameConflictError) as exc:
        node.close()
        raise CliError(f"lab: node {settings.node!r} cannot join: {exc}") from None
    if node.engine_error is not None:
        print_note(f"lab: the engine {coordinator.description} does not answer; serving this "
                   "node's devices and retrying with backoff (GET /health says degraded)")
    return node


# ---------------------------------------------------------------------- nodes, devices
def _get(url: str, path: str, token: str | None) -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise CliError(f"talking to a server needs labd's `server` extra ({exc})") from None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = httpx.get(url.rstrip("/") + path, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}; is `labd serve` running there?") from None
    body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
    if answer.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise CliError(f"{url}{path}: {answer.status_code} {error.get('message', answer.text[:200])}")
    return body


@lab_app.command("nodes")
@reports_errors
def nodes(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """Every live node of the lab: version, last heartbeat, address and devices."""
    body = _get(url, "/lab/nodes", token)
    if body.get("lab") is None:
        raise CliError(f"{url} is not a node of a lab (it was started without --engine)")
    lab = body["lab"]
    table = Table(title=f"lab on {lab['engine']}", title_justify="left")
    for column in ("node", "version", "heartbeat", "url", "devices"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for info in body.get("nodes", []):
        beat = info.get("heartbeat_at")
        ago = f"{now - beat:.1f} s ago" if isinstance(beat, int | float) else "?"
        devices = ", ".join(str(d.get("device_id")) for d in info.get("devices", []))
        table.add_row(Text(str(info.get("node"))), str(info.get("version")), ago,
                      str(info.get("url") or "-"), Text(devices or "-"))
    console.print(table)
    if not lab.get("connected"):
        print_note(f"{lab['node']} cannot reach the engine: {lab.get('engine_error')}")


@lab_app.command("devices")
@reports_errors
def devices(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """Every device of every live node, with its node, state and owner."""
    body = _get(url, "/lab/devices", token)
    table = Table(title="lab devices", title_justify="left")
    for column in ("id", "node", "type", "state", "owner"):
        table.add_column(column, overflow="fold")
    for info in body.get("devices", []):
        table.add_row(str(info.get("device_id")), str(info.get("node", "-")),
                      str(info.get("device_type")), status_text(info.get("state")),
                      str(info.get("owner_label") or "-"))
    console.print(table)


# ---------------------------------------------------------------------- up
#: Where ``labd lab up`` writes the node logs unless told: this directory next to the servers file.
DEFAULT_LOG_DIR = "labd-logs"
_NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class ServerSpec:
    """One server of ``lab-servers.toml``."""

    node: str
    config: Path | None
    port: int
    args: list[str] = field(default_factory=list)


@dataclass
class ServersFile:
    """A ``lab-servers.toml``: the engine, the servers and where their logs go."""

    path: Path
    engine: str | None
    servers: list[ServerSpec]
    log_dir: Path  # relative paths in the file are relative to the file
    log_dir_from: str  # where log_dir was chosen, for error messages


def load_servers(path: Path) -> ServersFile:
    """What a ``lab-servers.toml`` names (one-line errors naming the key and what is valid)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: {exc}", EXIT_USAGE) from None
    servers = data.get("servers")
    if not isinstance(servers, dict) or not servers:
        raise CliError(f"{path}: no [servers.NAME] tables; each names a node to run", EXIT_USAGE)
    specs = []
    for name, table in servers.items():
        if not _NODE_NAME.fullmatch(name):
            raise CliError(f"{path}: servers.{name}: a node name is 1 to 64 letters, digits or "
                           "_ - . (e.g. the PC's name)", EXIT_USAGE)
        if not isinstance(table, dict) or not isinstance(table.get("port"), int):
            raise CliError(f"{path}: servers.{name}: needs port = <number>", EXIT_USAGE)
        config = table.get("config")
        args = table.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise CliError(f"{path}: servers.{name}: args must be a list of strings", EXIT_USAGE)
        specs.append(ServerSpec(name, path.parent / config if config else None, table["port"], args))
    engine = data.get("engine")
    if engine is not None and not isinstance(engine, str):
        raise CliError(f"{path}: engine must be a URL string", EXIT_USAGE)
    log_dir = data.get("log_dir")
    if log_dir is not None and (not isinstance(log_dir, str) or not log_dir):
        raise CliError(f"{path}: log_dir must be a directory path string, e.g. "
                       f'log_dir = "{DEFAULT_LOG_DIR}"', EXIT_USAGE)
    chosen = f"log_dir in {path}" if log_dir else f"the default, next to {path}"
    return ServersFile(path, engine, specs,
                       path.parent / Path(log_dir or DEFAULT_LOG_DIR).expanduser(), chosen)


def open_node_logs(log_dir: Path, specs: list[ServerSpec], where: str) -> dict[str, NodeLog]:
    """One open :class:`NodeLog` per server, in ``log_dir`` (created if missing).

    Raises :class:`CliError` (exit 2) if the directory or a file cannot be written, before
    anything starts; ``where`` says where the directory was chosen.
    """
    from labd.lab.launcher_log import NodeLog

    logs: dict[str, NodeLog] = {}
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            log = NodeLog(log_dir / f"{spec.node}.log", on_problem=partial(_show_note, spec.node))
            log.open()
            logs[spec.node] = log
    except OSError as exc:
        for log in logs.values():
            log.close()
        reason = exc.strerror or str(exc)
        raise CliError(f"cannot write the node logs in {log_dir} ({where}): {reason}; pass "
                       "--log-dir with a directory this user may write", EXIT_USAGE) from None
    return logs


def _show(text: Text) -> None:
    """Print a line of the launcher's terminal; a terminal that is gone costs only the line."""
    try:
        console.print(text, soft_wrap=True)
    except OSError:
        pass


def _show_note(node: str, message: str) -> None:
    _show(Text(f"[{node}] {message}", style="yellow"))


class Supervisor:
    """Runs one ``labd serve`` child, restarting it with backoff when it crashes (not when
    it refused its options or config: exit code 2 would come back at every restart).

    The child's output (stdout and stderr) is printed here as ``[node] line`` and appended,
    timestamped, to the node's :class:`NodeLog` with the supervisor's notes (started,
    exited, restarting, stopped). The child learns of its launcher through the
    :class:`LaunchInfo` environment variables, so its dashboard shows that file.
    """

    MAX_BACKOFF_S = 30.0
    HEALTHY_AFTER_S = 30.0  # a child that ran this long starts the backoff over
    MAX_LINE_BYTES = 8192  # a longer line is relayed in pieces (a child's output is not trusted)

    def __init__(self, spec: ServerSpec, engine: str | None, stop: threading.Event,
                 log: NodeLog, servers_file: Path,
                 on_gave_up: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.engine = engine
        self.stop = stop
        self.log = log
        self.servers_file = servers_file
        self.on_gave_up = on_gave_up
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.last_exit: int | None = None  # the exit code of the child's previous run
        self.gave_up = False  # the child refused its options or config: not restarted
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"labd-lab-up-{spec.node}")

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "labd.cli", "serve"]
        if self.spec.config is not None:
            command.append(str(self.spec.config))
        command += ["--port", str(self.spec.port), "--node", self.spec.node]
        if self.engine:
            command += ["--engine", self.engine]
        return command + self.spec.args

    def environ(self) -> dict[str, str]:
        """The child's environment: ours, unbuffered UTF-8 output, and the launcher's facts."""
        from labd.lab.launcher_log import LaunchInfo

        env = {key: value for key, value in os.environ.items()
               if not key.startswith("LABD_LAUNCHER_")}  # a launcher's child starts no other
        env.setdefault("PYTHONIOENCODING", "utf-8")  # what _relay decodes
        env.setdefault("COLUMNS", "200")  # rich wraps output to a pipe at 80 columns otherwise
        launch = LaunchInfo(self.log.path, os.getpid(), str(self.servers_file), self.restarts,
                            self.last_exit)
        return {**env, "PYTHONUNBUFFERED": "1", **launch.environ()}

    def _run(self) -> None:
        from labd.lab.launcher_log import describe_exit

        backoff = 1.0
        while not self.stop.is_set():
            started = time.monotonic()
            process, failure = self._start()
            if process is not None:
                self._relay(process)
                code = process.wait()
                if self.stop.is_set():
                    self.log.note(f"stopped: exit code {describe_exit(code)}")
                    return
                self.last_exit = code
                if code == EXIT_USAGE:
                    self._give_up(code)
                    return
                failure = f"exited with {describe_exit(code)}"
            elif self.stop.is_set():
                return
            if time.monotonic() - started >= self.HEALTHY_AFTER_S:
                backoff = 1.0
            self.restarts += 1
            message = f"{failure}; restarting in {backoff:g} s (restart {self.restarts})"
            self.log.note(message)
            _show(Text(f"[{self.spec.node}] {message}", style="yellow"))
            if self.stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.MAX_BACKOFF_S)

    def _give_up(self, code: int) -> None:
        """The child refused its options or config (the usage exit code): a restart would
        fail the same way, so it stays stopped, saying so."""
        config = self.spec.config or self.servers_file
        message = (f"exited with {code}: `labd serve` refused its options or config (its last "
                   f"lines above say why); a restart cannot fix that, so it stays stopped. Fix "
                   f"{config} and run labd lab up again.")
        self.log.note(message)
        _show(Text(f"[{self.spec.node}] {message}", style="red"))
        self.gave_up = True
        self.on_gave_up()

    def _start(self) -> tuple[subprocess.Popen[bytes] | None, str]:
        """Start the child (unless stopping); None and why if it could not start."""
        command = self.command()
        with self._lock:
            if self.stop.is_set():
                return None, "stopping"
            try:
                self.process = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=self.environ())
            except OSError as exc:
                return None, f"could not start {command[0]} ({exc.strerror or exc})"
            process = self.process
        run = f", restart {self.restarts}" if self.restarts else ""
        self.log.note(f"started (pid {process.pid}{run}): {shlex.join(command)}")
        return process, ""

    def _relay(self, process: subprocess.Popen[bytes]) -> None:
        """Print and log each line the child writes until it closes its output."""
        stdout = process.stdout
        assert stdout is not None
        with stdout:
            for raw in iter(lambda: stdout.readline(self.MAX_LINE_BYTES), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.log.line(line)
                _show(Text(f"[{self.spec.node}] ", style="cyan") + Text(line))

    def terminate(self) -> None:
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            self.log.note("stopping: sent SIGINT (labd lab up is stopping)")
            process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            self.log.note("did not stop in time: killed")
            process.kill()


@lab_app.command("up")
@reports_errors
def up(
    servers_file: Annotated[Path, typer.Argument(help="lab-servers.toml: the servers of this PC.")],
    log_dir: Annotated[
        Path | None,
        typer.Option(
            "--log-dir",
            help="Directory of the node logs (<node>.log, shown on each node's dashboard "
            f"server page). Default: the file's log_dir, else {DEFAULT_LOG_DIR}/ next to it.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start every server of a lab-servers.toml, restart crashed ones, stop all on Ctrl+C."""
    servers = load_servers(servers_file)
    directory = (log_dir.expanduser() if log_dir is not None else servers.log_dir).absolute()
    logs = open_node_logs(directory, servers.servers,
                          "--log-dir" if log_dir is not None else servers.log_dir_from)
    stop = threading.Event()
    all_gave_up = threading.Event()
    supervisors: list[Supervisor] = []

    def gave_up() -> None:
        if all(supervisor.gave_up for supervisor in supervisors):
            all_gave_up.set()

    supervisors += [Supervisor(spec, servers.engine, stop, logs[spec.node],
                               servers_file.absolute(), gave_up) for spec in servers.servers]
    console.print(f"labd lab up: starting {len(supervisors)} server(s): "
                  + ", ".join(f"{s.node} on port {s.port}" for s in servers.servers)
                  + f"; their logs in {directory}. Ctrl+C stops all.", soft_wrap=True)
    for supervisor in supervisors:
        supervisor.thread.start()
    try:
        from labd.cli.serving import wait_for_interrupt

        wait_for_interrupt(all_gave_up)
    finally:
        stop.set()
        console.print("stopping every server...")
        for supervisor in supervisors:
            supervisor.terminate()
        deadline = time.monotonic() + 10.0
        for supervisor in supervisors:
            supervisor.thread.join(max(deadline - time.monotonic(), 0.1))
        for supervisor in supervisors:
            if supervisor.thread.is_alive():
                supervisor.kill()
                supervisor.thread.join(5.0)
        for log in logs.values():
            log.close()
    console.print("labd lab up: stopped")
    if all_gave_up.is_set():
        raise CliError("labd lab up: every server refused its options or config; nothing "
                       f"left to run (see the messages above and the logs in {directory})",
                       EXIT_USAGE)
