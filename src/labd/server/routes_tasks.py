"""``/tasks``: list, inspect, start, cancel, pause, resume, parameters and errors of task runs.

Starting a run constructs the user's task class, so it runs on a worker thread as the remote
actor (the run's ``owner`` is the X-Labd-Owner principal). Cancel, pause and resume only flip
events in the core and answer on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Path
from starlette.responses import Response

from labd.errors import InvalidArgumentError, LabDaemonException
from labd.ownership import acting_as
from labd.server.context import ServerContext
from labd.server.encoding import dumps, dumps_lenient
from labd.server.models import (
    Ctx,
    ParameterRequest,
    RemoteActor,
    TaskIdPath,
    TaskRequest,
    TimeoutQuery,
)
from labd.server.routing import RouteSpec, json_bytes_response, json_response

__all__ = ["ROUTES"]

_RESERVED_PARAMS = frozenset({"task_id", "task_type", "wait_for_devices"})
T = TypeVar("T")
ParameterKey = Annotated[str, Path(min_length=1, max_length=256)]


def _guard_task_code(fn: Callable[[], T], failure: str) -> T:
    # The task's own set_parameter/get_parameter refusing a value is bad input (400).
    try:
        return fn()
    except LabDaemonException:
        raise
    except Exception as exc:
        raise InvalidArgumentError(f"{failure}: {type(exc).__name__}: {exc}") from exc


def _task_info(ctx: ServerContext, task_id: str) -> dict[str, Any]:
    handle = ctx.daemon.get_task(task_id)
    info = handle.info()
    info["result"] = handle.result
    return info


async def list_tasks(ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """Live and retained task runs, oldest first, with their results."""

    def job() -> bytes:
        handles = ctx.daemon.task_handles()
        return dumps_lenient({"tasks": [{**h.info(), "result": h.result} for h in handles]})

    return json_bytes_response(await ctx.run(job, what="listing tasks", timeout=timeout))


async def get_task(task_id: TaskIdPath, ctx: Ctx, timeout: TimeoutQuery = None) -> Response:
    """One run: status, progress, parameters, error and result."""
    body = await ctx.run(lambda: dumps_lenient(_task_info(ctx, task_id)),
                         what=f"reading task {task_id!r}", timeout=timeout)
    return json_bytes_response(body)


def _start(ctx: ServerContext, body: TaskRequest) -> dict[str, Any]:
    try:
        handle = ctx.daemon.execute_task(
            body.task_id, body.task_type, wait_for_devices=body.wait_for_devices, **body.params)
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

    def job() -> dict[str, Any]:
        with acting_as(actor):
            return _start(ctx, body)

    started = await ctx.run(job, what=f"starting a {body.task_type} task", timeout=timeout)
    return json_response(started, status_code=201)


async def get_task_error(task_id: TaskIdPath, ctx: Ctx) -> Response:
    """The run's error record, with its traceback, or null."""
    record = ctx.daemon.get_task_error(task_id)
    return json_response({"error": record.to_dict() if record is not None else None})


async def clear_task_error(task_id: TaskIdPath, ctx: Ctx) -> Response:
    """Forget the run's error record."""
    ctx.daemon.clear_task_error(task_id)
    return Response(status_code=204)


async def cancel_task(task_id: TaskIdPath, ctx: Ctx) -> Response:
    """Ask the run to stop (a pending run never starts)."""
    ctx.daemon.get_task(task_id).cancel()
    return json_response({"status": "cancellation_requested", "task_id": task_id})


async def pause_task(task_id: TaskIdPath, ctx: Ctx) -> Response:
    """Close the run's pause gate; it blocks at its next checkpoint."""
    ctx.daemon.get_task(task_id).pause()
    return json_response({"status": "paused", "task_id": task_id})


async def resume_task(task_id: TaskIdPath, ctx: Ctx) -> Response:
    """Open the run's pause gate again."""
    ctx.daemon.get_task(task_id).resume()
    return json_response({"status": "resumed", "task_id": task_id})


async def set_task_parameter(
    task_id: TaskIdPath, body: ParameterRequest, ctx: Ctx, actor: RemoteActor,
    timeout: TimeoutQuery = None,
) -> Response:
    """Call the run's ``set_parameter(key, value)`` (409 TaskError if it has none)."""

    def job() -> None:
        handle = ctx.daemon.get_task(task_id)
        with acting_as(actor):
            _guard_task_code(lambda: handle.set_parameter(body.key, body.value),
                             f"Task {task_id!r} rejected parameter {body.key!r}")

    await ctx.run(job, what=f"setting parameter {body.key!r} of task {task_id!r}", timeout=timeout)
    return json_response({"status": "parameter_set", "key": body.key, "value": body.value})


async def get_task_parameter(
    task_id: TaskIdPath, key: ParameterKey, ctx: Ctx, actor: RemoteActor,
    timeout: TimeoutQuery = None,
) -> Response:
    """Call the run's ``get_parameter(key)`` (409 TaskError if it has none)."""

    def job() -> bytes:
        handle = ctx.daemon.get_task(task_id)
        with acting_as(actor):
            value = _guard_task_code(lambda: handle.get_parameter(key),
                                     f"Task {task_id!r} could not read parameter {key!r}")
        return dumps({"key": key, "value": value}, f"parameter {key!r} of task {task_id!r}")

    body = await ctx.run(job, what=f"reading parameter {key!r} of task {task_id!r}", timeout=timeout)
    return json_bytes_response(body)


ROUTES = [
    RouteSpec("GET", "/tasks", list_tasks),
    RouteSpec("POST", "/tasks", start_task, 201),
    RouteSpec("GET", "/tasks/{task_id}", get_task),
    RouteSpec("GET", "/tasks/{task_id}/error", get_task_error),
    RouteSpec("DELETE", "/tasks/{task_id}/error", clear_task_error, 204),
    RouteSpec("POST", "/tasks/{task_id}/cancel", cancel_task),
    RouteSpec("POST", "/tasks/{task_id}/pause", pause_task),
    RouteSpec("POST", "/tasks/{task_id}/resume", resume_task),
    RouteSpec("POST", "/tasks/{task_id}/parameters", set_task_parameter),
    RouteSpec("GET", "/tasks/{task_id}/parameters/{key}", get_task_parameter),
]
