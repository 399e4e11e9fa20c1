"""Hand parsing for the hot ``POST /devices/{id}/call`` route.

FastAPI's dependency solving is about 60 % of that route's CPU (cProfile, bench/README.md),
so the call route reads its path id, body, ``?timeout=`` and ``X-Labd-Owner`` itself, with the
same pydantic model and limits as the declared ones (``?timeout=`` through the same
:func:`~labd.server.models.check_timeout`). Every failure is raised as the same
:class:`RequestValidationError` FastAPI would raise, so the answer (400 with the error record
naming the field) is identical, and :data:`CALL_OPENAPI` keeps ``/openapi.json`` accurate.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import Request

from labd.ownership import Actor
from labd.server.models import (
    ID_REGEX,
    MIN_REQUEST_TIMEOUT,
    TIMEOUT_HELP,
    CallRequest,
    check_timeout,
)

__all__ = [
    "CALL_OPENAPI",
    "call_body",
    "document_call_body",
    "path_id",
    "remote_actor",
    "timeout_query",
]

_ID = re.compile(ID_REGEX)


def _invalid(kind: str, loc: tuple[Any, ...], msg: str, value: Any) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


def path_id(request: Request, name: str) -> str:
    """A path id matching the id pattern, or a 400 naming ``path.<name>``."""
    value: str = request.path_params[name]
    if not _ID.match(value):
        raise _invalid("string_pattern_mismatch", ("path", name),
                       f"String should match pattern '{ID_REGEX}'", value)
    return value


def call_body(raw: bytes) -> CallRequest:
    """The validated body (malformed JSON -> ``MalformedRequest``, bad fields -> 400)."""
    if not raw.strip():
        raise _invalid("missing", ("body",), "Field required", None)
    try:
        return CallRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = []
        for error in exc.errors(include_url=False):
            errors.append({**error, "loc": ("body", *error.get("loc", ()))})
        raise RequestValidationError(errors) from None


def timeout_query(request: Request, maximum: float) -> float | None:
    """``?timeout=`` as seconds in [0.001, ``maximum``], or a 400 naming ``query.timeout``."""
    raw = request.query_params.get("timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _invalid("float_parsing", ("query", "timeout"),
                       "Input should be a valid number, unable to parse string as a number", raw
                       ) from None
    return check_timeout(value, maximum, raw)


def remote_actor(request: Request) -> Actor:
    """The remote caller, acting for ``X-Labd-Owner`` (set from the token when auth is on)."""
    owner = request.headers.get("x-labd-owner")
    if owner is not None and len(owner) > 128:
        raise _invalid("string_too_long", ("header", "X-Labd-Owner"),
                       "String should have at most 128 characters", owner)
    principal = owner.strip() if owner else None
    return Actor(remote=True, principal=principal or None)


#: What FastAPI would have documented for the declared parameters of the call route.
CALL_OPENAPI: dict[str, Any] = {
    "parameters": [
        {"name": "device_id", "in": "path", "required": True,
         "schema": {"type": "string", "pattern": ID_REGEX}},
        {"name": "timeout", "in": "query", "required": False,
         "description": TIMEOUT_HELP,
         "schema": {"type": "number", "minimum": MIN_REQUEST_TIMEOUT}},
        {"name": "X-Labd-Owner", "in": "header", "required": False,
         "description": "The principal you act as.",
         "schema": {"type": "string", "maxLength": 128}},
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CallRequest"}}},
    },
}


def document_call_body(app: FastAPI) -> None:
    """Put ``CallRequest`` into the OpenAPI components that :data:`CALL_OPENAPI` refers to."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["CallRequest"] = CallRequest.model_json_schema()
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
