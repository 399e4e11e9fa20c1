"""The coordinator interface: what a node asks of the lab's engine, and its data shapes.

Two implementations behave the same (the behaviour tests run against both):
:class:`~labd.lab.local.LocalCoordinator` (in one process: tests, a lab of nodes in one
script) and :class:`~labd.lab.redis_engine.RedisCoordinator` (Redis 7 or Valkey, several
PCs). Every operation is short and never blocks longer than the timeout it is given;
an unreachable engine raises :class:`~labd.lab.errors.EngineUnavailableError`.

The engine holds only expiring, rebuildable state: the directory (node and device keys
that expire unless refreshed), claims (expire unless renewed), the FIFO of waiting claims,
request and reply lists. Anything durable stays in each node's SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from labd.errors import iso_from_timestamp

__all__ = ["ClaimHolder", "ClaimOutcome", "ClaimSpec", "Coordinator", "StreamEntry"]


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    """Who claims: a unique key per owner, and what to tell others about it."""

    owner_key: str  # unique in the lab: "<node>/<kind>/<owner_id>/<random>"
    label: str  # "task 'sweep1'" for messages
    kind: str  # task | lease
    owner_id: str
    node: str  # the home node, which renews the claim


@dataclass(frozen=True, slots=True)
class ClaimHolder:
    """The live claim on one device (or a waiter's reservation of it)."""

    device_id: str
    owner_key: str
    label: str
    kind: str
    owner_id: str
    node: str
    since: float  # epoch seconds, engine clock
    token: int = 0  # 0 for a reservation by a waiting claim

    def busy_entry(self) -> dict[str, Any]:
        """The ``DeviceBusyError.busy`` shape, with the node."""
        return {
            "device_id": self.device_id,
            "owner": f"{self.label} on node {self.node!r}",
            "owner_kind": "pending" if self.token == 0 else self.kind,
            "owner_id": self.owner_id,
            "since": iso_from_timestamp(self.since),
            "node": self.node,
        }


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """A claim's answer: the fencing token, or the devices that are busy (nothing granted)."""

    token: int | None
    busy: tuple[ClaimHolder, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One item of a relayed stream: engine id, the device's sequence number, the payload."""

    entry_id: str
    sequence: int
    timestamp: float
    payload: bytes = field(repr=False)


class Coordinator(Protocol):
    """The lab's shared state. See the module docstring; both implementations pass one suite."""

    #: Where the engine is, for messages (``redis://lab-engine:6379/0``, without password).
    description: str

    def ping(self) -> None:
        """Return if the engine answers, else raise EngineUnavailableError."""

    # -- directory -----------------------------------------------------------------------
    def register(
        self, node: str, info: Mapping[str, Any], device_ids: Sequence[str], ttl: float,
        instance: str = "",
    ) -> None:
        """Register (or refresh) ``node`` and its devices for ``ttl`` seconds, all or none.

        ``instance`` identifies the process: another live instance under the same node name
        raises :class:`~labd.lab.errors.NodeNameConflictError`; another live node holding one
        of the ids, :class:`~labd.lab.errors.DeviceIdConflictError`. Nothing is registered then.
        """

    def unregister(self, node: str, device_ids: Sequence[str], instance: str = "") -> None:
        """Remove ``node`` and those of ``device_ids`` it holds (a clean exit), if ``instance``
        is the one registered."""

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Live nodes and the info each registered."""

    def node_of(self, device_id: str) -> str | None:
        """The live node that serves ``device_id``, or None."""

    def publish(self, event: Mapping[str, Any]) -> None:
        """Send an event to whoever listens (a lossy hint; the keys are the truth)."""

    def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event published from now on (on a thread of the
        coordinator's); returns the function that stops listening. Events may be lost."""

    # -- claims --------------------------------------------------------------------------
    def claim(
        self, spec: ClaimSpec, device_ids: Sequence[str], ttl: float, ticket: int | None = None,
    ) -> ClaimOutcome:
        """Claim every device for ``spec`` for ``ttl`` seconds, all or none.

        Free devices that an earlier live waiter wants are reserved for it (FIFO); with
        ``ticket`` (from :meth:`enqueue`) only waiters queued before it count, and a grant
        takes the ticket out of the queue. The token is the larger of a counter and the
        engine's clock in µs, so it grows even across an engine restarted empty.
        """

    def enqueue(self, spec: ClaimSpec, device_ids: Sequence[str], ttl: float) -> int:
        """Queue a waiting claim; its reservation lives ``ttl`` s unless refreshed."""

    def refresh_waiter(
        self, ticket: int, spec: ClaimSpec, device_ids: Sequence[str], ttl: float,
    ) -> None:
        """Keep a queued claim alive for another ``ttl`` seconds."""

    def dequeue(self, ticket: int) -> None:
        """Take a queued claim out of the queue (it gave up or was cancelled)."""

    def renew(self, device_ids: Sequence[str], token: int, ttl: float) -> list[str]:
        """Extend the claims with ``token`` by ``ttl`` s; return the devices no longer held."""

    def release(self, device_ids: Sequence[str], token: int) -> None:
        """Drop the claims that still carry ``token``."""

    def holder(self, device_id: str) -> ClaimHolder | None:
        """The live claim on ``device_id``, or None."""

    # -- request / reply -----------------------------------------------------------------
    def push_request(self, node: str, payload: bytes) -> None:
        """Append a request to ``node``'s request list."""

    def pop_request(self, node: str, timeout: float) -> bytes | None:
        """Take the oldest request of ``node``, waiting up to ``timeout`` s."""

    def exchange(self, node: str, payload: bytes, reply_key: str, wait: float) -> bytes | None:
        """Push a request to ``node`` and wait up to ``wait`` s for its reply, in one round trip."""

    async def exchange_async(
        self, node: str, payload: bytes, reply_key: str, wait: float,
    ) -> bytes | None:
        """:meth:`exchange` for an event loop: awaits the engine, never blocks the loop. An
        engine that cannot wait without blocking may answer None before ``wait``: the caller
        then waits for the reply with :meth:`pop_reply` on a thread."""

    async def close_async(self) -> None:
        """Drop the connections :meth:`exchange_async` made for the running loop (call it on
        that loop before it ends). Idempotent."""

    def push_reply(self, reply_key: str, payload: bytes, ttl: float) -> None:
        """Put a reply on ``reply_key`` (kept ``ttl`` s for a caller that may be gone)."""

    def reply_and_pop(
        self, reply_key: str, payload: bytes, ttl: float, node: str, timeout: float,
    ) -> bytes | None:
        """:meth:`push_reply` then :meth:`pop_request` of ``node``, in one round trip."""

    def pop_reply(self, reply_key: str, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` s for the reply on ``reply_key``."""

    # -- streams -------------------------------------------------------------------------
    def stream_add(self, stream: str, entries: Sequence[StreamEntry], maxlen: int) -> None:
        """Append entries to a capped stream (oldest trimmed beyond about ``maxlen``)."""

    def stream_read(
        self, stream: str, after: str, timeout: float, count: int,
    ) -> list[StreamEntry]:
        """Entries after ``after`` (``$``: only new ones), waiting up to ``timeout`` s."""

    def stream_tail(self, stream: str) -> str:
        """The id of ``stream``'s newest entry now (a reader that starts after it sees every
        later entry, whenever it first reads); ``"0"`` if the stream is empty or absent."""

    def stream_length(self, stream: str) -> int:
        """How many entries the engine keeps for ``stream`` now."""

    def close(self) -> None:
        """Drop connections. Idempotent."""
