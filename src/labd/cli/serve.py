"""``labd serve [CONFIG] [--demo]``: a daemon from a config file, over HTTP, until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from labd.cli.errors import reports_errors
from labd.cli.output import console, print_note
from labd.cli.serving import (
    busy_port_error,
    port_is_free,
    serve_in_background,
    stop_all,
    wait_for_interrupt,
)
from labd.config import apply_config, load_config

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["serve"]


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
) -> None:
    """Serve a lab over HTTP and Server-Sent Events until Ctrl-C.

    Example: labd serve examples/lab.toml --port 5000
    """
    # Load (and import) everything before any thread starts, so a bad file changes nothing.
    lab_config = load_config(config) if config is not None else None
    if lab_config is None and not demo:
        print_note(
            "no CONFIG and no --demo: serving an empty lab (add devices with "
            "POST /devices, or pass a config file)"
        )
    if not port_is_free(host, port):  # checked again at bind time; this saves building the lab
        raise busy_port_error(host, port)
    from labd.daemon import LabDaemon

    daemon = LabDaemon(strict_ownership=strict)
    server = None
    try:
        if demo:
            from labd.sim import demo_lab

            demo_lab(daemon)
        if lab_config is not None:
            apply_config(daemon, lab_config)
        server = serve_in_background(daemon, host, port)
        _print_banner(daemon, str(server.url), host)
        wait_for_interrupt()
        console.print("stopping...")
    finally:
        clean = stop_all(server, daemon, console)
    console.print("labd stopped" + ("" if clean else " (with the problems above)"))


def _print_banner(daemon: LabDaemon, url: str, host: str) -> None:
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
    console.print(f"  API docs:  {url}/docs")
    console.print(f"  overview:  {url}/  (live events: {url}/stream/events)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print_note(f"listening on {host}: anyone who can reach this machine can control the lab")
    console.print("Press Ctrl-C to stop.", style="dim")
