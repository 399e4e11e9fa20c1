"""Claims in the lab's engine for the owners of one node: the registry's :class:`ClaimGate`.

The node's :class:`~labd.ownership.ClaimRegistry` asks this gate first, so a run or lease
owns its devices in the engine (all or none, across nodes) before it owns them locally.
Each held claim has a fencing token and a deadline on this node's monotonic clock; a
renewer thread pushes the deadline out every ``claim_renew`` seconds. A claim that cannot
be renewed before its deadline, or that the engine no longer holds, is *lost*: its owner is
told (the node cancels the run or ends the lease) and no command carries its token again.

Queued claims (``wait_for_devices``, ``claim(wait=...)``) wait in the engine's FIFO; one
thread asks again for each every ``claim_poll`` seconds and keeps its reservation alive.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from labd.errors import DeviceBusyError
from labd.lab.coordinator import ClaimHolder, ClaimSpec, Coordinator
from labd.lab.errors import ClaimLostError, EngineUnavailableError
from labd.lab.settings import LabTimings
from labd.ownership import Actor, Owner, PendingClaim, busy_message

__all__ = ["EngineClaims", "HeldClaim", "RemoteClaim"]

log = logging.getLogger("labd.lab")


class RemoteClaim(Owner):
    """Stands in, on a device's node, for the owner of a claim taken by another node.

    Installed in the local registry when the first command with the claim's token arrives,
    so local callers without the token are refused (409) while the remote run owns it.
    """

    def __init__(self, holder: ClaimHolder) -> None:
        self.kind = holder.kind
        self.owner_id = holder.owner_id
        self.holder = holder
        self.token = holder.token
        self.principal = None  # a token, not a user name, admits commands from other nodes

    @property
    def label(self) -> str:
        return f"{self.holder.label} on node {self.holder.node!r}"


@dataclass
class HeldClaim:
    """One owner's claim in the engine: its devices, token and renew deadline."""

    owner: Owner
    spec: ClaimSpec
    device_ids: tuple[str, ...]
    token: int
    deadline: float  # time.monotonic() by which a renewal must have succeeded
    lost: str | None = None  # why, once lost


@dataclass
class _Wait:
    pending: PendingClaim
    spec: ClaimSpec
    granted: Callable[[], None]
    give_up_at: float | None
    ticket: int | None = None
    refreshed_at: float = field(default_factory=time.monotonic)


def _spec(owner: Owner, node: str) -> ClaimSpec:
    key = f"{node}/{owner.kind}/{owner.owner_id}/{uuid.uuid4().hex[:12]}"
    return ClaimSpec(key, owner.label, owner.kind, owner.owner_id, node)


