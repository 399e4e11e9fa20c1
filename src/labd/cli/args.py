"""Command-line words to Python values: ``1550`` is a number, ``wl=1550`` a keyword argument.

``labd call laser1 set_wavelength 1550`` and ``labd run WavelengthSweep steps=40`` share
these rules, so a value is spelled the same way everywhere:

* a word that is a JSON literal becomes that value: ``1550`` -> 1550, ``1.5e-3``, ``true``,
  ``null``, ``[1, 2]``, ``{"a": 1}``, ``"quoted text"``;
* anything else stays a string: ``GPIB0::1``, ``hello``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from labd.cli.errors import EXIT_USAGE, CliError

__all__ = ["parse_call_args", "parse_params", "parse_value"]

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


def parse_call_args(words: Sequence[str]) -> tuple[list[Any], dict[str, Any]]:
    """Split ``labd call`` words into positional ``args`` and ``name=value`` ``kwargs``.

    A word that is itself JSON (``"a=b"`` in quotes) stays positional. Keywords may not
    repeat, and positionals may not follow keywords (as in Python).

    >>> parse_call_args(["1550", "unit=nm"])
    ([1550], {'unit': 'nm'})
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in words:
        keyword = _keyword(word)
        if keyword is None:
            if kwargs:
                raise CliError(
                    f"positional argument {word!r} follows keyword arguments; put positional "
                    "values first (as in Python)",
                    EXIT_USAGE,
                )
            args.append(parse_value(word))
            continue
        name, value = keyword
        if name in kwargs:
            raise CliError(f"keyword argument {name!r} is given twice", EXIT_USAGE)
        kwargs[name] = value
    return args, kwargs


def parse_params(words: Sequence[str], what: str = "task parameter") -> dict[str, Any]:
    """Parse ``key=value`` words (``labd run``); anything else is a usage error.

    >>> parse_params(["steps=40", "laser_id=laser1"])
    {'steps': 40, 'laser_id': 'laser1'}
    """
    params: dict[str, Any] = {}
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


def _keyword(word: str) -> tuple[str, Any] | None:
    """``(name, value)`` for a ``name=value`` word that is not a JSON literal, else None."""
    if _is_json(word):
        return None
    match = _KEYWORD.match(word)
    if match is None:
        return None
    return match.group(1), parse_value(match.group(2))


def _is_json(word: str) -> bool:
    try:
        json.loads(word)
    except ValueError:
        return False
    return True
