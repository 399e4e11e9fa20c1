"""``labd runs``: the run history — list, show one run, export it, prune old runs.

Listing, showing and exporting ask a running server (``--url``), which reads its run store,
or, with ``--db FILE``, read the database file itself, read-only: no server needed, and it
works while a labd process writes the file. ``labd runs prune`` works on the file (``--db``)
and refuses one that a live labd process has open.

    labd runs --status failed --since 7d
    labd runs --db ~/.local/share/labd/labd.db
    labd runs show sweep1
    labd runs export sweep1 --hdf5 sweep1.h5
    labd runs prune --older-than 90d --max-size 1GB
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from labd.cli.errors import DEFAULT_URL, EXIT_USAGE, CliError, reports_errors
from labd.cli.output import console, print_note
from labd.cli.remote import TokenOption, UrlOption, items, open_api
from labd.cli.run_view import print_run, runs_table
from labd.cli.stores import DbOption, disk_bytes, in_use_error, resolve_db
from labd.cli.units import format_bytes, parse_duration, parse_since, parse_size

if TYPE_CHECKING:
    from labd.store import RunStore
    from labd.store_history import HistoryFile

__all__ = ["RUN_METADATA_KEYS", "export", "list_runs", "prune", "runs_app", "show"]

#: Fields of a run record that an HDF5 export keeps as file metadata.
RUN_METADATA_KEYS = (
    "task_id", "task_type", "status", "params", "device_ids", "owner", "parent_id", "progress",
    "error", "created_at", "started_at", "finished_at",
)
# HDF5 attributes are limited to 64 KiB; larger metadata values go into /data/run instead.
_MAX_ATTRIBUTE_BYTES = 60_000
# Reading a file directly, an export takes every stored event (a server sends its last 1000).
_ALL_EVENTS = 2**62

#: ``--db`` for reading: no LABD_DB fallback, so ``labd runs`` keeps asking the server unless told.
ReadDbOption = Annotated[
    Path | None,
    typer.Option("--db", help="Read this run store file directly (read-only; no server needed, "
                 "works while labd runs).", dir_okay=False, show_default=False),
]


@contextmanager
def _history_file(db: Path) -> Iterator[HistoryFile]:
    from labd.store_history import HistoryFile, HistoryFileError

    try:
        history = HistoryFile(db)
    except HistoryFileError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    try:
        yield history
    finally:
        history.close()


def _read_run(task_id: str, db: Path | None, url: str, token: str | None,
              events: int) -> Mapping[str, Any]:
    """One run's record, from the file (``--db``) or the server."""
    if db is not None:
        with _history_file(db) as history:
            found = history.get_run(task_id, events_limit=events)
        if found is None:
            raise CliError(f"no run {task_id!r} in {str(db)!r}; list them with labd runs --db {db}")
        return found
    with open_api(url, token=token) as api:
        record = api.get_run(task_id)
    if not isinstance(record, Mapping):
        raise CliError(f"the server answered something unexpected for run {task_id!r}")
    return record

