"""``/runs`` and ``/devices/{id}/errors/history``: the run history, read from the run store.

With a run store (``LabDaemon(store=...)``) these endpoints read the SQLite history, which
outlives restarts; without one they serve the runs the daemon still retains in memory. Every
read runs on a worker thread (a large history or a prune in progress must never stall the
event loop), and the answer is encoded there too. NumPy arrays that the store keeps in side
files come back as lists. Stored tracebacks are shown to admins only (with tokens; without
tokens, to everyone): for others ``traceback`` is null, as in immediate error answers.

On a node of a lab ``GET /runs`` merges every live node's history; a run or a device this node
does not have is read from the live node that has it (:mod:`labd.lab.answers`, the same reads).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query
from starlette.responses import Response

from labd.errors import InvalidArgumentError, UnknownTaskError
from labd.lab.answers import device_error_history, run_record
from labd.server.context import ServerContext
from labd.server.encoding import dumps_lenient
from labd.server.models import Ctx, DeviceIdPath, ShowTracebacks, TaskIdPath, hide_tracebacks
from labd.server.routes_lab import ask_other_node
from labd.server.routing import RouteSpec, json_bytes_response
from labd.tasks import TaskState

__all__ = ["MAX_PAGE", "ROUTES", "parse_since"]

#: Largest ``limit`` of one page of ``GET /runs``.
MAX_PAGE = 1000
#: Largest ``limit`` of the event and error-history endpoints.
MAX_EVENTS = 10_000

StatusQuery = Annotated[
    TaskState | None, Query(description="Only runs in this state.")
]
TaskTypeQuery = Annotated[
    str | None, Query(min_length=1, max_length=256, description="Only runs of this task type.")
]
SinceQuery = Annotated[
    str | None,
    Query(max_length=64, description="Only runs created at or after this time: ISO 8601 "
          "(no zone means UTC) or POSIX seconds."),
]
PageLimitQuery = Annotated[
    int, Query(ge=1, le=MAX_PAGE, description=f"Runs per page, 1 to {MAX_PAGE}.")
]
OffsetQuery = Annotated[int, Query(ge=0, description="Runs to skip (newest first).")]
EventsLimitQuery = Annotated[
    int, Query(ge=1, le=MAX_EVENTS, description=f"At most this many, 1 to {MAX_EVENTS}.")
]


def _bad_query(name: str, value: str, valid: str) -> InvalidArgumentError:
    error = InvalidArgumentError(f"Invalid query parameter {name}={value!r}: {valid}.")
    error.labd_context = {  # type: ignore[attr-defined]
        "errors": [{"field": f"query.{name}", "message": valid, "type": "value_error"}]
    }
    return error


def parse_since(value: str) -> float:
    """POSIX seconds from ``"1714564800"`` or ISO 8601 (``"2024-05-01T12:00:00Z"``; naive is UTC).

    Raises :class:`InvalidArgumentError` naming the parameter and what it accepts.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise _bad_query("since", value, "give an ISO 8601 time such as "
                             "2024-05-01T12:00:00Z, or POSIX seconds such as 1714564800") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(seconds):
        raise _bad_query("since", value, "give a finite number of POSIX seconds or an ISO 8601 time")
    return seconds


def _run_for(run: dict[str, Any], show_tracebacks: bool) -> dict[str, Any]:
    """A run record or summary as this caller may see it."""
    if show_tracebacks or not run.get("error"):
        return run
    return {**run, "error": hide_tracebacks(run["error"])}


def _page(
    ctx: ServerContext, status: TaskState | None, task_type: str | None, since: float | None,
    limit: int, offset: int, show_tracebacks: bool,
) -> bytes:
    # One more than asked tells whether another page follows, so next_offset is exact.
    # On a node of a lab: every live node's runs, each naming its node (labd.lab).
    runs = ctx.daemon.runs if ctx.daemon.lab is None else ctx.daemon.lab.runs
    rows = runs(status.value if status is not None else None, task_type, since, limit + 1, offset)
    more = len(rows) > limit
    runs = [_run_for(row, show_tracebacks) for row in rows[:limit]]
    body = {"runs": runs, "limit": limit, "offset": offset,
            "next_offset": offset + limit if more else None}
    return dumps_lenient(body)


