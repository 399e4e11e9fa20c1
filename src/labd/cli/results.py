"""Show what a finished task run produced: status line, error, and a summary of its result.

Results are whatever a task returns, usually a dict; a list of records with the same keys
(the sweep's ``results``) becomes a short table, everything else a one-line summary per key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from labd.cli.output import one_line, sparkline, status_text, summarize_value

__all__ = ["print_task_outcome", "records_table", "run_seconds", "sweep_summary"]

# A result table shows the first and last few rows of a long list.
HEAD_ROWS = 4
TAIL_ROWS = 3


def run_seconds(info: Mapping[str, Any]) -> float | None:
    """Seconds from ``started_at`` to ``finished_at`` of a task info, None if unknown."""
    try:
        started = datetime.fromisoformat(str(info["started_at"]).replace("Z", "+00:00"))
        finished = datetime.fromisoformat(str(info["finished_at"]).replace("Z", "+00:00"))
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds()


def _records(value: object) -> list[Mapping[str, Any]] | None:
    """``value`` if it is a non-empty list of dicts with the same keys, else None."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(row, Mapping) for row in value):
        return None
    keys = list(value[0])
    if not keys or any(list(row) != keys for row in value):
        return None
    return value


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.6g}"
    return one_line(value)


def records_table(
    rows: Sequence[Mapping[str, Any]], title: str | None = None, highlight: int | None = None
) -> Table:
    """The first and last rows of a list of records (``…`` between), ``highlight`` in bold."""
    table = Table(title=title, title_justify="left")
    keys = list(rows[0])
    table.add_column("#", justify="right", style="dim")
    for key in keys:
        table.add_column(str(key), justify="right")
    shown = list(range(len(rows)))
    if len(rows) > HEAD_ROWS + TAIL_ROWS + 1:
        shown = [*range(HEAD_ROWS), -1, *range(len(rows) - TAIL_ROWS, len(rows))]
        if highlight is not None and highlight not in shown:
            shown = [*range(HEAD_ROWS), -1, highlight, -1, *range(len(rows) - TAIL_ROWS, len(rows))]
    for index in shown:
        if index < 0:
            table.add_row("…", *("…" for _ in keys))
            continue
        style = "bold green" if index == highlight else None
        table.add_row(str(index), *(_cell(rows[index][k]) for k in keys), style=style)
    return table


def print_task_outcome(console: Console, info: Mapping[str, Any]) -> None:
    """Print the status line, the error if any, and a summary of the result."""
    status = str(info.get("status") or "unknown")
    line = Text.assemble(
        "task ",
        (repr(info.get("task_id")), "bold"),
        f" ({info.get('task_type', '?')}) ",
        status_text(status),
    )
    seconds = run_seconds(info)
    if seconds is not None:
        line.append(f" in {seconds:.2f} s")
    console.print(line)
    error = info.get("error")
    if isinstance(error, Mapping):
        console.print(
            Text(
                f"  {error.get('type', 'Error')}: {one_line(error.get('message', ''))}", style="red"
            ),
            soft_wrap=True,
        )
    result = info.get("result")
    if result is None:
        return
    if not isinstance(result, Mapping):
        console.print(f"  result: {summarize_value(result)}", soft_wrap=True)
        return
    for key, value in result.items():
        rows = _records(value)
        if rows is not None:
            console.print(records_table(rows, title=f"result[{key!r}]: {len(rows)} rows"))
        else:
            console.print(f"  {key}: {summarize_value(value)}", soft_wrap=True)


def sweep_summary(console: Console, results: object) -> None:
    """The demo's view of a sweep: resonance (minimum power), a few rows and a sparkline."""
    rows = _records(results)
    if rows is None or not {"wavelength", "power"} <= set(rows[0]):
        console.print("  (the sweep returned no points)")
        return
    powers = [float(row["power"]) for row in rows]
    finite = [p for p in powers if math.isfinite(p)]
    if not finite:
        console.print("  (every power reading was non-finite)")
        return
    lowest = powers.index(min(finite))
    console.print(records_table(rows, title=f"sweep: {len(rows)} points", highlight=lowest))
    console.print(
        Text.assemble(
            "resonance at ",
            (f"{float(rows[lowest]['wavelength']):.3f} nm", "bold green"),
            f": minimum power {powers[lowest]:.4g} mW (maximum {max(finite):.4g} mW)",
        )
    )
    first, last = float(rows[0]["wavelength"]), float(rows[-1]["wavelength"])
    console.print(f"  power vs wavelength  {first:.1f} nm {sparkline(powers)} {last:.1f} nm")
