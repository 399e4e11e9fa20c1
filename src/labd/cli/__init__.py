"""The ``labd`` command: serve a lab, drive a running one, or try the simulated demo.

Commands::

    labd serve [CONFIG] [--demo]      a daemon from a config file, over HTTP, until Ctrl-C
                                      (run history in --db, default ~/.local/share/labd)
    labd demo                         the simulated lab, a sweep through the client, then serve
    labd devices | tasks | methods    tables of what a running server has
    labd types                        device and task types, with their parameters' types
    labd call DEVICE METHOD [ARGS]    call a device method remotely
    labd run TASK [k=v ...] --follow  start a task run, with a live progress bar
    labd cancel ID | watch DEVICE     stop a run | live values of a device
    labd runs [show|export|prune]     the run history: list, one run, to HDF5/JSON, delete old
    labd lab nodes | devices | up     a lab of several PCs (labd serve --engine redis://...)
    labd version

Remote commands talk to ``--url`` (or ``$LABD_URL``, default http://127.0.0.1:5000).
User errors print one red ``labd: error: ...`` line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from labd.cli import demo as _demo
from labd.cli import lab as _lab
from labd.cli import registry as _registry
from labd.cli import remote as _remote
from labd.cli import runs as _runs
from labd.cli import serve as _serve
from labd.cli import watch as _watch
from labd.cli.output import console

__all__ = ["app", "main"]

app = typer.Typer(
    name="labd",
    help="labd: instrument control and experiment automation, shared safely.",
    no_args_is_help=True,
    add_completion=False,
    # Our own errors are one line; a traceback means a bug and should be the plain one.
    pretty_exceptions_enable=False,
)

app.command("serve")(_serve.serve)
app.command("demo")(_demo.demo)
app.command("devices")(_remote.devices)
app.command("methods")(_remote.methods)
app.command("types")(_registry.types)
app.command("call", context_settings=_remote.FREE_WORDS)(_remote.call)
app.command("run", context_settings=_remote.FREE_WORDS)(_remote.run)
app.command("tasks")(_remote.tasks)
app.command("cancel")(_remote.cancel)
app.command("watch")(_watch.watch)
app.add_typer(_runs.runs_app, name="runs")
app.add_typer(_lab.lab_app, name="lab")


@app.command("version")
def version() -> None:
    """Print labd's version."""
    import labd

    console.print(f"labd {labd.__version__}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``labd`` command (the console-script entry point).

    Example: ``main(["devices", "--url", "http://127.0.0.1:5000"])``.
    """
    app(args=list(argv) if argv is not None else sys.argv[1:], prog_name="labd")
