"""A lab of several nodes over HTTP: ``/lab/nodes``, ``/lab/devices``, and other nodes' devices.

On a node of a lab (``labd serve --engine ... --node NAME``) ``GET /devices`` also lists the
devices of every other live node, each with its ``node``; ``POST /devices/{id}/call`` on a
device another node serves goes through the engine (:mod:`labd.lab`), with the same role
rules as a local call; ``/health`` carries the lab's part (``degraded`` naming the engine
while it is unreachable). A run another node started, another node's error records and
history, and ``POST /devices`` naming another ``node`` go to that node the same way, which
answers as its own routes would (:mod:`labd.lab.answers`). Without an engine none of this runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from labd.errors import InvalidArgumentError, UnknownDeviceError, UnknownTaskError
from labd.lab import LabNode, RemoteRun
from labd.lab.errors import QueriesOnlyError
from labd.ownership import Actor
from labd.server.auth import Token
from labd.server.context import ServerContext
from labd.server.encoding import dumps, dumps_lenient
from labd.server.errors import Forbidden
from labd.server.models import AddDeviceRequest, Ctx, TimeoutQuery
from labd.server.routing import RouteSpec, json_bytes_response, json_response
from labd.streaming import StreamHub

__all__ = [
    "ROUTES",
    "act_on_other_node",
    "add_on_other_node",
    "ask_other_node",
    "call_on_other_node",
    "lab_health",
    "merge_devices",
    "run_on_other_node",
    "run_request_on_other_node",
    "task_on_other_node",
]

_STREAM_CONTROL = frozenset({"start_streaming", "stop_streaming"})
#: Margin left of the request timeout for the reply to travel back.
_REPLY_MARGIN_S = 0.05


def lab_of(ctx: ServerContext) -> LabNode | None:
    """The lab node of the server's daemon, or None without an engine."""
    node = ctx.daemon.lab
    return node if isinstance(node, LabNode) else None


