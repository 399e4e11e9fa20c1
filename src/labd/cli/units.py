"""Durations, sizes and times as people type and read them: ``90d``, ``500MB``, ``2024-05-01``.

Parsing raises :class:`~labd.cli.errors.CliError` (exit 2) naming the option, the value and
what is valid, so ``--older-than 90x`` prints one line instead of a traceback.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime

from labd.cli.errors import EXIT_USAGE, CliError

__all__ = [
    "DURATION_UNITS",
    "SIZE_UNITS",
    "format_bytes",
    "format_seconds",
    "parse_duration",
    "parse_since",
    "parse_size",
]

#: Seconds per duration unit.
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
#: Bytes per size unit (decimal, as disks are sold; KiB/MiB/GiB for powers of two).
SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_duration(text: str, option: str = "--older-than") -> float:
    """Seconds in ``"90d"``, ``"12h"``, ``"1.5w"``; units s, m, h, d, w.

    >>> parse_duration("2h")
    7200.0
    """
    match = _AMOUNT.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in DURATION_UNITS:
        raise CliError(
            f"{option}: {text!r} is not a duration; give a number and a unit, e.g. 90d or 12h "
            f"(valid units: {', '.join(DURATION_UNITS)})",
            EXIT_USAGE,
        )
    return float(match.group(1)) * DURATION_UNITS[unit]


def parse_size(text: str, option: str = "--max-size") -> int:
    """Bytes in ``"500MB"``, ``"1GB"``, ``"64KiB"`` (a bare number is bytes).

    >>> parse_size("1.5GB")
    1500000000
    """
    match = _AMOUNT.match(text)
    unit = (match.group(2).lower() or "b") if match else ""
    if match is None or unit not in SIZE_UNITS:
        raise CliError(
            f"{option}: {text!r} is not a size; give a number and a unit, e.g. 500MB or 1GB "
            "(valid units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
            EXIT_USAGE,
        )
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def parse_since(text: str, now: float | None = None) -> float:
    """POSIX seconds for ``--since``: a duration back from now (``7d``) or a local ISO time.

    ``2024-05-01`` and ``2024-05-01T14:00`` are local time; add ``Z`` or ``+02:00`` for a
    zone. Raises :class:`CliError` (exit 2) if it is neither.
    """
    match = _AMOUNT.match(text)
    if match is not None and match.group(2).lower() in DURATION_UNITS:
        return (time.time() if now is None else now) - parse_duration(text, "--since")
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"--since: {text!r} is neither a duration back from now (e.g. 7d, 12h; units "
            f"{', '.join(DURATION_UNITS)}) nor an ISO 8601 time (e.g. 2024-05-01 or "
            "2024-05-01T14:00)",
            EXIT_USAGE,
        ) from None
    return moment.timestamp()  # a naive time is local time, as a person at a terminal means


def format_bytes(size: float | None) -> str:
    """``"12.3 MB"`` (decimal units, as :func:`parse_size` reads them); ``"?"`` if unknown."""
    if size is None or not math.isfinite(size):
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def format_seconds(seconds: float | None) -> str:
    """``"0.25 s"``, ``"3 m 12 s"``, ``"2 h 05 m"``, ``"3 d 04 h"``; ``"-"`` if unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} m"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"
