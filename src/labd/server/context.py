"""What every route handler needs: the daemon, settings, the offloader, metrics, shutdown.

One :class:`ServerContext` per app lives on ``app.state.labd``; handlers get it through the
``Ctx`` dependency (see :mod:`labd.server.models`). It also keeps two per-device counts:
calls in flight (running, or waiting for a worker or the device), capped at
``device_max_in_flight`` so that a hung instrument holds a bounded number of threads (the
next call gets 503 :class:`~labd.server.errors.DeviceOverloaded` with ``Retry-After``), and
calls that outlived their request timeout, which drive ``DeviceInfo.unresponsive``. A call
answered 504 still counts as in flight until its thread returns.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from labd.errors import LabDaemonException, UnknownNameError
from labd.server.errors import DeviceOverloaded, device_fault
from labd.server.metrics import ServerMetrics
from labd.server.offload import Offloader
from labd.server.shutdown import ShutdownSignal

if TYPE_CHECKING:
    from labd.daemon import LabDaemon
    from labd.server.auth import TokenTable

__all__ = ["ServerContext", "ServerSettings", "get_context", "guard_device_code"]

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """Tunables of one server app."""

    request_timeout: float = 30.0  # seconds a request may wait for a worker before a 504
    max_body_bytes: int = 16 * 2**20  # larger request bodies get 413
    cors_origins: tuple[str, ...] | None = None  # None: no CORS headers at all
    stream_ping: float = 15.0  # seconds between keep-alive comments on SSE streams
    stream_send_timeout: float = 30.0  # a client that accepts no bytes this long is dropped
    stream_maxsize: int = 1000  # default per-client stream buffer (items)
    stream_max_bytes: int = 32 * 2**20  # per-client stream buffer cap (estimated bytes)
    stream_max_clients: int = 100  # SSE clients per stream; the next one gets 503
    stream_max_clients_total: int = 1000  # SSE clients over all streams; the next one gets 503
    stream_max_maxsize: int = 100_000  # largest ?maxsize= a client may ask for; above: 422
    tokens: TokenTable | None = None  # None: no authentication (see labd.server.auth)
    # Hosts (the Host header, without port) the server answers; others get 421 (DNS
    # rebinding). Always allowed besides these: localhost, 127.0.0.1, [::1], the bind address.
    allowed_hosts: tuple[str, ...] = ()
    bind_host: str = "127.0.0.1"  # the address the server listens on (allowed as a Host)
    max_request_timeout: float = 3600.0  # ?timeout= outside [0.001, this] is a 400
    lease_default_ttl: float = 30.0  # an HTTP lease without ttl gets this
    lease_max_ttl: float = 3600.0  # an HTTP lease (or renewal) may not ask for more
    device_max_in_flight: int = 4  # calls running or waiting per device; beyond: 503
    device_workers: int = 32  # threads running device code, over all devices
    server_workers: int = 8  # threads running other blocking work (task info, run history)


class ServerContext:
    """Shared state of one server app; see the module docstring."""

    def __init__(self, daemon: LabDaemon, settings: ServerSettings) -> None:
        self.daemon = daemon
        self.settings = settings
        self.shutdown = ShutdownSignal()
        self.offloader = Offloader(self.shutdown, device_workers=settings.device_workers,
                                   server_workers=settings.server_workers)
        self.metrics = ServerMetrics(daemon)
        self.started_at = time.monotonic()
        self.endpoints: dict[str, str] = {}  # name -> "METHOD /path", for GET /
        self._late: dict[str, int] = {}
        self._late_lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()

    def timeout(self, override: float | None) -> float:
        """The request timeout: the ``?timeout=`` override or the server default."""
        return self.settings.request_timeout if override is None else override

    async def run(self, fn: Callable[[], T], *, what: str, timeout: float | None = None) -> T:
        """Run ``fn`` on a worker thread within the request timeout (no device flagging)."""
        return await self.offloader.run(fn, timeout=self.timeout(timeout), what=what)

    async def run_for_device(
        self, device_id: str, fn: Callable[[], T], *, what: str, timeout: float | None = None,
    ) -> T:
        """Run device code on a device worker; past the timeout answer 504 and flag the device.

        Beyond ``device_max_in_flight`` calls on this device (running or waiting) raise
        :class:`DeviceOverloaded` (503) at once, before anything runs. The flag
        (``DeviceInfo.unresponsive``) clears when the last late call on it ends.
        """
        self._enter(device_id)
        return await self.offloader.run(
            fn, timeout=self.timeout(timeout), what=what, device=True,
            on_timeout=lambda: self._count_late(device_id, +1),
            on_late=lambda: self._count_late(device_id, -1),
            on_exit=lambda: self._leave(device_id),  # exactly once, even if never started
        )

    def in_flight(self, device_id: str) -> int:
        """Calls on ``device_id`` running or waiting right now (including abandoned ones)."""
        with self._in_flight_lock:
            return self._in_flight.get(device_id, 0)

    def _enter(self, device_id: str) -> None:
        cap = self.settings.device_max_in_flight
        with self._in_flight_lock:
            count = self._in_flight.get(device_id, 0)
            if count >= cap:
                raise DeviceOverloaded(device_id, cap)
            self._in_flight[device_id] = count + 1

    def _leave(self, device_id: str) -> None:
        with self._in_flight_lock:
            count = self._in_flight.get(device_id, 0) - 1
            if count > 0:
                self._in_flight[device_id] = count
            else:
                self._in_flight.pop(device_id, None)

    def _count_late(self, device_id: str, delta: int) -> None:
        with self._late_lock:
            count = max(self._late.get(device_id, 0) + delta, 0)
            if count:
                self._late[device_id] = count
            else:
                self._late.pop(device_id, None)
            with contextlib.suppress(UnknownNameError):
                self.daemon.device_slot(device_id).unresponsive = count > 0



# async: FastAPI runs plain-def dependencies in a thread pool (two thread hops per request)
async def get_context(request: Request) -> ServerContext:
    """The :class:`ServerContext` of the app serving ``request``."""
    context: ServerContext = request.app.state.labd
    return context


def guard_device_code(fn: Callable[[], T], device_id: str, action: str) -> T:
    """Call ``fn``; a non-labd exception from device code becomes ``DeviceOperationError`` (502)."""
    try:
        return fn()
    except LabDaemonException:
        raise
    except Exception as exc:
        raise device_fault(exc, device_id, action) from exc
