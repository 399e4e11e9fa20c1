"""``/``, ``/health`` and ``/metrics``: what this server is, whether it is alive, its numbers."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

import labd
from labd.devices import DeviceState
from labd.errors import UnknownNameError, utc_now_iso
from labd.server.context import ServerContext
from labd.server.models import Ctx
from labd.server.routing import RouteSpec, json_response

__all__ = ["ROUTES"]

# /health must answer at once; reading the store's row count waits at most this long (a
# prune or VACUUM holds the store's read connection).
_STORE_STATS_TIMEOUT_S = 2.0
_STORE_KEYS = ("path", "size_bytes", "runs", "degraded", "degraded_reason", "dropped_records")


async def root(ctx: Ctx) -> Response:
    """Server name, version and the endpoints it offers."""
    return json_response({"name": "labd", "version": labd.__version__,
                          "endpoints": dict(ctx.endpoints)})


async def _store_health(ctx: ServerContext) -> dict[str, Any] | None:
    """The ``store`` part of ``/health``: None without a run store; never raises."""
    store = ctx.daemon.store
    if store is None:
        return None
    try:
        stats = await ctx.run(store.stats, what="reading the run store's statistics",
                              timeout=_STORE_STATS_TIMEOUT_S)
    except Exception as exc:  # busy (pruning), closed with the daemon, or the server stopping
        return {"path": str(store.path), "size_bytes": None, "runs": None,
                "degraded": store.degraded_reason is not None,
                "degraded_reason": store.degraded_reason, "dropped_records": store.dropped_records,
                "unavailable": f"{type(exc).__name__}: {exc}"}
    return {key: stats[key] for key in _STORE_KEYS}


def _device_problems(ctx: ServerContext) -> dict[str, str]:
    """``{device_id: why}`` for each device that is unresponsive, faulted or connecting.

    Reads the devices' slots only (no device code, no device lock), so ``/health`` answers at
    once even while the device hangs. ``unresponsive`` is the server's flag for a device with
    a call past its request timeout (see ``ServerContext.run_for_device``).
    """
    problems: dict[str, str] = {}
    for device_id in ctx.daemon.device_ids():
        try:
            slot = ctx.daemon.device_slot(device_id)
        except UnknownNameError:  # removed while we looked
            continue
        reasons = []
        if slot.unresponsive:
            reasons.append("unresponsive: a call is still running past its request timeout")
        if slot.state is DeviceState.FAULTED:
            error = slot.last_error
            reasons.append(f"faulted: {error.message}" if error is not None else "faulted")
        elif slot.state is DeviceState.CONNECTING:
            reasons.append("connecting: its connect() has not returned yet")
        if reasons:
            problems[device_id] = "; ".join(reasons)
    return problems


async def health(ctx: Ctx) -> Response:
    """Liveness: answers at once even while instruments hang (503 once the daemon shut down).

    ``status`` is ``degraded`` (still 200) while the run store cannot write its history, or
    while a device is unresponsive, faulted or still connecting; ``device_problems`` then
    names each such device and why (``{}`` when all is well).
    """
    daemon = ctx.daemon
    running = sum(1 for handle in daemon.task_handles() if handle.status in ("running", "paused"))
    store = await _store_health(ctx)
    device_problems = _device_problems(ctx)
    status = "healthy"
    if daemon.closed:
        status = "daemon_closed"
    elif (store is not None and store["degraded"]) or device_problems:
        status = "degraded"
    body = {
        "status": status,
        "timestamp": utc_now_iso(),
        "uptime_s": round(time.monotonic() - ctx.started_at, 3),
        "devices": len(daemon.device_ids()),
        "device_problems": device_problems,
        "tasks_running": running,
        "store": store,
    }
    return json_response(body, status_code=200 if not daemon.closed else 503)


async def metrics(ctx: Ctx) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    RouteSpec("GET", "/", root),
    RouteSpec("GET", "/health", health),
    RouteSpec("GET", "/metrics", metrics),
]
