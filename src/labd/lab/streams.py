"""Device streams across nodes: relayed through capped Redis Streams, fanned out locally.

On the device's node a :class:`StreamRelay` subscribes once to the device's stream (as any
subscriber: on its own delivery thread, never the device's) and puts each item into a
bounded queue that drops its oldest item when full (counted); one thread moves the queue
into the engine with ``XADD MAXLEN ~ N``, so a slow or absent engine never blocks the device.
The relay runs while some node reads it (each reader renews its interest every heartbeat).

On each other node with subscribers a :class:`StreamReader` (one per stream) reads the
engine's stream and publishes into a local :class:`~labd.streaming.StreamHub`; the server's
SSE routes, the dashboard and scripts subscribe to that hub as to a local device's. A gap in
the device's sequence numbers counts as items dropped on the way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from labd.errors import UnserializableResult
from labd.lab.calls import dumps
from labd.lab.coordinator import Coordinator, StreamEntry
from labd.lab.errors import EngineUnavailableError
from labd.streaming import StreamHub, Subscription

__all__ = ["StreamReader", "StreamRelay", "stream_name"]

log = logging.getLogger("labd.lab")

#: Items a relay queues for the engine before it drops the oldest.
RELAY_QUEUE_MAX = 4096
#: Items moved into the engine per round trip.
RELAY_BATCH = 500
#: The sequence number of the entry a relay adds when the device's stream ended.
END_OF_STREAM = -1


def stream_name(source_id: str, kind: str = "dev", node: str = "") -> str:
    """The engine stream of a device (``dev:<id>``) or of a run (``task:<home node>:<id>``)."""
    return f"dev:{source_id}" if kind == "dev" else f"task:{node}:{source_id}"


class StreamRelay:
    """One device's stream into the engine (on the device's node); see the module docstring."""

    def __init__(
        self, coordinator: Coordinator, device_id: str,
        subscribe: Callable[[int], Subscription], maxlen: int, name: str | None = None,
    ) -> None:
        self.device_id = device_id  # or a run's id, for a run's stream
        self.name = name or stream_name(device_id)
        self._coordinator = coordinator
        self._maxlen = maxlen
        self.engine_dropped = 0  # items lost because the engine did not take them
        self.unencodable = 0  # items that cannot go as JSON (a driver object in a payload)
        self.relayed = 0
        self.readers: dict[str, float] = {}  # reader node -> monotonic expiry of its interest
        self._closed = threading.Event()
        # Pull mode, no callback: the subscription's own queue is the bounded drop-oldest one.
        self._sub = subscribe(RELAY_QUEUE_MAX)
        self._thread = threading.Thread(target=self._pump, name=f"labd-lab-relay-{device_id}",
                                        daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Items lost before the engine: queue overflow, engine failures, items not JSON."""
        return self._sub.dropped + self.engine_dropped + self.unencodable

    def _pump(self) -> None:
        name = self.name
        sub = self._sub
        while not self._closed.is_set():
            first = sub.get(0.5)
            if first is None:
                if sub.closed and not self._closed.is_set():
                    self._send_end(name)  # the device's stream ended: readers end theirs
                if sub.closed:
                    return
                continue
            entries = []
            for item in [first, *sub.drain(RELAY_BATCH - 1)]:
                try:
                    entries.append(StreamEntry("", item.sequence, item.timestamp,
                                               dumps(item.payload, f"an item of {name}")))
                except UnserializableResult as exc:
                    # Readers count the gap as a drop; the relay goes on with the next item.
                    self.unencodable += 1
                    if self.unencodable == 1:
                        log.warning("lab: %s; such items are not relayed to other nodes", exc)
            if not entries:
                continue
            try:
                self._coordinator.stream_add(name, entries, self._maxlen)
                self.relayed += len(entries)
            except EngineUnavailableError:
                self.engine_dropped += len(entries)
                self._closed.wait(0.2)  # the engine is away: do not spin

    def _send_end(self, name: str) -> None:
        try:
            self._coordinator.stream_add(name, [StreamEntry("", END_OF_STREAM, time.time(), b"null")],
                                         self._maxlen)
        except EngineUnavailableError:
            pass  # the readers' nodes notice the relay is gone when they renew (it is not kept)

    @property
    def running(self) -> bool:
        """False once the device's stream ended (stopped, device removed)."""
        return not self._sub.closed

    def alive(self) -> bool:
        """True while some reader renewed its interest recently and the stream runs."""
        now = time.monotonic()
        return not self._sub.closed and any(expiry > now for expiry in self.readers.values())

    def close(self) -> None:
        """Stop relaying (unsubscribes from the device's stream). Idempotent."""
        self._closed.set()
        self._sub.close()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def stats(self) -> dict[str, Any]:
        """Relayed and dropped counts, queue length, readers."""
        return {"device_id": self.device_id, "relayed": self.relayed, "dropped": self.dropped,
                "queued": len(self._sub), "readers": sorted(self.readers)}


