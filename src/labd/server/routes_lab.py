"""A lab of several nodes over HTTP: ``/lab/nodes``, ``/lab/devices``, and other nodes' devices.

On a node of a lab (``labd serve --engine ... --node NAME``) ``GET /devices`` also lists the
devices of every other live node, each with its ``node``; ``POST /devices/{id}/call`` on a
device another node serves goes through the engine (:mod:`labd.lab`), with the same role
rules as a local call; ``/health`` carries the lab's part (``degraded`` naming the engine
while it is unreachable). Without an engine none of this runs.
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
from labd.server.models import Ctx, TimeoutQuery
from labd.server.routing import RouteSpec, json_bytes_response, json_response
from labd.streaming import StreamHub

__all__ = [
    "ROUTES",
    "act_on_other_node",
    "ask_other_node",
    "call_on_other_node",
    "control_on_other_node",
    "lab_health",
    "merge_devices",
    "run_on_other_node",
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
    seconds = max(ctx.timeout(timeout) - _REPLY_MARGIN_S, 0.01)
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


async def ask_other_node(
    ctx: ServerContext, device_id: str, op: str, timeout: float | None,
) -> Any:
    """A device's ``info`` (with its ``node``) or ``methods`` from the node that serves it.

    Raises :class:`UnknownDeviceError` (404) if no live node serves ``device_id``.
    """
    node = lab_of(ctx)
    if node is None or not node.knows(device_id):
        raise UnknownDeviceError(
            f"No device found with ID: '{device_id}' on this node or any live node of the lab.")
    seconds = max(ctx.timeout(timeout) - _REPLY_MARGIN_S, 0.01)
    answer = await ctx.run(lambda: node.ask(device_id, op, seconds),
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
    seconds = max(ctx.timeout(timeout) - _REPLY_MARGIN_S, 0.01)
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


async def control_on_other_node(
    ctx: ServerContext, task_id: str, caller: Token | None, action: str,
) -> None:
    """``POST /tasks/{id}/cancel|pause|resume`` of a run another node started: its owner or
    an admin."""
    node = lab_of(ctx)
    if node is None:
        raise UnknownTaskError(f"No task run with id {task_id!r}.")
    home, info = await ctx.run(lambda: node.find_run(task_id), what=f"finding run {task_id!r}")
    owner = info.get("owner")
    if caller is not None and not caller.allows("admin") and owner not in (None, caller.user):
        raise Forbidden(
            f"Run {task_id!r} (node {home!r}) belongs to {owner!r}: only {owner!r} or an admin "
            f"may {action} it, and the token of user {caller.user!r} has {caller.role!r}.")
    await ctx.run(lambda: node.control_run(home, task_id, action),
                  what=f"{action} run {task_id!r} on node {home!r}")


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
