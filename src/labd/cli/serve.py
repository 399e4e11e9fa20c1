"""``labd serve [CONFIG] [--demo] [--tokens FILE]``: a daemon from a config file, over HTTP, until Ctrl-C.

Server settings come from the options here, else the config file's keys of the same names
(``allowed_hosts``, ``lease_max_ttl``, ``stream_max_clients``, ``device_max_in_flight``, ...;
see :data:`labd.config.SERVER_KEYS`); ``--allow-host`` names are added to the file's. All are
checked before the lab is built, so a bad value is one line and changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from labd.cli.errors import EXIT_USAGE, CliError, reports_errors
from labd.cli.lab import join_lab, settings_for_serve
from labd.cli.output import console, print_note
from labd.cli.serving import (
    busy_port_error,
    port_is_free,
    serve_in_background,
    stop_all,
    wait_for_interrupt,
)
from labd.cli.stores import DbOption, NoDbOption, open_run_store
from labd.cli.units import parse_size
from labd.config import DEFAULT_CONNECT_TIMEOUT, LabConfig, apply_config, load_config

if TYPE_CHECKING:
    from labd.daemon import LabDaemon
    from labd.server.auth import TokenTable
    from labd.store import RunStore

__all__ = ["MIN_DB_BYTES", "serve"]

#: The smallest size cap a run store accepts (labd.store.RunStore's max_bytes).
MIN_DB_BYTES = 64 * 1024
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD = ("0.0.0.0", "::", "")


@reports_errors
def serve(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="Lab config: a .toml file naming device and task classes, or a .py file with "
            "setup(daemon).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the lab to your network.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on (0 picks a free one).", min=0, max=65535)
    ] = 5000,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Add the simulated lab (laser1, pm1, daq1, WavelengthSweep)."),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Refuse commands from local threads that do not own a device, too."
        ),
    ] = False,
    db: DbOption = None,
    no_db: NoDbOption = False,
    db_max_size: Annotated[
        str | None,
        typer.Option(
            "--db-max-size",
            help="Size cap of the history, e.g. 500MB: the oldest finished runs are deleted "
            "beyond it.",
            show_default=False,
        ),
    ] = None,
    connect_timeout: Annotated[
        float | None,
        typer.Option(
            "--connect-timeout",
            help="Seconds each device's connect() may take; a device still connecting after "
            "that is served as faulted (with the reason) instead of blocking the start. "
            f"Default: the config's connect_timeout, else {DEFAULT_CONNECT_TIMEOUT:g}.",
            min=0.001,
            show_default=False,
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="A host name clients use to reach this server (repeatable), e.g. "
            "labpc.example.org. Requests naming other hosts get 421 (DNS rebinding); "
            "localhost, 127.0.0.1, [::1] and the --host address are always allowed, and with "
            "--host 0.0.0.0 also this machine's IP addresses. '*' allows any host (only behind "
            "a proxy that checks Host itself). Added to the config's allowed_hosts.",
            metavar="NAME",
            show_default=False,
        ),
    ] = None,
    max_lease_ttl: Annotated[
        float | None,
        typer.Option(
            "--max-lease-ttl",
            help="Longest lease (seconds) a client may ask for; leases without a ttl last 30 s. "
            "Default: the config's lease_max_ttl, else 3600.",
            metavar="SECONDS",
            show_default=False,
        ),
    ] = None,
    stream_max_clients: Annotated[
        int | None,
        typer.Option(
            "--stream-max-clients",
            help="SSE clients per stream; the next one gets 503. Default: the config's "
            "stream_max_clients, else 100.",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    device_max_in_flight: Annotated[
        int | None,
        typer.Option(
            "--device-max-in-flight",
            help="Calls running or waiting per device; the next one gets 503 with Retry-After. "
            "Default: the config's device_max_in_flight, else 4.",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            envvar="LABD_ENGINE",
            help="Join a lab of several PCs through this Redis/Valkey engine, e.g. "
            "redis://labd-NODE:PASSWORD@lab-engine:6379/0 (rediss:// for TLS; off this PC a "
            "password is required). Default: the config's [lab] engine; none: one PC.",
            show_default=False,
        ),
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="This node's name in the lab (default: the config's [lab] node, else the "
            "host name).",
            show_default=False,
        ),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            "--tokens",
            envvar="LABD_TOKENS_FILE",
            help='Bearer tokens with roles (TOML: [tokens] "<token>" = { user = "alice", role = '
            '"operator" }; roles viewer, operator, admin). Without it anyone who reaches the '
            "port has full control.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve a lab over HTTP and Server-Sent Events until Ctrl-C, recording run history.

    Example: labd serve examples/lab.toml --port 5000 --db runs.db --tokens tokens.toml
    """
    # Check and load (and import) everything before any thread starts, so bad input changes
    # nothing.
    max_bytes = _size_cap(db_max_size)
    tokens = _load_tokens(tokens_file)
    lab_config = load_config(config) if config is not None else None
    options = _server_options(
        host, lab_config, allow_host=allow_host, lease_max_ttl=max_lease_ttl,
        stream_max_clients=stream_max_clients, device_max_in_flight=device_max_in_flight)
    lab = settings_for_serve(engine, node, lab_config.lab if lab_config is not None else None)
    if lab_config is None and not demo:
        print_note(
            "no CONFIG and no --demo: serving an empty lab (add devices with "
            "POST /devices, or pass a config file)"
        )
    if not port_is_free(host, port):  # checked again at bind time; this saves building the lab
        raise busy_port_error(host, port)
    from labd.daemon import LabDaemon

    store = None if no_db else open_run_store(db, max_bytes)
    try:
        daemon = LabDaemon(strict_ownership=strict, store=store)
    except BaseException:
        if store is not None:
            store.close()
        raise
    server = None
    lab_node = None
    try:
        if demo:
            from labd.sim import demo_lab

            demo_lab(daemon)
        if lab_config is not None:
            _announce_connects(lab_config, connect_timeout)
            apply_config(daemon, lab_config, connect_timeout=connect_timeout)
        if lab is not None:  # registered before the server listens: a clashing id stops here
            lab_node = join_lab(daemon, lab)
        server = serve_in_background(daemon, host, port, tokens=tokens, options=options)
        if lab_node is not None:
            lab_node.url = str(server.url)
            console.print(f"  lab:       node {lab_node.name!r} on {lab_node.coordinator.description}",
                          soft_wrap=True)
        _print_banner(daemon, str(server.url), host, store, tokens,
                      allowed_hosts=options.get("allowed_hosts", ()))
        wait_for_interrupt()
        console.print("stopping...")
    finally:
        clean = stop_all(server, daemon, console)
        if lab_node is not None:  # after the daemon: its runs gave their claims back
            lab_node.close()
        if store is not None:
            store.close()
    console.print("labd stopped" + ("" if clean else " (with the problems above)"))


