"""``/tasks``: list, inspect, start, cancel, pause, resume, parameters and errors of task runs.

Starting a run constructs the user's task class, so it runs on a worker thread as the remote
actor (the run's ``owner`` is the X-Labd-Owner principal). Cancel, pause and resume only flip
events in the core and answer on the loop. An unknown run id is 404 before anything is
offloaded.

With tokens a run belongs to the user who started it: only that user or an admin may cancel,
pause, resume or set parameters of it (403 naming the owner). A run nobody owns (started by a
script in the daemon's process) is anyone's, as a device nobody owns takes anyone's commands.
Stored tracebacks are shown to admins only. Without tokens nothing is checked (one PC).

On a node of a lab a run another node started is reached through the engine (routes_lab):
its node answers as its own routes would (:mod:`labd.lab.answers`) and checks the owner rule
against the caller's user (and whether an admin) sent along, so every node answers the same.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from starlette.responses import Response

from labd.errors import InvalidArgumentError, LabDaemonException, UnknownNameError
from labd.lab import answers
from labd.ownership import acting_as
from labd.server.auth import Caller, Token
from labd.server.context import ServerContext
from labd.server.encoding import dumps, dumps_lenient
from labd.server.errors import Forbidden
from labd.server.models import (
    Ctx,
    ParameterRequest,
    RemoteActor,
    ShowTracebacks,
    TaskIdPath,
    TaskRequest,
    TimeoutQuery,
)
from labd.server.routes_lab import run_request_on_other_node, task_on_other_node
from labd.server.routing import RouteSpec, json_bytes_response, json_response
from labd.signatures import constructor_signature
from labd.tasks import TaskHandle

__all__ = ["ROUTES"]

_RESERVED_PARAMS = frozenset({"task_id", "task_type", "wait_for_devices"})
ParameterKey = Annotated[str, Path(min_length=1, max_length=256)]


def _task_info(handle: TaskHandle) -> dict[str, Any]:
    info = handle.info()
    info["result"] = handle.result
    return info


def _identity(caller: Token | None) -> dict[str, Any] | None:
    """Who acts, as a run's node checks it (:func:`labd.lab.answers.may_act_on`)."""
    return None if caller is None else {"user": caller.user, "admin": caller.allows("admin")}


def _owned_run(ctx: ServerContext, task_id: str, caller: Token | None, action: str) -> TaskHandle:
    """The run (404 if unknown), if ``caller`` may ``action`` it; else 403 naming its owner."""
    handle = ctx.daemon.get_task(task_id)
    if caller is None or caller.allows("admin"):  # no need to build the run's info
        return handle
    owner = handle.info()["owner"]
    if not answers.may_act_on(owner, _identity(caller)):
        raise _refusal(task_id, owner, caller, action)
    return handle


def _refusal(task_id: str, owner: str, caller: Token, action: str) -> Forbidden:
    """The 403 for ``caller``, who may not ``action`` a run of ``owner``, on any node."""
    error = Forbidden(
        f"Run {task_id!r} belongs to {owner!r}: only {owner!r} or an admin may {action} it, "
        f"and the token of user {caller.user!r} has {caller.role!r}. Ask {owner!r} or an admin.")
    error.labd_context = {  # type: ignore[attr-defined]
        "task_id": task_id, "owner": owner, "user": caller.user, "role": caller.role,
        "required_role": "admin"}
    return error


async def _on_other_node(
    ctx: ServerContext, task_id: str, request: dict[str, Any], timeout: float | None = None,
    *, caller: Token | None = None, action: str | None = None,
) -> Any:
    """``request`` about a run another node started, answered there (404 if none did).

    ``action``: a request only the run's owner or an admin may make (``caller`` is who asks);
    that node decides, and its refusal is the same 403 as a refusal here.
    """
    if action is not None:
        request = {**request, "caller": _identity(caller)}
    answer = await run_request_on_other_node(ctx, task_id, request, timeout)
    if action is not None and isinstance(answer, dict) and "refused_owner" in answer:
        assert caller is not None  # a run's node refuses only a caller it was told of
        raise _refusal(task_id, answer["refused_owner"], caller, action)
    return answer


