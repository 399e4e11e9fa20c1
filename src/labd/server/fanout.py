"""One hub subscription per stream, fanned out to that stream's SSE clients on the event loop.

A publish on the device's thread must not cost more with 1,000 SSE clients than with one. So
each stream a server serves has one :class:`StreamFanout`: a single pull-mode
:class:`labd.streaming.Subscription` whose ``on_ready`` does one
``loop.call_soon_threadsafe``, then stays quiet until the loop has drained the subscription
and re-armed it (a burst of publishes costs one wake-up). On the loop, each batch goes to
every client's :class:`ClientBuffer`, bounded in items *and* bytes: a client that stops
reading loses its own oldest items (counted), never anyone else's. A stream takes at most
``max_clients`` clients and the server at most ``max_clients_total`` over all its streams; the
next one is refused (:class:`StreamFull`, HTTP 503) before anything is opened or started.

The fan-out's subscription lives as long as it has clients: the last one to leave closes it,
so a stream started by SSE clients stops as before (DESIGN.md, Streaming). Everything but
:meth:`StreamFanout.on_ready` and :meth:`StreamFanout.adopt` runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np

from labd.errors import LabDaemonException
from labd.streaming import FanoutStats, StreamItem, Subscription

__all__ = ["ClientBuffer", "FanoutTable", "StreamFanout", "StreamFull", "payload_bytes"]

#: Items the shared subscription holds while the loop is busy (drained every loop turn).
SHARED_MAXSIZE = 10_000


class StreamFull(LabDaemonException):
    """The stream (or, with ``total``, the server) has as many SSE clients as allowed (HTTP 503)."""

    def __init__(self, stream: str, cap: int, *, total: bool = False) -> None:
        if total:
            message = (
                f"This server already has {cap} SSE client(s) over all its streams, the most it "
                f"allows (stream_max_clients_total={cap}), so {stream} was refused. Close "
                "another stream, or start the server with a larger stream_max_clients_total.")
        else:
            message = (
                f"Stream {stream} already has {cap} SSE client(s), the most this server allows "
                f"(stream_max_clients={cap}). Close another client of this stream, or start the "
                "server with a larger stream_max_clients.")
        super().__init__(message)
        self.stream = stream
        self.cap = cap
        self.total = total


def payload_bytes(obj: Any, depth: int = 2) -> int:
    """A cheap estimate of what ``obj`` weighs in memory and on the wire (for buffer caps).

    Arrays count their ``nbytes``, strings and bytes their length, numbers 8; containers are
    sampled (16 items, ``depth`` levels) and scaled to their length.
    """
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, str | bytes | bytearray):
        return len(obj)
    if isinstance(obj, list | tuple):
        if not obj or depth == 0:
            return 8 * len(obj) + 2
        sample = obj[:16]
        return sum(payload_bytes(v, depth - 1) for v in sample) * len(obj) // len(sample) + 2
    if isinstance(obj, dict):
        if depth == 0:
            return 16 * len(obj) + 2
        return sum(len(str(k)) + payload_bytes(v, depth - 1) for k, v in obj.items()) + 2
    return 8


class ClientBuffer:
    """One SSE client's buffer on the loop: at most ``maxsize`` items and ``max_bytes`` bytes.

    Beyond either cap the oldest items go (counted in :attr:`dropped`); the newest item is
    always kept, so one item larger than ``max_bytes`` still gets through.
    """

    def __init__(self, fanout: StreamFanout, maxsize: int, max_bytes: int) -> None:
        self.fanout = fanout
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.bytes = 0
        self.delivered = 0
        self.dropped = 0
        self.ended = False  # the stream ended: what is queued is all that will come
        self.wake = asyncio.Event()
        self._items: deque[tuple[StreamItem, int]] = deque()

    def put(self, batch: list[tuple[StreamItem, int]]) -> None:
        """Queue a batch of ``(item, size)``, dropping this client's oldest beyond the caps."""
        items = self._items
        items.extend(batch)
        self.bytes += sum(size for _, size in batch)
        while len(items) > self.maxsize or (self.bytes > self.max_bytes and len(items) > 1):
            self.bytes -= items.popleft()[1]
            self.dropped += 1
        self.wake.set()

    def end(self) -> None:
        """Nothing more will come (the stream ended)."""
        self.ended = True
        self.wake.set()

    def drain(self, limit: int) -> list[StreamItem]:
        """Take up to ``limit`` queued items, oldest first."""
        items = self._items
        out: list[StreamItem] = []
        while items and len(out) < limit:
            item, size = items.popleft()
            self.bytes -= size
            out.append(item)
        self.delivered += len(out)
        return out

    def __len__(self) -> int:
        return len(self._items)

    def leave(self) -> None:
        """Stop receiving (the client went away). Idempotent."""
        self.fanout.remove(self)

    def stats(self) -> dict[str, Any]:
        """This client's counters."""
        return {"queued": len(self._items), "bytes": self.bytes, "maxsize": self.maxsize,
                "max_bytes": self.max_bytes, "delivered": self.delivered,
                "dropped": self.dropped}


