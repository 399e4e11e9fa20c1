"""Command-line words to Python values: ``1550`` is a number, ``wl=1550`` a keyword argument.

``labd call laser1 set_wavelength 1550`` and ``labd run WavelengthSweep steps=40`` share
these rules, so a value is spelled the same way everywhere:

* a word that is a JSON literal becomes that value: ``1550`` -> 1550, ``1.5e-3``, ``true``,
  ``null``, ``[1, 2]``, ``{"a": 1}``, ``"quoted text"``;
* anything else stays a string: ``GPIB0::1``, ``hello``.

When the server describes the parameter (a JSON Schema from ``GET /devices/{id}/methods`` or
``/task-types``), the schema decides: a word for a string parameter stays the string it is
(``port=1550`` sends ``"1550"``), and a whole number for a float parameter is sent as a
float (``1550`` -> ``1550.0``). The server validates the result either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from labd.cli.errors import EXIT_USAGE, CliError

__all__ = [
    "convert_call_args",
    "convert_params",
    "parse_call_args",
    "parse_params",
    "parse_value",
    "split_call_words",
    "split_params",
    "value_for",
]

#: A parameter as the server describes it: ``{"name", "kind", "schema", ...}``.
ParameterSpec = Mapping[str, Any]

_KEYWORD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


def parse_value(word: str) -> Any:
    """``word`` as a JSON literal if it is one, else the string itself.

    >>> parse_value("1550"), parse_value("true"), parse_value("GPIB0::1")
    (1550, True, 'GPIB0::1')
    """
    try:
        # NaN and Infinity are JSON extensions json.loads accepts; a lab may need them.
        return json.loads(word)
    except ValueError:
        return word


def value_for(word: str, schema: Mapping[str, Any] | None) -> Any:
    """``word`` converted for a parameter whose JSON Schema is ``schema`` (None/{}: unknown).

    >>> value_for("1550", {"type": "number"}), value_for("1550", {"type": "string"})
    (1550.0, '1550')
    """
    value = parse_value(word)
    types = _schema_types(schema or {})
    if not types:
        return value
    kind = _json_type(value)
    accepted = kind in types or (kind == "integer" and "number" in types)
    if not accepted and "string" in types:
        return word  # the parameter takes text: keep what was typed
    if kind == "integer" and "integer" not in types and "number" in types:
        return float(value)
    return value


def split_call_words(words: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``labd call`` words as positional words and ``name=word`` keywords, still unparsed.

    A word that is itself JSON (``"a=b"`` in quotes) stays positional. Keywords may not
    repeat, and positionals may not follow keywords (as in Python).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for word in words:
        keyword = _keyword(word)
        if keyword is None:
            if kwargs:
                raise CliError(
                    f"positional argument {word!r} follows keyword arguments; put positional "
                    "values first (as in Python)",
                    EXIT_USAGE,
                )
            args.append(word)
            continue
        name, value = keyword
        if name in kwargs:
            raise CliError(f"keyword argument {name!r} is given twice", EXIT_USAGE)
        kwargs[name] = value
    return args, kwargs


def convert_call_args(
    args: Sequence[str], kwargs: Mapping[str, str], parameters: Iterable[ParameterSpec] | None,
) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword words converted through the method's parameter schemas."""
    params = [p for p in parameters or [] if isinstance(p, Mapping)]
    positional = [p for p in params if p.get("kind") in ("positional_only", "positional_or_keyword")]
    var_args = _schema_of(params, "var_positional")
    converted = [
        value_for(word, positional[i].get("schema") if i < len(positional) else var_args)
        for i, word in enumerate(args)
    ]
    return converted, convert_params(kwargs, params)


def convert_params(
    words: Mapping[str, str], parameters: Iterable[ParameterSpec] | None,
) -> dict[str, Any]:
    """``name -> word`` converted through each named parameter's schema (or ``**kwargs``'s)."""
    params = [p for p in parameters or [] if isinstance(p, Mapping)]
    by_name = {str(p.get("name")): p.get("schema") for p in params
               if p.get("kind") in ("positional_or_keyword", "keyword_only")}
    rest = _schema_of(params, "var_keyword")
    return {name: value_for(word, by_name.get(name, rest)) for name, word in words.items()}


def parse_call_args(
    words: Sequence[str], parameters: Iterable[ParameterSpec] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Split ``labd call`` words into positional ``args`` and ``name=value`` ``kwargs``.

    ``parameters`` (the method's description from the server) converts each value through
    its schema; without it every value is parsed by :func:`parse_value`.

    >>> parse_call_args(["1550", "unit=nm"])
    ([1550], {'unit': 'nm'})
    """
    args, kwargs = split_call_words(words)
    return convert_call_args(args, kwargs, parameters)


def split_params(words: Sequence[str], what: str = "task parameter") -> dict[str, str]:
    """``key=value`` words (``labd run``) as ``key -> word``; anything else is a usage error."""
    params: dict[str, str] = {}
    for word in words:
        keyword = _keyword(word)
        if keyword is None:
            raise CliError(
                f"expected {what}s as key=value (e.g. steps=40 laser_id=laser1), got {word!r}",
                EXIT_USAGE,
            )
        name, value = keyword
        if name in params:
            raise CliError(f"{what} {name!r} is given twice", EXIT_USAGE)
        params[name] = value
    return params


def parse_params(
    words: Sequence[str], what: str = "task parameter",
    parameters: Iterable[ParameterSpec] | None = None,
) -> dict[str, Any]:
    """Parse ``key=value`` words (``labd run``), through ``parameters``' schemas if given.

    >>> parse_params(["steps=40", "laser_id=laser1"])
    {'steps': 40, 'laser_id': 'laser1'}
    """
    return convert_params(split_params(words, what), parameters)


def _keyword(word: str) -> tuple[str, str] | None:
    """``(name, value word)`` for a ``name=value`` word that is not a JSON literal, else None."""
    if _is_json(word):
        return None
    match = _KEYWORD.match(word)
    if match is None:
        return None
    return match.group(1), match.group(2)


def _is_json(word: str) -> bool:
    try:
        json.loads(word)
    except ValueError:
        return False
    return True


def _schema_of(params: Sequence[ParameterSpec], kind: str) -> Any:
    return next((p.get("schema") for p in params if p.get("kind") == kind), None)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    """The JSON types a schema accepts (empty: unknown, take the word as parsed)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {str(k) for k in kind}
    if "enum" in schema or "const" in schema:
        values = schema.get("enum") if "enum" in schema else [schema.get("const")]
        return {_json_type(v) for v in values or []}
    types: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or []:
            branch_types = _schema_types(branch) if isinstance(branch, Mapping) else set()
            if not branch_types:
                return set()  # a branch takes anything: no preference
            types |= branch_types
    return types
