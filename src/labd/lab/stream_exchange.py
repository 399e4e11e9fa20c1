"""A node's side of device streams across the lab: its relays and its readers.

The relays put this node's device streams into the engine while other nodes read them; the
readers bring other nodes' device streams into local hubs (one reader per stream, shared by
every local subscriber). Both end when nobody reads them; a stream stopped on its own node
ends for every reader (see :mod:`labd.lab.streams`).

    exchange = StreamExchange(daemon, coordinator, timings, 2000, locate=..., request=..., notify=...)
    hub = exchange.hub("camera1")     # subscribe to it as to a local device's hub
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from labd.lab.coordinator import Coordinator
from labd.lab.settings import LabTimings
from labd.lab.streams import StreamReader, StreamRelay, stream_name
from labd.ownership import Actor, acting_as, current_actor
from labd.streaming import StreamHub

__all__ = ["StreamExchange"]


class StreamExchange:
    """Relays and readers of one node; see the module docstring."""

    def __init__(
        self, daemon: Any, coordinator: Coordinator, node: str, timings: LabTimings, maxlen: int, *,
        locate: Callable[[str], str],
        request: Callable[[str, dict[str, Any], float | None], Any],
        notify: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.daemon = daemon
        self.coordinator = coordinator
        self.node = node  # this node's name (its runs' streams are task:<node>:<id>)
        self.timings = timings
        self.maxlen = maxlen
        self._locate = locate
        self._request = request
        self._notify = notify
        self._lock = threading.Lock()
        # Keyed by engine stream name: dev:<device> or task:<home node>:<run>.
        self._relays: dict[str, StreamRelay] = {}  # this node's streams, read elsewhere
        self._readers: dict[str, StreamReader] = {}  # other nodes' streams, read here

    # -- reading another node's stream -----------------------------------------------------
    def hub(self, device_id: str) -> StreamHub:
        """This node's hub of another node's device stream: one reader per stream, shared."""
        node = self._locate(device_id)
        return self._hub(node, device_id, "dev", {"method": "start_streaming"})

    def task_hub(self, node: str, task_id: str) -> StreamHub:
        """This node's hub of the progress stream of ``node``'s run ``task_id``."""
        return self._hub(node, task_id, "task", {})

    def _hub(self, node: str, source_id: str, kind: str, extra: dict[str, Any]) -> StreamHub:
        name = stream_name(source_id, kind, node)
        with self._lock:
            reader = self._readers.get(name)
            if reader is not None and not reader.hub.closed:
                return reader.hub
            reader = StreamReader(self.coordinator, source_id, node, self._reader_idle,
                                  idle_after=max(2 * self.timings.heartbeat, 0.2), name=name)
            self._readers[name] = reader
        try:
            reader.start()  # reads from "now" on, before the relay starts: nothing is missed
            answer = self._request(node, {"op": "stream_open", "device": source_id, "kind": kind,
                                          "principal": current_actor().principal, **extra}, None)
        except BaseException:
            self._drop_reader(reader)
            raise
        if isinstance(answer, dict) and answer.get("ended"):
            self._drop_reader(reader)  # ended meanwhile: its subscribers see the end at once
        return reader.hub

    def _drop_reader(self, reader: StreamReader) -> None:
        with self._lock:
            if self._readers.get(reader.name) is reader:
                del self._readers[reader.name]
        reader.close()

    def _reader_idle(self, reader: StreamReader) -> None:
        """No local subscriber for a while, or the stream ended: stop reading, tell its node."""
        self._drop_reader(reader)
        if not reader.ended:
            kind = "task" if reader.name.startswith("task:") else "dev"
            self._notify(reader.node, {"op": "stream_close", "device": reader.device_id,
                                       "kind": kind})

    # -- relaying this node's streams ----------------------------------------------------------
    def handle(self, op: str, request: dict[str, Any]) -> Any:
        """Answer ``stream_open``, ``stream_keep`` or ``stream_close`` from a reading node."""
        source_id, reader_node = str(request.get("device")), str(request.get("from"))
        kind = "task" if request.get("kind") == "task" else "dev"
        name = stream_name(source_id, kind, self.node)
        if op == "stream_open":
            if kind == "task":
                return self._open_task_relay(source_id, reader_node, name)
            return self._open_relay(source_id, reader_node, request.get("principal"))
        if op == "stream_keep":  # renews interest only: a stream someone stopped stays stopped
            self._keep_relay(name, reader_node)
        else:
            self._close_relay(name, reader_node)
        return None

    def _open_task_relay(self, task_id: str, reader_node: str, name: str) -> dict[str, Any]:
        """Relay one of this node's runs' progress stream while others read it."""
        handle = self.daemon.get_task(task_id)  # UnknownTaskError (404) for an id not here
        with self._lock:
            relay = self._relays.get(name)
            if relay is None or not relay.running:
                if not handle.is_running():
                    return {"ended": True}
                try:
                    relay = StreamRelay(
                        self.coordinator, task_id,
                        lambda maxsize: self.daemon.subscribe_task(task_id, maxsize=maxsize),
                        self.maxlen, name=name)
                except RuntimeError:  # its stream ended just now
                    return {"ended": True}
                self._relays[name] = relay
            relay.readers[reader_node] = time.monotonic() + self.timings.directory_ttl
            return relay.stats()

    def _open_relay(self, device_id: str, reader_node: str, principal: Any) -> dict[str, Any]:
        """A reader on ``reader_node`` wants ``device_id``'s stream: relay it (started if need be)."""
        slot = self.daemon.device_slot(device_id)
        name = stream_name(device_id)
        with self._lock:
            relay = self._relays.get(name)
            if relay is None or not relay.running:  # none yet, or the device's stream ended
                if relay is not None:
                    relay.close()
                if self.daemon.stream_hub(device_id) is None:
                    with acting_as(Actor(remote=True, principal=principal)):
                        slot.check_command("start_streaming")  # starting it is a command
                relay = StreamRelay(
                    self.coordinator, device_id,
                    lambda maxsize: self.daemon.subscribe(device_id, maxsize=maxsize),
                    self.maxlen)
                self._relays[name] = relay
            relay.readers[reader_node] = time.monotonic() + self.timings.directory_ttl
            return relay.stats()

    def _keep_relay(self, name: str, reader_node: str) -> None:
        with self._lock:
            relay = self._relays.get(name)
            if relay is not None and relay.running:
                relay.readers[reader_node] = time.monotonic() + self.timings.directory_ttl

    def _close_relay(self, name: str, reader_node: str) -> None:
        with self._lock:
            relay = self._relays.get(name)
            if relay is None:
                return
            relay.readers.pop(reader_node, None)
            if relay.alive():
                return
            del self._relays[name]
        relay.close()

    def keep(self) -> None:
        """Every heartbeat: renew this node's interest in remote streams; end unread relays."""
        with self._lock:
            readers = list(self._readers.values())
            stale = [r for r in self._relays.values() if not r.alive()]
            for relay in stale:
                del self._relays[relay.name]
        for reader in readers:
            self._notify(reader.node, {"op": "stream_keep", "device": reader.device_id,
                                       "kind": "task" if reader.name.startswith("task:") else "dev"})
        for relay in stale:
            relay.close()

    def stats(self) -> dict[str, Any]:
        """Relays (this node's devices read elsewhere) and readers (others' devices read here)."""
        with self._lock:
            return {"relays": [r.stats() for r in self._relays.values()],
                    "readers": [r.stats() for r in self._readers.values()]}

    def close(self) -> None:
        """End every reader and relay of this node."""
        with self._lock:
            readers, self._readers = list(self._readers.values()), {}
            relays, self._relays = list(self._relays.values()), {}
        for reader in readers:
            reader.close()
        for relay in relays:
            relay.close()
