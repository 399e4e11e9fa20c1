"""``labd lab nodes | devices | up``, and joining a lab from ``labd serve --engine``.

    labd serve lab-a.toml --engine redis://labd-a:PW@lab-engine:6379/0 --node pc-laser
    labd lab nodes --url http://pc-laser:5000       # every live node: version, heartbeat, devices
    labd lab devices                                # every device of the lab with its node
    labd lab up lab-servers.toml                    # start the nodes of one PC, keep them up

``lab-servers.toml`` names the servers to run on this PC::

    engine = "redis://127.0.0.1:6379/0"      # optional: --engine of every server
    [servers.pc-laser]                        # the table name is the node name
    config = "lab-laser.toml"                 # the lab config it serves (relative to this file)
    port = 5001
    args = ["--no-db"]                        # optional: more `labd serve` options
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from labd.cli.errors import DEFAULT_URL, EXIT_USAGE, CliError, reports_errors
from labd.cli.output import console, print_note, status_text

if TYPE_CHECKING:
    from labd.lab import LabNode, LabSettings

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
@dataclass
class ServerSpec:
    """One server of ``lab-servers.toml``."""

    node: str
    config: Path | None
    port: int
    args: list[str] = field(default_factory=list)


def load_servers(path: Path) -> tuple[str | None, list[ServerSpec]]:
    """The engine and the servers a ``lab-servers.toml`` names (one-line errors)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: {exc}", EXIT_USAGE) from None
    servers = data.get("servers")
    if not isinstance(servers, dict) or not servers:
        raise CliError(f"{path}: no [servers.NAME] tables; each names a node to run", EXIT_USAGE)
    specs = []
    for name, table in servers.items():
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
    return engine, specs


class Supervisor:
    """Runs one ``labd serve`` child, restarting it with backoff when it crashes."""

    MAX_BACKOFF_S = 30.0
    HEALTHY_AFTER_S = 30.0  # a child that ran this long starts the backoff over

    def __init__(self, spec: ServerSpec, engine: str | None, stop: threading.Event) -> None:
        self.spec = spec
        self.engine = engine
        self.stop = stop
        self.process: subprocess.Popen[str] | None = None
        self.restarts = 0
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

    def _run(self) -> None:
        backoff = 1.0
        while not self.stop.is_set():
            started = time.monotonic()
            with self._lock:
                if self.stop.is_set():
                    return
                self.process = subprocess.Popen(
                    self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            process = self.process
            assert process.stdout is not None
            for line in process.stdout:
                console.print(Text(f"[{self.spec.node}] ", style="cyan") + Text(line.rstrip()),
                              soft_wrap=True)
            code = process.wait()
            if self.stop.is_set():
                return
            if time.monotonic() - started >= self.HEALTHY_AFTER_S:
                backoff = 1.0
            self.restarts += 1
            console.print(Text(f"[{self.spec.node}] exited with {code}; restarting in "
                               f"{backoff:g} s (restart {self.restarts})", style="yellow"))
            if self.stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.MAX_BACKOFF_S)

    def terminate(self) -> None:
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        with self._lock:
            process = self.process
        if process is not None and process.poll() is None:
            process.kill()


@lab_app.command("up")
@reports_errors
def up(
    servers_file: Annotated[Path, typer.Argument(help="lab-servers.toml: the servers of this PC.")],
) -> None:
    """Start every server of a lab-servers.toml, restart crashed ones, stop all on Ctrl+C."""
    engine, specs = load_servers(servers_file)
    stop = threading.Event()
    supervisors = [Supervisor(spec, engine, stop) for spec in specs]
    console.print(f"labd lab up: starting {len(specs)} server(s): "
                  + ", ".join(f"{s.node} on port {s.port}" for s in specs) + ". Ctrl+C stops all.")
    for supervisor in supervisors:
        supervisor.thread.start()
    try:
        from labd.cli.serving import wait_for_interrupt

        wait_for_interrupt()
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
    console.print("labd lab up: stopped")