def _announce_connects(config: LabConfig, connect_timeout: float | None) -> None:
    """Say what may take a while before the server listens: connecting the devices."""
    to_connect = [device.device_id for device in config.devices if device.connect]
    if not to_connect:
        return
    seconds = connect_timeout or config.connect_timeout or DEFAULT_CONNECT_TIMEOUT
    limit = "no time limit" if seconds == float("inf") else f"up to {seconds:g} s each"
    console.print(f"connecting {len(to_connect)} device(s) ({', '.join(to_connect)}; {limit})...",
                  soft_wrap=True)


#: CLI option -> (server keyword, what it must be), for one-line errors naming the option.
_NUMERIC_OPTIONS = {
    "--max-lease-ttl": ("lease_max_ttl", "a positive number of seconds"),
    "--stream-max-clients": ("stream_max_clients", "a positive whole number"),
    "--device-max-in-flight": ("device_max_in_flight", "a positive whole number"),
}


def _server_options(
    host: str, config: LabConfig | None, *, allow_host: list[str] | None, **given: Any,
) -> dict[str, Any]:
    """LabDaemonServer keywords from the config and the options (these win), all checked."""
    options = dict(config.server_options) if config is not None else {}
    for option, (key, valid) in _NUMERIC_OPTIONS.items():
        value = given.get(key)
        if value is None:
            continue
        if not 0 < value < float("inf"):
            raise CliError(f"{option} must be {valid}, got {value!r}", EXIT_USAGE)
        options[key] = value
    if allow_host:
        options["allowed_hosts"] = (*options.get("allowed_hosts", ()), *allow_host)
    try:
        from labd.server.lifecycle import server_settings
    except ImportError as exc:
        raise CliError(f"serving needs labd's `server` extra ({exc}); install it with "
                       "pip install 'labd[server]'") from None
    from labd.errors import InvalidArgumentError

    try:
        settings = server_settings(host, **options)
    except InvalidArgumentError as exc:
        source = f" (from {config.path} and the options)" if config is not None else ""
        raise CliError(f"server settings{source}: {exc}", EXIT_USAGE) from None
    if "allowed_hosts" in options:
        options["allowed_hosts"] = settings.allowed_hosts
    return options