class EngineClaims:
    """The :class:`~labd.ownership.ClaimGate` of a lab node; see the module docstring."""

    def __init__(
        self, coordinator: Coordinator, node: str, timings: LabTimings, *,
        on_lost: Callable[[Owner, str], None],
        on_released: Callable[[tuple[str, ...], int], None],
        on_claimed: Callable[[tuple[str, ...], int], None] | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._node = node
        self._timings = timings
        self._on_lost = on_lost
        self._on_released = on_released
        self._on_claimed = on_claimed or (lambda device_ids, token: None)
        self._lock = threading.Lock()
        self._held: dict[int, HeldClaim] = {}
        self._lost: dict[int, HeldClaim] = {}
        self._waits: dict[int, _Wait] = {}
        self._stop = threading.Event()
        self._wake_waiters = threading.Event()
        self._threads = [
            threading.Thread(target=self._renew_loop, name=f"labd-lab-renew-{node}", daemon=True),
            threading.Thread(target=self._wait_loop, name=f"labd-lab-queue-{node}", daemon=True),
        ]

    def start(self) -> None:
        """Start the renewer and the queue threads."""
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the threads (claims still held expire in the engine by themselves)."""
        self._stop.set()
        self._wake_waiters.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # -- the gate --------------------------------------------------------------------------
    def _needed(self, owner: Owner, ids: tuple[str, ...]) -> tuple[str, ...]:
        """The ids not already held here by an owner that lets ``owner`` nest (a parent run)."""
        nested = set()
        for held in self._held.values():
            if held.owner is not owner and held.owner.permits_claim_by(owner):
                nested.update(set(held.device_ids) & set(ids))
        return tuple(d for d in ids if d not in nested)

    def acquire(self, owner: Owner, device_ids: tuple[str, ...], hint: str) -> None:
        """Claim in the engine, all or none, or raise :class:`DeviceBusyError` naming the nodes."""
        if isinstance(owner, RemoteClaim):
            return  # its claim is in the engine already, taken by its home node
        with self._lock:
            needed = self._needed(owner, device_ids)
        if not needed:
            return
        spec = _spec(owner, self._node)
        sent_at = time.monotonic()
        outcome = self._coordinator.claim(spec, needed, self._timings.claim_ttl)
        if outcome.token is None:
            busy = [holder.busy_entry() for holder in outcome.busy]
            raise DeviceBusyError(busy_message(busy, hint or "Wait, or pass wait_for_devices=True."), busy)
        self._store(owner, spec, needed, outcome.token, sent_at)

    def _store(self, owner: Owner, spec: ClaimSpec, ids: tuple[str, ...], token: int,
               sent_at: float) -> None:
        with self._lock:
            self._held[id(owner)] = HeldClaim(owner, spec, ids, token,
                                              sent_at + self._timings.claim_ttl)
            self._lost.pop(id(owner), None)
        owner.fence = functools.partial(self._fence, owner)
        self._on_claimed(ids, token)

    def _fence(self, owner: Owner) -> None:
        """Before a command to a device ``owner`` holds here: refuse if its claim was lost."""
        held = self._held.get(id(owner))
        if held is not None and time.monotonic() < held.deadline:
            return
        if held is not None:
            self._lose(held, "it was not renewed before its deadline")
        lost = self._lost.get(id(owner))
        if lost is not None:
            raise self._lost_error(lost, ", ".join(lost.device_ids))

    def queue(self, pending: PendingClaim, timeout: float | None, granted: Callable[[], None]) -> None:
        """Wait in the engine's FIFO (see the module docstring)."""
        give_up = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._waits[id(pending.owner)] = _Wait(pending, _spec(pending.owner, self._node),
                                                  granted, give_up)
        self._wake_waiters.set()

    def withdraw(self, owner: Owner) -> None:
        """Stop ``owner``'s engine wait and leave the queue. Idempotent."""
        with self._lock:
            wait = self._waits.pop(id(owner), None)
        if wait is not None and wait.ticket is not None:
            try:
                self._coordinator.dequeue(wait.ticket)
            except EngineUnavailableError:
                pass  # its reservation expires by itself (waiter_ttl)

    def release(self, owner: Owner) -> None:
        """Give back ``owner``'s engine claim; never raises (an unreleased claim expires)."""
        with self._lock:
            held = self._held.pop(id(owner), None)
            lost = self._lost.pop(id(owner), None)
        if owner.fence is not None:
            owner.fence = None
        # A lost claim is given back too: if the engine still has it (lost to a deadline,
        # not to a takeover) its devices are free now instead of at its expiry. The script
        # deletes only claims that still carry this token.
        held = held or lost
        if held is None:
            return
        try:
            self._coordinator.release(held.device_ids, held.token)
        except EngineUnavailableError as exc:
            log.warning("lab: could not release %s's claim (%s); it expires by itself", owner.label, exc)
        self._on_released(held.device_ids, held.token)

    # -- what callers ask ------------------------------------------------------------------
    def token_for(self, actor: Actor, device_id: str) -> int | None:
        """The token to send with a command from ``actor`` to ``device_id`` (None: no claim).

        Raises :class:`ClaimLostError` if the claim that admits ``actor`` was lost or is past
        its deadline: nothing more is sent on its behalf.
        """
        expired: HeldClaim | None = None
        with self._lock:
            for held in (*self._held.values(), *self._lost.values()):
                if device_id in held.device_ids and held.owner.permits(actor):
                    if held.lost is None and time.monotonic() >= held.deadline:
                        expired = held
                        break
                    if held.lost is not None:
                        raise self._lost_error(held, device_id)
                    return held.token
        if expired is not None:
            self._lose(expired, "it was not renewed before its deadline")
            raise self._lost_error(expired, device_id)
        return None

    def held(self) -> list[HeldClaim]:
        """Claims this node holds in the engine."""
        with self._lock:
            return list(self._held.values())

    def _lost_error(self, held: HeldClaim, device_id: str) -> ClaimLostError:
        return ClaimLostError(
            f"Device {device_id!r}: claim lost: the claim of {held.owner.label} (token "
            f"{held.token}) {held.lost or 'is past its deadline'}; this node sends nothing more "
            "for it and the run is cancelled. Claim the devices again.",
            [{"device_id": device_id, "owner": held.owner.label, "owner_kind": held.owner.kind,
              "owner_id": held.owner.owner_id, "since": "", "node": self._node}])

    def _lose(self, held: HeldClaim, why: str) -> None:
        with self._lock:
            if self._held.get(id(held.owner)) is not held:
                return
            del self._held[id(held.owner)]
            held.lost = why
            self._lost[id(held.owner)] = held
        log.warning("lab: %s lost its claim on %s: %s", held.owner.label, list(held.device_ids), why)
        self._on_lost(held.owner, why)

    # -- threads ---------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        period = self._timings.claim_renew
        while not self._stop.is_set():
            for held in self.held():
                self._renew(held)
            with self._lock:
                deadlines = [h.deadline for h in self._held.values()]
            wait = period if not deadlines else max(min(period, min(deadlines) - time.monotonic()), 0.01)
            self._stop.wait(wait)

    def _renew(self, held: HeldClaim) -> None:
        if time.monotonic() >= held.deadline:
            self._lose(held, f"it could not be renewed within its {self._timings.claim_ttl:g} s TTL")
            return
        sent_at = time.monotonic()
        try:
            lost = self._coordinator.renew(held.device_ids, held.token, self._timings.claim_ttl)
        except EngineUnavailableError:
            return  # tried again next period; the deadline decides
        if lost:
            self._lose(held, f"the engine no longer holds it for {lost} (expired or restarted)")
            return
        with self._lock:
            if held.lost is None:
                held.deadline = sent_at + self._timings.claim_ttl

    def _wait_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_waiters.clear()  # before the work: a wake-up during it is kept
            with self._lock:
                waits = list(self._waits.values())
            for wait in waits:
                self._try(wait)
            self._wake_waiters.wait(self._timings.claim_poll if waits else 1.0)

    def _try(self, wait: _Wait) -> None:
        owner = wait.pending.owner
        ttl = self._timings.waiter_ttl
        try:
            with self._lock:
                needed = self._needed(owner, wait.pending.device_ids)
            if wait.ticket is None:
                wait.ticket = self._coordinator.enqueue(wait.spec, needed, ttl)
            elif time.monotonic() - wait.refreshed_at > ttl / 3:
                self._coordinator.refresh_waiter(wait.ticket, wait.spec, needed, ttl)
                wait.refreshed_at = time.monotonic()
            sent_at = time.monotonic()
            outcome = self._coordinator.claim(wait.spec, needed, self._timings.claim_ttl, wait.ticket)
        except EngineUnavailableError:
            outcome = None
        with self._lock:
            if self._waits.get(id(owner)) is not wait:
                current = False  # withdrawn meanwhile
            else:
                current = True
                if outcome is not None and outcome.token is not None:
                    del self._waits[id(owner)]
        if outcome is not None and outcome.token is not None:
            if not current:  # withdrawn while the grant was on its way: give it back
                self._coordinator.release(needed, outcome.token)
                return
            self._store(owner, wait.spec, needed, outcome.token, sent_at)
            wait.granted()
            return
        if current and wait.give_up_at is not None and time.monotonic() >= wait.give_up_at:
            self.withdraw(owner)
            busy = [h.busy_entry() for h in (outcome.busy if outcome is not None else ())]
            gave_up = "Gave up waiting for devices held elsewhere in the lab."
            wait.pending.on_failed(DeviceBusyError(
                busy_message(busy, gave_up) if busy else gave_up, busy))