class StreamReader:
    """One remote device's stream read from the engine into a local hub; see the docstring."""

    def __init__(
        self, coordinator: Coordinator, device_id: str, node: str,
        on_idle: Callable[[StreamReader], None], idle_after: float = 2.0, name: str | None = None,
    ) -> None:
        self.device_id = device_id  # or a run's id, for a run's stream
        self.name = name or stream_name(device_id)
        self.node = node  # the device's node
        self._coordinator = coordinator
        self._on_idle = on_idle
        self.hub = StreamHub(f"{device_id}@{node}", history=256)
        self.received = 0
        self.gaps = 0  # items the device published that never arrived here
        self.last_sequence: int | None = None
        self.ended = False  # the device's stream ended (stopped on its node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"labd-lab-reader-{device_id}",
                                        daemon=True)
        self._started = time.monotonic()
        self._after = "$"  # where reading starts: set by start()
        self._idle_after = idle_after  # without local subscribers this long: stop reading

    def start(self) -> None:
        """Start reading the entries added from now on (this call reads where "now" is).

        The position is taken here, not by the thread's first read: an entry the device's
        node adds before that read (its relay starts as soon as it is asked) still arrives.
        """
        try:
            self._after = self._coordinator.stream_tail(self.name)
        except EngineUnavailableError:
            self._after = "$"  # the engine is away: nothing can be relayed meanwhile either
        self._thread.start()

    def _read(self) -> None:
        after = self._after
        name = self.name
        idle_since: float | None = None
        while not self._stop.is_set():
            try:
                entries = self._coordinator.stream_read(name, after, min(self._idle_after, 0.5), 1000)
            except EngineUnavailableError:
                self._stop.wait(0.5)
                continue
            for entry in entries:
                after = entry.entry_id
                if entry.sequence == END_OF_STREAM:
                    self.ended = True
                    self._on_idle(self)  # ends the local hub: subscribers see the stream end
                    return
                self._take(entry)
            if self.hub.subscriptions:
                idle_since = None
            elif time.monotonic() - self._started > self._idle_after:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self._idle_after:
                    self._on_idle(self)
                    return

    def _take(self, entry: StreamEntry) -> None:
        last = self.last_sequence
        if last is not None and entry.sequence > last + 1:
            self.gaps += entry.sequence - last - 1
        self.last_sequence = entry.sequence
        self.received += 1
        try:
            self.hub.publish(orjson.loads(entry.payload))
        except orjson.JSONDecodeError:
            self.gaps += 1

    def close(self) -> None:
        """Stop reading and end the local hub's subscriptions. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self.hub.close(timeout=0.5)

    def stats(self) -> dict[str, Any]:
        """Received items, gaps (drops on the way), local subscribers."""
        return {"device_id": self.device_id, "node": self.node, "received": self.received,
                "gaps": self.gaps, "subscribers": len(self.hub.subscriptions)}