async def list_runs(
    ctx: Ctx, show_tracebacks: ShowTracebacks, status: StatusQuery = None,
    task_type: TaskTypeQuery = None, since: SinceQuery = None, limit: PageLimitQuery = 50,
    offset: OffsetQuery = 0,
) -> Response:
    """Run history, newest first, filtered and paginated (``next_offset`` is null at the end)."""
    after = parse_since(since) if since is not None else None
    body = await ctx.run(lambda: _page(ctx, status, task_type, after, limit, offset, show_tracebacks),
                         what="reading the run history")
    return json_bytes_response(body)


def _record(ctx: ServerContext, task_id: str, events_limit: int | None = None) -> dict[str, Any]:
    """The run's record from this node's history; on a node of a lab, else from the first
    live node that has it, with its ``node`` (UnknownTaskError if none has it)."""
    try:
        return run_record(ctx.daemon, task_id, events_limit)
    except UnknownTaskError:
        lab = ctx.daemon.lab
        if lab is None:
            raise
        node, record = lab.find_record(task_id, events_limit)
        return {**record, "node": node}


async def get_run(task_id: TaskIdPath, ctx: Ctx, show_tracebacks: ShowTracebacks) -> Response:
    """One run's full record: parameters, progress, result, error (traceback: admins), events."""
    body = await ctx.run(lambda: dumps_lenient(_run_for(_record(ctx, task_id), show_tracebacks)),
                         what=f"reading run {task_id!r} from the history")
    return json_bytes_response(body)


def _events(ctx: ServerContext, task_id: str, limit: int) -> bytes:
    # Without a store the record has no events (they are not kept in memory).
    events = list(_record(ctx, task_id, limit).get("events") or [])[-limit:]
    return dumps_lenient({"task_id": task_id, "events": events})


async def get_run_events(
    task_id: TaskIdPath, ctx: Ctx, limit: EventsLimitQuery = 100,
) -> Response:
    """The run's last ``limit`` events (state changes, progress, data), oldest first."""
    body = await ctx.run(lambda: _events(ctx, task_id, limit),
                         what=f"reading the events of run {task_id!r}")
    return json_bytes_response(body)


def _errors_body(device_id: str, errors: list[dict[str, Any]], show_tracebacks: bool) -> bytes:
    if not show_tracebacks:
        errors = [hide_tracebacks(error) for error in errors]
    return dumps_lenient({"device_id": device_id, "errors": errors})


async def get_device_error_history(
    device_id: DeviceIdPath, ctx: Ctx, show_tracebacks: ShowTracebacks,
    limit: EventsLimitQuery = 100,
) -> Response:
    """Every recorded error of a device, newest first (tracebacks: admins, or without tokens).

    With a store, history outlives the device: a device removed (or not re-added after a
    restart) still has its recorded errors; without one, an unknown id is 404. On a node of a
    lab, a device another live node serves has its history there.
    """
    lab = ctx.daemon.lab
    if lab is not None and device_id not in ctx.daemon.device_ids() and lab.knows(device_id):
        errors = await ask_other_node(ctx, device_id, "device_errors", None, limit=limit)
        return json_bytes_response(_errors_body(device_id, errors, show_tracebacks))
    body = await ctx.run(
        lambda: _errors_body(device_id, device_error_history(ctx.daemon, device_id, limit),
                             show_tracebacks),
        what=f"reading the error history of device {device_id!r}")
    return json_bytes_response(body)


ROUTES = [
    RouteSpec("GET", "/runs", list_runs),
    RouteSpec("GET", "/runs/{task_id}", get_run),
    RouteSpec("GET", "/runs/{task_id}/events", get_run_events),
    RouteSpec("GET", "/devices/{device_id}/errors/history", get_device_error_history),
]