def merge_devices(ctx: ServerContext, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``devices`` (this node's) with ``node``, then every other live node's devices."""
    node = lab_of(ctx)
    if node is None:
        return devices
    here = [{**device, "node": node.name} for device in devices]
    return here + node.remote_devices()


def lab_health(ctx: ServerContext) -> dict[str, Any] | None:
    """The ``lab`` part of ``/health`` (None without an engine)."""
    node = lab_of(ctx)
    return node.health() if node is not None else None


async def call_on_other_node(
    ctx: ServerContext, device_id: str, method: str, args: list[Any], kwargs: dict[str, Any],
    actor: Actor, token: Token | None, timeout: float | None,
) -> bytes:
    """``POST /devices/{id}/call`` for a device another node serves: the call's JSON answer.

    Raises :class:`UnknownDeviceError` (404) if no live node serves ``device_id``.
    """
    node = lab_of(ctx)
    if node is None or not node.knows(device_id):
        raise UnknownDeviceError(
            f"No device found with ID: '{device_id}' on this node or any live node of the lab.")
    if method in _STREAM_CONTROL:
        raise InvalidArgumentError(
            f"{device_id}.{method}() cannot be called through POST /devices/{{id}}/call: the "
            "server runs the device's stream.")
    # Only the device's node knows query from command: a viewer's call goes marked, and a
    # command comes back refused (403, as a local /call answers).
    queries_only = token is not None and not token.allows("operator")
    seconds = _seconds(ctx, timeout)
    what = f"{device_id}.{method}() on node {node.node_of(device_id)!r}"

    async def slow(job: Callable[[], bytes]) -> bytes:  # a slow or large reply
        return await ctx.run(job, what=what, timeout=timeout)

    def answer(result: Any) -> bytes:
        return b'{"result":' + dumps(result, f"the result of {what}") + b',"success":true}'

    try:
        # On the loop: the request and a prompt reply cost no thread hand-off (labd.lab.calls).
        return await node.call_async(device_id, method, args, kwargs, actor, seconds, slow,
                                     answer, queries_only=queries_only)
    except QueriesOnlyError as exc:
        assert token is not None
        refused = Forbidden(f"{exc} The token of user {token.user!r} has {token.role!r}. Ask "
                            "the lab's admin for an operator token.")
        refused.labd_context = {  # type: ignore[attr-defined]
            "required_role": "operator", "role": token.role, "user": token.user}
        raise refused from None


def _seconds(ctx: ServerContext, timeout: float | None) -> float:
    """How long a request to another node may wait: the request's timeout, less the reply's way."""
    return max(ctx.timeout(timeout) - _REPLY_MARGIN_S, 0.01)


async def ask_other_node(
    ctx: ServerContext, device_id: str, op: str, timeout: float | None, **fields: Any,
) -> Any:
    """A device's ``info`` (with its ``node``), ``methods``, ``device_error`` or
    ``device_errors`` from the node that serves it (``fields`` go with the request).

    Raises :class:`UnknownDeviceError` (404) if no live node serves ``device_id``.
    """
    node = lab_of(ctx)
    if node is None or not node.knows(device_id):
        raise UnknownDeviceError(
            f"No device found with ID: '{device_id}' on this node or any live node of the lab.")
    seconds = _seconds(ctx, timeout)
    answer = await ctx.run(lambda: node.ask(device_id, op, seconds, **fields),
                           what=f"asking node {node.node_of(device_id)!r} about {device_id!r}",
                           timeout=timeout)
    if op == "info" and isinstance(answer, dict):
        answer = {**answer, "node": node.node_of(device_id)}
    return answer


async def act_on_other_node(
    ctx: ServerContext, device_id: str, action: str, actor: Actor, timeout: float | None,
    bound: float | None = None,
) -> dict[str, Any]:
    """Connect, disconnect or stop the stream of a device another node serves (404 if none)."""
    node = lab_of(ctx)
    if node is None or not node.knows(device_id):
        raise UnknownDeviceError(
            f"No device found with ID: '{device_id}' on this node or any live node of the lab.")
    seconds = _seconds(ctx, timeout)
    return await ctx.run(lambda: node.act(device_id, action, actor, seconds, bound),
                         what=f"{device_id}.{action}() on node {node.node_of(device_id)!r}",
                         timeout=timeout)


async def task_on_other_node(
    ctx: ServerContext, task_id: str, timeout: float | None,
) -> dict[str, Any]:
    """``GET /tasks/{id}`` of a run another node started (with its ``node``); 404 if none has it."""
    node = lab_of(ctx)
    if node is None:
        raise UnknownTaskError(f"No task run with id {task_id!r}.")
    _, info = await ctx.run(lambda: node.find_run(task_id), what=f"finding run {task_id!r}",
                            timeout=timeout)
    return info


async def run_on_other_node(ctx: ServerContext, task_id: str) -> tuple[RemoteRun, StreamHub]:
    """``/stream/tasks/{id}`` of a run another node started: the run, and this node's hub of
    its relayed stream; 404 if no live node has it."""
    node = lab_of(ctx)
    if node is None:
        raise UnknownTaskError(f"No task run with id {task_id!r}.")
    return await ctx.run(lambda: node.run_stream(task_id), what=f"following run {task_id!r}")


async def run_request_on_other_node(
    ctx: ServerContext, task_id: str, request: dict[str, Any], timeout: float | None,
) -> Any:
    """The answer of the node that started run ``task_id`` to ``request`` (an op of
    :data:`labd.lab.answers.ANSWERS`); 404 if no live node has the run."""
    node = lab_of(ctx)
    if node is None:
        raise UnknownTaskError(f"No task run with id {task_id!r}.")
    seconds = _seconds(ctx, timeout)
    return await ctx.run(lambda: node.ask_run(task_id, request, seconds),
                         what=f"{request.get('op')} of run {task_id!r} on another node",
                         timeout=timeout)


async def add_on_other_node(
    ctx: ServerContext, body: AddDeviceRequest, actor: Actor, timeout: float | None,
) -> dict[str, Any]:
    """``POST /devices`` naming another ``node``: add the device there (its info, with its
    ``node``); 404 naming the live nodes if ``node`` is not one, 400 on a server without a lab."""
    node, target = lab_of(ctx), str(body.node)
    if node is None:
        raise InvalidArgumentError(
            f"node={target!r}: this server is not a node of a lab (it was started without an "
            "engine), so it adds devices to itself only; leave out node.")
    seconds = _seconds(ctx, timeout)
    return await ctx.run(
        lambda: node.add_device(target, body.device_id, body.device_type, body.params,
                                body.connect, actor, seconds),
        what=f"adding device {body.device_id!r} on node {target!r}", timeout=timeout)


async def lab_nodes(ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """Every live node of the lab: name, version, last heartbeat, URL and its devices."""
    node = lab_of(ctx)
    if node is None:
        return json_response({"lab": None, "nodes": []})
    nodes = await ctx.run(node.nodes, what="reading the lab's directory", timeout=timeout)
    return json_bytes_response(dumps_lenient({
        "lab": node.health(),
        "nodes": [{**info, "node": name} for name, info in sorted(nodes.items())]}))


async def lab_devices(ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """Every device of every live node, with its ``node`` (this node's in full)."""
    body = await ctx.run(
        lambda: dumps_lenient({"devices": merge_devices(ctx, ctx.daemon.list_devices())}),
        what="listing the lab's devices", timeout=timeout)
    return json_bytes_response(body)


ROUTES = [
    RouteSpec("GET", "/lab/nodes", lab_nodes),
    RouteSpec("GET", "/lab/devices", lab_devices),
]
