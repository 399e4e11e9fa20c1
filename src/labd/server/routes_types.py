"""``/device-types`` and ``/task-types``: every registered class, with its parameters' schemas.

What a client may pass to ``POST /devices`` (``params``) and ``POST /tasks`` (``params``):
each type's ``name``, ``doc`` and ``parameters``, in the shape of ``/devices/{id}/methods``
(``name``, ``required``, ``default``, ``annotation``, ``kind``, ``schema``, ``type``). The
constructor's ``device_id`` / ``task_id`` (and the positional parameter the device id fills)
and its ``**kwargs`` are left out: the server passes the id itself. Nothing runs user code
here but ``inspect``; a class whose signature cannot be read lists no parameters.
"""

from __future__ import annotations

import inspect
from typing import Any

from starlette.responses import Response

from labd.server.models import Ctx
from labd.server.routing import RouteSpec, json_response
from labd.signatures import CallableSignature, constructor_signature, device_constructor_signature

__all__ = ["ROUTES", "describe_type"]


def describe_type(name: str, cls: Any, signature: CallableSignature | None) -> dict[str, Any]:
    """``{"name", "class", "doc", "parameters"}`` of one registered type."""
    return {
        "name": name,
        "class": getattr(cls, "__qualname__", None) or repr(cls),
        "doc": inspect.getdoc(cls) if isinstance(cls, type) else None,
        "parameters": signature.describe(var_keyword=False) if signature is not None else [],
    }


async def list_device_types(ctx: Ctx) -> Response:
    """Registered device types: name, doc and constructor parameters with JSON Schemas."""
    types = []
    for name in ctx.daemon.device_types:
        cls = ctx.daemon.device_class(name)
        signature = device_constructor_signature(cls) if isinstance(cls, type) else None
        types.append(describe_type(name, cls, signature))
    return json_response({"device_types": types})


async def list_task_types(ctx: Ctx) -> Response:
    """Registered task types: name, doc and constructor parameters with JSON Schemas."""
    types = []
    for name in ctx.daemon.task_types:
        cls = ctx.daemon.task_class(name)
        signature = constructor_signature(cls, {"task_id"}) if isinstance(cls, type) else None
        types.append(describe_type(name, cls, signature))
    return json_response({"task_types": types})


ROUTES = [
    RouteSpec("GET", "/device-types", list_device_types),
    RouteSpec("GET", "/task-types", list_task_types),
]
