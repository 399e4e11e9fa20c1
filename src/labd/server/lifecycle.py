"""Run the app with uvicorn on a background thread (or the main one) and stop it in bounded time.

``start()`` binds the listening socket itself (so ``port=0`` gives a free port that is known
before the first request) and hands it to ``uvicorn.Server.run`` on a thread named
``labd-server-<port>``. uvicorn only installs signal handlers on the main thread, so a
background server leaves the host program's Ctrl+C alone. ``stop()`` first sets the app's
shutdown signal (every SSE stream ends, every request still waiting for a worker answers 503),
then asks uvicorn to exit and joins the thread, forcing the exit if the deadline nears.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from labd.errors import InvalidArgumentError
from labd.server.app import create_app
from labd.server.auth import Token, TokenTable
from labd.server.context import ServerContext, ServerSettings
from labd.server.guards import is_wildcard_address, normalize_allowed_hosts

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["DEFAULT_LEASE_TTL_S", "LabDaemonServer", "server_settings"]

log = logging.getLogger("labd.server")

#: Seconds uvicorn waits for open requests after stop() before cancelling them.
GRACEFUL_SHUTDOWN_S = 1
#: Seconds an HTTP lease lasts when it asks for no ttl (unless lease_max_ttl is shorter).
DEFAULT_LEASE_TTL_S = 30.0
#: Seconds start() waits for uvicorn to come up.
STARTUP_TIMEOUT_S = 15.0


class ServerState(enum.Enum):
    """Lifecycle of a :class:`LabDaemonServer`."""

    NEW = "new"  # constructed; start() not called yet
    RUNNING = "running"  # uvicorn serves requests on self.port
    STOPPED = "stopped"  # stop() ran (or start failed); make a new server to serve again


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server that reports when startup ended and chains signal exits to ``on_exit``."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        # uvicorn's own loop polls should_exit every 0.1 s; this one also wakes at once when
        # stop() asks (see exit_soon), so stopping a server costs milliseconds, not a tick.
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    def exit_soon(self) -> None:
        """From any thread: stop serving now (graceful shutdown follows as usual)."""
        self.should_exit = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(wake.set)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.server_state.connections and not self.server_state.tasks:
            # Nothing to drain: uvicorn's shutdown would still sleep 0.1 s for connections to
            # react to their shutdown request. Same steps otherwise: stop listening, wait for
            # the listeners to close, then the app's lifespan shutdown.
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
            for server in self.servers:
                await server.wait_closed()
            if not self.force_exit:
                await self.lifespan.shutdown()
            return
        await super().shutdown(sockets=sockets)
        # Connections still open after the graceful period (a client that stopped reading)
        # are closed here, while the loop still runs, instead of leaking with it.
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl+C on a blocking server: end the streams first, or uvicorn waits for them.
        self._on_exit()
        super().handle_exit(sig, frame)


def _check_address(host: object, port: object) -> None:
    if not isinstance(host, str) or not host:
        raise InvalidArgumentError(f"host must be an address such as '127.0.0.1', got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be an integer 0..65535 (0 picks a free one), got {port!r}")


def _check_body_and_timeout(request_timeout: object, max_body_bytes: object) -> None:
    if not isinstance(request_timeout, int | float) or isinstance(request_timeout, bool) or request_timeout <= 0:
        raise InvalidArgumentError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
    if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 0:
        raise InvalidArgumentError(f"max_body_bytes must be an integer >= 0, got {max_body_bytes!r}")


def _check_counts(**counts: object) -> None:
    """Each keyword is a limit that must be a positive integer (``stream_max_clients=100``)."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


def _check_seconds(**seconds: object) -> None:
    """Each keyword is a duration that must be a positive, finite number of seconds."""
    for name, value in seconds.items():
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not 0 < value < float("inf")):
            raise InvalidArgumentError(
                f"{name} must be a positive, finite number of seconds, got {value!r}")


