"""Server-Sent Events: ``/stream/devices/{id}``, ``/stream/tasks/{id}``, ``/stream/events``.

The server holds one pull-mode :class:`labd.streaming.Subscription` per stream and fans it
out on the event loop to that stream's clients (:mod:`labd.server.fanout`): a publish wakes
the loop once, however many clients listen. Each client has its own buffer, bounded in items
(``?maxsize=``, default ``stream_maxsize``) and bytes (``stream_max_bytes``), so a client that
stops reading loses only its own oldest items and never slows the device or the other
clients. ``?maxsize=`` outside 1..``stream_max_maxsize`` is a 422. A stream takes at most
``stream_max_clients`` clients and the server ``stream_max_clients_total`` over all streams;
the next one gets 503 ``StreamFull``. Streams end when the client leaves, when the stream
itself ends (``stop_streaming``, a task's ``finished``), or when the server stops.

Joining a device stream that runs is reading (any viewer). Starting one is a command
(DESIGN.md, Security model): with tokens it needs the ``operator`` role (403 otherwise), and
a remote caller who does not own a claimed device gets 409 ``DeviceBusyError``, as for any
command. The check happens before the device is touched; a stream an SSE client started
runs as the framework's and stops when its last client leaves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from typing import Annotated, Any

from fastapi import Header, Query
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from labd.errors import ErrorRecord, InvalidArgumentError, UnknownNameError, iso_from_timestamp
from labd.lab import RemoteRun
from labd.ownership import Actor, acting_as
from labd.server.auth import Token, current_token
from labd.server.context import ServerContext, guard_device_code
from labd.server.encoding import UnserializableResult, dumps, looks_large
from labd.server.errors import Forbidden, ServerStopping, error_response
from labd.server.fanout import SHARED_MAXSIZE, ClientBuffer, StreamFanout, StreamFull, fanout_table
from labd.server.models import Ctx, DeviceIdPath, RemoteActor, TaskIdPath
from labd.server.routes_lab import run_on_other_node
from labd.server.routing import RouteSpec
from labd.streaming import StreamHub, StreamItem, Subscription
from labd.tasks import TaskHandle

__all__ = ["ROUTES"]

log = logging.getLogger("labd.server")

#: Items sent per chunk; a fast stream is batched instead of one write per item.
BATCH = 256

LastEventIdQuery = Annotated[
    int | None, Query(ge=0, description="Replay items after this sequence (like Last-Event-ID).")]
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID")]
# Bounded by the server's stream_max_maxsize in the handler (a 422 naming the range).
MaxsizeQuery = Annotated[int | None, Query(
    description="This client's stream buffer (items): 1 to the server's stream_max_maxsize "
                "(default 100000); without it, the server's stream_maxsize.")]


class _Pump:
    """One client: its buffer in the stream's fan-out, the shutdown wake-up, and its cleanup."""

    def __init__(self, ctx: ServerContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.stopping = False
        self.client: ClientBuffer | None = None
        self._closed = False
        self._shutdown_handle = ctx.shutdown.add(self._on_shutdown)
        ctx.metrics.stream_clients.labels(kind).inc()

    @property
    def sub(self) -> Subscription:
        """The fan-out's subscription on the stream (valid once joined)."""
        assert self.client is not None and self.client.fanout.sub is not None
        return self.client.fanout.sub

    async def join(self, key: Hashable, label: str,
                   open_subscription: Callable[[StreamFanout], Awaitable[None]],
                   maxsize: int | None) -> None:
        """Become a client of stream ``key`` (opening it with ``open_subscription`` if needed)."""
        settings = self.ctx.settings
        table = fanout_table(self.ctx, settings.stream_max_clients,
                             settings.stream_max_clients_total)
        self.client = await table.join(key, label, open_subscription,
                                       maxsize or settings.stream_maxsize,
                                       settings.stream_max_bytes)

    def _on_shutdown(self) -> None:  # on the loop (ShutdownSignal schedules it there)
        self.stopping = True
        if self.client is not None:
            self.client.wake.set()

    def close(self) -> None:
        """Leave the stream and forget the client (on the loop). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.ctx.shutdown.remove(self._shutdown_handle)
        self.ctx.metrics.stream_clients.labels(self.kind).dec()
        if self.client is not None:
            self.client.leave()

    async def next_batch(self) -> list[StreamItem] | None:
        """The next queued items; None once the stream ended or the server is stopping."""
        client = self.client
        assert client is not None
        while not self.stopping:
            items = client.drain(BATCH)
            if items:
                return items
            if client.ended:
                return None
            client.wake.clear()  # set again by new items, the stream's end, or shutdown
            await client.wake.wait()
        return None


def _shared_maxsize(ctx: ServerContext) -> int:
    return max(SHARED_MAXSIZE, ctx.settings.stream_maxsize)


def _refuse_maxsize(ctx: ServerContext, maxsize: int | None) -> Response | None:
    """A 422 answer if ``?maxsize=`` is outside 1..stream_max_maxsize; None if it is fine."""
    most = ctx.settings.stream_max_maxsize
    if maxsize is None or 1 <= maxsize <= most:
        return None
    record = ErrorRecord(
        type="InvalidArgumentError", origin="framework",
        message=f"?maxsize={maxsize} is outside the range this server allows: 1 to {most} items "
                f"(stream_max_maxsize). Ask for at most {most}, or leave maxsize out for the "
                f"default of {ctx.settings.stream_maxsize}.",
        context={"parameter": "maxsize", "minimum": 1, "maximum": most})
    ctx.metrics.count_error(422, record.type)
    return error_response(422, record)


async def _refuse_if_full(pump: _Pump, join: Awaitable[None]) -> Response | None:
    """Await ``join``; a full stream (or server) becomes a 503 answer (and the pump is released)."""
    try:
        await join
    except StreamFull as exc:
        pump.close()
        cap = {"max_clients_total" if exc.total else "max_clients": exc.cap}
        record = ErrorRecord(type="StreamFull", message=str(exc), origin="framework",
                             context={"stream": exc.stream, **cap})
        pump.ctx.metrics.count_error(503, record.type)
        return error_response(503, record, headers={"Retry-After": "5"})
    except BaseException:
        pump.close()
        raise
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


def _viewer_cannot_start(device_id: str, caller: Token) -> Forbidden:
    error = Forbidden(
        f"Starting the stream of {device_id!r} needs the 'operator' role; it is not running, "
        f"and the token of user {caller.user!r} has {caller.role!r}. Viewers may join a running "
        "stream: ask an operator to start it, or ask the lab's admin for an operator token.")
    error.labd_context = {  # type: ignore[attr-defined]
        "required_role": "operator", "role": caller.role, "user": caller.user,
        "device_id": device_id}
    return error


def _join_or_start(ctx: ServerContext, device_id: str, actor: Actor, caller: Token | None,
                   fanout: StreamFanout) -> None:
    """Join the device's running stream, or start it if the caller may (on a device worker).

    Joining subscribes to the live hub itself, so it can never start the device: a stream
    that ended in between refuses the subscription, and then this is a start after all.
    """
    hub = ctx.daemon.stream_hub(device_id)
    if hub is not None:
        try:
            sub = hub.subscribe(maxsize=_shared_maxsize(ctx), on_ready=fanout.on_ready)
        except RuntimeError:  # the stream ended just now
            pass
        else:
            fanout.adopt(sub)
            return
    if caller is not None and not caller.allows("operator"):
        raise _viewer_cannot_start(device_id, caller)
    with acting_as(actor):
        # daemon.subscribe starts the device as the framework: check the caller first.
        ctx.daemon.device_slot(device_id).check_command("start_streaming")
        fanout.adopt(guard_device_code(
            lambda: ctx.daemon.subscribe(device_id, on_ready=fanout.on_ready,
                                         maxsize=_shared_maxsize(ctx)),
            device_id, "start_streaming()"))


async def stream_device(
    device_id: DeviceIdPath, ctx: Ctx, actor: RemoteActor, request: Request,
    maxsize: MaxsizeQuery = None, last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """Subscribe to a device's data (``event: device_data``); an operator's request starts it.

    Viewers may join a running stream; starting one needs the ``operator`` role (403) and,
    on a claimed device, its owner (409), like any command.
    """
    refused = _refuse_maxsize(ctx, maxsize)
    if refused is not None:
        return refused
    after = _resume_after(last_event_id, last_event_id_header)
    caller = current_token(request)
    pump = _Pump(ctx, "device")

    async def open_subscription(fanout: StreamFanout) -> None:
        await ctx.run_for_device(
            device_id, lambda: _join_or_start(ctx, device_id, actor, caller, fanout),
            what=f"starting the stream of {device_id!r}")

    refused = await _refuse_if_full(pump, pump.join(
        ("device", device_id), f"/stream/devices/{device_id}", open_subscription, maxsize))
    if refused is not None:
        return refused
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
    refused = _refuse_maxsize(ctx, maxsize)
    if refused is not None:
        return refused
    after = _resume_after(last_event_id, last_event_id_header)
    handle: TaskHandle | RemoteRun
    remote_hub: StreamHub | None = None
    try:
        handle = ctx.daemon.get_task(task_id)
    except UnknownNameError:
        if ctx.daemon.lab is None:
            raise
        # A lab node: another node's run, its stream relayed here (routes_lab; 404 if none).
        handle, remote_hub = await run_on_other_node(ctx, task_id)
    pump = _Pump(ctx, "task")

    async def open_subscription(fanout: StreamFanout) -> None:
        if remote_hub is not None:
            fanout.adopt(remote_hub.subscribe(on_ready=fanout.on_ready,
                                              maxsize=_shared_maxsize(ctx)))
            return
        fanout.adopt(ctx.daemon.subscribe_task(task_id, on_ready=fanout.on_ready,
                                               maxsize=_shared_maxsize(ctx)))

    refused = await _refuse_if_full(pump, pump.join(
        ("task", task_id), f"/stream/tasks/{task_id}", open_subscription, maxsize))
    if refused is not None:
        return refused
    try:
        first, replay = _task_stream_start(pump, handle, after)
    except BaseException:
        pump.close()
        raise
    content = _generate(pump, first, replay, _merged, f"task {task_id!r} events", _is_finished)
    return _SSEResponse(ctx, pump, content)


def _task_stream_start(
    pump: _Pump, handle: TaskHandle | RemoteRun, after: int | None,
) -> tuple[list[bytes], list[StreamItem]]:
    """Build the first ``state`` frame and the items to send before live ones."""
    task_id = handle.task_id
    hub = pump.sub.hub
    info, now = handle.info(), time.time()
    state = {"event": "state", "task_id": task_id, "sequence": hub.sequence,
             "timestamp": iso_from_timestamp(now), "status": info["status"],
             "progress": info["progress"]}
    replay = hub.replay(after) if after is not None else []
    if handle.is_running():
        return [_frame("state", dumps(state), None)], replay
    # Ended before we subscribed: its "finished" event may be gone, so send one.
    assert pump.client is not None
    pump.client.fanout.catch_up()
    replay = [*replay, *pump.client.drain(len(pump.client))]
    if not any(_is_finished(item) for item in replay):
        replay.append(StreamItem(hub.sequence + 1, now, {
            "event": "finished", "task_id": task_id, "status": handle.status}))
    return [_frame("state", dumps(state), None)], replay


async def stream_events(
    ctx: Ctx, maxsize: MaxsizeQuery = None,
    last_event_id: LastEventIdQuery = None, last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """Every daemon event (devices added, states, errors, task states, claims, leases, streams)."""
    refused = _refuse_maxsize(ctx, maxsize)
    if refused is not None:
        return refused
    after = _resume_after(last_event_id, last_event_id_header)
    hub = ctx.daemon.events
    pump = _Pump(ctx, "events")

    async def open_subscription(fanout: StreamFanout) -> None:
        fanout.adopt(hub.subscribe(on_ready=fanout.on_ready, maxsize=_shared_maxsize(ctx)))

    refused = await _refuse_if_full(pump, pump.join(
        ("events",), "/stream/events", open_subscription, maxsize))
    if refused is not None:
        return refused
    replay = hub.replay(after) if after is not None else []
    content = _generate(pump, (), replay, _merged, "daemon events")
    return _SSEResponse(ctx, pump, content)


# ?maxsize= outside 1..stream_max_maxsize answers 422 (covered by the generic "4XX" entry:
# the OpenAPI description lists no 422, which FastAPI would otherwise claim for validation).
_SSE_DOCS: dict[int | str, dict[str, Any]] = {
    200: {"description": "A stream of Server-Sent Events (see docs/http-api.md, Streams).",
          "content": {"text/event-stream": {}}},
    403: {"description": "Starting a device stream that is not running needs the operator "
                         "role (viewers may join a running one)."},
    409: {"description": "Starting a device stream on a device someone else owns."},
    503: {"description": "The stream already has stream_max_clients clients, or the server "
                         "stream_max_clients_total over all streams (error type StreamFull), "
                         "the device has device_max_in_flight calls in flight, or the server "
                         "is stopping."},
}

ROUTES = [
    RouteSpec("GET", "/stream/devices/{device_id}", stream_device, responses=_SSE_DOCS),
    RouteSpec("GET", "/stream/tasks/{task_id}", stream_task, responses=_SSE_DOCS),
    RouteSpec("GET", "/stream/events", stream_events, responses=_SSE_DOCS),
]
