"""JSON for the wire: orjson with NumPy support, non-finite floats as ``null``, no leaks.

One encoder for every answer labd sends: the server's responses and streams
(:mod:`labd.server.encoding` re-exports it) and a lab node's replies and relayed streams
(:mod:`labd.lab.calls`), so a device's answer is the same JSON from any node of a lab.

Device results and stream payloads are user data, so encoding is strict about what it sends:
JSON-able values, NumPy arrays and scalars, dataclasses (public fields only), sets, enums and
datetimes. Any other object (a driver handle, a plain class instance) is refused with
:class:`UnserializableResult` naming its type, rather than leaking its attributes or repr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from labd.errors import UnserializableResult

__all__ = [
    "LARGE_PAYLOAD_BYTES", "UnserializableResult", "dumps", "dumps_lenient", "looks_large",
    "unserializable",
]

#: Payloads estimated above this size are encoded on a worker thread, not the event loop.
LARGE_PAYLOAD_BYTES = 256 * 1024

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    # orjson calls this for anything it does not encode natively.
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf" and not obj.flags.c_contiguous:
            return np.ascontiguousarray(obj)
        return obj.tolist()  # e.g. float16 or object arrays; complex fails on the next round
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(type(obj).__name__)


def dumps(obj: Any, what: str = "the result") -> bytes:
    """Encode ``obj`` as JSON bytes, or raise :class:`UnserializableResult` naming the bad type.

    ``what`` names the value in the message, e.g. ``"laser1.get_handle() result"``.
    """
    try:
        return orjson.dumps(obj, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise unserializable(what, exc) from None


def unserializable(what: str, exc: BaseException) -> UnserializableResult:
    """The error for ``what`` (``"the result of laser.get_handle()"``) that the encoder
    refused with ``exc``, naming the type it could not encode."""
    text = str(exc)
    marker = "Type is not JSON serializable: "
    name = text.split(marker, 1)[1] if marker in text else (text or type(exc).__name__)
    return UnserializableResult(
        f"Cannot send {what} as JSON: it contains a {name} object. Return numbers, strings, "
        "lists, dicts, NumPy arrays or dataclasses instead.")


def _lenient_default(obj: Any) -> Any:
    try:
        return _default(obj)
    except TypeError:
        return f"<unserializable {type(obj).__name__}>"


def dumps_lenient(obj: Any) -> bytes:
    """Like :func:`dumps`, but a value that cannot be encoded becomes ``"<unserializable T>"``.

    For listings (task results) where one odd value must not hide everything else.
    """
    try:
        return orjson.dumps(obj, default=_lenient_default, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return orjson.dumps(f"<unserializable {type(obj).__name__}>")


def looks_large(obj: Any, limit: int = LARGE_PAYLOAD_BYTES, depth: int = 2) -> bool:
    """A cheap guess whether ``obj`` encodes to more than ``limit`` bytes (arrays, long lists)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) > limit // 2
    if isinstance(obj, list | tuple):
        if len(obj) * 8 > limit:
            return True
        return depth > 0 and any(looks_large(v, limit, depth - 1) for v in obj[:16])
    if isinstance(obj, dict):
        return depth > 0 and any(looks_large(v, limit, depth - 1) for v in obj.values())
    if isinstance(obj, str | bytes):
        return len(obj) > limit
    # A dataclass has an unknown shape: let a worker find out.
    return dataclasses.is_dataclass(obj)
