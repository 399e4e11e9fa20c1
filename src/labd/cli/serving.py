"""Run a daemon behind an HTTP server in this process until Ctrl-C (``serve`` and ``demo``).

Start: check the port, build the server, start it on its own thread. Wait: the main thread
sleeps until SIGINT (Ctrl-C) or SIGTERM. Stop: server first (no new requests), then the
daemon (tasks, streams, devices), then say whether everything stopped.

A server started by ``labd lab up`` finds its launcher's facts (pid, servers file, restarts,
log file) in the environment, read once here; its dashboard server page shows them and the
end of the node's log file (see :mod:`labd.lab.launcher_log`).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from labd.cli.errors import CliError

if TYPE_CHECKING:
    from labd.daemon import LabDaemon
    from labd.server import LabDaemonServer
    from labd.server.auth import TokenTable

__all__ = [
    "busy_port_error",
    "port_is_free",
    "serve_in_background",
    "stop_all",
    "wait_for_interrupt",
]

# How long the server gets to stop, and the daemon to shut down, each.
STOP_TIMEOUT_S = 5.0
SHUTDOWN_TIMEOUT_S = 2.0


def port_is_free(host: str, port: int) -> bool:
    """True if a server could listen on ``host:port`` now (port 0 is always free).

    Uses SO_REUSEADDR as uvicorn does, so a port in TIME_WAIT counts as free.
    """
    if port == 0:
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def busy_port_error(host: str, port: int) -> CliError:
    """The one-line error for a port another program listens on."""
    return CliError(
        f"cannot listen on {host}:{port}: the port is already in use (another `labd serve`?); "
        "stop that program or pass --port with another number (--port 0 picks a free one)"
    )


def _is_bind_error(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) says the address is taken."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno in (errno.EADDRINUSE, errno.EACCES):
            return True
        if "address already in use" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def serve_in_background(
    daemon: LabDaemon, host: str, port: int, *, tokens: TokenTable | None = None,
    options: Mapping[str, Any] | None = None,
) -> LabDaemonServer:
    """Start an HTTP server for ``daemon`` on its own thread and return it (already listening).

    ``tokens`` (from :func:`labd.server.auth.load_tokens`) turns on bearer-token auth;
    ``options`` are more :class:`labd.server.LabDaemonServer` keyword arguments (limits and
    ``allowed_hosts``, checked beforehand with :func:`labd.server.lifecycle.server_settings`).
    The facts of a launcher (``labd lab up``) in the environment go to the app's state for
    the dashboard.

    Raises :class:`CliError` if the port is taken or the server extra is not installed.
    """
    if not port_is_free(host, port):
        raise busy_port_error(host, port)
    try:
        from labd.server import LabDaemonServer
    except ImportError as exc:
        raise CliError(
            f"serving needs labd's `server` extra ({exc}); install it with pip install 'labd[server]'"
        ) from None
    from labd.lab.launcher_log import LaunchInfo

    server = LabDaemonServer(daemon, host=host, port=port, tokens=tokens, **dict(options or {}))
    server.app.state.labd_launcher = LaunchInfo.from_environ(os.environ)
    try:
        server.start(blocking=False)
    except Exception as exc:
        # Another program can take the port between the check and the bind.
        if _is_bind_error(exc):
            raise busy_port_error(host, port) from None
        raise
    return server


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (systemd, docker stop) stops the server like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_interrupt(stop: threading.Event | None = None) -> None:
    """Block the main thread until Ctrl-C, SIGTERM or ``stop`` is set."""
    stop = stop or threading.Event()
    with _sigterm_as_interrupt():
        try:
            # A timed wait keeps the main thread responsive to signals on every platform.
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            return


def stop_all(server: Any, daemon: LabDaemon, console: Console) -> bool:
    """Stop ``server`` (if any) and shut ``daemon`` down; print the report unless clean.

    Returns True when everything stopped cleanly. Safe to call with ``server=None``.
    """
    clean = True
    if server is not None:
        try:
            server.stop(timeout=STOP_TIMEOUT_S)
        except Exception as exc:  # the daemon must still shut down
            clean = False
            console.print(
                Text(f"labd: the HTTP server did not stop cleanly: {exc}", style="yellow"),
                soft_wrap=True,
            )
    report = daemon.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
    if not report.clean:
        console.print(Text(str(report), style="yellow"), soft_wrap=True)
        return False
    return clean
