"""The server's JSON: :mod:`labd.wire`, the one encoder of every labd answer (see there)."""

from __future__ import annotations

from labd.wire import LARGE_PAYLOAD_BYTES, UnserializableResult, dumps, dumps_lenient, looks_large

__all__ = ["LARGE_PAYLOAD_BYTES", "UnserializableResult", "dumps", "dumps_lenient", "looks_large"]
