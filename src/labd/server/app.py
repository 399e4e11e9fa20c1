"""Build the FastAPI app for one daemon: routes, error handling, body limit, auth, CORS, lifespan.

``create_app`` is all wiring; the behaviour lives in the route modules. The app works with
uvicorn (:class:`labd.server.LabDaemonServer`) and with Starlette's ``TestClient`` — use the
client as a context manager so the lifespan runs and worker threads are released.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

import labd
from labd.server import (
    routes_devices,
    routes_leases,
    routes_meta,
    routes_runs,
    routes_tasks,
    sse,
)
from labd.server.auth import BearerAuthMiddleware
from labd.server.context import ServerContext, ServerSettings
from labd.server.fastparse import document_call_body
from labd.server.limits import BodyLimitMiddleware
from labd.server.routing import endpoints_index, install_error_handlers, install_routes

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["create_app"]

log = logging.getLogger("labd.server")

ROUTES = [
    *routes_meta.ROUTES,
    *routes_devices.ROUTES,
    *routes_tasks.ROUTES,
    *routes_leases.ROUTES,
    *routes_runs.ROUTES,
    *sse.ROUTES,
]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    context: ServerContext = app.state.labd
    context.metrics.attach()
    try:
        yield
    finally:
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
        description="Instruments and experiments of one labd daemon over HTTP and SSE.",
    )
    app.state.labd = context
    context.endpoints = endpoints_index(ROUTES)
    install_error_handlers(app)
    install_routes(app, ROUTES)
    document_call_body(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.tokens is not None:
        # Outside the body limit (a stranger's body is never read), inside CORS (preflights
        # need no token, and 401 answers carry CORS headers).
        app.add_middleware(BearerAuthMiddleware, tokens=settings.tokens)
    if settings.cors_origins:
        # Added last, so it is outermost: error answers carry CORS headers too.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app
