"""``/``, ``/health`` and ``/metrics``: what this server is, whether it is alive, its numbers.

``/health`` is open to anyone (monitoring). On a server with tokens, a caller without a valid
token gets the status and counts only: no store path, no error texts, no device names.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

import labd
from labd.devices import DeviceState
from labd.errors import UnknownNameError, utc_now_iso
from labd.server.auth import current_token
from labd.server.context import ServerContext
from labd.server.models import Ctx
from labd.server.routes_lab import lab_health
from labd.server.routing import RouteSpec, json_response

__all__ = ["ROUTES"]

# /health must answer at once; reading the store's row count waits at most this long (a
# prune or VACUUM holds the store's read connection).
_STORE_STATS_TIMEOUT_S = 2.0
_STORE_KEYS = ("path", "size_bytes", "runs", "degraded", "degraded_reason", "dropped_records")


async def root(ctx: Ctx, request: Request) -> Response:
    """Server name, version and the endpoints it offers (a browser is sent to the dashboard)."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/ui/", status_code=307)
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


def _status(ctx: ServerContext, store_degraded: bool, device_problems: dict[str, str]) -> str:
    if ctx.daemon.closed:
        return "daemon_closed"
    lab = lab_health(ctx)
    engine_lost = lab is not None and not lab["connected"]  # a lab node without its engine
    return "degraded" if store_degraded or device_problems or engine_lost else "healthy"


async def health(ctx: Ctx, request: Request) -> Response:
    """Liveness: answers at once even while instruments hang (503 once the daemon shut down).

    ``status`` is ``degraded`` (still 200) while the run store cannot write its history, or
    while a device is unresponsive, faulted or still connecting; ``device_problems`` then
    names each such device and why (``{}`` when all is well). With tokens configured, a
    caller without a valid token gets ``status``, ``devices`` and ``tasks_running`` only.
    """
    daemon = ctx.daemon
    running = sum(1 for handle in daemon.task_handles() if handle.status in ("running", "paused"))
    device_problems = _device_problems(ctx)
    http_status = 200 if not daemon.closed else 503
    if ctx.settings.tokens is not None and current_token(request) is None:
        store_degraded = daemon.store is not None and daemon.store.degraded_reason is not None
        return json_response({
            "status": _status(ctx, store_degraded, device_problems),
            "devices": len(daemon.device_ids()),
            "tasks_running": running,
        }, status_code=http_status)
    store = await _store_health(ctx)
    body = {
        "status": _status(ctx, store is not None and store["degraded"], device_problems),
        "timestamp": utc_now_iso(),
        "uptime_s": round(time.monotonic() - ctx.started_at, 3),
        "devices": len(daemon.device_ids()),
        "device_problems": device_problems,
        "tasks_running": running,
        "store": store,
    }
    lab = lab_health(ctx)
    if lab is not None:  # a node of a lab: its engine, whether it answers, the live nodes
        body["lab"] = lab
    return json_response(body, status_code=http_status)


async def metrics(ctx: Ctx) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    RouteSpec("GET", "/", root),
    RouteSpec("GET", "/health", health),
    RouteSpec("GET", "/metrics", metrics),
]
