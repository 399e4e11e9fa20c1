"""Route lists, the route class that turns every exception into an error answer, JSON replies.

Each ``routes_*`` module ends with a list of :class:`RouteSpec`; :func:`install_routes` adds
them with :class:`LabdRoute`, whose handler wrapper is the one place where exceptions raised by
a handler (validation, body limits, daemon errors) become ``{"error": ...}`` answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from labd.server.encoding import dumps_lenient
from labd.server.errors import (
    describe_exception,
    error_response,
    http_exception_record,
    validation_record,
)
from labd.server.models import ErrorEnvelope

__all__ = [
    "ERROR_DOCS",
    "LabdRoute",
    "RouteSpec",
    "endpoints_index",
    "install_error_handlers",
    "install_routes",
    "json_bytes_response",
    "json_response",
    "render_exception",
]

#: OpenAPI description of error answers. Declaring 4XX also stops FastAPI from documenting a
#: 422 answer that this server never sends (validation errors are 400).
ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorEnvelope, "description": "Bad input, unknown id, busy device or lease "
            "(see the error table in docs/http-api.md)."},
    "5XX": {"model": ErrorEnvelope, "description": "Device failure (502), server stopping or "
            "daemon closed (503), request timeout (504)."},
}


@dataclass(frozen=True)
class RouteSpec:
    """One endpoint: HTTP method, path, handler and success status."""

    method: str
    path: str
    endpoint: Callable[..., Any]
    status_code: int = 200
    responses: dict[int | str, dict[str, Any]] | None = None  # extra OpenAPI answers
    openapi_extra: dict[str, Any] | None = None  # for routes that parse their own parameters


def json_response(obj: Any, status_code: int = 200) -> Response:
    """``obj`` as JSON for framework-made answers (an odd value never fails the whole answer)."""
    return Response(dumps_lenient(obj), status_code=status_code, media_type="application/json")


def json_bytes_response(body: bytes, status_code: int = 200) -> Response:
    """Already-encoded JSON (encoded on a worker thread)."""
    return Response(body, status_code=status_code, media_type="application/json")


def render_exception(request: Request, exc: Exception) -> Response:
    """The error answer for ``exc``, counted in the app's metrics."""
    if isinstance(exc, RequestValidationError):
        status, record = 400, validation_record(exc)
    elif isinstance(exc, HTTPException):
        status, record = exc.status_code, http_exception_record(exc, request.method, request.url.path)
    else:
        status, record = describe_exception(exc)
    context = getattr(request.app.state, "labd", None)
    if context is not None:
        context.metrics.count_error(status, record.type)
    # HTTPException keeps its own headers; a labd exception may ask for some (Retry-After).
    headers = getattr(exc, "headers" if isinstance(exc, HTTPException) else "labd_headers", None)
    return error_response(status, record, headers=dict(headers) if headers else None)


class LabdRoute(APIRoute):
    """An APIRoute whose handler answers every exception with the error record shape."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response: Response = await handler(request)
            except Exception as exc:
                return render_exception(request, exc)
            return response

        return guarded


def install_routes(app: FastAPI, specs: Sequence[RouteSpec]) -> None:
    """Add ``specs`` to ``app`` as :class:`LabdRoute` routes."""
    for spec in specs:
        app.router.add_api_route(
            spec.path, spec.endpoint, methods=[spec.method], status_code=spec.status_code,
            responses={**ERROR_DOCS, **(spec.responses or {})}, route_class_override=LabdRoute,
            summary=next(iter((spec.endpoint.__doc__ or "").strip().splitlines()), None),
            openapi_extra=spec.openapi_extra,
        )


async def _handle(request: Request, exc: Exception) -> Response:
    return render_exception(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Error answers for what happens outside route handlers (no such route, wrong method).

    The ``Exception`` entry is Starlette's last resort: it answers 500 ``InternalError``
    without a traceback (Starlette still re-raises, so the server logs it).
    """
    app.add_exception_handler(RequestValidationError, _handle)
    app.add_exception_handler(HTTPException, _handle)
    app.add_exception_handler(Exception, _handle)


def endpoints_index(specs: Sequence[RouteSpec]) -> dict[str, str]:
    """``{"list_devices": "GET /devices", ...}`` for ``GET /``."""
    return {spec.endpoint.__name__: f"{spec.method} {spec.path}" for spec in specs}
