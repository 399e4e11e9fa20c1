"""The in-process coordinator: the engine's behaviour with dicts, one lock and conditions.

For tests and for several nodes inside one Python process. It keeps the same rules as the
Redis scripts (all-or-none claims, FIFO reservations, fencing tokens from a counter and the
clock in µs, expiring keys) so the same behaviour tests run against both.

    coordinator = LocalCoordinator()
    node_a = LabNode(daemon_a, coordinator, node="a")
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from labd.lab.coordinator import ClaimHolder, ClaimOutcome, ClaimSpec, StreamEntry
from labd.lab.errors import DeviceIdConflictError, NodeNameConflictError

__all__ = ["LocalCoordinator"]

log = logging.getLogger("labd.lab")


class _Expiring:
    """A value with a deadline on the monotonic clock."""

    __slots__ = ("deadline", "value")

    def __init__(self, value: Any, ttl: float) -> None:
        self.value = value
        self.deadline = time.monotonic() + ttl

    @property
    def alive(self) -> bool:
        return time.monotonic() < self.deadline


class LocalCoordinator:
    """The coordinator for one process; see the module docstring."""

    description = "in-process coordinator"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._nodes: dict[str, _Expiring] = {}
        self._instances: dict[str, _Expiring] = {}  # node -> the process registered under it
        self._devices: dict[str, _Expiring] = {}  # device id -> node
        self._claims: dict[str, _Expiring] = {}  # device id -> ClaimHolder
        self._fence = 0
        self._tickets = itertools.count(1)
        self._waiters: dict[int, _Expiring] = {}  # ticket -> (spec, device ids)
        self._lists: dict[str, deque[bytes]] = {}
        self._streams: dict[str, list[tuple[int, StreamEntry]]] = {}
        self._stream_ids = itertools.count(1)
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.closed = False

    def ping(self) -> None:
        """Always answers."""

    # -- directory -------------------------------------------------------------------------
    def register(
        self, node: str, info: Mapping[str, Any], device_ids: Sequence[str], ttl: float,
        instance: str = "",
    ) -> None:
        """See :meth:`Coordinator.register`."""
        with self._lock:
            owner = self._instances.get(node)
            if owner is not None and owner.alive and owner.value != instance:
                raise NodeNameConflictError(node)
            for device_id in device_ids:
                held = self._devices.get(device_id)
                if held is not None and held.alive and held.value != node:
                    raise DeviceIdConflictError(device_id, held.value)
            self._nodes[node] = _Expiring(dict(info), ttl)
            self._instances[node] = _Expiring(instance, ttl)
            for device_id in device_ids:
                self._devices[device_id] = _Expiring(node, ttl)

    def unregister(self, node: str, device_ids: Sequence[str], instance: str = "") -> None:
        """See :meth:`Coordinator.unregister`."""
        with self._lock:
            owner = self._instances.get(node)
            if owner is not None and owner.alive and owner.value != instance:
                return  # another process uses the name now
            self._instances.pop(node, None)
            self._nodes.pop(node, None)
            for device_id in device_ids:
                held = self._devices.get(device_id)
                if held is not None and held.value == node:
                    del self._devices[device_id]

    def nodes(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Coordinator.nodes`."""
        with self._lock:
            return {name: dict(entry.value) for name, entry in self._nodes.items() if entry.alive}

    def node_of(self, device_id: str) -> str | None:
        """See :meth:`Coordinator.node_of`."""
        with self._lock:
            held = self._devices.get(device_id)
            return str(held.value) if held is not None and held.alive else None

    def publish(self, event: Mapping[str, Any]) -> None:
        """Call every listener (in-process subscribers of the event channel)."""
        for listener in list(self._listeners):
            try:
                listener(dict(event))
            except Exception:
                log.exception("lab: an event listener failed")

    def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """See :meth:`Coordinator.listen` (called on the publisher's thread here)."""
        self._listeners.append(callback)

        def stop() -> None:
            try:
                self._listeners.remove(callback)
            except ValueError:
                pass
        return stop

    # -- claims ----------------------------------------------------------------------------
    def _live_claim(self, device_id: str) -> ClaimHolder | None:
        entry = self._claims.get(device_id)
        if entry is None:
            return None
        if not entry.alive:
            del self._claims[device_id]
            return None
        holder: ClaimHolder = entry.value
        return holder

    def claim(
        self, spec: ClaimSpec, device_ids: Sequence[str], ttl: float, ticket: int | None = None,
    ) -> ClaimOutcome:
        """See :meth:`Coordinator.claim`."""
        ids = list(dict.fromkeys(device_ids))
        with self._lock:
            busy: list[ClaimHolder] = []
            free: list[str] = []
            for device_id in ids:
                holder = self._live_claim(device_id)
                if holder is None:
                    free.append(device_id)
                elif holder.owner_key != spec.owner_key:
                    busy.append(holder)
            if not busy:
                busy = self._reserved(free, ticket)
            if busy:
                return ClaimOutcome(None, tuple(busy))
            now_us = time.time_ns() // 1000
            self._fence = max(self._fence + 1, now_us)
            token = self._fence
            since = time.time()
            for device_id in ids:
                self._claims[device_id] = _Expiring(ClaimHolder(
                    device_id, spec.owner_key, spec.label, spec.kind, spec.owner_id, spec.node,
                    since, token), ttl)
            if ticket is not None:
                self._waiters.pop(ticket, None)
            return ClaimOutcome(token)

    def _reserved(self, free: list[str], ticket: int | None) -> list[ClaimHolder]:
        # Free devices wanted by an earlier live waiter are reserved for it (FIFO).
        busy = []
        wanted = set(free)
        for other in sorted(self._waiters):
            if ticket is not None and other >= ticket:
                break
            entry = self._waiters[other]
            if not entry.alive:
                del self._waiters[other]
                continue
            spec, ids, queued_at = entry.value
            for device_id in ids:
                if device_id in wanted:
                    wanted.discard(device_id)
                    busy.append(ClaimHolder(device_id, spec.owner_key, spec.label, spec.kind,
                                            spec.owner_id, spec.node, queued_at))
        return busy

    def enqueue(self, spec: ClaimSpec, device_ids: Sequence[str], ttl: float) -> int:
        """See :meth:`Coordinator.enqueue`."""
        with self._lock:
            ticket = next(self._tickets)
            self._waiters[ticket] = _Expiring((spec, tuple(device_ids), time.time()), ttl)
            return ticket

    def refresh_waiter(
        self, ticket: int, spec: ClaimSpec, device_ids: Sequence[str], ttl: float,
    ) -> None:
        """See :meth:`Coordinator.refresh_waiter`."""
        with self._lock:
            entry = self._waiters.get(ticket)
            queued_at = entry.value[2] if entry is not None else time.time()
            self._waiters[ticket] = _Expiring((spec, tuple(device_ids), queued_at), ttl)

    def dequeue(self, ticket: int) -> None:
        """See :meth:`Coordinator.dequeue`."""
        with self._lock:
            self._waiters.pop(ticket, None)

    def renew(self, device_ids: Sequence[str], token: int, ttl: float) -> list[str]:
        """See :meth:`Coordinator.renew`."""
        lost = []
        with self._lock:
            for device_id in device_ids:
                holder = self._live_claim(device_id)
                if holder is None or holder.token != token:
                    lost.append(device_id)
                else:
                    self._claims[device_id] = _Expiring(holder, ttl)
        return lost

    def release(self, device_ids: Sequence[str], token: int) -> None:
        """See :meth:`Coordinator.release`."""
        with self._lock:
            for device_id in device_ids:
                holder = self._live_claim(device_id)
                if holder is not None and holder.token == token:
                    del self._claims[device_id]

    def holder(self, device_id: str) -> ClaimHolder | None:
        """See :meth:`Coordinator.holder`."""
        with self._lock:
            return self._live_claim(device_id)

    # -- request / reply -------------------------------------------------------------------
    def _push(self, key: str, payload: bytes) -> None:
        with self._changed:
            self._lists.setdefault(key, deque()).append(payload)
            self._changed.notify_all()

    def _pop(self, key: str, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                items = self._lists.get(key)
                if items:
                    payload = items.popleft()
                    if not items:
                        del self._lists[key]
                    return payload
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    return None
                self._changed.wait(remaining)

    def push_request(self, node: str, payload: bytes) -> None:
        """See :meth:`Coordinator.push_request`."""
        self._push(f"req:{node}", payload)

    def pop_request(self, node: str, timeout: float) -> bytes | None:
        """See :meth:`Coordinator.pop_request`."""
        return self._pop(f"req:{node}", timeout)

    def exchange(self, node: str, payload: bytes, reply_key: str, wait: float) -> bytes | None:
        """See :meth:`Coordinator.exchange`."""
        self.push_request(node, payload)
        return self.pop_reply(reply_key, wait)

    async def exchange_async(
        self, node: str, payload: bytes, reply_key: str, wait: float,
    ) -> bytes | None:
        """See :meth:`Coordinator.exchange_async`: in one process there is no socket to
        await, so this does not wait (the caller waits with :meth:`pop_reply` on a thread)."""
        self.push_request(node, payload)
        return self.pop_reply(reply_key, 0.0)

    async def close_async(self) -> None:
        """See :meth:`Coordinator.close_async` (nothing to drop)."""

    def push_reply(self, reply_key: str, payload: bytes, ttl: float) -> None:
        """See :meth:`Coordinator.push_reply` (an unread reply stays until popped)."""
        self._push(f"reply:{reply_key}", payload)

    def reply_and_pop(
        self, reply_key: str, payload: bytes, ttl: float, node: str, timeout: float,
    ) -> bytes | None:
        """See :meth:`Coordinator.reply_and_pop`."""
        self.push_reply(reply_key, payload, ttl)
        return self.pop_request(node, timeout)

    def pop_reply(self, reply_key: str, timeout: float) -> bytes | None:
        """See :meth:`Coordinator.pop_reply`."""
        return self._pop(f"reply:{reply_key}", timeout)

    # -- streams ---------------------------------------------------------------------------
    def stream_add(self, stream: str, entries: Sequence[StreamEntry], maxlen: int) -> None:
        """See :meth:`Coordinator.stream_add` (trimmed to exactly ``maxlen``)."""
        with self._changed:
            items = self._streams.setdefault(stream, [])
            for entry in entries:
                number = next(self._stream_ids)
                items.append((number, StreamEntry(str(number), entry.sequence,
                                                  entry.timestamp, entry.payload)))
            del items[:max(len(items) - maxlen, 0)]
            self._changed.notify_all()

    def stream_read(
        self, stream: str, after: str, timeout: float, count: int,
    ) -> list[StreamEntry]:
        """See :meth:`Coordinator.stream_read`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            items = self._streams.get(stream, [])
            start = (items[-1][0] if items else 0) if after == "$" else int(after)
            while True:
                items = self._streams.get(stream, [])
                found = [entry for number, entry in items if number > start][:count]
                remaining = deadline - time.monotonic()
                if found or remaining <= 0 or self.closed:
                    return found
                self._changed.wait(remaining)

    def stream_tail(self, stream: str) -> str:
        """See :meth:`Coordinator.stream_tail`."""
        with self._changed:
            items = self._streams.get(stream, [])
            return str(items[-1][0]) if items else "0"

    def stream_length(self, stream: str) -> int:
        """See :meth:`Coordinator.stream_length`."""
        with self._lock:
            return len(self._streams.get(stream, []))

    # -- test helpers ----------------------------------------------------------------------
    def forget_everything(self) -> None:
        """Lose all state except the token floor, as an engine restarted empty does.

        (Redis loses its counter too; its tokens still grow because they follow the clock.)
        """
        with self._changed:
            self._nodes.clear()
            self._instances.clear()
            self._devices.clear()
            self._claims.clear()
            self._waiters.clear()
            self._lists.clear()
            self._streams.clear()
            self._fence = 0
            self._changed.notify_all()

    def close(self) -> None:
        """Wake every waiter; later pops return at once. Idempotent."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()
