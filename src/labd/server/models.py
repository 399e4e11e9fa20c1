"""Request bodies, path and query parameters, and dependencies shared by the routes.

Bodies are pydantic models with ``extra="forbid"``: a misspelt field is a 400 naming it, not
a silently ignored value. They also make ``/openapi.json`` describe every body exactly.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, StrictBool, StrictStr
from starlette.requests import Request

from labd.ownership import Actor
from labd.server.auth import current_token
from labd.server.context import ServerContext, get_context

__all__ = [
    "ID_REGEX",
    "MIN_REQUEST_TIMEOUT",
    "NODE_REGEX",
    "AddDeviceRequest",
    "CallRequest",
    "ConnectRequest",
    "Ctx",
    "DeviceIdPath",
    "ErrorEnvelope",
    "LeaseIdPath",
    "LeaseRequest",
    "MaxsizeQuery",
    "ParameterRequest",
    "RemoteActor",
    "RenewRequest",
    "ShowTracebacks",
    "TaskIdPath",
    "TaskRequest",
    "TimeoutQuery",
    "check_timeout",
    "hide_tracebacks",
]

#: Ids of devices, tasks and leases (docs/http-api.md).
ID_REGEX = r"^[A-Za-z0-9_\-.:]{1,128}$"
_ID_HELP = "1 to 128 letters, digits or the characters _ - . :"
#: Names of the nodes of a lab (labd.lab.settings).
NODE_REGEX = r"^[A-Za-z0-9_.\-]{1,64}$"
#: Shortest ``?timeout=`` a request may ask for (seconds); the longest is a server setting.
MIN_REQUEST_TIMEOUT = 0.001
TIMEOUT_HELP = (f"Request timeout in seconds, from {MIN_REQUEST_TIMEOUT} to the server's "
                "max_request_timeout (default 3600); default: the server's request_timeout.")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CallRequest(_Body):
    """``POST /devices/{id}/call``: call ``method(*args, **kwargs)`` on the device."""

    method: StrictStr = Field(min_length=1, max_length=256, description="A public method name.")
    args: list[Any] = Field(default_factory=list, description="Positional arguments.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")


class AddDeviceRequest(_Body):
    """``POST /devices``: construct ``device_type(device_id, **params)``."""

    device_id: StrictStr = Field(pattern=ID_REGEX, description=_ID_HELP)
    device_type: StrictStr = Field(min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)
    connect: StrictBool = Field(False, description="Also connect the device.")
    node: StrictStr | None = Field(
        None, pattern=NODE_REGEX,
        description="On a node of a lab: the live node to add it to (default: this node).")


class ConnectRequest(_Body):
    """``POST /devices/{id}/connect``: optional bound on ``connect()``."""

    timeout: PositiveFloat | None = Field(None, description="Seconds; the device is faulted after.")


class TaskRequest(_Body):
    """``POST /tasks``: start ``task_type(task_id=..., **params).run(context)``."""

    task_id: StrictStr | None = Field(None, pattern=ID_REGEX, description="None generates an id.")
    task_type: StrictStr = Field(min_length=1, max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)
    wait_for_devices: StrictBool | PositiveFloat = Field(
        False, description="Queue until the devices are free: true, or at most this many seconds.")


class ParameterRequest(_Body):
    """``POST /tasks/{id}/parameters``: call the task's ``set_parameter(key, value)``."""

    key: StrictStr = Field(min_length=1, max_length=256)
    value: Any = None


class LeaseRequest(_Body):
    """``POST /leases``: hold devices as ``owner`` for ``ttl`` seconds (renewable)."""

    device_ids: list[Annotated[StrictStr, Field(pattern=ID_REGEX)]] = Field(min_length=1)
    owner: StrictStr | None = Field(
        None, min_length=1, max_length=128, description="Defaults to the X-Labd-Owner header.")
    ttl: PositiveFloat | None = Field(None, description="Seconds until expiry unless renewed.")


class RenewRequest(_Body):
    """``POST /leases/{id}/renew``: push the expiry ``ttl`` seconds (default: the original)."""

    ttl: PositiveFloat | None = None


class ErrorEnvelope(BaseModel):
    """Every error answer: ``{"error": ErrorRecord}``."""

    error: dict[str, Any]


DeviceIdPath = Annotated[str, Path(pattern=ID_REGEX, description=_ID_HELP)]
TaskIdPath = Annotated[str, Path(pattern=ID_REGEX, description=_ID_HELP)]
LeaseIdPath = Annotated[str, Path(pattern=ID_REGEX, description=_ID_HELP)]
MaxsizeQuery = Annotated[
    int | None, Query(ge=1, le=1_000_000, description="This client's stream buffer (items).")
]


# async: FastAPI runs plain-def dependencies in a thread pool (two thread hops per request)
async def _remote_actor(
    x_labd_owner: Annotated[
        str | None,
        Header(alias="X-Labd-Owner", max_length=128, description="The principal you act as."),
    ] = None,
) -> Actor:
    principal = x_labd_owner.strip() if x_labd_owner else None
    return Actor(remote=True, principal=principal or None)


#: The caller as the core sees it: a remote actor, acting for the X-Labd-Owner principal.
RemoteActor = Annotated[Actor, Depends(_remote_actor)]
#: The app's :class:`ServerContext`.
Ctx = Annotated[ServerContext, Depends(get_context)]


def check_timeout(value: float | None, maximum: float, raw: Any = None) -> float | None:
    """``value`` if it is None or within [:data:`MIN_REQUEST_TIMEOUT`, ``maximum``] seconds.

    Otherwise the same 400 as any bad query parameter, naming ``query.timeout`` and the range
    (a timeout of 5e-324 s would only ever answer 504; one of a year would pin a worker).
    """
    if value is None or (math.isfinite(value) and MIN_REQUEST_TIMEOUT <= value <= maximum):
        return value
    raise RequestValidationError([{
        "type": "timeout_range", "loc": ("query", "timeout"),
        "msg": f"Input should be a number of seconds from {MIN_REQUEST_TIMEOUT:g} to "
               f"{maximum:g} (this server's max_request_timeout)",
        "input": value if raw is None else raw,
    }])


# async: FastAPI runs plain-def dependencies in a thread pool (two thread hops per request)
async def _timeout_query(
    ctx: Ctx,
    timeout: Annotated[
        float | None,
        Query(description=TIMEOUT_HELP, json_schema_extra={"minimum": MIN_REQUEST_TIMEOUT}),
    ] = None,
) -> float | None:
    return check_timeout(timeout, ctx.settings.max_request_timeout)


#: ``?timeout=`` in seconds within [0.001, ``max_request_timeout``], or None (the default).
TimeoutQuery = Annotated[float | None, Depends(_timeout_query)]


# async: FastAPI runs plain-def dependencies in a thread pool (two thread hops per request)
async def _shows_tracebacks(request: Request) -> bool:
    token = current_token(request)
    return token is None or token.allows("admin")


#: True when the caller may see stored tracebacks: an admin's token, or a server without
#: tokens (one PC, one user). Tracebacks name files, paths and values: not for every viewer.
ShowTracebacks = Annotated[bool, Depends(_shows_tracebacks)]

_RECORD_KEYS = frozenset({"type", "message", "origin", "traceback"})


def hide_tracebacks(record: Any) -> Any:
    """``record`` (an error record dict, or None) with ``traceback`` set to None.

    Keeps the error record shape (the key stays, as in immediate error answers); anything
    that is not an error record is returned unchanged.
    """
    if isinstance(record, dict) and record.keys() >= _RECORD_KEYS and record["traceback"]:
        return {**record, "traceback": None}
    return record