def _check_limits(
    request_timeout: float, max_request_timeout: float, lease_default_ttl: float,
    lease_max_ttl: float,
) -> None:
    if max_request_timeout < 0.001 or request_timeout > max_request_timeout:
        raise InvalidArgumentError(
            f"max_request_timeout ({max_request_timeout!r} s) must be at least 0.001 s and at "
            f"least request_timeout ({request_timeout!r} s)")
    if lease_default_ttl > lease_max_ttl:  # only when both were given
        raise InvalidArgumentError(
            f"lease_default_ttl ({lease_default_ttl!r} s) must not exceed lease_max_ttl "
            f"({lease_max_ttl!r} s)")


def server_settings(
    host: str = "127.0.0.1",
    *,
    request_timeout: float = 30.0,
    max_body_bytes: int = 16 * 2**20,
    cors_origins: Iterable[str] | None = None,
    stream_ping: float = 15.0,
    stream_max_clients: int = 100,
    stream_max_bytes: int = 32 * 2**20,
    stream_max_clients_total: int = 1000,
    stream_max_maxsize: int = 100_000,
    tokens: TokenTable | Mapping[str, Token | tuple[str, str]] | None = None,
    allowed_hosts: Iterable[str] = (),
    max_request_timeout: float = 3600.0,
    lease_default_ttl: float | None = None,
    lease_max_ttl: float = 3600.0,
    device_max_in_flight: int = 4,
    device_workers: int = 32,
    server_workers: int = 8,
) -> ServerSettings:
    """The checked :class:`ServerSettings` of a server listening on ``host``.

    Takes :class:`LabDaemonServer`'s keyword arguments (see there) and raises
    :class:`InvalidArgumentError` naming the first bad one and what is valid. ``labd serve``
    calls it to check its options before it builds the lab. ``lease_default_ttl`` defaults to
    30 s, or ``lease_max_ttl`` if that is shorter.

    Example: ``server_settings("0.0.0.0", allowed_hosts=["labpc.example.org"])``.
    """
    _check_address(host, 0)
    _check_body_and_timeout(request_timeout, max_body_bytes)
    _check_counts(stream_max_clients=stream_max_clients, stream_max_bytes=stream_max_bytes,
                  stream_max_clients_total=stream_max_clients_total,
                  stream_max_maxsize=stream_max_maxsize,
                  device_max_in_flight=device_max_in_flight, device_workers=device_workers,
                  server_workers=server_workers)
    _check_seconds(max_request_timeout=max_request_timeout, lease_max_ttl=lease_max_ttl)
    if lease_default_ttl is None:
        lease_default_ttl = min(DEFAULT_LEASE_TTL_S, lease_max_ttl)
    _check_seconds(lease_default_ttl=lease_default_ttl)
    _check_limits(request_timeout, max_request_timeout, lease_default_ttl, lease_max_ttl)
    origins = None if cors_origins is None else tuple(cors_origins)
    if origins is not None and not all(isinstance(o, str) for o in origins):
        raise InvalidArgumentError(f"cors_origins must be strings such as 'http://localhost:3000', got {origins!r}")
    return ServerSettings(
        request_timeout=float(request_timeout), max_body_bytes=max_body_bytes,
        cors_origins=origins, stream_ping=stream_ping,
        tokens=None if tokens is None else TokenTable.coerce(tokens),
        stream_max_clients=stream_max_clients, stream_max_bytes=stream_max_bytes,
        stream_max_clients_total=stream_max_clients_total,
        stream_max_maxsize=stream_max_maxsize,
        allowed_hosts=normalize_allowed_hosts(allowed_hosts), bind_host=host,
        max_request_timeout=float(max_request_timeout),
        lease_default_ttl=float(lease_default_ttl), lease_max_ttl=float(lease_max_ttl),
        device_max_in_flight=device_max_in_flight, device_workers=device_workers,
        server_workers=server_workers)


