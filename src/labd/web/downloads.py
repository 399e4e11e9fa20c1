"""``/ui/runs/{id}/download.json`` and ``download.h5``: a run's record as a file.

JSON is the whole record (parameters, result, error, events) as ``GET /runs/{id}`` gives it.
HDF5 follows ``labd runs export --hdf5``: the result and what the run emitted (``emitted``)
as data, the rest of the record as file metadata (values too large for an HDF5 attribute go
to ``/data/run``). Both are built on a worker thread; HDF5 needs h5py (``labd[hdf5]``), and
without it the answer is a 501 that says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from labd.errors import LabDaemonException
from labd.server.context import ServerContext
from labd.server.encoding import dumps_lenient
from labd.server.models import hide_tracebacks
from labd.server.routing import render_exception
from labd.web.render import viewer_of
from labd.web.views import run_record

__all__ = ["download_hdf5", "download_json", "hdf5_parts"]

#: Fields of a run record kept as HDF5 file metadata.
METADATA_KEYS = ("task_id", "task_type", "status", "params", "device_ids", "owner",
                 "parent_id", "progress", "error", "created_at", "started_at", "finished_at")
_MAX_ATTRIBUTE_BYTES = 60_000  # HDF5 attributes hold at most 64 KiB


def hdf5_parts(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, metadata) of a run record for :func:`labd.io.save_hdf5`."""
    result = record.get("result")
    data: dict[str, Any] = dict(result) if isinstance(result, Mapping) else (
        {} if result is None else {"result": result})
    emitted = [e.get("body") for e in record.get("events") or []
               if isinstance(e, Mapping) and e.get("kind") == "data"]
    if emitted:
        data["emitted" if "emitted" not in data else "run_emitted"] = emitted
    metadata: dict[str, Any] = {}
    oversized: dict[str, Any] = {}
    for key in METADATA_KEYS:
        value = record.get(key)
        size = len(orjson.dumps(value, default=str))
        (oversized if size > _MAX_ATTRIBUTE_BYTES else metadata)[key] = value
    if oversized:
        data["run"] = oversized
    return data, metadata


def _record(request: Request, task_id: str) -> dict[str, Any]:
    ctx: ServerContext = request.app.state.labd
    record = run_record(ctx, task_id)  # on a node of a lab: any live node's run
    if record.get("error") and not viewer_of(request).is_admin:
        record = {**record, "error": hide_tracebacks(record["error"])}
    return record


def _attachment(body: bytes, media_type: str, name: str) -> Response:
    return Response(body, media_type=media_type, headers={
        "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})


async def download_json(request: Request, task_id: str) -> Response:
    """The run's record as a JSON file."""
    ctx: ServerContext = request.app.state.labd
    try:
        body = await ctx.run(lambda: dumps_lenient(_record(request, task_id)),
                             what=f"exporting run {task_id!r}")
    except LabDaemonException as exc:
        return render_exception(request, exc)
    return _attachment(body, "application/json", f"{task_id}.json")


def _hdf5_bytes(record: dict[str, Any]) -> bytes:
    from labd.io import save_hdf5

    data, metadata = hdf5_parts(record)
    with tempfile.TemporaryDirectory(prefix="labd-export-") as folder:
        path = Path(folder) / "run.h5"
        save_hdf5(data, path, metadata)
        return path.read_bytes()


async def download_hdf5(request: Request, task_id: str) -> Response:
    """The run's result and emitted data as an HDF5 file (501 without h5py)."""
    ctx: ServerContext = request.app.state.labd
    try:
        body = await ctx.run(lambda: _hdf5_bytes(_record(request, task_id)),
                             what=f"exporting run {task_id!r} to HDF5")
    except LabDaemonException as exc:
        return render_exception(request, exc)
    except ImportError as exc:
        return Response(f"HDF5 export needs h5py (pip install 'labd[hdf5]'): {exc}",
                        status_code=501, media_type="text/plain")
    return _attachment(body, "application/x-hdf5", f"{task_id}.h5")
