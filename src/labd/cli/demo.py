"""``labd demo``: the simulated lab behind a real server, a sweep through the client, then serve.

Everything a new user should see in one command: the server starts in this process on
127.0.0.1, a ``WavelengthSweep`` runs through :class:`labd.client.ServerAPI` exactly as a
remote script would run it (with a live progress bar fed by the task's event stream), the
resonance it finds is printed, and the server keeps running for the browser until Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from labd.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, CliError, reports_errors
from labd.cli.follow import follow_task
from labd.cli.output import console, print_note
from labd.cli.remote import open_api
from labd.cli.results import print_task_outcome, sweep_summary
from labd.cli.serving import port_is_free, serve_in_background, stop_all, wait_for_interrupt
from labd.cli.stores import DbOption, NoDbOption, open_run_store

if TYPE_CHECKING:
    from labd.store import RunStore

__all__ = ["HOST", "demo"]

HOST = "127.0.0.1"
START_WL, STOP_WL = 1545.0, 1555.0


@reports_errors
def demo(
    port: Annotated[
        int,
        typer.Option(help="Port for the server; if busy, a free one is used.", min=0, max=65535),
    ] = 5000,
    steps: Annotated[int, typer.Option(help="Points in the sweep.", min=1)] = 40,
    dwell: Annotated[
        float, typer.Option(help="Seconds to wait at each point (shows the bar moving).", min=0.0)
    ] = 0.05,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Keep serving after the sweep until Ctrl-C.")
    ] = True,
    db: DbOption = None,
    no_db: NoDbOption = False,
) -> None:
    """Run the simulated lab (laser, power meter, DAQ) in a server and sweep it through the client.

    Example: labd demo --steps 101
    """
    from labd.daemon import LabDaemon
    from labd.sim import demo_lab

    if not port_is_free(HOST, port):
        print_note(f"port {port} is busy; using a free port instead")
        port = 0
    store = None if no_db else _demo_store(db)
    daemon = LabDaemon(store=store)
    server = None
    try:
        demo_lab(daemon)
        server = serve_in_background(daemon, HOST, port)
        url = str(server.url)
        console.print(
            Text.assemble(
                ("labd demo", "bold"),
                ": simulated lab (laser1, pm1, daq1) serving at ",
                (url, "bold cyan"),
            )
        )
        status = _sweep(url, steps, dwell)
        _print_urls(url, store)
        if status != "completed":
            raise typer.Exit(EXIT_INTERRUPTED if status == "interrupted by you" else EXIT_ERROR)
        if wait:
            console.print(
                "Serving until Ctrl-C (try `labd devices` or `labd watch daq1` in "
                "another terminal).",
                style="dim",
            )
            wait_for_interrupt()
            console.print("stopping...")
    finally:
        stop_all(server, daemon, console)
        if store is not None:
            store.close()


def _demo_store(db: Path | None) -> RunStore | None:
    """The run store for the demo; if the default one cannot be used, history stays in memory.

    A path the user gave (--db, LABD_DB) must work; the demo does not give up on it silently.
    """
    try:
        return open_run_store(db)
    except CliError as exc:
        if db is not None:
            raise
        print_note(f"run history kept in memory only: {exc}")
        return None


def _sweep(url: str, steps: int, dwell: float) -> str:
    """Run the sweep through the client, show its progress and result; return its status."""
    params: dict[str, Any] = {
        "laser_id": "laser1",
        "detector_id": "pm1",
        "start_wl": START_WL,
        "stop_wl": STOP_WL,
        "steps": steps,
        "dwell": dwell,
    }
    console.print(
        f"sweeping laser1 from {START_WL:g} to {STOP_WL:g} nm in {steps} steps, "
        "reading pm1, through the HTTP client:"
    )
    with open_api(url) as api:
        started = api.execute_task(None, "WavelengthSweep", params)
        task_id = str(started["task_id"]) if isinstance(started, Mapping) else "?"
        # Ctrl-C during the demo's sweep means stop: no question asked.
        outcome = follow_task(api, url, task_id, console, ask=False)
    info = outcome.info
    result = info.get("result")
    if outcome.status == "completed" and isinstance(result, Mapping):
        sweep_summary(console, result.get("results"))
    else:
        print_task_outcome(console, info)
    if outcome.cancelled_by_user or outcome.detached:
        return "interrupted by you"
    return outcome.status


def _print_urls(url: str, store: RunStore | None) -> None:
    console.print(Text.assemble("server:    ", (url, "bold cyan")))
    console.print(f"dashboard: {url}/ui/")
    console.print(f"API docs:  {url}/docs")
    console.print(f"overview:  {url}/  (live events: {url}/stream/events)")
    if store is not None:
        console.print(f"history:   {store.path} (list it with `labd runs --url {url}`)",
                      soft_wrap=True)
    else:
        console.print("history:   in memory only (--no-db)")
