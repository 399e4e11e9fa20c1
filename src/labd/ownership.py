"""Who may command a device: owners (task runs and leases), callers, and the claim registry.

- An :class:`Owner` holds devices: a task run (in :mod:`labd.tasks`) or a :class:`Lease`.
- An :class:`Actor` describes the caller on the current thread: the task run it executes,
  the principal (user) it acts for, whether it is a remote (HTTP) caller, or the framework
  itself (``bypass``).
- :class:`ClaimRegistry` grants claims atomically (all devices or none), queues waiting
  claims in a fair FIFO, and releases them. Each device keeps a stack of owners so a child
  task may re-claim a device its parent owns.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from labd.deadlines import DeadlineTimer, TimerHandle
from labd.errors import DeviceBusyError, InvalidArgumentError, LeaseError, iso_from_timestamp

__all__ = [
    "Actor",
    "ClaimGate",
    "ClaimRegistry",
    "Lease",
    "Owner",
    "PendingClaim",
    "acting_as",
    "current_actor",
]


class Owner:
    """Something that can hold devices. Subclasses set ``kind`` and ``owner_id``."""

    kind: str = "owner"
    owner_id: str = ""
    principal: str | None = None
    parent: Owner | None = None
    #: Set by a lab node (labd.lab) while this owner holds a claim in the lab's engine: raises
    #: ClaimLostError once that claim is lost, so no command goes out under it. None: no lab.
    fence: Callable[[], None] | None = None

    @property
    def label(self) -> str:
        """Human label used in messages, e.g. ``task 'sweep1'``."""
        return f"{self.kind} {self.owner_id!r}"

    def lineage(self) -> Iterator[Owner]:
        """This owner, then its parent, grandparent, ..."""
        node: Owner | None = self
        while node is not None:
            yield node
            node = node.parent

    def permits(self, actor: Actor) -> bool:
        """May ``actor`` send commands to a device this owner holds?"""
        run = actor.run
        if run is not None and any(node is self for node in run.lineage()):
            return True
        return self.kind == "lease" and self.principal is not None and (
            actor.principal == self.principal or (run is not None and run.principal == self.principal)
        )

    def permits_claim_by(self, claimant: Owner) -> bool:
        """May ``claimant`` claim (nest on top of) a device this owner holds?"""
        parent = claimant.parent
        if parent is not None and any(node is self for node in parent.lineage()):
            return True
        return self.kind == "lease" and self.principal is not None and (
            claimant.principal == self.principal
        )


@dataclass(frozen=True, slots=True)
class Actor:
    """The caller on this thread, as seen by ownership checks."""

    run: Owner | None = None
    principal: str | None = None
    remote: bool = False
    bypass: bool = False


LOCAL = Actor()
FRAMEWORK = Actor(bypass=True)
_state = threading.local()


def current_actor() -> Actor:
    """The actor of the calling thread (a plain local caller by default)."""
    actor: Actor = getattr(_state, "actor", LOCAL)
    return actor


@contextlib.contextmanager
def acting_as(actor: Actor) -> Iterator[Actor]:
    """Make the current thread act as ``actor`` for the duration of the block."""
    previous = getattr(_state, "actor", LOCAL)
    _state.actor = actor
    try:
        yield actor
    finally:
        _state.actor = previous


class Claimable(Protocol):
    """What the registry needs of a device slot: its id and the fast-path owner fields."""

    device_id: str
    owner: Owner | None
    owner_since: float | None


def _busy_entry(device_id: str, owner: Owner, since: float) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "owner": owner.label,
        "owner_kind": owner.kind,
        "owner_id": owner.owner_id,
        "since": iso_from_timestamp(since),
    }


def busy_message(busy: list[dict[str, Any]], hint: str) -> str:
    """``Device 'laser1' is owned by task 'sweep1' since 18:03:07Z; ...`` for one or more devices."""
    parts = [
        f"Device {b['device_id']!r} is {'reserved by' if b['owner_kind'] == 'pending' else 'owned by'} "
        f"{b['owner']} since {b['since'][11:19]} UTC"
        for b in busy
    ]
    return "; ".join(parts) + f". {hint}"


class PendingClaim:
    """A claim waiting in the FIFO for its devices; granted or cancelled exactly once."""

    def __init__(
        self,
        owner: Owner,
        device_ids: tuple[str, ...],
        on_granted: Callable[[], object],
        on_failed: Callable[[BaseException], None],
    ) -> None:
        self.owner = owner
        self.device_ids = device_ids
        self.on_granted = on_granted
        self.on_failed = on_failed
        self.queued_at = time.time()
        self.timer: TimerHandle | None = None
        self.done = False


class ClaimGate(Protocol):
    """Claims held in a lab's engine (:mod:`labd.lab`), for a daemon that is a lab node.

    The registry takes the engine's claim before its own and gives it back after, so two
    nodes never both own a device. Without a gate (no engine) nothing here runs.
    """

    def acquire(self, owner: Owner, device_ids: tuple[str, ...], hint: str) -> None:
        """Claim the devices in the engine for ``owner``, all or none, or raise DeviceBusyError."""

    def queue(
        self, pending: PendingClaim, timeout: float | None, granted: Callable[[], None],
    ) -> None:
        """Wait in the engine's FIFO: call ``granted()`` once the engine holds the devices,
        or ``pending.on_failed(DeviceBusyError)`` when ``timeout`` runs out."""

    def withdraw(self, owner: Owner) -> None:
        """Stop every engine wait of ``owner``. Idempotent."""

    def release(self, owner: Owner) -> None:
        """Give back the engine claims of ``owner``. Idempotent; never raises."""


class Lease(Owner):
    """Devices held by a person or program (not a task), with an optional time to live.

    Use it as a context manager: ``with daemon.claim(["laser1"], owner="alice", ttl=30) as lease:``.
    Inside the block the thread acts as ``alice``; call :meth:`renew` before ``ttl`` runs out
    or the lease expires and the devices become free.
    """

    kind = "lease"

    def __init__(
        self, registry: ClaimRegistry, lease_id: str, holder: str,
        device_ids: tuple[str, ...], ttl: float | None,
    ) -> None:
        self._registry = registry
        self.owner_id = lease_id
        self.lease_id = lease_id
        self.principal = holder
        self.holder = holder
        self.device_ids = device_ids
        self.ttl = ttl
        self.created_at = time.time()
        self.expires_at: float | None = None  # wall clock, for display
        self.status = "active"  # active | released | expired | broken
        self.reason: str | None = None
        self._deadline_handle: TimerHandle | None = None
        self._deadline: float | None = None  # time.monotonic() of expiry; None: never
        self._generation = 0  # bumped by every (re)schedule; see ClaimRegistry._expire
        self._actor_cm: contextlib.AbstractContextManager[Actor] | None = None

    @property
    def label(self) -> str:
        return f"lease {self.lease_id!r} of {self.holder!r}"

    @property
    def active(self) -> bool:
        """True until released, expired or broken."""
        return self.status == "active"

    def renew(self, ttl: float | None = None) -> None:
        """Push the expiry ``ttl`` seconds (default: the original ttl) into the future."""
        self._registry.renew_lease(self, ttl)

    def release(self) -> None:
        """Give the devices back. Idempotent."""
        self._registry.end_lease(self, "released", None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "lease_id": self.lease_id,
            "owner": self.holder,
            "device_ids": list(self.device_ids),
            "ttl": self.ttl,
            "status": self.status,
            "reason": self.reason,
            "created_at": iso_from_timestamp(self.created_at),
            "expires_at": iso_from_timestamp(self.expires_at) if self.expires_at else None,
        }

    def __enter__(self) -> Lease:
        if not self.active:
            raise LeaseError(f"{self.label} is {self.status}; claim the devices again.")
        self._actor_cm = acting_as(Actor(run=current_actor().run, principal=self.holder))
        self._actor_cm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._actor_cm is not None:
            self._actor_cm.__exit__(None, None, None)
            self._actor_cm = None
        self.release()


class ClaimRegistry:
    """Atomic all-or-none device claims, a fair FIFO of waiting claims, and leases."""

    def __init__(
        self,
        resolve: Callable[[str], Claimable],
        timer: DeadlineTimer,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._resolve = resolve
        self._timer = timer
        self._on_event = on_event or (lambda event: None)
        self._lock = threading.Lock()
        self._stacks: dict[str, list[tuple[Owner, float]]] = {}
        self._held: dict[int, tuple[Owner, tuple[str, ...]]] = {}
        self._pending: list[PendingClaim] = []
        self._leases: dict[str, Lease] = {}
        self._lease_ids = itertools.count(1)
        #: The lab engine's claims (labd.lab sets it on a lab node); None: this process only.
        self.gate: ClaimGate | None = None

    # -- queries ---------------------------------------------------------------------------
    def owner_of(self, device_id: str) -> tuple[Owner, float] | None:
        """The current (innermost) owner of a device and since when (epoch seconds)."""
        with self._lock:
            stack = self._stacks.get(device_id)
            return stack[-1] if stack else None

    def pending(self) -> list[PendingClaim]:
        """Claims waiting for devices, oldest first."""
        with self._lock:
            return [p for p in self._pending if not p.done]

    def waiting_for(self, device_id: str) -> list[str]:
        """Labels of the claims queued for ``device_id``, first in line first."""
        with self._lock:
            return [p.owner.label for p in self._pending
                    if not p.done and device_id in p.device_ids]

    def leases(self) -> list[Lease]:
        """Active leases."""
        with self._lock:
            return list(self._leases.values())

    def get_lease(self, lease_id: str) -> Lease | None:
        """The active lease with that id, or None."""
        with self._lock:
            return self._leases.get(lease_id)

    # -- claims ----------------------------------------------------------------------------
    def claim(self, owner: Owner, device_ids: Sequence[str], hint: str) -> None:
        """Grant every device to ``owner`` now, or raise :class:`DeviceBusyError` naming each busy one."""
        ids = tuple(dict.fromkeys(device_ids))
        gate = self.gate
        if gate is not None:
            self._claim_gated(gate, owner, ids, hint)
            return
        with self._lock:
            busy = self._conflicts(owner, ids, reserved_by_queue=True)
            if busy:
                raise DeviceBusyError(busy_message(busy, hint), busy)
            self._grant(owner, ids)
        self._on_event({"event": "devices_claimed", "owner": owner.label, "device_ids": list(ids)})

    def _claim_gated(self, gate: ClaimGate, owner: Owner, ids: tuple[str, ...], hint: str) -> None:
        """A lab node's claim: the engine's first (all or none across nodes), then ours."""
        gate.acquire(owner, ids, hint)
        granted = False
        try:
            with self._lock:
                busy = self._conflicts(owner, ids, reserved_by_queue=False)
                if busy:
                    raise DeviceBusyError(busy_message(busy, hint), busy)
                self._grant(owner, ids)
                granted = True
        finally:
            if not granted:
                gate.release(owner)
        self._on_event({"event": "devices_claimed", "owner": owner.label, "device_ids": list(ids)})

    def _granted_by_engine(self, pending: PendingClaim) -> None:
        """The engine granted a queued claim: take it here too, or give it back."""
        busy: list[dict[str, Any]] = []
        granted = False
        with self._lock:
            if not pending.done:
                pending.done = True
                busy = self._conflicts(pending.owner, pending.device_ids, reserved_by_queue=False)
                if not busy:
                    self._grant(pending.owner, pending.device_ids)
                    granted = True
        if not granted:
            if self.gate is not None:
                self.gate.release(pending.owner)
            if busy:
                pending.on_failed(DeviceBusyError(busy_message(busy, "Try again."), busy))
            return
        self._on_event({"event": "devices_claimed", "owner": pending.owner.label,
                        "device_ids": list(pending.device_ids)})
        pending.on_granted()

    def claim_or_queue(
        self,
        owner: Owner,
        device_ids: Sequence[str],
        on_granted: Callable[[], object],
        on_failed: Callable[[BaseException], None],
        timeout: float | None,
    ) -> PendingClaim | None:
        """Grant now (returns None, ``on_granted`` not called) or queue (returns the claim).

        A queued claim calls ``on_granted`` (outside the registry lock) once all its devices are
        free, in FIFO order, or ``on_failed(DeviceBusyError)`` when ``timeout`` runs out.
        """
        ids = tuple(dict.fromkeys(device_ids))
        gate = self.gate
        if gate is not None:  # a lab node: the FIFO is the engine's
            try:
                self._claim_gated(gate, owner, ids, "")
                return None
            except DeviceBusyError:
                queued = PendingClaim(owner, ids, on_granted, on_failed)
                gate.queue(queued, timeout, lambda: self._granted_by_engine(queued))
                return queued
        with self._lock:
            if not self._conflicts(owner, ids, reserved_by_queue=True):
                self._grant(owner, ids)
                granted = True
            else:
                granted = False
                pending = PendingClaim(owner, ids, on_granted, on_failed)
                self._pending.append(pending)
        if granted:
            self._on_event({"event": "devices_claimed", "owner": owner.label, "device_ids": list(ids)})
            return None
        if timeout is not None:
            pending.timer = self._timer.call_later(timeout, lambda: self._time_out(pending, timeout))
        return pending

    def cancel_pending(self, pending: PendingClaim) -> bool:
        """Take a waiting claim out of the queue; False if it was already granted or failed."""
        with self._lock:
            if pending.done:
                return False
            pending.done = True
            if self.gate is None:
                self._pending.remove(pending)
        if self.gate is not None:  # a lab node: the claim waits in the engine's FIFO
            self.gate.withdraw(pending.owner)
            return True
        if pending.timer is not None:
            pending.timer.cancel()
        self._grant_waiting()
        return True

    def withdraw(self, owner: Owner) -> None:
        """Take every queued claim of ``owner`` out of the FIFO and release what it holds.

        For a start that failed or was interrupted before the caller learnt of its queued
        claim: nothing of ``owner``'s stays queued or held. Idempotent.
        """
        with self._lock:
            mine = [p for p in self._pending if p.owner is owner]
            for pending in mine:
                pending.done = True
                self._pending.remove(pending)
        for pending in mine:
            if pending.timer is not None:
                pending.timer.cancel()
        if self.gate is not None:
            self.gate.withdraw(owner)
        self.release(owner)
        self._grant_waiting()

    def release(self, owner: Owner) -> tuple[str, ...]:
        """Release every device ``owner`` holds, then grant waiting claims. Idempotent.

        The entry in ``_held`` goes last, so a release cut short by an interrupt is finished
        by the next release of the same owner (the task runner's clean-up does one).
        """
        try:
            with self._lock:
                entry = self._held.get(id(owner))
                if entry is None:
                    return ()
                _, ids = entry
                for device_id in ids:
                    stack = self._stacks.get(device_id, [])
                    stack[:] = [item for item in stack if item[0] is not owner]
                    self._publish_owner(device_id)
                del self._held[id(owner)]
        finally:
            if self.gate is not None:
                self.gate.release(owner)  # then the engine's claim (never raises)
        self._on_event({"event": "devices_released", "owner": owner.label, "device_ids": list(ids)})
        self._grant_waiting()
        return ids

    def forget_device(self, device_id: str) -> None:
        """Drop bookkeeping for a removed device."""
        with self._lock:
            self._stacks.pop(device_id, None)

    # -- leases ----------------------------------------------------------------------------
    def grant_lease(
        self, device_ids: Sequence[str], holder: str, ttl: float | None,
        wait: bool | float = False,
    ) -> Lease:
        """Create an active lease on ``device_ids`` for ``holder``.

        Raises :class:`DeviceBusyError` at once, or with ``wait`` (True, or seconds) queues in
        the same fair FIFO as task runs until every device is free (or the wait runs out).
        """
        ids = tuple(dict.fromkeys(device_ids))
        lease = Lease(self, f"lease-{next(self._lease_ids)}", holder, ids, ttl)
        if wait is False:
            self.claim(lease, ids, "Wait for it to finish, or ask its owner to release it.")
        else:
            self._wait_for_claim(lease, ids, None if wait is True else float(wait))
        with self._lock:
            self._leases[lease.lease_id] = lease
            self._schedule_expiry(lease, ttl)
        self._on_event({"event": "lease_granted", "lease": lease.to_dict()})
        return lease

    def _wait_for_claim(self, owner: Owner, ids: tuple[str, ...], timeout: float | None) -> None:
        """Queue ``owner``'s claim in the FIFO and block until granted; interrupt-safe."""
        done = threading.Event()
        failure: list[BaseException] = []

        def failed(exc: BaseException) -> None:
            failure.append(exc)
            done.set()

        granted = False
        try:
            if self.claim_or_queue(owner, ids, done.set, failed, timeout) is None:
                granted = True
                return
            done.wait()
            granted = not failure
        finally:
            # Interrupted (Ctrl+C, even inside claim_or_queue) or failed: leave no waiter
            # queued and no device held.
            if not granted:
                self.withdraw(owner)
        if failure:
            raise failure[0]

    def renew_lease(self, lease: Lease, ttl: float | None) -> None:
        """Extend an active lease; raises :class:`LeaseError` if it already ended or expired."""
        # Check before touching the old deadline: a bad ttl must leave the lease as it was.
        if ttl is not None and (
            not isinstance(ttl, int | float) or isinstance(ttl, bool) or not ttl > 0
        ):
            raise InvalidArgumentError(
                f"ttl must be a positive number of seconds or None, got {ttl!r}; "
                f"{lease.label} is unchanged."
            )
        with self._lock:
            # Check, cancel and reschedule under one lock: two renewals never leave a stray
            # timer behind, and a renewal that races the expiry either wins or raises.
            overdue = lease._deadline is not None and time.monotonic() >= lease._deadline
            if lease.active and not overdue:
                self._schedule_expiry(lease, lease.ttl if ttl is None else ttl)
                renewed = lease.to_dict()
            else:
                renewed = None
        if renewed is None:
            if lease.active:  # past its deadline, its timer not run yet: it has expired
                self._expire(lease, lease._generation)
            raise LeaseError(
                f"{lease.label} is {lease.status}"
                + (f" ({lease.reason})" if lease.reason else "")
                + "; it cannot be renewed. Claim the devices again."
            )
        self._on_event({"event": "lease_renewed", "lease": renewed})

    def end_lease(self, lease: Lease, status: str, reason: str | None) -> bool:
        """Release, expire or break a lease. Returns False if it had already ended."""
        with self._lock:
            if lease.status != "active":
                return False
            lease.status = status
            lease.reason = reason
            self._leases.pop(lease.lease_id, None)
            if lease._deadline_handle is not None:
                lease._deadline_handle.cancel()
                lease._deadline_handle = None
        self.release(lease)
        self._on_event({"event": f"lease_{status}", "lease": lease.to_dict()})
        return True

    def _expire(self, lease: Lease, generation: int) -> None:
        """The timer of one deadline fired: expire unless the lease was renewed since."""
        with self._lock:
            if lease._generation != generation:
                return  # a renewal replaced this deadline
            ttl = lease.ttl
        self.end_lease(lease, "expired", f"not renewed within {ttl:g} s" if ttl else "expired")

    def _schedule_expiry(self, lease: Lease, ttl: float | None) -> None:
        # Caller holds self._lock. Each deadline has a generation; only the newest may expire.
        if lease._deadline_handle is not None:
            lease._deadline_handle.cancel()
        lease._generation += 1
        if ttl is None:
            lease.expires_at = None
            lease._deadline = None
            lease._deadline_handle = None
            return
        if ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        generation = lease._generation
        lease.ttl = ttl
        lease.expires_at = time.time() + ttl
        lease._deadline = time.monotonic() + ttl
        lease._deadline_handle = self._timer.call_at(
            lease._deadline, lambda: self._expire(lease, generation)
        )

    # -- internals (call with self._lock held) ---------------------------------------------
    def _conflicts(
        self, owner: Owner, ids: tuple[str, ...], *, reserved_by_queue: bool
    ) -> list[dict[str, Any]]:
        busy = []
        for device_id in ids:
            stack = self._stacks.get(device_id)
            if stack:
                holder, since = stack[-1]
                if holder is not owner and not holder.permits_claim_by(owner):
                    busy.append(_busy_entry(device_id, holder, since))
        if busy or not reserved_by_queue:
            return busy
        # Fairness: free devices wanted by an earlier waiting claim are reserved for it. A device
        # held by an owner that lets ``owner`` nest (an ancestor task, a lease of the same
        # principal) is not: the waiter cannot get it before that holder ends, and the holder
        # may be waiting for this very claim (a parent waiting for its child).
        free = self._free(ids)
        for pending in self._pending:
            if pending.owner is owner:
                break
            if pending.done:  # on its way out of the queue (see cancel_pending)
                continue
            for device_id in set(pending.device_ids) & free:
                entry = _busy_entry(device_id, pending.owner, pending.queued_at)
                entry["owner_kind"] = "pending"
                busy.append(entry)
        return busy

    def _free(self, ids: tuple[str, ...]) -> set[str]:
        return {device_id for device_id in ids if not self._stacks.get(device_id)}

    def _grant(self, owner: Owner, ids: tuple[str, ...]) -> None:
        # `_held` first: whatever part of the grant an interrupt lets happen below, a
        # release of this owner finds and undoes it.
        now = time.time()
        previous = self._held.get(id(owner))
        merged = ids if previous is None else tuple(dict.fromkeys(previous[1] + ids))
        self._held[id(owner)] = (owner, merged)
        for device_id in ids:
            self._stacks.setdefault(device_id, []).append((owner, now))
            self._publish_owner(device_id)

    def _publish_owner(self, device_id: str) -> None:
        # Keep the device slot's fast-path fields in step with the stack.
        stack = self._stacks.get(device_id)
        try:
            slot = self._resolve(device_id)
        except Exception:
            return
        if stack:
            slot.owner, slot.owner_since = stack[-1]
        else:
            slot.owner, slot.owner_since = None, None

    def _grant_waiting(self) -> None:
        granted: list[PendingClaim] = []
        with self._lock:
            reserved: set[str] = set()
            for pending in list(self._pending):
                if pending.done:  # left behind by an interrupted removal: purge it
                    self._pending.remove(pending)
                    continue
                wanted = set(pending.device_ids)
                if not self._free(pending.device_ids) & reserved and not self._conflicts(
                    pending.owner, pending.device_ids, reserved_by_queue=False
                ):
                    pending.done = True
                    self._pending.remove(pending)
                    self._grant(pending.owner, pending.device_ids)
                    granted.append(pending)
                else:
                    reserved |= wanted
        for pending in granted:
            if pending.timer is not None:
                pending.timer.cancel()
            self._on_event({
                "event": "devices_claimed", "owner": pending.owner.label,
                "device_ids": list(pending.device_ids),
            })
            pending.on_granted()

    def _time_out(self, pending: PendingClaim, timeout: float) -> None:
        with self._lock:
            if pending.done:
                return
            pending.done = True
            self._pending.remove(pending)
            busy = self._conflicts(pending.owner, pending.device_ids, reserved_by_queue=False)
        message = busy_message(
            busy, f"Gave up waiting after {timeout:g} s (wait_for_devices={timeout:g})."
        ) if busy else f"Gave up waiting for devices after {timeout:g} s."
        self._grant_waiting()
        pending.on_failed(DeviceBusyError(message, busy))