class StreamFanout:
    """The one subscription a server holds on a stream, and the clients it feeds."""

    def __init__(self, table: FanoutTable, key: Hashable, loop: asyncio.AbstractEventLoop) -> None:
        self.table = table
        self.key = key
        self.loop = loop
        self.sub: Subscription | None = None
        self.clients: list[ClientBuffer] = []
        self.ended = False  # the subscription closed: no new clients join this fan-out
        self._lock = threading.Lock()  # adopt() (a worker) against abandon() (the loop)
        self._abandoned = False

    # -- any thread --------------------------------------------------------------------------
    def on_ready(self) -> None:
        """The subscription's hook: data arrived (or the stream ended). One loop wake-up."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self.loop.call_soon_threadsafe(self._dispatch)

    def adopt(self, sub: Subscription) -> None:
        """Keep ``sub`` (subscribed on a worker); close it at once if the opener gave up."""
        with self._lock:
            if not self._abandoned:
                sub.fanout = self.stats
                self.sub = sub
                return
        sub.close()

    def stats(self) -> FanoutStats:
        """The clients' counters, for the stream's stats."""
        clients = list(self.clients)
        return FanoutStats(len(clients), sum(c.dropped for c in clients),
                           [c.stats() for c in clients])

    # -- the loop ----------------------------------------------------------------------------
    def abandon(self) -> None:
        """Opening failed or was cancelled: drop the subscription, if one arrived."""
        with self._lock:
            self._abandoned = True
            sub, self.sub = self.sub, None
        self.ended = True
        if sub is not None:
            sub.close()

    def catch_up(self) -> None:
        """Hand the clients what the subscription holds now (after opening, before a drain)."""
        self._dispatch()

    def add_client(self, maxsize: int, max_bytes: int) -> ClientBuffer:
        client = ClientBuffer(self, maxsize, max_bytes)
        self.clients.append(client)
        return client

    def remove(self, client: ClientBuffer) -> None:
        if client not in self.clients:
            return
        self.clients.remove(client)
        self.table.clients_total -= 1
        if not self.clients:
            # The last client left: release the stream (it stops if clients started it).
            self.ended = True
            self.table.forget(self)
            sub = self.sub
            if sub is not None:
                sub.close()

    def _dispatch(self) -> None:
        sub = self.sub
        if sub is None:
            return  # not adopted yet; start() catches up
        closed = sub.closed  # read first: everything published before the close is queued
        items = sub.drain()
        if items:
            batch = [(item, payload_bytes(item.payload)) for item in items]
            for client in self.clients:
                client.put(batch)
        if closed:
            self.ended = True
            self.table.forget(self)
            for client in self.clients:
                client.end()
        elif not sub.arm():  # more arrived meanwhile (or it just closed): go again
            self.loop.call_soon(self._dispatch)


class FanoutTable:
    """The fan-outs of one server, one per stream and event loop."""

    def __init__(self, max_clients: int, max_clients_total: int = 1000) -> None:
        self.max_clients = max_clients
        self.max_clients_total = max_clients_total
        #: Clients over all streams, counting those still joining (on the loop, no lock).
        self.clients_total = 0
        self._fanouts: dict[tuple[asyncio.AbstractEventLoop, Hashable], StreamFanout] = {}
        self._opening: dict[tuple[asyncio.AbstractEventLoop, Hashable], list[Any]] = {}

    async def join(
        self, key: Hashable, label: str,
        open_subscription: Callable[[StreamFanout], Awaitable[None]],
        maxsize: int, max_bytes: int,
    ) -> ClientBuffer:
        """A new client of stream ``key``: joins its fan-out, opening one if there is none.

        ``open_subscription(fanout)`` subscribes (on a worker, if it runs device code) and
        hands the subscription to ``fanout.adopt``. Raises :class:`StreamFull` at either cap,
        before opening anything (a refused client never starts a device's stream).
        """
        if self.clients_total >= self.max_clients_total:
            raise StreamFull(label, self.max_clients_total, total=True)
        loop = asyncio.get_running_loop()
        slot = (loop, key)
        opening = self._opening.setdefault(slot, [asyncio.Lock(), 0])
        opening[1] += 1
        self.clients_total += 1  # this client's place, held while it waits to join
        joined = False
        try:
            async with opening[0]:  # one opener per stream; later clients join its fan-out
                fanout = self._fanouts.get(slot)
                if fanout is not None and (fanout.ended or fanout.sub is None or fanout.sub.closed):
                    fanout = None
                if fanout is not None and len(fanout.clients) >= self.max_clients:
                    raise StreamFull(label, self.max_clients)
                if fanout is None:
                    fanout = await self._open(slot, open_subscription)
                client = fanout.add_client(maxsize, max_bytes)
                joined = True  # from now on the client's leave() gives its place back
                return client
        finally:
            if not joined:
                self.clients_total -= 1
            opening[1] -= 1
            if not opening[1]:
                del self._opening[slot]

    async def _open(
        self, slot: tuple[asyncio.AbstractEventLoop, Hashable],
        open_subscription: Callable[[StreamFanout], Awaitable[None]],
    ) -> StreamFanout:
        fanout = StreamFanout(self, slot[1], slot[0])
        try:
            await open_subscription(fanout)
        except BaseException:
            fanout.abandon()
            raise
        if fanout.sub is None:  # pragma: no cover - open_subscription must adopt or raise
            raise RuntimeError(f"stream {slot[1]!r}: no subscription was opened")
        self._fanouts[slot] = fanout
        fanout.catch_up()
        return fanout

    def forget(self, fanout: StreamFanout) -> None:
        """Drop ``fanout`` from the table (it ended), unless a newer one replaced it."""
        slot = (fanout.loop, fanout.key)
        if self._fanouts.get(slot) is fanout:
            del self._fanouts[slot]


_TABLES: weakref.WeakKeyDictionary[object, FanoutTable] = weakref.WeakKeyDictionary()


def fanout_table(owner: object, max_clients: int, max_clients_total: int) -> FanoutTable:
    """The fan-out table of ``owner`` (a server context), made on first use."""
    table = _TABLES.get(owner)
    if table is None:
        table = _TABLES[owner] = FanoutTable(max_clients, max_clients_total)
    return table