async def list_tasks(ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """Live and retained task runs, oldest first, with their results (on a node of a lab,
    every live node's, each with its ``node``)."""

    def job() -> bytes:
        lab = ctx.daemon.lab
        if lab is not None:
            return dumps_lenient({"tasks": lab.tasks()})
        handles = ctx.daemon.task_handles()
        return dumps_lenient({"tasks": [{**h.info(), "result": h.result} for h in handles]})

    return json_bytes_response(await ctx.run(job, what="listing tasks", timeout=timeout))


async def get_task(task_id: TaskIdPath, ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """One run: status, progress, parameters, error and result."""
    try:
        handle = ctx.daemon.get_task(task_id)  # an unknown id is 404 before any work starts
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        # A lab node: another node may have started it (routes_lab; 404 if none did).
        return json_response(await task_on_other_node(ctx, task_id, timeout))
    body = await ctx.run(lambda: dumps_lenient(_task_info(handle)),
                         what=f"reading task {task_id!r}", timeout=timeout)
    return json_bytes_response(body)


def _validated_params(cls: Any, body: TaskRequest) -> dict[str, Any]:
    """``body.params`` checked and converted against the task's constructor annotations (422)."""
    signature = constructor_signature(cls, {"task_id"}) if isinstance(cls, type) else None
    if signature is None:
        return body.params
    _, params = signature.validate((), body.params, f"task type {body.task_type!r}")
    return params


def _start(ctx: ServerContext, body: TaskRequest, params: dict[str, Any]) -> dict[str, Any]:
    try:
        handle = ctx.daemon.execute_task(
            body.task_id, body.task_type, wait_for_devices=body.wait_for_devices, **params)
    except LabDaemonException:
        raise
    except Exception as exc:  # raised by the task class's constructor
        raise InvalidArgumentError(
            f"Task type {body.task_type!r} could not be created with parameters "
            f"{sorted(body.params)}: {type(exc).__name__}: {exc}"
        ) from exc
    return {"task_id": handle.task_id, "task_type": handle.task_type,
            "device_ids": handle.device_ids, "status": handle.status}


async def start_task(
    body: TaskRequest, ctx: Ctx, actor: RemoteActor, timeout: TimeoutQuery = None,
) -> Response:
    """Start a run; it claims its devices first (409 naming each busy one, or queues)."""
    clash = sorted(_RESERVED_PARAMS & set(body.params))
    if clash:
        raise InvalidArgumentError(
            f"params must not contain {clash}: those are fields of the request body itself.")
    # Before any run exists: a parameter that does not fit the annotations is 422, no run.
    params = _validated_params(ctx.daemon.task_class(body.task_type), body)

    def job() -> dict[str, Any]:
        with acting_as(actor):
            return _start(ctx, body, params)

    started = await ctx.run(job, what=f"starting a {body.task_type} task", timeout=timeout)
    return json_response(started, status_code=201)


async def get_task_error(
    task_id: TaskIdPath, ctx: Ctx, show_tracebacks: ShowTracebacks,
) -> Response:
    """The run's error record, or null; its traceback for admins (or without tokens)."""
    try:
        record = ctx.daemon.get_task_error(task_id)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        error = await _on_other_node(ctx, task_id, {"op": "task_error", "tracebacks": show_tracebacks})
        return json_response({"error": error})
    return json_response(
        {"error": record.to_dict(include_traceback=show_tracebacks) if record is not None else None})


async def clear_task_error(task_id: TaskIdPath, ctx: Ctx) -> Response:
    """Forget the run's error record. A JSON answer: LabDaemon's ServerAPI parses every one."""
    try:
        ctx.daemon.clear_task_error(task_id)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        await _on_other_node(ctx, task_id, {"op": "task_error", "clear": True})
    return json_response({"status": "cleared", "task_id": task_id})


async def _control_run(
    ctx: ServerContext, task_id: str, caller: Token | None, action: str, status: str,
) -> Response:
    """``handle.<action>()`` for the run's owner or an admin; another node's run on a lab node."""
    try:
        handle = _owned_run(ctx, task_id, caller, action)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        await _on_other_node(ctx, task_id, {"op": "task_control", "action": action},
                             caller=caller, action=action)
    else:
        getattr(handle, action)()
    return json_response({"status": status, "task_id": task_id})


async def cancel_task(task_id: TaskIdPath, ctx: Ctx, caller: Caller) -> Response:
    """Ask the run to stop (a pending run never starts). With tokens: its owner or an admin."""
    return await _control_run(ctx, task_id, caller, "cancel", "cancellation_requested")


async def pause_task(task_id: TaskIdPath, ctx: Ctx, caller: Caller) -> Response:
    """Close the run's pause gate; it blocks at its next checkpoint. Owner or admin."""
    return await _control_run(ctx, task_id, caller, "pause", "paused")


async def resume_task(task_id: TaskIdPath, ctx: Ctx, caller: Caller) -> Response:
    """Open the run's pause gate again. Owner or admin."""
    return await _control_run(ctx, task_id, caller, "resume", "resumed")


async def set_task_parameter(
    task_id: TaskIdPath, body: ParameterRequest, ctx: Ctx, actor: RemoteActor, caller: Caller,
    timeout: TimeoutQuery = None,
) -> Response:
    """Call the run's ``set_parameter(key, value)`` (409 TaskError if it has none). Owner or admin."""
    answer = {"status": "parameter_set", "key": body.key, "value": body.value}
    action = "set parameters of"
    try:
        handle = _owned_run(ctx, task_id, caller, action)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        await _on_other_node(ctx, task_id, {  # another node's run: checked there
            "op": "set_parameter", "key": body.key, "value": body.value,
            "principal": actor.principal}, timeout, caller=caller, action=action)
        return json_response(answer)
    await ctx.run(lambda: answers.set_task_parameter(handle, body.key, body.value, actor),
                  what=f"setting parameter {body.key!r} of task {task_id!r}", timeout=timeout)
    return json_response(answer)


async def get_task_parameter(
    task_id: TaskIdPath, key: ParameterKey, ctx: Ctx, actor: RemoteActor,
    timeout: TimeoutQuery = None,
) -> Response:
    """Call the run's ``get_parameter(key)`` (409 TaskError if it has none)."""
    try:
        handle = ctx.daemon.get_task(task_id)  # an unknown id is 404 before any work starts
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        return json_response(await _on_other_node(  # another node's run; redacted there
            ctx, task_id, {"op": "get_parameter", "key": key, "principal": actor.principal},
            timeout))

    def job() -> bytes:
        value = answers.read_task_parameter(handle, key, actor)
        return dumps({"key": key, "value": value}, f"parameter {key!r} of task {task_id!r}")

    body = await ctx.run(job, what=f"reading parameter {key!r} of task {task_id!r}", timeout=timeout)
    return json_bytes_response(body)


ROUTES = [
    RouteSpec("GET", "/tasks", list_tasks),
    RouteSpec("POST", "/tasks", start_task, 201),
    RouteSpec("GET", "/tasks/{task_id}", get_task),
    RouteSpec("GET", "/tasks/{task_id}/error", get_task_error),
    RouteSpec("DELETE", "/tasks/{task_id}/error", clear_task_error),
    RouteSpec("POST", "/tasks/{task_id}/cancel", cancel_task),
    RouteSpec("POST", "/tasks/{task_id}/pause", pause_task),
    RouteSpec("POST", "/tasks/{task_id}/resume", resume_task),
    RouteSpec("POST", "/tasks/{task_id}/parameters", set_task_parameter),
    RouteSpec("GET", "/tasks/{task_id}/parameters/{key}", get_task_parameter),
]
