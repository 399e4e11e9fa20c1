"""Form fields from JSON Schemas: what the dashboard shows for a method's or a task's parameters.

Each parameter description (the shape of ``GET /devices/{id}/methods`` and ``GET
/task-types``: ``name``, ``required``, ``default``, ``schema``, ``annotation``, ``kind``)
becomes a :class:`Field` whose ``widget`` the templates render and whose ``kind`` the
browser script uses to turn the input back into JSON:

    number, integer   <input type=number>        ("step" any / 1)
    boolean           <input type=checkbox>
    choice            <select> of the enum values (each option's JSON in data-json)
    list              <input> of comma-separated items (or a JSON array)
    text              <input type=text>
    json              <input> holding any JSON value (schemas labd cannot describe)

``Optional[X]`` (``anyOf`` with ``null``) is X, and may be left empty. An empty optional
field is left out of the call, so the parameter's default applies.

Example::

    fields_for([{"name": "nm", "required": True, "schema": {"type": "number"}, ...}])
    # [Field(name='nm', widget='number', kind='number', required=True, ...)]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Field", "fields_for"]

_SIMPLE = {"number": "number", "integer": "integer", "boolean": "boolean", "string": "text"}


@dataclass(frozen=True)
class Field:
    """One input of a generated form."""

    name: str
    widget: str  # number | checkbox | select | text
    kind: str  # number | integer | boolean | choice | list | text | json
    required: bool
    annotation: str | None = None
    default: str = ""  # the input's initial value, as text
    checked: bool = False  # checkbox default
    choices: list[tuple[str, str]] = field(default_factory=list)  # (label, JSON)
    item_kind: str = "json"  # list items: number | integer | boolean | text | json
    positional_only: bool = False
    hint: str = ""


def _unwrap(schema: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """(the schema without a ``null`` alternative, whether null was allowed)."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        rest = [o for o in options if isinstance(o, Mapping) and o.get("type") != "null"]
        if len(rest) == 1 and len(rest) < len(options):
            return rest[0], True
    return schema, False


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(_text(v) if not isinstance(v, list | dict) else json.dumps(v) for v in value)
    return json.dumps(value)


def _item_kind(schema: Mapping[str, Any]) -> str:
    items = schema.get("items")
    if isinstance(items, Mapping):
        return _SIMPLE.get(str(items.get("type")), "json")
    return "json"


def _field(param: Mapping[str, Any], override: Any = None, use_override: bool = False) -> Field:
    raw_schema = param.get("schema")
    schema, nullable = _unwrap(raw_schema if isinstance(raw_schema, Mapping) else {})
    required = bool(param.get("required")) and not nullable
    name = str(param["name"])
    default = override if use_override else (None if param.get("required") else param.get("default"))
    common: dict[str, Any] = {
        "name": name, "required": required, "annotation": param.get("annotation"),
        "positional_only": param.get("kind") in ("positional_only", "var_positional"),
    }
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        choices = [(_text(v), json.dumps(v)) for v in enum]
        return Field(widget="select", kind="choice", choices=choices,
                     default=json.dumps(default) if default is not None else "", **common)
    kind = _SIMPLE.get(str(schema.get("type")), "json")
    if param.get("kind") == "var_positional" or schema.get("type") == "array":
        item_schema = schema if schema.get("type") == "array" else {"items": schema}
        return Field(widget="text", kind="list", item_kind=_item_kind(item_schema),
                     default=_text(default), hint="comma-separated values", **common)
    if kind == "boolean":
        return Field(widget="checkbox", kind="boolean", checked=default is True, **common)
    if kind in ("number", "integer"):
        return Field(widget="number", kind=kind, default=_text(default), **common)
    hint = "" if kind == "text" else "a JSON value"
    return Field(widget="text", kind=kind, default=_text(default), hint=hint, **common)


def fields_for(
    parameters: Iterable[Mapping[str, Any]], values: Mapping[str, Any] | None = None,
) -> list[Field]:
    """The form fields of ``parameters``; ``values`` prefill them (``Run again``)."""
    values = values or {}
    return [_field(p, values.get(str(p["name"])), str(p["name"]) in values)
            for p in parameters if p.get("kind") != "var_keyword"]
