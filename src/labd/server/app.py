"""Build the FastAPI app for one daemon: routes, error handling, guards, auth, CORS, lifespan.

``create_app`` is all wiring; the behaviour lives in the route modules. The app works with
uvicorn (:class:`labd.server.LabDaemonServer`) and with Starlette's ``TestClient`` — use the
client as a context manager so the lifespan runs and worker threads are released (its
``Host: testserver`` is the address its requests arrive at, so the Host check lets it in).

Middleware, outermost first: the Host check (421), CORS, bearer tokens (401/403), cross-site
pages (403) and JSON-only bodies (415), the body limit (413), and the device-call fast path;
see :mod:`labd.server.guards`, :mod:`labd.server.auth` and :mod:`labd.server.hotpath`. Guards
with nothing between them run as one :class:`~labd.server.guards.GuardChain` layer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

import labd
from labd.server import (
    routes_devices,
    routes_lab,
    routes_leases,
    routes_meta,
    routes_runs,
    routes_tasks,
    routes_types,
    sse,
)
from labd.server.auth import BearerAuthMiddleware, required_role
from labd.server.context import ServerContext, ServerSettings
from labd.server.fastparse import document_call_body
from labd.server.guards import CrossSiteGuard, GuardChain, HostGuard, JsonBodyGuard
from labd.server.hotpath import CallDispatch
from labd.server.limits import BodyLimitMiddleware
from labd.server.routing import endpoints_index, install_error_handlers, install_routes

# The module, not its names: labd.web's modules import labd.server's, so whichever package
# is imported first, this finds the other complete by the time create_app runs.
from labd.web import routes as web_routes

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["BEARER_SCHEME", "create_app"]

log = logging.getLogger("labd.server")

#: The OpenAPI security scheme of a server with tokens (Swagger UI's "Authorize" button).
BEARER_SCHEME: dict[str, Any] = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "A token from the server's tokens file (docs/http-api.md)."},
}

# The first route that matches wins, and every request is matched against the routes in
# order: the hot device-call route goes first (its path matches no other route).
_HOT = [r for r in routes_devices.ROUTES if r.path == "/devices/{device_id}/call"]
ROUTES = [
    *_HOT,
    *routes_meta.ROUTES,
    *(r for r in routes_devices.ROUTES if r not in _HOT),
    *routes_tasks.ROUTES,
    *routes_types.ROUTES,
    *routes_leases.ROUTES,
    *routes_runs.ROUTES,
    *routes_lab.ROUTES,
    *sse.ROUTES,
]


# FastAPI >= 0.150 asks OpenTelemetry's global providers on every request whether to trace it;
# labd's metrics are Prometheus' (/metrics), and that lookup costs more than a device call's
# own bookkeeping. Older FastAPI has no such option.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    context: ServerContext = app.state.labd
    context.metrics.attach()
    web_routes.started(app)
    try:
        yield
    finally:
        web_routes.stopped(app)
        node = routes_lab.lab_of(context)
        if node is not None:  # the engine connections of this loop (calls to other nodes)
            await node.coordinator.close_async()
        context.metrics.detach(timeout=0.5)
        busy = context.offloader.close(timeout=0.0)  # idle workers exit; busy ones when done
        if busy:
            log.warning("labd server: worker(s) still running device code at shutdown: %s", busy)


def create_app(daemon: LabDaemon, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app serving ``daemon`` as described in docs/http-api.md.

    Example::

        from starlette.testclient import TestClient
        with TestClient(create_app(daemon)) as client:
            client.get("/devices").json()
    """
    settings = settings or ServerSettings()
    context = ServerContext(daemon, settings)
    app = FastAPI(
        title="labd", version=labd.__version__, lifespan=_lifespan,
        docs_url=None, redoc_url=None,  # labd.web serves them from local files, not a CDN
        description="Instruments and experiments of one labd daemon over HTTP and SSE.",
        **_NO_NATIVE_TELEMETRY,
    )
    app.state.labd = context
    context.endpoints = endpoints_index(ROUTES)
    install_error_handlers(app)
    install_routes(app, ROUTES)
    document_call_body(app)
    web_routes.install(app)
    if settings.tokens is not None:
        _declare_bearer_auth(app)
    # Innermost: every guard below has run before a device call skips FastAPI's router.
    app.add_middleware(CallDispatch, handler=routes_devices.call_device)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    host_guard = (HostGuard, {"bind_host": settings.bind_host,
                              "allowed_hosts": settings.allowed_hosts})
    # Inside auth: a stranger learns nothing, not even which bodies this server takes.
    browser_guards = [(CrossSiteGuard, {"allowed_origins": settings.cors_origins or ()}),
                      (JsonBodyGuard, {})]
    if settings.tokens is None and not settings.cors_origins:
        # Nothing between them: the Host check and the browser guards run as one layer.
        app.add_middleware(GuardChain, guards=[host_guard, *browser_guards])
        return app
    app.add_middleware(GuardChain, guards=browser_guards)
    if settings.tokens is not None:
        # Outside the body limit (a stranger's body is never read), inside CORS (preflights
        # need no token, and 401 answers carry CORS headers).
        app.add_middleware(BearerAuthMiddleware, tokens=settings.tokens,
                           sessions=app.state.labd_sessions)
    if settings.cors_origins:
        # Added last, so it is outermost: error answers carry CORS headers too.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    # Outermost: a request for a host this server does not serve gets nothing else.
    app.add_middleware(GuardChain, guards=[host_guard])
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer scheme in ``/openapi.json``: required globally, optional on open paths."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = BEARER_SCHEME
            schema["security"] = [{"bearerAuth": []}]
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    if required_role(method.upper(), path) is None:
                        operation["security"] = [{}, {"bearerAuth": []}]  # token optional
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
