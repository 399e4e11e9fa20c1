"""Which parameters are secrets, and how they are shown: ``"***"``, never their value.

Device and task parameters often carry an instrument's password or a cloud API key. labd
passes them to the constructor unchanged, but everything it shows or keeps about them
(``device_info()["params"]``, ``TaskRun.info()``, the run store, hence ``GET /devices/{id}``,
``GET /tasks/{id}``, ``GET /runs/{id}``) goes through :func:`redact` first.

The rule (:func:`is_secret_name`), on the parameter's *name* only, case-insensitively:

- the name, with everything but letters and digits removed, contains one of
  ``password``, ``passwd``, ``passphrase``, ``secret``, ``token``, ``apikey``,
  ``accesskey``, ``privatekey``, ``credential`` (so ``db_password``, ``clientSecret``,
  ``API-Key``, ``aws_access_key_id``, ``credentials``, ``refresh_token`` are secrets);
- or one of its words (split at non-alphanumerics and camelCase humps) is ``auth``,
  ``oauth`` or ``authorization`` (``auth``, ``http_auth``, ``authHeader``). ``auth`` is
  matched as a word, not a substring, so ``author`` and ``authority`` stay visible.

A false positive costs a hidden value on a screen; a false negative leaks a secret, so the
rule leans to hiding. Names that are not strings are never secret.

Example::

    >>> redact({"address": "GPIB0::5", "password": "hunter2", "cloud": {"api_key": "k"}})
    {'address': 'GPIB0::5', 'password': '***', 'cloud': {'api_key': '***'}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_name", "redact"]

#: What a secret value is shown as.
REDACTED = "***"

_SECRET_SUBSTRINGS = (
    "password", "passwd", "passphrase", "secret", "token",
    "apikey", "accesskey", "privatekey", "credential",
)
_SECRET_WORDS = frozenset({"auth", "oauth", "authorization"})
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def is_secret_name(name: object) -> bool:
    """True if a parameter called ``name`` holds a secret (see the module docstring).

    Example: ``is_secret_name("API_Key")`` is True, ``is_secret_name("author")`` is False.
    """
    if not isinstance(name, str):
        return False
    squashed = _NOT_ALNUM.sub("", name.lower())
    if any(part in squashed for part in _SECRET_SUBSTRINGS):
        return True
    return any(word.lower() in _SECRET_WORDS for word in _WORDS.findall(name))


def redact(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of ``mapping`` with the value of every secret-named key replaced by ``"***"``.

    Nested mappings (also inside lists and tuples) are redacted the same way; the original
    is never changed, so the real values still reach the constructor that needs them.
    """
    return {key: REDACTED if is_secret_name(key) else _redact_value(value)
            for key, value in mapping.items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, list | tuple):
        items = [_redact_value(item) for item in value]
        # Unchanged sequences are returned as they were (a tuple stays a tuple).
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value
