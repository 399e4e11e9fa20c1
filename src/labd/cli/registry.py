"""``labd types``: the device and task types a running server can add and run.

One table each, with every constructor parameter and its type (from ``GET /device-types`` and
``GET /task-types``), so a user knows what ``POST /devices`` and ``labd run`` take.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from labd.cli.errors import DEFAULT_URL, reports_errors
from labd.cli.output import console, parameters_text
from labd.cli.remote import TokenOption, UrlOption, items, open_api

__all__ = ["types", "types_table"]


def types_table(title: str, rows: list[Mapping[str, Any]]) -> Table:
    """A table of registered types: name, parameters (typed, with defaults), first doc line."""
    table = Table(title=title, title_justify="left")
    for column in ("type", "parameters", "doc"):
        table.add_column(column, overflow="fold")
    for row in rows:
        doc = str(row.get("doc") or "").strip().splitlines()
        # Text, not markup: "dict[str, float]" would be read as a style tag.
        table.add_row(Text(str(row.get("name"))), Text(parameters_text(row.get("parameters"))),
                      Text(doc[0] if doc else ""))
    return table


@reports_errors
def types(url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """List the device and task types the server has, with their parameters' types."""
    with open_api(url, token=token) as api:
        device_types = items(api.device_types(), "device_types")
        task_types = items(api.task_types(), "task_types")
    console.print(types_table("device types", device_types))
    console.print(types_table("task types", task_types))
