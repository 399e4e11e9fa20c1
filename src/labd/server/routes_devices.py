"""``/devices``: list, inspect, add, connect, disconnect, call, errors, stream stop.

Everything that may run device code (constructors, ``connect``, methods, ``is_streaming`` in
the device info) runs on a worker thread via the context's offloader, as the remote actor,
so the core's ownership rules apply: queries always pass, commands to owned devices are 409.
An unknown device id is 404 before anything is offloaded.

The routes add what only the server knows: with tokens, commands through ``/call`` need the
``operator`` role (a viewer may call queries); a device's stream is started and stopped only
through the stream routes (never ``/call``), and stopping it is a command that obeys
ownership; stored tracebacks are shown to admins only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from labd.devices import DeviceSlot
from labd.errors import InvalidArgumentError, LabDaemonException, UnknownNameError, utc_now_iso
from labd.lab import answers
from labd.ownership import acting_as
from labd.server.auth import Token, current_token
from labd.server.context import ServerContext, guard_device_code
from labd.server.encoding import dumps, dumps_lenient
from labd.server.errors import Forbidden
from labd.server.fastparse import CALL_OPENAPI, call_body, path_id, remote_actor, timeout_query
from labd.server.models import (
    AddDeviceRequest,
    ConnectRequest,
    Ctx,
    DeviceIdPath,
    RemoteActor,
    ShowTracebacks,
    TimeoutQuery,
)
from labd.server.routes_lab import (
    act_on_other_node,
    add_on_other_node,
    ask_other_node,
    call_on_other_node,
    merge_devices,
)
from labd.server.routing import RouteSpec, json_bytes_response, json_response
from labd.signatures import signature_of

__all__ = ["ROUTES"]

_RESERVED_PARAMS = frozenset({"device_id", "device_type"})
# The server owns a device's stream: /call must not start one nobody can subscribe to, or
# stop one under its subscribers without the ownership check of the stop route.
_STREAM_CONTROL = frozenset({"start_streaming", "stop_streaming"})
_UNKNOWN_CALL = ("(unknown)", "(unknown)")


def _info_bytes(ctx: ServerContext, device_id: str) -> bytes:
    return dumps_lenient(ctx.daemon.device_info(device_id))


async def list_devices(ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """List every device: state, owner, errors and stream statistics.

    On a node of a lab, every live node's devices too, each with its ``node``.
    """
    body = await ctx.run(
        lambda: dumps_lenient({"devices": merge_devices(ctx, ctx.daemon.list_devices())}),
        what="listing devices", timeout=timeout)
    return json_bytes_response(body)


async def get_device(device_id: DeviceIdPath, ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """One device's state (including ``unresponsive`` while a call is past its timeout)."""
    try:
        ctx.daemon.device_slot(device_id)  # an unknown id is 404 before any work starts
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        return json_response(await ask_other_node(ctx, device_id, "info", timeout))  # routes_lab
    body = await ctx.run(lambda: _info_bytes(ctx, device_id),
                         what=f"reading device {device_id!r}", timeout=timeout)
    return json_bytes_response(body)


async def get_device_methods(device_id: DeviceIdPath, ctx: Ctx) -> Response:
    """Public methods of a device: name, query/command, parameters, doc."""
    try:
        methods = ctx.daemon.device_methods(device_id)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        methods = await ask_other_node(ctx, device_id, "methods", None)  # routes_lab
    return json_response({"methods": methods})


async def add_device(
    body: AddDeviceRequest, ctx: Ctx, actor: RemoteActor, timeout: TimeoutQuery = None,
) -> Response:
    """Construct a device of a registered type (and connect it if asked).

    On a node of a lab, ``node`` names the live node to add it to (this one if absent).
    """
    clash = sorted(_RESERVED_PARAMS & set(body.params))
    if clash:
        raise InvalidArgumentError(
            f"params must not contain {clash}: device_id and device_type are fields of the body.")
    lab = ctx.daemon.lab
    if body.node is not None and (lab is None or body.node != lab.name):
        # Another node's device type, checked there (routes_lab).
        added = await add_on_other_node(ctx, body, actor, timeout)
        return json_response(added, status_code=201)
    daemon, device_id = ctx.daemon, body.device_id
    params = answers.device_params(daemon, body.device_type, body.params)  # 422 before any work

    def job() -> bytes:
        with acting_as(actor):
            answers.add_device(daemon, device_id, body.device_type, params, body.connect)
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
    try:
        ctx.daemon.device_slot(device_id)  # an unknown id is 404 before any work starts
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        return json_response(  # another node's device (routes_lab)
            await act_on_other_node(ctx, device_id, "connect", actor, timeout, bound))

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
    try:
        ctx.daemon.device_slot(device_id)  # an unknown id is 404 before any work starts
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        return json_response(  # another node's device (routes_lab)
            await act_on_other_node(ctx, device_id, "disconnect", actor, timeout))

    def job() -> bytes:
        with acting_as(actor):
            ctx.daemon.disconnect_device(device_id)
        return _info_bytes(ctx, device_id)

    info = await ctx.run_for_device(device_id, job, what=f"{device_id}.disconnect()", timeout=timeout)
    return json_bytes_response(info)


def _prepared_call(
    ctx: ServerContext, slot: DeviceSlot, method: str, args: list[Any], kwargs: dict[str, Any],
    actor: Any,
) -> Callable[[], Any]:
    """The call to run on a worker, its arguments checked and converted here, on the loop.

    Arguments that do not fit the method's annotations are 422 before the device lock is
    taken. Validation binds them to the signature, so the call needs no second check. A name
    without a signature (unknown, private, a builtin) goes through the daemon's own checks,
    which say why it cannot be called (404/400).
    """
    original = slot.originals.get(method)
    signature = signature_of(original) if original is not None else None
    if signature is None:
        device_id = slot.device_id
        return lambda: ctx.daemon.call_device(device_id, method, args, kwargs, actor=actor)
    args, kwargs = signature.validate(args, kwargs, f"{slot.device_id}.{method}()")

    def call() -> Any:
        with acting_as(actor):
            return getattr(slot.instance, method)(*args, **kwargs)  # the locking wrapper

    return call