class LabDaemonServer:
    """Serve a :class:`labd.LabDaemon` over HTTP and Server-Sent Events (docs/http-api.md).

    Binds to 127.0.0.1 by default. Without ``tokens`` there is no authentication: anyone who
    reaches the port has full control. ``tokens`` maps bearer token strings to
    ``Token(user, role)`` (or ``(user, role)``, or a :class:`labd.server.auth.TokenTable`);
    then every request but ``GET /health`` needs a token, and its user is the caller's
    principal (see docs/http-api.md, "Authentication"). Tokens travel in clear text over plain
    HTTP: beyond a trusted network, put a TLS proxy in front. ``port=0`` picks a free port;
    read it back from :attr:`port`.

    Only requests whose ``Host`` is localhost, 127.0.0.1, [::1], ``host`` or the address they
    arrived at are answered (421 otherwise, against DNS rebinding); list the other names
    clients use in ``allowed_hosts`` (see :mod:`labd.server.guards`). Limits, each with a
    clear 4xx/503 beyond it (docs/http-api.md): ``stream_max_clients`` SSE clients per stream
    and ``stream_max_clients_total`` over all, each with a buffer of at most
    ``stream_max_bytes`` and ``?maxsize=`` up to ``stream_max_maxsize`` items;
    ``?timeout=`` up to ``max_request_timeout`` s; HTTP leases last ``lease_default_ttl`` s
    (default 30 s, at most ``lease_max_ttl``) unless they ask for up to ``lease_max_ttl``; ``device_max_in_flight`` calls running or
    waiting per device, on ``device_workers`` threads in all; other blocking work (task info,
    run history) on ``server_workers`` threads.

    Example::

        server = LabDaemonServer(daemon, port=0, tokens={"s3cret-token": Token("alice", "operator")})
        server.start()
        print(server.url)          # http://127.0.0.1:54321
        ...
        server.stop()
    """

    def __init__(
        self,
        daemon: LabDaemon,
        host: str = "127.0.0.1",
        port: int = 5000,
        *,
        request_timeout: float = 30.0,
        max_body_bytes: int = 16 * 2**20,
        cors_origins: Iterable[str] | None = None,
        stream_ping: float = 15.0,
        stream_max_clients: int = 100,
        stream_max_bytes: int = 32 * 2**20,
        stream_max_clients_total: int = 1000,
        stream_max_maxsize: int = 100_000,
        log_level: str = "warning",
        tokens: TokenTable | Mapping[str, Token | tuple[str, str]] | None = None,
        allowed_hosts: Iterable[str] = (),
        max_request_timeout: float = 3600.0,
        lease_default_ttl: float | None = None,
        lease_max_ttl: float = 3600.0,
        device_max_in_flight: int = 4,
        device_workers: int = 32,
        server_workers: int = 8,
    ) -> None:
        _check_address(host, port)
        settings = server_settings(
            host, request_timeout=request_timeout, max_body_bytes=max_body_bytes,
            cors_origins=cors_origins, stream_ping=stream_ping,
            stream_max_clients=stream_max_clients, stream_max_bytes=stream_max_bytes,
            stream_max_clients_total=stream_max_clients_total,
            stream_max_maxsize=stream_max_maxsize, tokens=tokens, allowed_hosts=allowed_hosts,
            max_request_timeout=max_request_timeout, lease_default_ttl=lease_default_ttl,
            lease_max_ttl=lease_max_ttl, device_max_in_flight=device_max_in_flight,
            device_workers=device_workers, server_workers=server_workers)
        self.daemon = daemon
        self.host = host
        self.port = port
        self.log_level = log_level
        self.app = create_app(daemon, settings)
        self._context: ServerContext = self.app.state.labd
        self._state = ServerState.NEW
        self._lock = threading.Lock()
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5000`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> ServerState:
        """Where the server is in its lifecycle."""
        return self._state

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._state is ServerState.RUNNING

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"labd server cannot listen on {self.host}:{self.port}: {exc.strerror}. "
                "Stop what uses that port, or pick another one (port=0 picks a free one)."
            ) from exc
        self.port = int(sock.getsockname()[1])
        return sock

    def start(self, blocking: bool = False) -> None:
        """Start serving. ``blocking=True`` serves on this thread until Ctrl+C or :meth:`stop`.

        Raises ``OSError`` if the address is taken, ``RuntimeError`` if uvicorn fails to start.
        """
        with self._lock:
            if self._state is not ServerState.NEW:
                raise RuntimeError(f"This server is {self._state.value}; a server starts once. "
                                   "Create a new LabDaemonServer to serve again.")
            sock = self._bind()
            config = uvicorn.Config(
                self.app, host=self.host, port=self.port, log_level=self.log_level,
                log_config=None, access_log=False, lifespan="on", ws="none",
                # No reverse proxy by default: skip uvicorn's X-Forwarded-* middleware layer.
                proxy_headers=False, server_header=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
            server = self._server = _Uvicorn(config, self._context.shutdown.set)
            self._state = ServerState.RUNNING
        self._log_host_rule()
        if blocking:
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                # uvicorn re-raises the Ctrl+C it handled gracefully; the server has stopped,
                # so return normally and let the caller shut its daemon down.
                if not server.should_exit:
                    raise
            finally:
                sock.close()
                self._finish(time.monotonic() + 1.0)
            return
        self._thread = threading.Thread(
            target=self._serve, args=(server, sock), name=f"labd-server-{self.port}", daemon=True)
        self._thread.start()
        if not server.ready.wait(STARTUP_TIMEOUT_S) or not server.started:
            self.stop(timeout=2.0)
            raise RuntimeError(f"The labd server on {self.url} did not start; see the log above.")
        log.info("labd server listening on %s", self.url)

    def _log_host_rule(self) -> None:
        """On every interface, say which Host names get answers (the others get 421)."""
        if not is_wildcard_address(self.host):
            return
        names = self._context.settings.allowed_hosts
        log.info(
            "labd server listening on all interfaces (%s): clients may use localhost or this "
            "machine's IP addresses; host names they use must be allowed (%s), or they get "
            "421 Misdirected Request. Allowed names: %s", self.host,
            "labd serve --allow-host NAME, or allowed_hosts in the config",
            ", ".join(names) if names else "none")

    @staticmethod
    def _serve(server: _Uvicorn, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException:  # SystemExit from a failed startup must not vanish silently
            log.exception("labd server thread ended with an error")
        finally:
            server.ready.set()
            sock.close()

    def stop(self, timeout: float = 5.0) -> None:
        """End every stream, stop uvicorn and join its thread within ``timeout``. Idempotent."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._state is ServerState.STOPPED:
                return
            self._state = ServerState.STOPPED
        self._context.shutdown.set()
        server, thread = self._server, self._thread
        if server is not None:
            server.exit_soon()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(deadline - time.monotonic() - 0.5, 0.0))
            if thread.is_alive():
                server.force_exit = True  # type: ignore[union-attr]
                thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                log.warning("labd server thread %s did not stop within %g s", thread.name, timeout)
        self._finish(deadline)

    def _finish(self, deadline: float) -> None:
        self._state = ServerState.STOPPED
        self._context.shutdown.set()
        self._context.metrics.detach(timeout=max(min(deadline - time.monotonic(), 0.5), 0.0))
        busy = self._context.offloader.close(timeout=max(min(deadline - time.monotonic(), 0.2), 0.0))
        if busy:
            log.warning("labd server: worker(s) still running device code after stop: %s", busy)

    def __enter__(self) -> LabDaemonServer:
        if self._state is ServerState.NEW:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LabDaemonServer {self.url} {self._state.value}>"
