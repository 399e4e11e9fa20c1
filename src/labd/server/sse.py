"""Server-Sent Events: ``/stream/devices/{id}``, ``/stream/tasks/{id}``, ``/stream/events``.

Each client gets its own pull-mode :class:`labd.streaming.Subscription` with a bounded queue,
so a client that stops reading loses only its own oldest items and never slows the device or
the other clients. The subscription's ``on_ready`` hook wakes the client's generator on the
event loop (``call_soon_threadsafe``); the generator drains, sends, re-arms and waits again.
Streams end when the client leaves, when the stream itself ends (``stop_streaming``, a task's
``finished``), or when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

from fastapi import Header, Query
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from labd.errors import ErrorRecord, InvalidArgumentError, iso_from_timestamp
from labd.ownership import acting_as
from labd.server.context import ServerContext, guard_device_code
from labd.server.encoding import UnserializableResult, dumps, looks_large
from labd.server.errors import ServerStopping
from labd.server.models import Ctx, DeviceIdPath, MaxsizeQuery, RemoteActor, TaskIdPath
from labd.server.routing import RouteSpec
from labd.streaming import StreamItem, Subscription
from labd.tasks import TaskHandle

__all__ = ["ROUTES"]

log = logging.getLogger("labd.server")

#: Items sent per chunk; a fast stream is batched instead of one write per item.
BATCH = 256

LastEventIdQuery = Annotated[
    int | None, Query(ge=0, description="Replay items after this sequence (like Last-Event-ID).")]
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID")]


class _Pump:
    """One client's subscription, the wake-up event it triggers, and its cleanup."""

    def __init__(self, ctx: ServerContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.stopping = False
        self.sub: Subscription | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._shutdown_handle = ctx.shutdown.add(self._on_shutdown)
        ctx.metrics.stream_clients.labels(kind).inc()

    def on_ready(self) -> None:
        """Called by the producer's thread when data arrives for an armed subscription."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self.loop.call_soon_threadsafe(self.wake.set)

    def _on_shutdown(self) -> None:
        self.stopping = True
        self.wake.set()

    def adopt(self, sub: Subscription) -> None:
        """Keep ``sub`` (from a worker thread); close it at once if the client already left."""
        with self._lock:
            if not self._closed:
                self.sub = sub
                return
        sub.close()

    def close(self) -> None:
        """Close the subscription and forget the client. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sub = self.sub
        self.ctx.shutdown.remove(self._shutdown_handle)
        self.ctx.metrics.stream_clients.labels(self.kind).dec()
        if sub is not None:
            sub.close()

    async def next_batch(self) -> list[StreamItem] | None:
        """The next queued items; None once the stream ended or the server is stopping."""
        sub = self.sub
        assert sub is not None
        while not self.stopping:
            items = sub.drain(BATCH)
            if items:
                return items
            if sub.closed:
                return sub.drain() or None  # published just before the stream ended
            self.wake.clear()
            if sub.arm():  # nothing queued: wait for on_ready (or shutdown)
                await self.wake.wait()
        return None


def _frame(event: str, data: bytes, sequence: int | None) -> bytes:
    head = b"" if sequence is None else b"id: %d\n" % sequence
    return head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def _error_frame(what: str, item: StreamItem, exc: Exception) -> bytes:
    record = ErrorRecord(type=type(exc).__name__, message=str(exc), origin="framework",
                         context={"sequence": item.sequence})
    body = {"event": "stream_error", "sequence": item.sequence,
            "timestamp": iso_from_timestamp(item.timestamp),
            "error": record.to_dict(include_traceback=False)}
    return _frame("stream_error", dumps(body, what), item.sequence)


def _encode(items: Sequence[StreamItem], envelope: Callable[[StreamItem], tuple[str, dict[str, Any]]],
            what: str) -> bytes:
    frames = []
    for item in items:
        event, body = envelope(item)
        try:
            frames.append(_frame(event, dumps(body, what), item.sequence))
        except UnserializableResult as exc:
            frames.append(_error_frame(what, item, exc))
    return b"".join(frames)


async def _encode_off_loop(ctx: ServerContext, items: Sequence[StreamItem],
                           envelope: Callable[[StreamItem], tuple[str, dict[str, Any]]],
                           what: str) -> bytes:
    if any(looks_large(item.payload) for item in items):
        return await ctx.offloader.run(lambda: _encode(items, envelope, what),
                                       timeout=None, what=f"encoding {what}")
    return _encode(items, envelope, what)


def _resume_after(query: int | None, header: str | None) -> int | None:
    if query is not None:
        return query
    if header is None or not header.strip():
        return None
    try:
        value = int(header.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"Last-Event-ID must be the integer sequence of the last event received, got {header!r}."
        ) from None
    if value < 0:
        raise InvalidArgumentError(f"Last-Event-ID must be >= 0, got {value}.")
    return value


class _SSEResponse(EventSourceResponse):
    """EventSourceResponse that always releases its pump and drops stalled clients quietly."""

    def __init__(self, ctx: ServerContext, pump: _Pump, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, ping=ctx.settings.stream_ping, sep="\n",
                         send_timeout=ctx.settings.stream_send_timeout)
        self._pump = pump

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("labd server: dropped an SSE client that stopped reading (%s stream)",
                     self._pump.kind)
        finally:
            self._pump.close()


async def _generate(pump: _Pump, first: Sequence[bytes], replay: Sequence[StreamItem],
                    envelope: Callable[[StreamItem], tuple[str, dict[str, Any]]], what: str,
                    until: Callable[[StreamItem], bool] | None = None) -> AsyncIterator[bytes]:
    """Frames: ``first``, then replayed items, then live items (skipping replayed sequences).

    Ends after the item for which ``until`` is true, when the stream ends, or on server stop.
    """
    ctx, last = pump.ctx, 0
    try:
        for frame in first:
            yield frame
        batch: list[StreamItem] | None = list(replay)
        while batch is not None:
            fresh = [item for item in batch if item.sequence > last]
            end = next((i for i, item in enumerate(fresh) if until(item)), None) if until else None
            if end is not None:
                fresh = fresh[: end + 1]
            if fresh:
                yield await _encode_off_loop(ctx, fresh, envelope, what)
                last = fresh[-1].sequence
            if end is not None:
                return
            batch = await pump.next_batch()
    except ServerStopping:
        return
    finally:
        pump.close()


async def stream_device(
    device_id: DeviceIdPath, ctx: Ctx, actor: RemoteActor,
    maxsize: MaxsizeQuery = None, last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """Subscribe to a device's data (``event: device_data``); starts the stream if needed."""
    after = _resume_after(last_event_id, last_event_id_header)
    pump = _Pump(ctx, "device")
    size = maxsize or ctx.settings.stream_maxsize

    def job() -> None:
        with acting_as(actor):
            pump.adopt(guard_device_code(
                lambda: ctx.daemon.subscribe(device_id, on_ready=pump.on_ready, maxsize=size),
                device_id, "start_streaming()"))

    try:
        await ctx.run_for_device(device_id, job, what=f"starting the stream of {device_id!r}")
    except BaseException:
        pump.close()
        raise
    assert pump.sub is not None
    replay = pump.sub.hub.replay(after) if after is not None else []

    def envelope(item: StreamItem) -> tuple[str, dict[str, Any]]:
        return "device_data", {"event": "device_data", "device_id": device_id,
                               "timestamp": iso_from_timestamp(item.timestamp),
                               "sequence": item.sequence, "payload": item.payload}

    content = _generate(pump, (), replay, envelope, f"{device_id!r} stream data")
    return _SSEResponse(ctx, pump, content)


def _merged(item: StreamItem) -> tuple[str, dict[str, Any]]:
    payload = item.payload if isinstance(item.payload, dict) else {"data": item.payload}
    body = {**payload, "sequence": item.sequence, "timestamp": iso_from_timestamp(item.timestamp)}
    return str(payload.get("event", "message")), body


def _is_finished(item: StreamItem) -> bool:
    return isinstance(item.payload, dict) and item.payload.get("event") == "finished"


async def stream_task(
    task_id: TaskIdPath, ctx: Ctx, maxsize: MaxsizeQuery = None,
    last_event_id: LastEventIdQuery = None, last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """A run's ``state``, ``progress``, ``data``, ``parameter`` and ``finished`` events."""
    after = _resume_after(last_event_id, last_event_id_header)
    handle = ctx.daemon.get_task(task_id)
    pump = _Pump(ctx, "task")
    try:
        first, replay = _task_stream_start(pump, handle, after, maxsize)
    except BaseException:
        pump.close()
        raise
    content = _generate(pump, first, replay, _merged, f"task {task_id!r} events", _is_finished)
    return _SSEResponse(ctx, pump, content)


def _task_stream_start(
    pump: _Pump, handle: TaskHandle, after: int | None, maxsize: int | None,
) -> tuple[list[bytes], list[StreamItem]]:
    """Subscribe; build the first ``state`` frame and the items to send before live ones."""
    ctx, task_id = pump.ctx, handle.task_id
    pump.adopt(ctx.daemon.subscribe_task(task_id, on_ready=pump.on_ready,
                                         maxsize=maxsize or ctx.settings.stream_maxsize))
    assert pump.sub is not None
    hub = pump.sub.hub
    info, now = handle.info(), time.time()
    state = {"event": "state", "task_id": task_id, "sequence": hub.sequence,
             "timestamp": iso_from_timestamp(now), "status": info["status"],
             "progress": info["progress"]}
    replay = hub.replay(after) if after is not None else []
    if handle.is_running():
        return [_frame("state", dumps(state), None)], replay
    # Ended before we subscribed: its "finished" event may be gone, so send one.
    replay = [*replay, *pump.sub.drain()]
    if not any(_is_finished(item) for item in replay):
        replay.append(StreamItem(hub.sequence + 1, now, {
            "event": "finished", "task_id": task_id, "status": handle.status}))
    return [_frame("state", dumps(state), None)], replay


async def stream_events(
    ctx: Ctx, maxsize: MaxsizeQuery = None,
    last_event_id: LastEventIdQuery = None, last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """Every daemon event (devices added, states, errors, task states, claims, leases, streams)."""
    after = _resume_after(last_event_id, last_event_id_header)
    hub = ctx.daemon.events
    pump = _Pump(ctx, "events")
    try:
        pump.adopt(hub.subscribe(on_ready=pump.on_ready,
                                 maxsize=maxsize or ctx.settings.stream_maxsize))
    except BaseException:
        pump.close()
        raise
    replay = hub.replay(after) if after is not None else []
    content = _generate(pump, (), replay, _merged, "daemon events")
    return _SSEResponse(ctx, pump, content)


_SSE_DOCS: dict[int | str, dict[str, Any]] = {
    200: {"description": "A stream of Server-Sent Events (see docs/http-api.md, Streams).",
          "content": {"text/event-stream": {}}},
}

ROUTES = [
    RouteSpec("GET", "/stream/devices/{device_id}", stream_device, responses=_SSE_DOCS),
    RouteSpec("GET", "/stream/tasks/{task_id}", stream_task, responses=_SSE_DOCS),
    RouteSpec("GET", "/stream/events", stream_events, responses=_SSE_DOCS),
]
