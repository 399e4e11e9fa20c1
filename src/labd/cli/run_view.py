"""How ``labd runs`` shows history: the runs table and one run's full record.

Times are shown in local time (the record keeps ISO 8601 UTC). Results arrive as JSON, so a
NumPy array is a (nested) list of numbers here; it is shown as an array again: shape,
dtype and a few values, never thousands of numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from labd.cli.output import format_json, one_line, progress_label, status_text
from labd.cli.results import records_table
from labd.cli.units import format_seconds

__all__ = ["describe_value", "local_time", "print_run", "run_duration", "runs_table"]

# Lists of numbers longer than this are summarised as arrays; shorter ones print as they are.
_INLINE_VALUES = 8
_EDGE_VALUES = 3
_ACTIVE = ("pending", "running", "paused")


def _parse(iso: object) -> datetime | None:
    if not isinstance(iso, str) or not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None


def local_time(iso: object) -> str:
    """``2024-05-01 14:03:07`` in local time from an ISO 8601 UTC stamp; ``-`` if none."""
    moment = _parse(iso)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def run_duration(run: Mapping[str, Any]) -> float | None:
    """Seconds the run ran: start to finish, or start to now while it is active."""
    started = _parse(run.get("started_at"))
    if started is None:
        return None
    finished = _parse(run.get("finished_at"))
    if finished is None:
        if run.get("status") not in _ACTIVE:
            return None
        finished = datetime.now(started.tzinfo)
    return (finished - started).total_seconds()


def _error_text(record: object, limit: int = 60) -> Text:
    if not isinstance(record, Mapping):
        return Text("-", style="dim")
    message = one_line(f"{record.get('type', 'Error')}: {record.get('message', '')}")
    return Text(message if len(message) <= limit else message[: limit - 1] + "…", style="red")


def runs_table(runs: Iterable[Mapping[str, Any]], title: str = "runs") -> Table:
    """The ``labd runs`` table: id, type, status, progress, created, duration, error."""
    table = Table(title=title, title_justify="left")
    for column in ("id", "type", "status", "progress", "created", "duration", "error"):
        table.add_column(column, overflow="fold")
    for run in runs:
        table.add_row(
            str(run.get("task_id", "?")),
            str(run.get("task_type", "?")),
            status_text(run.get("status")),
            progress_label(run.get("progress")),
            local_time(run.get("created_at")),
            format_seconds(run_duration(run)),
            _error_text(run.get("error")),
        )
    return table


# ---------------------------------------------------------------------- values
def _as_array(value: object) -> np.ndarray[Any, Any] | None:
    """``value`` as a numeric array if it is a (nested, rectangular) list of numbers."""
    if not isinstance(value, list) or not value:
        return None
    first = value[0]
    if isinstance(first, bool) or not isinstance(first, list | int | float):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # ragged
        return None
    return array if array.dtype.kind in "biuf" else None


def _array_text(array: np.ndarray[Any, Any]) -> str:
    flat = array.ravel()
    if flat.size <= 2 * _EDGE_VALUES:
        shown = ", ".join(f"{v:.6g}" for v in flat.tolist())
    else:
        head = ", ".join(f"{v:.6g}" for v in flat[:_EDGE_VALUES].tolist())
        tail = ", ".join(f"{v:.6g}" for v in flat[-_EDGE_VALUES:].tolist())
        shown = f"{head}, …, {tail}"
    return f"array {array.dtype} shape {tuple(array.shape)}: [{shown}]"


def describe_value(value: object, limit: int = 100) -> str:
    """One line for a result value: arrays as dtype, shape and a few values; else short JSON."""
    array = _as_array(value)
    if array is not None and array.size > _INLINE_VALUES:
        return _array_text(array)
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:.6g}"
    if isinstance(value, str):
        return one_line(value) if len(value) <= limit else one_line(value)[: limit - 1] + "…"
    text = one_line(format_json(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _records(value: object) -> list[Mapping[str, Any]] | None:
    if not isinstance(value, list) or not value or not all(isinstance(r, Mapping) for r in value):
        return None
    keys = list(value[0])
    return value if keys and all(list(r) == keys for r in value) else None


# ---------------------------------------------------------------------- one run
def _summary_panel(run: Mapping[str, Any]) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Text | str]] = [
        ("status", status_text(run.get("status"))),
        ("type", str(run.get("task_type", "?"))),
        ("devices", ", ".join(str(d) for d in run.get("device_ids") or []) or "-"),
        ("owner", str(run.get("owner") or "-")),
        ("progress", _progress_text(run.get("progress"))),
        ("created", local_time(run.get("created_at"))),
        ("started", local_time(run.get("started_at"))),
        ("finished", local_time(run.get("finished_at"))),
        ("duration", format_seconds(run_duration(run))),
    ]
    if run.get("parent_id"):
        rows.append(("parent", str(run["parent_id"])))
    for key, value in rows:
        grid.add_row(key, value)
    return Panel(grid, title=f"run {run.get('task_id')!r}", title_align="left", expand=False)


def _progress_text(progress: object) -> str:
    label = progress_label(progress)
    if isinstance(progress, Mapping) and progress.get("message"):
        label += f"  ({one_line(progress['message'])})"
    return label


def _mapping_table(title: str, values: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in values.items():
        table.add_row(str(key), describe_value(value))
    return table


def _print_result(console: Console, result: object) -> None:
    if result is None:
        console.print("result: none", style="dim")
        return
    if not isinstance(result, Mapping):
        console.print(f"result: {describe_value(result)}", soft_wrap=True)
        return
    scalars = {k: v for k, v in result.items() if _records(v) is None}
    if scalars:
        console.print(_mapping_table("result", scalars))
    for key, value in result.items():
        rows = _records(value)
        if rows is not None:
            console.print(records_table(rows, title=f"result[{key!r}]: {len(rows)} rows"))


def _print_error(console: Console, error: object) -> None:
    if not isinstance(error, Mapping):
        return
    console.print(Text(f"error: {error.get('type', 'Error')}: {one_line(error.get('message', ''))}",
                       style="bold red"), soft_wrap=True)
    traceback = error.get("traceback")
    if isinstance(traceback, str) and traceback.strip():
        console.print(Text(traceback.rstrip(), style="red"), soft_wrap=True)


def _events_table(events: list[Mapping[str, Any]]) -> Table:
    table = Table(title=f"last {len(events)} events", title_justify="left")
    for column in ("time", "kind", "details"):
        table.add_column(column, overflow="fold")
    for event in events:
        table.add_row(local_time(event.get("timestamp")), str(event.get("kind", "?")),
                      describe_value(event.get("body"), limit=90))
    return table


def print_run(console: Console, run: Mapping[str, Any], events: int = 10) -> None:
    """``labd runs show``: summary panel, params, result summary, error + traceback, events."""
    parts: list[Any] = [_summary_panel(run)]
    params = run.get("params")
    if isinstance(params, Mapping) and params:
        parts.append(_mapping_table("params", params))
    console.print(Group(*parts))
    _print_result(console, run.get("result"))
    _print_error(console, run.get("error"))
    all_events = [e for e in run.get("events") or [] if isinstance(e, Mapping)]
    if all_events and events > 0:
        console.print(_events_table(all_events[-events:]))
