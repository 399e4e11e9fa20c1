"""What each dashboard page shows, read from the daemon (plain functions, run on a worker).

The pages call these through the server's offloader (``ServerContext.run``): reading device
info may run device code (``is_streaming``) and history reads SQLite, so nothing here runs
on the event loop. Each returns plain dicts and lists for the templates.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import labd
from labd.errors import UnknownNameError, UnknownTaskError
from labd.server.routes_lab import lab_of, merge_devices
from labd.server.routes_types import describe_type
from labd.signatures import constructor_signature

if TYPE_CHECKING:
    from labd.server.context import ServerContext

__all__ = [
    "ACTIVE_STATES",
    "RUN_STATES",
    "health",
    "lab_devices",
    "lab_page",
    "overview",
    "overview_part",
    "plottable",
    "run_page",
    "runs_page",
    "task_type",
    "tasks_page",
]

#: Runs that have not finished.
ACTIVE_STATES = frozenset({"pending", "running", "paused"})
#: Run states, for the history filter.
RUN_STATES = ("pending", "running", "paused", "completed", "failed", "cancelled", "interrupted")
#: Runs scanned at most by a text search of the history.
TEXT_SCAN_LIMIT = 5000
_RECENT_RUNS = 8
# Device and task calls the generic method forms leave to their own buttons.
CONTROL_METHODS = frozenset({"connect", "disconnect", "start_streaming", "stop_streaming"})


def health(ctx: ServerContext, devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Status, uptime, problems and the store, as ``/health`` says them (never raises)."""
    daemon = ctx.daemon
    devices = devices if devices is not None else daemon.list_devices()
    problems = {d["device_id"]: _problem(d) for d in devices if _problem(d)}
    store = daemon.store
    store_degraded = store is not None and store.degraded_reason is not None
    status = "daemon_closed" if daemon.closed else (
        "degraded" if problems or store_degraded else "healthy")
    running = sum(1 for h in daemon.task_handles() if h.status in ("running", "paused"))
    return {
        "status": status, "uptime_s": time.monotonic() - ctx.started_at,
        "devices": len(devices), "tasks_running": running, "device_problems": problems,
        "store": None if store is None else {
            "path": str(store.path), "degraded_reason": store.degraded_reason,
            "dropped_records": store.dropped_records},
        "version": labd.__version__,
    }


def _problem(device: dict[str, Any]) -> str:
    reasons = []
    if device.get("unresponsive"):
        reasons.append("unresponsive")
    if device.get("state") == "faulted":
        error = device.get("last_error") or {}
        reasons.append(f"faulted: {error.get('message', '')}".rstrip(": "))
    elif device.get("state") == "connecting":
        reasons.append("connecting")
    return "; ".join(reasons)


def overview(ctx: ServerContext) -> dict[str, Any]:
    """Devices, unfinished runs, recent runs and health, for ``/ui/``."""
    devices = ctx.daemon.list_devices()
    return {
        "devices": lab_devices(ctx, devices),
        "tasks": active_tasks(ctx),
        "runs": history(ctx, None, None, _RECENT_RUNS, 0),
        "health": health(ctx, devices),
    }


def overview_part(ctx: ServerContext, part: str) -> dict[str, Any]:
    """What one live section of the overview needs (its refresh reads nothing else)."""
    if part == "devices":
        return {"devices": lab_devices(ctx, ctx.daemon.list_devices())}
    if part == "tasks":
        return {"tasks": active_tasks(ctx)}
    if part == "runs":
        return {"runs": history(ctx, None, None, _RECENT_RUNS, 0)}
    return {"health": health(ctx)}


def active_tasks(ctx: ServerContext) -> list[dict[str, Any]]:
    """Unfinished runs (pending, running, paused), oldest first; on a node of a lab, every
    live node's, each with its ``node`` (as ``GET /tasks``)."""
    node = lab_of(ctx)
    infos = node.tasks() if node is not None else ctx.daemon.list_tasks()
    return [info for info in infos if info.get("status") in ACTIVE_STATES]


def history(
    ctx: ServerContext, status: str | None, task_type: str | None, limit: int, offset: int,
) -> list[dict[str, Any]]:
    """The run history, newest first; on a node of a lab, every live node's merged, each run
    with its ``node`` (as ``GET /runs``)."""
    node = lab_of(ctx)
    if node is None:
        return ctx.daemon.runs(status, task_type, None, limit, offset)
    return node.runs(status, task_type, None, limit, offset)


def run_record(ctx: ServerContext, task_id: str) -> dict[str, Any]:
    """A run's record from this node's history, or on a node of a lab from the live node
    whose history has it (with its ``node``); :class:`UnknownTaskError` if none has it."""
    try:
        return ctx.daemon.get_run(task_id)
    except UnknownTaskError:
        node = lab_of(ctx)
        if node is None:
            raise
        where, record = node.find_record(task_id)
        return {**record, "node": where}


def task_types(ctx: ServerContext) -> list[dict[str, Any]]:
    """Every registered task type with its parameters (as ``GET /task-types``)."""
    return [task_type(ctx, name) for name in ctx.daemon.task_types]