runs_app = typer.Typer(
    name="runs",
    help="The run history: list runs, show or export one, prune old ones.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# ---------------------------------------------------------------------- list
@runs_app.callback(invoke_without_command=True)
@reports_errors
def list_runs(
    ctx: typer.Context,
    status: Annotated[
        str | None,
        typer.Option(help="Only runs in this state: pending, running, paused, completed, failed, "
                     "cancelled or interrupted.", show_default=False),
    ] = None,
    task_type: Annotated[
        str | None, typer.Option("--type", help="Only runs of this task type.", show_default=False)
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only runs created since: a duration back from now (7d, 12h) or a "
                     "local ISO time (2024-05-01, 2024-05-01T14:00).", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(help="Runs to show.", min=1, max=1000)] = 20,
    offset: Annotated[int, typer.Option(help="Skip this many newer runs.", min=0)] = 0,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    db: ReadDbOption = None,
) -> None:
    """List recorded runs, newest first: status, progress, when, how long, error.

    Example: labd runs --status failed --since 7d
    """
    if ctx.invoked_subcommand is not None:
        return
    after = parse_since(since) if since is not None else None
    if db is not None:
        with _history_file(db) as history:
            found = history.runs(status=status, task_type=task_type, since=after,
                                 limit=limit + 1, offset=offset)
        page: Any = {"runs": found[:limit],
                     "next_offset": offset + limit if len(found) > limit else None}
    else:
        with open_api(url, token=token) as api:
            page = api.list_runs(status, task_type, after, limit, offset)
    rows = items(page, "runs")
    console.print(runs_table(rows, title=f"runs in {db}" if db is not None else f"runs at {url}"))
    if not rows:
        console.print("no runs match" if (status or task_type or since or offset) else
                      "no runs recorded yet", style="dim")
    next_offset = page.get("next_offset") if isinstance(page, Mapping) else None
    if isinstance(next_offset, int):
        where = f" --db {db}" if db is not None else ""
        console.print(f"more runs: labd runs --offset {next_offset}{where}", style="dim")


# ---------------------------------------------------------------------- show
@runs_app.command("show")
@reports_errors
def show(
    task_id: Annotated[str, typer.Argument(help="Id of the run.")],
    events: Annotated[int, typer.Option(help="How many of its last events to show.", min=0)] = 10,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    db: ReadDbOption = None,
) -> None:
    """Show one run: summary, parameters, result, error with traceback, last events.

    Example: labd runs show sweep1
    """
    record = _read_run(task_id, db, url, token, max(events, 1))
    print_run(console, record, events=events)


# ---------------------------------------------------------------------- export
def _refuse_existing(path: Path | None, force: bool) -> None:
    if path is not None and path.exists() and not force:
        raise CliError(f"{str(path)!r} already exists; pass --force to replace it", EXIT_USAGE)


def _free_key(data: Mapping[str, Any], name: str) -> str:
    """``name``, or ``run_<name>`` if the result already uses it."""
    return name if name not in data else f"run_{name}"


def _kept_events(record: Mapping[str, Any], data: dict[str, Any]) -> None:
    """Add what the run emitted and reported (its events) to ``data``, beside any result.

    emitted (+ emitted_at): every emitted value, oldest first; progress_history: columns
    done, total (NaN: none), message, timestamp.
    """
    events = [e for e in record.get("events") or [] if isinstance(e, Mapping)]
    emitted = [e for e in events if e.get("kind") == "data"]
    if emitted:
        data[_free_key(data, "emitted")] = [e.get("body") for e in emitted]
        data[_free_key(data, "emitted_at")] = [str(e.get("timestamp")) for e in emitted]
    progress = [e["body"] for e in events if e.get("kind") == "progress" and isinstance(e.get("body"), Mapping)]
    if progress:
        def column(key: str) -> list[float]:
            values = [p.get(key) for p in progress]
            return [float(v) if isinstance(v, int | float) else float("nan") for v in values]

        data[_free_key(data, "progress_history")] = {
            "done": column("done"), "total": column("total"),
            "message": [str(p.get("message") or "") for p in progress],
            "timestamp": [str(e.get("timestamp")) for e in events if e.get("kind") == "progress"
                          and isinstance(e.get("body"), Mapping)],
        }


def _hdf5_parts(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, metadata) for save_hdf5: the result and the kept events as data, the rest of the
    record (parameters, state, final progress, error) as metadata."""
    result = record.get("result")
    data: dict[str, Any] = dict(result) if isinstance(result, Mapping) else (
        {} if result is None else {"result": result})
    _kept_events(record, data)
    metadata: dict[str, Any] = {}
    oversized: dict[str, Any] = {}
    for key in RUN_METADATA_KEYS:
        value = record.get(key)
        size = len(orjson.dumps(value, default=str))
        (oversized if size > _MAX_ATTRIBUTE_BYTES else metadata)[key] = value
    if oversized:
        data["run"] = oversized
        metadata["run_fields_in_data"] = sorted(oversized)
    return data, metadata


def _save(record: Mapping[str, Any], hdf5: Path | None, json_file: Path | None, force: bool) -> None:
    from labd.io import save_hdf5, save_json

    try:
        if json_file is not None:
            save_json(dict(record), json_file)
        if hdf5 is not None:
            data, metadata = _hdf5_parts(record)
            save_hdf5(data, hdf5, metadata, overwrite=force)
    except ImportError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except (OSError, TypeError, ValueError) as exc:
        raise CliError(f"cannot export run {record.get('task_id')!r}: {exc}") from None


@runs_app.command("export")
@reports_errors
def export(
    task_id: Annotated[str, typer.Argument(help="Id of the run.")],
    hdf5: Annotated[
        Path | None,
        typer.Option("--hdf5", help="Write the result as HDF5 (labd.io.save_hdf5), with the run "
                     "record as metadata.", dir_okay=False, show_default=False),
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="Write the whole run record (events too) as JSON.",
                     dir_okay=False, show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    db: ReadDbOption = None,
) -> None:
    """Export a run to HDF5 and/or JSON: its result, emitted data and progress, its record.

    A run that ended without a result (interrupted, cancelled, failed) still exports what
    it emitted and reported. Example: labd runs export sweep1 --hdf5 sweep1.h5
    """
    if hdf5 is None and json_file is None:
        raise CliError("say where to export: --hdf5 FILE and/or --json FILE", EXIT_USAGE)
    _refuse_existing(hdf5, force)
    _refuse_existing(json_file, force)
    record = _read_run(task_id, db, url, token, _ALL_EVENTS)
    _save(record, hdf5, json_file, force)
    for path in (hdf5, json_file):
        if path is not None:
            console.print(Text.assemble(f"run {task_id!r} ({record.get('status')}) written to ",
                                        (str(path), "bold")), soft_wrap=True)


# ---------------------------------------------------------------------- prune
def _count_older(path: Path, cutoff: float) -> int | None:
    """Finished runs created before ``cutoff`` (for the progress bar), None if unknown."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT COUNT(*) FROM runs WHERE finished_at IS NOT NULL AND "
                           "finished_at < ?", (cutoff,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return int(row[0])


def _open_for_prune(path: Path) -> RunStore:
    from labd.store import RunStore, StoreError, StoreInUseError

    if not path.is_file():
        raise CliError(f"no run store at {str(path)!r}; pass the database with --db PATH "
                       "(or set LABD_DB)", EXIT_USAGE)
    try:
        return RunStore(path)
    except StoreInUseError as exc:
        raise in_use_error(path, exc.pid, "prune") from None
    except StoreError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _prune_with_bar(store: RunStore, older_than: float | None, max_bytes: int | None,
                    total: int | None) -> int:
    columns = (TextColumn("pruning"), BarColumn(),
               TextColumn("{task.fields[deleted]} run(s) deleted"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("prune", total=total, deleted=0)
        counted = [0]

        def advance(n: int) -> None:
            counted[0] += n
            bar.update(task, advance=n, deleted=counted[0])

        deleted = store.prune(older_than=older_than, max_bytes=max_bytes, progress=advance)
        # Full bar at the end: the size cap has no total known in advance.
        bar.update(task, total=max(deleted, 1), completed=max(deleted, 1), deleted=deleted)
    return deleted


@runs_app.command("prune")
@reports_errors
def prune(
    older_than: Annotated[
        str | None,
        typer.Option(help="Delete finished runs that ended longer ago than this, e.g. 90d "
                     "(units s, m, h, d, w).", show_default=False),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(help="Then delete the oldest finished runs until the database is under "
                     "this size, e.g. 1GB.", show_default=False),
    ] = None,
    db: DbOption = None,
) -> None:
    """Delete old runs from a run store file (no server needed), then compact it.

    Example: labd runs prune --older-than 90d --max-size 1GB
    """
    if older_than is None and max_size is None:
        raise CliError("say what to delete: --older-than 90d and/or --max-size 1GB", EXIT_USAGE)
    seconds = parse_duration(older_than, "--older-than") if older_than is not None else None
    max_bytes = parse_size(max_size, "--max-size") if max_size is not None else None
    path, _ = resolve_db(db)
    before = disk_bytes(path)
    total = None
    if seconds is not None and max_bytes is None:
        total = _count_older(path, time.time() - seconds) if path.is_file() else None
    store = _open_for_prune(path)
    try:
        if store.interrupted:
            print_note(f"{store.interrupted} run(s) left active by a stopped labd are now "
                       "marked interrupted")
        deleted = _prune_with_bar(store, seconds, max_bytes, total)
    finally:
        store.close()
    after = disk_bytes(path)
    console.print(f"deleted {deleted} run(s) from {path}; size {format_bytes(before)} -> "
                  f"{format_bytes(after)}", soft_wrap=True)
