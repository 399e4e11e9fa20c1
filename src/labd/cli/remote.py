"""Commands that talk to a running server: devices, methods, call, run, tasks, cancel.

Each opens a :class:`labd.client.ServerAPI` on ``--url`` (or ``$LABD_URL``), does one
thing, prints it, and closes the connection. Errors become one red line
(:func:`labd.cli.errors.reports_errors`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from labd.cli.args import convert_call_args, convert_params, split_call_words, split_params
from labd.cli.errors import DEFAULT_URL, EXIT_ERROR, EXIT_INTERRUPTED, CliError, reports_errors
from labd.cli.follow import follow_task
from labd.cli.output import (
    console,
    devices_table,
    format_json,
    one_line,
    parameters_text,
    tasks_table,
)
from labd.cli.results import print_task_outcome

if TYPE_CHECKING:
    from labd.client import ServerAPI

__all__ = [
    "OwnerOption",
    "TokenOption",
    "UrlOption",
    "call",
    "cancel",
    "devices",
    "items",
    "methods",
    "open_api",
    "run",
    "tasks",
]

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="LABD_URL", help="Server to talk to.", show_default=True),
]
OwnerOption = Annotated[
    str | None,
    typer.Option(
        "--owner",
        envvar="LABD_OWNER",
        help="Act as this principal (the holder of a lease), sent as X-Labd-Owner.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", envvar="LABD_TOKEN", help="Bearer token, if the server wants one."),
]
# Commands that take free words (values like -5) must not read them as options.
FREE_WORDS = {"ignore_unknown_options": True, "allow_interspersed_args": True}


@contextmanager
def open_api(
    url: str, owner: str | None = None, token: str | None = None, timeout: float = 30.0
) -> Iterator[ServerAPI]:
    """A :class:`ServerAPI` on ``url`` for the block; a clear error if the extra is missing."""
    try:
        from labd.client import ServerAPI
    except ImportError as exc:
        raise CliError(
            f"talking to a server needs labd's `server` extra ({exc}); install it with "
            "pip install 'labd[server]'"
        ) from None
    with ServerAPI(url, timeout=timeout, owner=owner, token=token) as api:
        yield api


def items(answer: object, key: str) -> list[Mapping[str, Any]]:
    """The list under ``key`` of a ``{"devices": [...]}``-style answer (or the list itself)."""
    value = answer.get(key) if isinstance(answer, Mapping) else answer
    if not isinstance(value, list):
        raise CliError(
            f"the server answered something unexpected for {key}: {one_line(answer)[:200]}"
        )
    return [v for v in value if isinstance(v, Mapping)]


# ---------------------------------------------------------------------- devices
@reports_errors
def devices(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """List the server's devices: state, streaming, owner and last error."""
    with open_api(url, token=token) as api:
        rows = items(api.list_devices(), "devices")
    console.print(devices_table(rows))