def task_type(ctx: ServerContext, name: str) -> dict[str, Any]:
    """One task type with its parameters; :class:`UnknownNameError` if there is none."""
    if name not in ctx.daemon.task_types:
        raise UnknownNameError(
            f"No task type {name!r}; registered: {', '.join(ctx.daemon.task_types) or 'none'}.")
    cls = ctx.daemon.task_class(name)
    signature = constructor_signature(cls, {"task_id"}) if isinstance(cls, type) else None
    return describe_type(name, cls, signature)


def tasks_page(ctx: ServerContext) -> dict[str, Any]:
    """Unfinished runs and the task types, for ``/ui/tasks``."""
    return {"tasks": active_tasks(ctx), "task_types": task_types(ctx)}


def _matches(run: dict[str, Any], text: str) -> bool:
    haystack = " ".join(str(run.get(key) or "") for key in
                        ("task_id", "task_type", "owner", "params", "error", "status"))
    return text in haystack.lower()


def runs_page(
    ctx: ServerContext, status: str | None, task_type: str | None, text: str,
    limit: int, offset: int,
) -> dict[str, Any]:
    """One page of the history, newest first, with ``next_offset`` (None on the last page)."""
    daemon = ctx.daemon
    store = daemon.store
    if store is not None:
        store.flush(timeout=2.0)
    needle = text.strip().lower()
    if not needle:
        rows = history(ctx, status, task_type, limit + 1, offset)
    else:
        scanned = history(ctx, status, task_type, TEXT_SCAN_LIMIT, 0)
        rows = [run for run in scanned if _matches(run, needle)][offset:offset + limit + 1]
    return {"runs": rows[:limit], "next_offset": offset + limit if len(rows) > limit else None,
            "prev_offset": max(offset - limit, 0) if offset > 0 else None}


def run_page(ctx: ServerContext, task_id: str) -> dict[str, Any]:
    """A run's record (live or historical) and whether it is still running."""
    store = ctx.daemon.store
    if store is not None:
        store.flush(timeout=2.0)
    record = run_record(ctx, task_id)
    events = list(record.get("events") or [])
    data = [e.get("body") for e in events if e.get("kind") == "data"]
    if not data:
        data = plottable(record.get("result"))
    messages = [e for e in events if e.get("kind") in ("progress", "state")]
    return {"run": record, "data": data, "messages": messages[-200:],
            "active": record.get("status") in ACTIVE_STATES}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        _is_number(v) or isinstance(v, dict) for v in value)


def plottable(result: Any) -> list[Any]:
    """Rows to plot from a run's result: a list of numbers or dicts; a dict of two or more
    equally long numeric columns (``{"wavelength": [...], "power": [...]}``), as rows; or the
    first list of rows among a dict's values (``{"results": [{"wavelength": ...}, ...]}``)."""
    if _rows(result):
        return list(result)
    if not isinstance(result, dict):
        return []
    columns = {key: value for key, value in result.items() if isinstance(value, list)
               and value and all(_is_number(v) for v in value)}
    if len(columns) >= 2 and len({len(column) for column in columns.values()}) == 1:
        return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    return next((list(value) for value in result.values() if _rows(value)), [])


# ---------------------------------------------------------------------- a lab of several nodes
#: Device states that make a node's health ``degraded`` on the lab page.
_TROUBLED_STATES = frozenset({"faulted", "connecting"})


def lab_devices(ctx: ServerContext, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``devices`` (this node's), and on a lab node every other live node's, each with its
    ``node``; another node's device is ``remote``, with ``node_url`` (its node's server, where
    its page is) when that node published one."""
    node = lab_of(ctx)
    if node is None:
        return devices
    urls = {name: info.get("url") for name, info in node.nodes().items()}
    here = node.name
    return [{**device, "remote": device["node"] != here,
             "node_url": urls.get(device["node"]) if device["node"] != here else None}
            for device in merge_devices(ctx, devices)]


def lab_page(ctx: ServerContext) -> dict[str, Any]:
    """``/ui/lab``: the engine, and every live node with its health, version, last heartbeat
    and devices (``lab`` None: this server is not a node of a lab)."""
    node = lab_of(ctx)
    if node is None:
        return {"lab": None, "nodes": []}
    nodes = node.nodes()  # re-read from the engine (the last read while it is unreachable)
    now = time.time()
    rows = []
    for name, info in sorted(nodes.items()):
        devices = list(info.get("devices") or [])
        troubled = [d["device_id"] for d in devices if d.get("state") in _TROUBLED_STATES]
        beat = info.get("heartbeat_at")
        rows.append({
            "node": name, "here": name == node.name, "version": info.get("version"),
            "host": info.get("host"), "url": info.get("url"), "pid": info.get("pid"),
            "heartbeat_age_s": max(now - beat, 0.0) if isinstance(beat, int | float) else None,
            "devices": devices, "problems": troubled,
            "status": health(ctx)["status"] if name == node.name
            else ("degraded" if troubled else "healthy"),
        })
    return {"lab": node.health(), "nodes": rows}