def _check_callable(slot: DeviceSlot, method: str, token: Token | None) -> None:
    """Refuse stream control through ``/call`` (400), and commands from a viewer (403)."""
    device_id = slot.device_id
    if method in _STREAM_CONTROL:
        refused = InvalidArgumentError(
            f"{device_id}.{method}() cannot be called through POST /devices/{{id}}/call: the "
            f"server runs the device's stream. Subscribe with GET /stream/devices/{device_id} "
            f"(it starts the stream) and stop it with POST /devices/{device_id}/stream/stop.")
        refused.labd_context = {  # type: ignore[attr-defined]
            "device_id": device_id, "method": method,
            "use": [f"GET /stream/devices/{device_id}", f"POST /devices/{device_id}/stream/stop"]}
        raise refused
    if token is None or slot.kinds.get(method) != "command" or token.allows("operator"):
        return
    error = Forbidden(
        f"{device_id}.{method}() is a command and needs the 'operator' role; the token of user "
        f"{token.user!r} has {token.role!r}, which may call query methods only. Ask the lab's "
        "admin for an operator token.")
    # The context every 403 for a role carries (auth.Token.require); the message names the method.
    error.labd_context = {  # type: ignore[attr-defined]
        "required_role": "operator", "role": token.role, "user": token.user}
    raise error


async def call_device(request: Request) -> Response:
    """Call a public method as the remote caller: ``{"result": ..., "success": true}``.

    The hot path: parameters are read by :mod:`labd.server.fastparse`, not by FastAPI's
    dependency injection (documented through ``openapi_extra``). With tokens a viewer may
    call query methods; commands need operator. ``start_streaming``/``stop_streaming`` are
    never callable here (use the stream routes).
    """
    ctx: ServerContext = request.app.state.labd
    device_id = path_id(request, "device_id")
    actor = remote_actor(request)
    timeout = timeout_query(request, ctx.settings.max_request_timeout)
    body = call_body(await request.body())
    method = body.method
    what = f"{device_id}.{method}()"
    labels = _UNKNOWN_CALL  # metric labels: real names only, so bad input cannot add series
    try:
        # On the loop, before any work is offloaded: an unknown id is 404 (not 504), and
        # arguments that do not fit the annotations are 422 before the device lock is taken.
        try:
            slot = ctx.daemon.device_slot(device_id)
        except UnknownNameError:
            if ctx.daemon.lab is None:
                raise
            # A lab node: another node may serve the device (routes_lab; 404 if none does).
            return json_bytes_response(await call_on_other_node(
                ctx, device_id, method, body.args, body.kwargs, actor, current_token(request),
                timeout))
        labels = (device_id, method if method in slot.originals else "(unknown)")
        _check_callable(slot, method, current_token(request))
        call = _prepared_call(ctx, slot, method, body.args, body.kwargs, actor)

        def job() -> bytes:
            result: Any = guard_device_code(call, device_id, what)
            return b'{"result":' + dumps(result, f"the result of {what}") + b',"success":true}'

        payload = await ctx.run_for_device(device_id, job, what=what, timeout=timeout)
    except Exception as exc:
        outcome = type(exc).__name__ if isinstance(exc, LabDaemonException | TypeError) else "error"
        ctx.metrics.count_call(*labels, outcome)
        raise
    ctx.metrics.count_call(*labels, "ok")
    return json_bytes_response(payload)


async def get_device_error(
    device_id: DeviceIdPath, ctx: Ctx, show_tracebacks: ShowTracebacks,
) -> Response:
    """The device's last error record, or null; its traceback for admins (or without tokens)."""
    try:
        record = ctx.daemon.get_device_error(device_id)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        error = await ask_other_node(ctx, device_id, "device_error", None,  # routes_lab
                                     tracebacks=show_tracebacks)
        return json_response({"error": error})
    return json_response(
        {"error": record.to_dict(include_traceback=show_tracebacks) if record is not None else None})


async def clear_device_error(device_id: DeviceIdPath, ctx: Ctx) -> Response:
    """Forget the device's last error. A JSON answer: LabDaemon's ServerAPI parses every one."""
    try:
        ctx.daemon.clear_device_error(device_id)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        await ask_other_node(ctx, device_id, "device_error", None, clear=True)  # routes_lab
    return json_response({"status": "cleared", "device_id": device_id})


async def stop_device_stream(
    device_id: DeviceIdPath, ctx: Ctx, actor: RemoteActor, timeout: TimeoutQuery = None,
) -> Response:
    """Stop the device's stream and end every subscription (SSE clients see the stream end).

    A command: while someone else owns the device (a lease, a task) the answer is 409.
    """
    try:
        slot = ctx.daemon.device_slot(device_id)  # an unknown id is 404 before any work starts
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        await act_on_other_node(ctx, device_id, "stop_streaming", actor, timeout)  # routes_lab
        return json_response({"status": "stopped", "device_id": device_id,
                              "timestamp": utc_now_iso()})

    def job() -> None:
        with acting_as(actor):
            slot.check_command("stop_streaming")  # the ownership check a command's wrapper makes
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
    RouteSpec("DELETE", "/devices/{device_id}/error", clear_device_error),
    RouteSpec("POST", "/devices/{device_id}/stream/stop", stop_device_stream),
]
