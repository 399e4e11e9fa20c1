"""Mount the dashboard on a labd app: pages, sign-in, downloads, ``/docs``, static files.

:func:`install` is called by :func:`labd.server.create_app`. Pages are left out of the
OpenAPI description (they are HTML for people, not API); ``GET /`` itself sends a browser
(``Accept: text/html``) to ``/ui/`` (:mod:`labd.server.routes_meta`). :func:`started` and :func:`stopped` (from the app's lifespan) attach and
detach the ring of recent log lines the server page shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

import labd
from labd.server.sessions import SessionTable
from labd.web import docs, downloads, signin
from labd.web.logbuffer import LogRing
from labd.web.pages import PAGES

__all__ = ["STATIC", "install", "started", "stopped"]

log = logging.getLogger("labd.server")

STATIC = Path(__file__).resolve().parent / "static"
_VENDOR_PROBE = STATIC / "vendor" / "htmx.min.js"


def install(app: FastAPI) -> None:
    """Add the dashboard to ``app`` (see the module docstring)."""
    app.state.labd_sessions = SessionTable()
    app.state.labd_log = LogRing()
    for path, handler in PAGES:
        app.router.add_api_route(path, handler, methods=["GET"], include_in_schema=False,
                                 response_class=HTMLResponse)
    extra: list[tuple[str, str, Callable[..., Any]]] = [
        ("GET", "/ui/login", signin.login_page),
        ("POST", "/ui/login", signin.login),
        ("POST", "/ui/logout", signin.logout),
        ("GET", "/ui/runs/{task_id}/download.json", downloads.download_json),
        ("GET", "/ui/runs/{task_id}/download.h5", downloads.download_hdf5),
        ("GET", "/docs", docs.swagger_ui),
        ("GET", "/redoc", docs.swagger_ui),
        ("GET", "/docs/oauth2-redirect", docs.oauth2_redirect),
    ]
    for method, path, endpoint in extra:
        app.router.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    app.router.add_api_route("/ui", _to_ui, methods=["GET"], include_in_schema=False)
    app.mount("/ui/static", StaticFiles(directory=STATIC, check_dir=False), name="ui-static")
    if not _VENDOR_PROBE.is_file():
        log.warning("labd dashboard: browser assets are not built (%s is missing); the pages "
                    "will not work. Run `make assets` (python tools/build_assets.py).",
                    _VENDOR_PROBE.parent)


async def _to_ui() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


def started(app: FastAPI) -> None:
    """Start keeping the server's log lines (app startup)."""
    ring = getattr(app.state, "labd_log", None)
    if isinstance(ring, LogRing):
        ring.attach()
        ctx = app.state.labd
        ring.note("INFO", "labd.server", f"server started: labd {labd.__version__}, "
                  f"{len(ctx.daemon.device_ids())} device(s), "
                  f"{'tokens' if ctx.settings.tokens is not None else 'no tokens'}")


def stopped(app: FastAPI) -> None:
    """Stop keeping log lines (app shutdown)."""
    ring = getattr(app.state, "labd_log", None)
    if isinstance(ring, LogRing):
        ring.detach()
