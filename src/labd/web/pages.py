"""The dashboard's pages: overview, device, tasks, launch form, history, run, server, lab.

Each handler reads what it shows on a worker thread (:mod:`labd.web.views`) and renders a
template (:func:`labd.web.render.page`). A labd error (an unknown device, run or task type)
becomes an HTML page with the error's status and message. The browser does everything else
through the JSON API and the streams (``static/labd.js``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Query
from starlette.requests import Request
from starlette.responses import Response

from labd.errors import LabDaemonException
from labd.lab.launcher_log import LaunchInfo, read_tail
from labd.server.context import ServerContext
from labd.server.errors import describe_exception
from labd.web import views
from labd.web.forms import fields_for
from labd.web.render import page

__all__ = ["PAGES"]

PAGE_SIZE = 25

Handler = Callable[..., Awaitable[Response]]


def _ctx(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.labd
    return context


async def _or_error(request: Request, make: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await make()
    except LabDaemonException as exc:
        status, record = describe_exception(exc)
        return page(request, "error.html", status_code=status, error=record.to_dict(),
                    title=f"{status} {record.type}")


async def overview(request: Request) -> Response:
    """``/ui/``: devices, unfinished runs, recent runs, health; live from /stream/events."""
    ctx = _ctx(request)
    data = await ctx.run(lambda: views.overview(ctx), what="reading the overview")
    return page(request, "overview.html", title="Overview", **data)


async def overview_part(request: Request, part: str) -> Response:
    """One live section of the overview (htmx re-fetches it when an event arrives)."""
    ctx = _ctx(request)
    if part not in ("devices", "tasks", "runs", "health"):
        return page(request, "error.html", status_code=404, title="404",
                    error={"type": "NotFound", "message": f"No overview part {part!r}."})
    data = await ctx.run(lambda: views.overview_part(ctx, part), what=f"reading the {part}")
    return page(request, f"part_{part}.html", **data)


async def device(request: Request, device_id: str) -> Response:
    """``/ui/devices/{id}``: queries, a form per command, control, errors, the live plot."""
    ctx = _ctx(request)

    async def make() -> Response:
        ctx.daemon.device_slot(device_id)  # an unknown id is 404 before any work
        info, methods = await ctx.run(
            lambda: (ctx.daemon.device_info(device_id), ctx.daemon.device_methods(device_id)),
            what=f"reading device {device_id!r}")
        names = {m["name"] for m in methods}
        shown = [m for m in methods if m["name"] not in views.CONTROL_METHODS]
        forms = [{**m, "fields": fields_for(m["parameters"])} for m in shown]
        return page(request, "device.html", title=device_id, device=info, forms=forms,
                    can_stream="start_streaming" in names)

    return await _or_error(request, make)


async def tasks(request: Request) -> Response:
    """``/ui/tasks``: unfinished runs with progress, and the task types to launch."""
    ctx = _ctx(request)
    data = await ctx.run(lambda: views.tasks_page(ctx), what="reading the tasks")
    return page(request, "tasks.html", title="Tasks", **data)


async def new_task(request: Request, task_type: str,
                   again: Annotated[str | None, Query(alias="from", max_length=128)] = None,
                   ) -> Response:
    """``/ui/tasks/new/{type}``: the launch form; ``?from=<run id>`` prefills a run's parameters."""
    ctx = _ctx(request)

    async def make() -> Response:
        described = views.task_type(ctx, task_type)
        values: dict[str, Any] = {}
        if again:
            record = await ctx.run(lambda: views.run_record(ctx, again), what="reading a run")
            values = dict(record.get("params") or {})
        return page(request, "task_new.html", title=f"New {task_type}", task_type=described,
                    fields=fields_for(described["parameters"], values), again=again)

    return await _or_error(request, make)


async def runs(
    request: Request,
    state: Annotated[str, Query(max_length=32)] = "",
    task_type: Annotated[str, Query(alias="type", max_length=256)] = "",
    text: Annotated[str, Query(max_length=256)] = "",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    """``/ui/runs``: the history, filtered by state, type and text, a page at a time."""
    ctx = _ctx(request)
    status = state if state in views.RUN_STATES else None
    data = await ctx.run(
        lambda: views.runs_page(ctx, status, task_type or None, text, PAGE_SIZE, offset),
        what="reading the run history")
    filters = {"state": status or "", "type": task_type, "text": text}
    return page(request, "runs.html", title="Runs", filters=filters, states=views.RUN_STATES,
                task_types=ctx.daemon.task_types, **data)


async def run(request: Request, task_id: str) -> Response:
    """``/ui/runs/{id}``: live progress and controls while it runs; its record once it ended."""
    ctx = _ctx(request)

    async def make() -> Response:
        data = await ctx.run(lambda: views.run_page(ctx, task_id), what=f"reading run {task_id!r}")
        return page(request, "run.html", title=f"Run {task_id}", **data)

    return await _or_error(request, make)


async def server(request: Request) -> Response:
    """``/ui/server``: health, uptime, versions, the launcher's log (if any), recent log lines.

    A server started by ``labd lab up`` (``app.state.labd_launcher``, see
    :mod:`labd.cli.serving`) also shows its launcher's facts and the end of its log file,
    earlier runs of the node included; the file is read on a worker thread.
    """
    ctx = _ctx(request)
    launcher: LaunchInfo | None = getattr(request.app.state, "labd_launcher", None)
    health, launcher_log = await ctx.run(
        lambda: (views.health(ctx), read_tail(launcher.log_file) if launcher else None),
        what="reading the server's health and its log file")
    ring = getattr(request.app.state, "labd_log", None)
    lines = ring.recent(200) if ring is not None else []
    return page(request, "server.html", title="Server", health=health, log_lines=lines,
                versions=_versions(), settings=ctx.settings, launcher=launcher,
                launcher_log=launcher_log)


async def lab(request: Request) -> Response:
    """``/ui/lab``: every node of the lab (health, version, last heartbeat, devices)."""
    ctx = _ctx(request)
    data = await ctx.run(lambda: views.lab_page(ctx), what="reading the lab's nodes")
    return page(request, "lab.html", title="Lab", **data)


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("labd", "fastapi", "starlette", "uvicorn", "numpy", "jinja2"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


#: (path, handler) of every GET page.
PAGES: list[tuple[str, Handler]] = [
    ("/ui/", overview),
    ("/ui/parts/{part}", overview_part),
    ("/ui/devices/{device_id}", device),
    ("/ui/tasks", tasks),
    ("/ui/tasks/new/{task_type}", new_task),
    ("/ui/runs", runs),
    ("/ui/runs/{task_id}", run),
    ("/ui/server", server),
    ("/ui/lab", lab),
]
