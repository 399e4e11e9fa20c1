"""Terminal output for the ``labd`` command: consoles, error lines, tables, value summaries.

Everything a command prints goes through here, so the look (and the one-line error rule)
is the same for every command. Rich writes to whatever ``sys.stdout`` is at print time, so
typer's ``CliRunner`` captures it in tests.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "SPARK_CHARS",
    "console",
    "devices_table",
    "err_console",
    "format_json",
    "numeric_values",
    "one_line",
    "parameters_text",
    "print_error",
    "print_note",
    "sparkline",
    "summarize_value",
    "tasks_table",
]

#: Eight heights, lowest first, for :func:`sparkline`.
SPARK_CHARS = "▁▂▃▄▅▆▇█"

STATUS_STYLES = {
    "completed": "green",
    "running": "cyan",
    "pending": "yellow",
    "paused": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    "interrupted": "red",
    "connected": "green",
    "faulted": "red",
    "disconnected": "dim",
    "added": "dim",
}

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def print_error(message: object) -> None:
    """Print ``labd: error: <message>`` in red on stderr, on one line (never wrapped)."""
    # Text, not markup: messages quote user input such as "[1, 2]" that rich would eat.
    err_console.print(Text(f"labd: error: {one_line(message)}", style="bold red"), soft_wrap=True)


def print_note(message: str, style: str = "yellow") -> None:
    """A one-line notice on stderr (e.g. "port 5000 is busy; using 5123")."""
    err_console.print(Text(f"labd: {one_line(message)}", style=style), soft_wrap=True)


def status_text(status: object) -> Text:
    """A status word in its colour."""
    word = str(status) if status is not None else "-"
    return Text(word, style=STATUS_STYLES.get(word, ""))


def format_json(value: Any) -> str:
    """``value`` as JSON (pretty for containers), falling back to ``repr`` for the rest."""
    indent = 2 if isinstance(value, Mapping | list | tuple) else None
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        return repr(value)


# ---------------------------------------------------------------------- tables
def _error_message(record: object) -> str:
    if isinstance(record, Mapping):
        return one_line(record.get("message") or record.get("type") or "")
    return "" if record is None else one_line(record)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parameters_text(parameters: object) -> str:
    """``nm: float, mode: Literal['fast', 'slow']='fast', *values, **extra`` from descriptions."""
    parts = []
    for p in parameters if isinstance(parameters, list) else []:
        if not isinstance(p, Mapping):
            continue
        kind = p.get("kind")
        stars = "*" if kind == "var_positional" else "**" if kind == "var_keyword" else ""
        text = stars + str(p.get("name"))
        annotation = p.get("annotation")
        if annotation:
            text += f": {annotation}"
        if not p.get("required") and not stars:
            text += f"={p.get('default')!r}"
        parts.append(text)
    return ", ".join(parts)


def devices_table(devices: Iterable[Mapping[str, Any]]) -> Table:
    """The ``labd devices`` table: id, type, state, streaming, owner, last error."""
    table = Table(title="devices", title_justify="left")
    for column in ("id", "type", "state", "streaming", "owner", "last error"):
        table.add_column(column, overflow="fold")
    for info in devices:
        error = _error_message(info.get("last_error"))
        table.add_row(
            str(info.get("device_id", "?")),
            str(info.get("device_type", "?")),
            status_text(info.get("state")),
            "yes" if info.get("streaming") else "no",
            str(info.get("owner_label") or info.get("owned_by") or "-"),
            Text(_short(error), style="red") if error else Text("-", style="dim"),
        )
    return table


def progress_label(progress: object) -> str:
    """``12/40`` or ``30%`` from a task's progress dict, ``-`` without one."""
    if not isinstance(progress, Mapping):
        return "-"
    done, total = progress.get("done"), progress.get("total")
    if isinstance(done, numbers.Real) and isinstance(total, numbers.Real) and total:
        return f"{done:g}/{total:g}"
    fraction = progress.get("fraction")
    if isinstance(fraction, numbers.Real):
        return f"{100 * float(fraction):.0f}%"
    return f"{done:g}" if isinstance(done, numbers.Real) else "-"


def tasks_table(tasks: Iterable[Mapping[str, Any]]) -> Table:
    """The ``labd tasks`` table: id, type, status, progress, devices, started, error."""
    table = Table(title="tasks", title_justify="left")
    for column in ("id", "type", "status", "progress", "devices", "started", "error"):
        table.add_column(column, overflow="fold")
    for info in tasks:
        error = _error_message(info.get("error"))
        started = str(info.get("started_at") or info.get("created_at") or "-")
        table.add_row(
            str(info.get("task_id", "?")),
            str(info.get("task_type", "?")),
            status_text(info.get("status")),
            progress_label(info.get("progress")),
            ", ".join(str(d) for d in info.get("device_ids") or []) or "-",
            started.replace("T", " ")[:19],
            Text(_short(error), style="red") if error else Text("-", style="dim"),
        )
    return table


# ---------------------------------------------------------------------- values
def numeric_values(value: object) -> list[float] | None:
    """The numbers in a flat list (or the first numeric list inside a dict), else None."""
    if isinstance(value, Mapping):
        for key in ("samples", "data", "values", "y"):
            found = numeric_values(value.get(key))
            if found is not None:
                return found
        for item in value.values():
            if isinstance(item, list | tuple):
                found = numeric_values(item)
                if found is not None:
                    return found
        return None
    if isinstance(value, list | tuple) and value:
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if all(isinstance(v, list | tuple) for v in value):  # several channels: the first
            return numeric_values(value[0])
    return None


def summarize_value(value: object, limit: int = 70) -> str:
    """A short description of a reading: the number, or n/min/mean/max of a block of samples."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return _short(str(value), limit)
    if isinstance(value, numbers.Real):
        return f"{float(value):.6g}"
    numbers_found = numeric_values(value)
    if numbers_found:
        finite = [v for v in numbers_found if math.isfinite(v)] or [math.nan]
        mean = sum(finite) / len(finite)
        return (
            f"{len(numbers_found)} values  min {min(finite):.4g}  mean {mean:.4g}  "
            f"max {max(finite):.4g}  last {numbers_found[-1]:.4g}"
        )
    return _short(one_line(format_json(value)), limit)


def sparkline(values: Sequence[float]) -> str:
    """One character per value, ``▁`` for the lowest and ``█`` for the highest.

    Non-finite values show as a space. ``sparkline([1, 2, 3, 2, 1])`` is ``"▁▅█▅▁"``.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    span = high - low
    top = len(SPARK_CHARS) - 1
    chars = []
    for v in values:
        if not math.isfinite(v):
            chars.append(" ")
        elif span == 0:
            chars.append(SPARK_CHARS[top // 2])
        else:
            chars.append(SPARK_CHARS[round((v - low) / span * top)])
    return "".join(chars)
