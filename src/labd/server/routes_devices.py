"""``/devices``: list, inspect, add, connect, disconnect, call, errors, stream stop.

Everything that may run device code (constructors, ``connect``, methods, ``is_streaming`` in
the device info) runs on a worker thread via the context's offloader, as the remote actor,
so the core's ownership rules apply: queries always pass, commands to owned devices are 409.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from labd.errors import InvalidArgumentError, LabDaemonException, utc_now_iso
from labd.ownership import acting_as
from labd.server.context import ServerContext, guard_device_code
from labd.server.encoding import dumps, dumps_lenient
from labd.server.fastparse import CALL_OPENAPI, call_body, path_id, remote_actor, timeout_query
from labd.server.models import (
    AddDeviceRequest,
    ConnectRequest,
    Ctx,
    DeviceIdPath,
    RemoteActor,
    TimeoutQuery,
)
from labd.server.routing import RouteSpec, json_bytes_response, json_response

__all__ = ["ROUTES"]

_RESERVED_PARAMS = frozenset({"device_id", "device_type"})


def _info_bytes(ctx: ServerContext, device_id: str) -> bytes:
    return dumps_lenient(ctx.daemon.device_info(device_id))


async def list_devices(ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """List every device: state, owner, errors and stream statistics."""
    body = await ctx.run(lambda: dumps_lenient({"devices": ctx.daemon.list_devices()}),
                         what="listing devices", timeout=timeout)
    return json_bytes_response(body)


async def get_device(device_id: DeviceIdPath, ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """One device's state (including ``unresponsive`` while a call is past its timeout)."""
    body = await ctx.run(lambda: _info_bytes(ctx, device_id),
                         what=f"reading device {device_id!r}", timeout=timeout)
    return json_bytes_response(body)


async def get_device_methods(device_id: DeviceIdPath, ctx: Ctx) -> Response:
    """Public methods of a device: name, query/command, parameters, doc."""
    return json_response({"methods": ctx.daemon.device_methods(device_id)})


async def add_device(
    body: AddDeviceRequest, ctx: Ctx, actor: RemoteActor, timeout: TimeoutQuery = None,
) -> Response:
    """Construct a device of a registered type (and connect it if asked)."""
    clash = sorted(_RESERVED_PARAMS & set(body.params))
    if clash:
        raise InvalidArgumentError(
            f"params must not contain {clash}: device_id and device_type are fields of the body.")
    daemon, device_id = ctx.daemon, body.device_id

    def job() -> bytes:
        with acting_as(actor):
            guard_device_code(lambda: daemon.add_device(device_id, body.device_type, **body.params),
                              device_id, f"{body.device_type}(...) constructor")
            if body.connect:
                daemon.connect_device(device_id)
        return _info_bytes(ctx, device_id)

    info = await ctx.run_for_device(device_id, job, what=f"adding device {device_id!r}",
                                    timeout=timeout)
    return json_bytes_response(info, status_code=201)


async def connect_device(
    device_id: DeviceIdPath, ctx: Ctx, actor: RemoteActor,
    body: ConnectRequest | None = None, timeout: TimeoutQuery = None,
) -> Response:
    """Call the device's ``connect()`` (optionally bounded by ``timeout`` in the body)."""
    bound = body.timeout if body is not None else None
    if timeout is None and bound is not None:
        timeout = max(ctx.timeout(None), bound + 1.0)  # let the daemon's own bound answer first

    def job() -> bytes:
        with acting_as(actor):
            ctx.daemon.connect_device(device_id, timeout=bound)
        return _info_bytes(ctx, device_id)

    info = await ctx.run_for_device(device_id, job, what=f"{device_id}.connect()", timeout=timeout)
    return json_bytes_response(info)


async def disconnect_device(
    device_id: DeviceIdPath, ctx: Ctx, actor: RemoteActor, timeout: TimeoutQuery = None,
) -> Response:
    """Call the device's ``disconnect()`` (stops its stream first). Idempotent."""

    def job() -> bytes:
        with acting_as(actor):
            ctx.daemon.disconnect_device(device_id)
        return _info_bytes(ctx, device_id)

    info = await ctx.run_for_device(device_id, job, what=f"{device_id}.disconnect()", timeout=timeout)
    return json_bytes_response(info)


async def call_device(request: Request) -> Response:
    """Call a public method as the remote caller: ``{"result": ..., "success": true}``.

    The hot path: parameters are read by :mod:`labd.server.fastparse`, not by FastAPI's
    dependency injection (documented through ``openapi_extra``).
    """
    ctx: ServerContext = request.app.state.labd
    device_id = path_id(request, "device_id")
    actor = remote_actor(request)
    timeout = timeout_query(request)
    body = call_body(await request.body())
    what = f"{device_id}.{body.method}()"

    def job() -> bytes:
        result: Any = guard_device_code(
            lambda: ctx.daemon.call_device(device_id, body.method, body.args, body.kwargs,
                                           actor=actor),
            device_id, what)
        return b'{"result":' + dumps(result, f"the result of {what}") + b',"success":true}'

    labels = ctx.known_method(device_id, body.method)
    try:
        payload = await ctx.run_for_device(device_id, job, what=what, timeout=timeout)
    except Exception as exc:
        outcome = type(exc).__name__ if isinstance(exc, LabDaemonException | TypeError) else "error"
        ctx.metrics.count_call(*labels, outcome)
        raise
    ctx.metrics.count_call(*labels, "ok")
    return json_bytes_response(payload)


async def get_device_error(device_id: DeviceIdPath, ctx: Ctx) -> Response:
    """The device's last error record, with its traceback, or null."""
    record = ctx.daemon.get_device_error(device_id)
    return json_response({"error": record.to_dict() if record is not None else None})


async def clear_device_error(device_id: DeviceIdPath, ctx: Ctx) -> Response:
    """Forget the device's last error."""
    ctx.daemon.clear_device_error(device_id)
    return Response(status_code=204)


async def stop_device_stream(
    device_id: DeviceIdPath, ctx: Ctx, actor: RemoteActor, timeout: TimeoutQuery = None,
) -> Response:
    """Stop the device's stream and end every subscription (SSE clients see the stream end)."""

    def job() -> None:
        with acting_as(actor):
            ctx.daemon.stop_streaming(device_id)

    await ctx.run_for_device(device_id, job, what=f"{device_id}.stop_streaming()", timeout=timeout)
    return json_response({"status": "stopped", "device_id": device_id, "timestamp": utc_now_iso()})


ROUTES = [
    RouteSpec("GET", "/devices", list_devices),
    RouteSpec("POST", "/devices", add_device, 201),
    RouteSpec("GET", "/devices/{device_id}", get_device),
    RouteSpec("GET", "/devices/{device_id}/methods", get_device_methods),
    RouteSpec("POST", "/devices/{device_id}/connect", connect_device),
    RouteSpec("POST", "/devices/{device_id}/disconnect", disconnect_device),
    RouteSpec("POST", "/devices/{device_id}/call", call_device, openapi_extra=CALL_OPENAPI),
    RouteSpec("GET", "/devices/{device_id}/error", get_device_error),
    RouteSpec("DELETE", "/devices/{device_id}/error", clear_device_error, 204),
    RouteSpec("POST", "/devices/{device_id}/stream/stop", stop_device_stream),
]
