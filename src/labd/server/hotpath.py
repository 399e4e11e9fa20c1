"""Serve ``POST /devices/{id}/call`` without FastAPI's router, dependency solving and telemetry.

Why: the device call is the route a lab hammers (a GUI polling, a script stepping a laser),
and FastAPI's per-request machinery in front of a route (route matching against every route,
the exit stack, dependency solving, telemetry lookups) costs more than labd's own work for a
call. :class:`CallDispatch` is the innermost middleware, so every guard (Host, CORS, tokens,
cross-site, JSON bodies, body limit) has already run; it hands a matching request straight
to :func:`labd.server.routes_devices.call_device`, the same handler the registered route
uses, and renders any exception with the same :func:`~labd.server.routing.render_exception`.

The registered route stays: it documents the call in ``/openapi.json`` and serves the rare
request this fast match declines (an app mounted under a ``root_path``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from labd.server.routing import render_exception

__all__ = ["CallDispatch", "call_route_device_id"]

_PREFIX = "/devices/"
_SUFFIX = "/call"


def call_route_device_id(scope: Scope) -> str | None:
    """The ``{device_id}`` of a ``POST /devices/{device_id}/call`` request, else None.

    Matches exactly what the route's path pattern matches (one non-empty path segment);
    anything else is left to the router, which answers it as before (404, 405, ...).
    """
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    device_id = path[len(_PREFIX):-len(_SUFFIX)]
    if not device_id or "/" in device_id:
        return None
    return device_id


class CallDispatch:
    """ASGI middleware: device calls go straight to their handler; see the module docstring."""

    def __init__(self, app: ASGIApp, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        device_id = call_route_device_id(scope)
        if device_id is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = {"device_id": device_id}
        request = Request(scope, receive)
        try:
            response = await self.handler(request)
        except Exception as exc:
            response = render_exception(request, exc)
        await response(scope, receive, send)