def _size_cap(text: str | None) -> int | None:
    if text is None:
        return None
    size = parse_size(text, "--db-max-size")
    if size < MIN_DB_BYTES:
        raise CliError(f"--db-max-size: {text!r} is too small; the history needs at least 64KiB "
                       "(e.g. --db-max-size 500MB)", EXIT_USAGE)
    return size


def _load_tokens(path: Path | None) -> TokenTable | None:
    if path is None:
        return None
    try:
        from labd.server.auth import load_tokens
    except ImportError as exc:
        raise CliError(f"--tokens needs labd's `server` extra ({exc}); install it with "
                       "pip install 'labd[server]'") from None
    from labd.errors import InvalidArgumentError

    try:
        return load_tokens(path, on_exposed=lambda problem: print_note("warning: " + problem))
    except InvalidArgumentError as exc:
        raise CliError(f"--tokens: {exc}", EXIT_USAGE) from None


def _print_banner(
    daemon: LabDaemon, url: str, host: str, store: RunStore | None, tokens: TokenTable | None,
    *, allowed_hosts: tuple[str, ...] = (),
) -> None:
    device_ids = daemon.device_ids()
    console.print(
        Text.assemble(
            ("labd serving ", "bold"),
            f"{len(device_ids)} device(s)",
            f" ({', '.join(device_ids)})" if device_ids else "",
            f" and {len(daemon.task_types)} task type(s) at ",
            (url, "bold cyan"),
        ),
        soft_wrap=True,
    )
    console.print(f"  dashboard: {url}/ui/")
    console.print(f"  API docs:  {url}/docs")
    console.print(f"  overview:  {url}/  (live events: {url}/stream/events)")
    console.print(f"  history:   {store.path if store is not None else 'in memory (--no-db)'}",
                  soft_wrap=True)
    console.print(f"  auth:      {tokens.describe() if tokens is not None else 'off (no --tokens)'}")
    console.print(f"  hosts:     {_hosts_line(host, allowed_hosts)}", soft_wrap=True)
    for device_id in device_ids:
        info = daemon.device_info(device_id)
        if info["state"] == "faulted":
            error = info["last_error"]
            reason = error["message"] if error else "see GET /devices/" + device_id
            print_note(f"device {device_id!r} is faulted: {reason}")
    if store is not None and store.interrupted:
        print_note(f"{store.interrupted} run(s) were active when labd last stopped; they are "
                   "now marked interrupted (see `labd runs --status interrupted`)")
    if host not in _LOOPBACK and tokens is None:
        print_note(f"listening on {host} with no --tokens: anyone who can reach this machine "
                   "can control the lab")
    console.print("Press Ctrl-C to stop.", style="dim")


def _hosts_line(host: str, allowed_hosts: tuple[str, ...]) -> str:
    """Which Host names the server answers (the others get 421), for the banner."""
    if "*" in allowed_hosts:
        return "any (allowed_hosts has '*'; the Host check is off)"
    names = ["localhost", "127.0.0.1", "[::1]"]
    if host in _WILDCARD:
        names.append("this machine's IP addresses")
    elif host not in _LOOPBACK:
        names.append(host)
    names.extend(allowed_hosts)
    more = "" if allowed_hosts else "; clients using a host name need --allow-host NAME"
    return ", ".join(names) + (more if host not in _LOOPBACK else "")
