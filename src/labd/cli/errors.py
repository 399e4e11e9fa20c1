"""How the ``labd`` command turns exceptions into one red line and an exit code.

User mistakes (a typo in a device id, a busy device, a server that is not running, a bad
config) never show a traceback: :func:`reports_errors` catches them at the command boundary
and prints ``labd: error: ...``. Anything else is a bug in labd and keeps its traceback.

Exit codes: 1 for errors reported by the server or the daemon, 2 for usage and config
errors (as click does for usage), 130 after Ctrl-C.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from labd.cli.output import print_error
from labd.config import ConfigError
from labd.errors import LabDaemonException

__all__ = [
    "DEFAULT_URL",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "CliError",
    "describe_error",
    "reports_errors",
]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_URL = "http://127.0.0.1:5000"

P = ParamSpec("P")
R = TypeVar("R")


class CliError(Exception):
    """A problem the user can fix, with the exit code to leave with.

    Raise it anywhere below a command; :func:`reports_errors` prints it as one line.
    """

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _is_connection_error(exc: BaseException) -> bool:
    # labd.client needs the optional `server` extra; only look if it is already loaded
    # (it is, whenever a client raised this exception).
    module = sys.modules.get("labd.client.errors")
    cls = getattr(module, "ServerConnectionError", None)
    return isinstance(cls, type) and isinstance(exc, cls)


def _is_timeout(exc: BaseException) -> bool:
    module = sys.modules.get("labd.client.errors")
    cls = getattr(module, "ServerTimeoutError", None)
    return isinstance(cls, type) and isinstance(exc, cls)


def describe_error(exc: BaseException, url: str | None = None) -> tuple[str, int] | None:
    """The one-line message and exit code for a user-facing error, or None for a bug.

    Example: an unreachable server gives
    ``("cannot reach labd at http://127.0.0.1:5000: is `labd serve` running? (...)", 1)``.
    """
    if isinstance(exc, CliError):
        return str(exc), exc.exit_code
    if isinstance(exc, ConfigError):
        return str(exc), EXIT_USAGE
    if _is_timeout(exc):
        return f"labd at {url or 'the server'} did not answer in time: {exc}", EXIT_ERROR
    if _is_connection_error(exc):
        # The transport's own words (Connection refused, Name or service not known) say why.
        cause = exc.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else f" ({exc})"
        return (
            f"cannot reach labd at {url or 'the server'}: is `labd serve` running?{detail}",
            EXIT_ERROR,
        )
    if isinstance(exc, LabDaemonException):
        # A remote error carries the server's own message; the suffix naming the HTTP
        # request is for logs, not for a person at a terminal.
        record = getattr(exc, "error", None)
        message = record.get("message") if isinstance(record, dict) else None
        return (
            message if isinstance(message, str) and message else str(exc) or type(exc).__name__,
            EXIT_ERROR,
        )
    return None


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a command so user-facing errors print one red line and exit non-zero.

    Put it under ``@app.command()``. A keyword argument ``url`` (the ``--url`` option) names
    the server in connection errors.
    """

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            url = kwargs.get("url")
            described = describe_error(exc, url if isinstance(url, str) else None)
            if described is None:
                raise
            message, code = described
            print_error(message)
            raise typer.Exit(code) from None

    return wrapper
