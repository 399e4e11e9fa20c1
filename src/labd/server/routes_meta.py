"""``/``, ``/health`` and ``/metrics``: what this server is, whether it is alive, its numbers."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

import labd
from labd.errors import utc_now_iso
from labd.server.models import Ctx
from labd.server.routing import RouteSpec, json_response

__all__ = ["ROUTES"]



async def root(ctx: Ctx) -> Response:
    """Server name, version and the endpoints it offers."""
    return json_response({"name": "labd", "version": labd.__version__,
                          "endpoints": dict(ctx.endpoints)})


async def health(ctx: Ctx) -> Response:
    """Liveness: answers at once even while instruments hang (503 once the daemon shut down)."""
    daemon = ctx.daemon
    running = sum(1 for handle in daemon.task_handles() if handle.status in ("running", "paused"))
    body = {
        "status": "healthy" if not daemon.closed else "daemon_closed",
        "timestamp": utc_now_iso(),
        "uptime_s": round(time.monotonic() - ctx.started_at, 3),
        "devices": len(daemon.device_ids()),
        "tasks_running": running,
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