@reports_errors
def methods(
    device: Annotated[str, typer.Argument(help="Device id, e.g. laser1.")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """List a device's public methods: query or command, typed parameters and what they do."""
    with open_api(url, token=token) as api:
        rows = items(api.get_device_methods(device), "methods")
    table = Table(title=f"{device} methods", title_justify="left")
    for column in ("method", "kind", "parameters", "returns", "doc"):
        table.add_column(column, overflow="fold")
    for method in rows:
        doc = str(method.get("doc") or "").strip().splitlines()
        # Text, not markup: "dict[str, Any]" would be read as a style tag.
        table.add_row(
            Text(str(method.get("name"))), Text(str(method.get("kind"))),
            Text(parameters_text(method.get("parameters"))),
            Text(str(method.get("returns_annotation") or "")), Text(doc[0] if doc else ""),
        )
    console.print(table)


def _described(answer: object, key: str, name: str) -> list[Mapping[str, Any]] | None:
    """The ``parameters`` of entry ``name`` in a ``{key: [...]}`` answer; None if absent."""
    entries = answer.get(key) if isinstance(answer, Mapping) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            params = entry.get("parameters")
            return [p for p in params if isinstance(p, Mapping)] if isinstance(params, list) else None
    return None


def _method_parameters(api: ServerAPI, device: str, method: str) -> list[Mapping[str, Any]] | None:
    """The method's parameter descriptions, to convert words through their schemas."""
    from labd.client import ServerAPIError

    try:
        return _described(api.get_device_methods(device), "methods", method)
    except ServerAPIError:  # e.g. no such device: the call itself says so
        return None


@reports_errors
def call(
    device: Annotated[str, typer.Argument(help="Device id, e.g. laser1.")],
    method: Annotated[str, typer.Argument(help="Method name, e.g. set_wavelength.")],
    words: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARGS",
            help="Arguments: JSON literals (1550, true, [1,2]) or strings; name=value for keywords.",
        ),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    owner: OwnerOption = None,
    token: TokenOption = None,
) -> None:
    """Call a device method on the server and print what it returned (as JSON).

    Example: labd call laser1 set_wavelength 1550
    """
    raw_args, raw_kwargs = split_call_words(words or [])
    with open_api(url, owner=owner, token=token) as api:
        # Words become values through the method's parameter schemas (a str stays a str).
        parameters = _method_parameters(api, device, method)
        args, kwargs = convert_call_args(raw_args, raw_kwargs, parameters)
        result = api.call(device, method, args, kwargs)
    # Plain print, not rich: the output is for scripts as much as for people.
    typer.echo(result if isinstance(result, str) else format_json(result))


# ---------------------------------------------------------------------- tasks
@reports_errors
def run(
    task_type: Annotated[str, typer.Argument(help="Registered task type, e.g. WavelengthSweep.")],
    words: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY=VALUE",
            help="Task parameters; values are JSON literals or strings.",
        ),
    ] = None,
    task_id: Annotated[
        str | None, typer.Option("--id", help="Task id (default: generated).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show progress until it ends.")
    ] = False,
    wait_for_devices: Annotated[
        bool,
        typer.Option(
            "--wait-for-devices",
            help="Queue until the devices are free instead of failing if busy.",
        ),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    owner: OwnerOption = None,
    token: TokenOption = None,
) -> None:
    """Start a task run on the server; with --follow, show its progress and result.

    Example: labd run WavelengthSweep laser_id=laser1 detector_id=pm1 start_wl=1545
    stop_wl=1555 steps=40 --follow
    """
    raw_params = split_params(words or [])
    with open_api(url, owner=owner, token=token) as api:
        params = convert_params(raw_params, _task_parameters(api, task_type))
        answer = api.execute_task(task_id, task_type, params, wait_for_devices)
        started = answer if isinstance(answer, Mapping) else {}
        run_id = str(started.get("task_id") or task_id)
        devices_text = ", ".join(str(d) for d in started.get("device_ids") or []) or "no devices"
        intro = Text.assemble(
            "started task ",
            (repr(run_id), "bold"),
            f" ({task_type}) owning {devices_text}: ",
            str(started.get("status", "?")),
        )
        if not follow:
            console.print(intro)
            console.print(
                f"follow it with `labd tasks`; stop it with `labd cancel {run_id}`", style="dim"
            )
            return
        outcome = follow_task(api, url, run_id, console, intro)
    print_task_outcome(console, outcome.info)
    if outcome.cancelled_by_user or outcome.detached:
        raise typer.Exit(EXIT_INTERRUPTED)
    if outcome.status != "completed":
        raise typer.Exit(EXIT_ERROR)


def _task_parameters(api: ServerAPI, task_type: str) -> list[Mapping[str, Any]] | None:
    """The task type's parameter descriptions (``/task-types``); None from an older server."""
    from labd.client import ServerAPIError

    try:
        return _described(api.task_types(), "task_types", task_type)
    except ServerAPIError:
        return None


@reports_errors
def tasks(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """List live and recently finished task runs."""
    with open_api(url, token=token) as api:
        rows = items(api.list_tasks(), "tasks")
    console.print(tasks_table(rows))


@reports_errors
def cancel(
    task_id: Annotated[str, typer.Argument(help="Id of the run to cancel.")],
    url: UrlOption = DEFAULT_URL,
    owner: OwnerOption = None,
    token: TokenOption = None,
) -> None:
    """Ask a running task to stop (it stops at its next cancellation check)."""
    with open_api(url, owner=owner, token=token) as api:
        answer = api.cancel_task(task_id)
    status = answer.get("status") if isinstance(answer, Mapping) else None
    console.print(f"task {task_id!r}: {status or 'cancellation requested'}")
