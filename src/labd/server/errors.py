"""Exceptions become HTTP answers here, in one table (docs/http-api.md, "Errors").

Every error answer is ``{"error": <ErrorRecord dict>}`` with ``traceback: null``: the stored
error endpoints keep tracebacks, immediate answers never carry one. The status comes from the
first class in the exception's MRO that the table knows, so subclasses inherit their parent's
status unless listed themselves. Anything unknown is a 500 ``InternalError`` whose traceback
goes to the server log, not to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from labd.errors import (
    DaemonClosedError,
    DeviceBusyError,
    DeviceError,
    DeviceNotConnectedError,
    DeviceOperationError,
    DeviceTimeoutError,
    ErrorRecord,
    InvalidArgumentError,
    LabDaemonException,
    LeaseError,
    TaskError,
    UnknownNameError,
)
from labd.lab.errors import EngineUnavailableError
from labd.server.encoding import UnserializableResult
from labd.signatures import ParameterValidationError

__all__ = [
    "DeviceOverloaded",
    "Forbidden",
    "PayloadTooLarge",
    "ServerStopping",
    "Unauthorized",
    "describe_exception",
    "device_fault",
    "error_response",
    "http_exception_record",
    "validation_record",
]

log = logging.getLogger("labd.server")


class ServerStopping(LabDaemonException):
    """The server is stopping; the request was abandoned (HTTP 503 ``ServerStopping``)."""


class DeviceOverloaded(LabDaemonException):
    """The device already has the most calls in flight the server allows (HTTP 503).

    The answer carries ``Retry-After`` (from :attr:`labd_headers`): the calls ahead of this
    one are running or waiting for the device, maybe hung.
    """

    def __init__(self, device_id: str, cap: int, retry_after: int = 5) -> None:
        super().__init__(
            f"Device {device_id!r} already has {cap} call(s) in flight, the most this server "
            f"allows per device (device_max_in_flight={cap}); they are running or waiting for "
            f"the device, which may be hung. Retry after {retry_after} s, check the instrument "
            "(GET /health names unresponsive devices), or start the server with a larger "
            "device_max_in_flight.")
        self.labd_context = {"device_id": device_id, "max_in_flight": cap}
        self.labd_headers = {"Retry-After": str(retry_after)}


class Unauthorized(LabDaemonException):
    """The request carries no bearer token this server knows (HTTP 401 ``Unauthorized``)."""


class Forbidden(LabDaemonException):
    """The caller's role is too low for the request (HTTP 403 ``Forbidden``)."""


class PayloadTooLarge(HTTPException):
    """The request body is larger than the server's ``max_body_bytes`` (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is larger than this server accepts ({limit} bytes); send less "
            "data per request or start the server with a larger max_body_bytes.",
        )


#: exception class -> (HTTP status, error origin). Looked up along the exception's MRO.
STATUS_TABLE: dict[type[BaseException], tuple[int, str]] = {
    UnknownNameError: (404, "framework"),
    # Arguments that do not fit the annotations of a method or constructor: the request is
    # well formed, its values are not (context.errors names each parameter).
    ParameterValidationError: (422, "framework"),
    InvalidArgumentError: (400, "framework"),
    DeviceBusyError: (409, "framework"),
    LeaseError: (409, "framework"),
    TaskError: (409, "task"),
    DeviceTimeoutError: (504, "device"),
    DeviceNotConnectedError: (409, "device"),
    DeviceError: (502, "device"),
    DaemonClosedError: (503, "framework"),
    DeviceOverloaded: (503, "framework"),
    EngineUnavailableError: (503, "framework"),  # a lab node cannot reach its engine
    ServerStopping: (503, "framework"),
    Unauthorized: (401, "framework"),
    Forbidden: (403, "framework"),
    UnserializableResult: (502, "device"),
    LabDaemonException: (500, "framework"),
}

_HTTP_TYPES = {
    400: "MalformedRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
}


def _context(exc: BaseException) -> dict[str, Any]:
    context: dict[str, Any] = {}
    if isinstance(exc, DeviceBusyError):
        context["busy"] = list(exc.busy)
    extra = getattr(exc, "labd_context", None)
    if isinstance(extra, dict):
        context.update(extra)
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, LabDaemonException):
        context["cause_type"] = type(cause).__name__
    return context


def describe_exception(exc: BaseException) -> tuple[int, ErrorRecord]:
    """The HTTP status and error record (without traceback) for ``exc``."""
    for cls in type(exc).__mro__:
        entry = STATUS_TABLE.get(cls)
        if entry is not None:
            status, origin = entry
            record = ErrorRecord(
                type=type(exc).__name__, message=str(exc) or type(exc).__name__,
                origin=origin,  # type: ignore[arg-type]
                context=_context(exc),
            )
            return status, record
    log.error("labd server: unexpected error while handling a request", exc_info=exc)
    text = str(exc)
    message = f"Internal server error ({type(exc).__name__}{': ' + text[:300] if text else ''}); "
    message += "the server log has the traceback."
    return 500, ErrorRecord(type="InternalError", message=message, origin="framework",
                            context={"cause_type": type(exc).__name__})


def _field(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


def validation_record(exc: RequestValidationError) -> ErrorRecord:
    """A 400 record naming each field that failed validation (or ``MalformedRequest`` for bad JSON)."""
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            loc = error.get("loc", ())
            position = loc[1] if len(loc) > 1 else "?"
            detail = (error.get("ctx") or {}).get("error", "JSON decode error")
            return ErrorRecord(
                type="MalformedRequest",
                message=f"The request body is not valid JSON ({detail} at position {position}). "
                "Send a JSON object with Content-Type: application/json.",
                origin="framework",
            )
    problems = []
    details = []
    for error in errors:
        field = _field(error.get("loc", ()))
        text = str(error.get("msg", "invalid value"))
        got = repr(error.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        problems.append(f"{field}: {text} (got {got})")
        details.append({"field": field, "message": text, "type": error.get("type")})
    return ErrorRecord(
        type="InvalidArgumentError",
        message="Invalid request: " + "; ".join(problems) + ".",
        origin="framework",
        context={"errors": details},
    )


def http_exception_record(exc: HTTPException, method: str, path: str) -> ErrorRecord:
    """A record for Starlette's own HTTP errors (no such route, wrong method, body too large)."""
    kind = _HTTP_TYPES.get(exc.status_code, "HTTPError")
    if exc.status_code == 404:
        message = f"No endpoint {method} {path}. GET / lists the endpoints."
    elif exc.status_code == 405:
        message = f"{method} is not allowed on {path}. GET / lists the endpoints and their methods."
    else:
        message = str(exc.detail)
    return ErrorRecord(type=kind, message=message, origin="framework")


def error_response(status: int, record: ErrorRecord, headers: dict[str, str] | None = None) -> Response:
    """``{"error": record}`` (traceback omitted) with ``status``."""
    body = orjson.dumps({"error": record.to_dict(include_traceback=False)},
                        option=orjson.OPT_SERIALIZE_NUMPY, default=repr)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def device_fault(exc: Exception, device_id: str, action: str) -> DeviceOperationError:
    """Wrap an exception raised by device code as :class:`DeviceOperationError` (HTTP 502).

    The original is the ``__cause__``; its class name goes to ``context.cause_type``.
    """
    fault = DeviceOperationError(
        f"Device {device_id!r}: {action} raised {type(exc).__name__}: {exc}"
    )
    fault.__cause__ = exc
    fault.labd_context = {"device_id": device_id}  # type: ignore[attr-defined]
    return fault
