"""Request bodies, path and query parameters, and dependencies shared by the routes.

Bodies are pydantic models with ``extra="forbid"``: a misspelt field is a 400 naming it, not
a silently ignored value. They also make ``/openapi.json`` describe every body exactly.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, StrictBool, StrictStr

from labd.ownership import Actor
from labd.server.context import ServerContext, get_context

__all__ = [
    "ID_REGEX",
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
    "TaskIdPath",
    "TaskRequest",
    "TimeoutQuery",
]

#: Ids of devices, tasks and leases (docs/http-api.md).
ID_REGEX = r"^[A-Za-z0-9_\-.:]{1,128}$"
_ID_HELP = "1 to 128 letters, digits or the characters _ - . :"


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
TimeoutQuery = Annotated[
    float | None,
    Query(gt=0, le=86_400, description="Request timeout in seconds (default: the server's)."),
]
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
