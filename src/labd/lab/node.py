"""A lab node: one daemon joined to the lab's engine.

:class:`LabNode` registers the node and its devices in the directory (keys that expire
unless refreshed every heartbeat), answers requests for its devices from other nodes,
calls other nodes' devices for its own callers, and takes claims in the engine for its runs
and leases (:class:`~labd.lab.claims.EngineClaims`). When the engine is unreachable the node
keeps serving its own devices, says ``degraded`` naming the engine, and reconnects with
backoff; the directory is rebuilt by the next successful heartbeat.

    node = LabNode(daemon, RedisCoordinator(url), "pc-laser")
    node.start()           # DeviceIdConflictError if another live node serves one of the ids
    ...
    daemon.shutdown(); node.close()
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from labd.errors import (
    DeviceBusyError,
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownNameError,
    UnknownTaskError,
    describe_choices,
)
from labd.lab.answers import ANSWERS, RUN_ACTIONS, may_act_on
from labd.lab.calls import RequestWorkers, call_request, claim_lost, send_call, send_call_async
from labd.lab.claims import EngineClaims, RemoteClaim
from labd.lab.coordinator import Coordinator
from labd.lab.errors import (
    DeviceIdConflictError,
    EngineUnavailableError,
    NodeNameConflictError,
    QueriesOnlyError,
)
from labd.lab.settings import LabTimings
from labd.lab.stream_exchange import StreamExchange
from labd.ownership import Actor, ClaimRegistry, Lease, Owner, acting_as, current_actor
from labd.signatures import signature_of
from labd.streaming import StreamHub, Subscription
from labd.tasks import TaskRun

__all__ = ["LabNode", "RemoteDevice", "RemoteRun"]

T = TypeVar("T")
log = logging.getLogger("labd.lab")

#: What another node may do to a device besides calling its methods.
_DEVICE_ACTIONS = frozenset({"connect", "disconnect", "stop_streaming"})


def _version() -> str:
    try:
        return importlib.metadata.version("labd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RemoteDevice:
    """A device on another node: its public methods are calls through the engine.

    ``daemon.get_device("camera1")`` returns one on a lab node when another node serves
    ``camera1``; inside a task run its commands carry the run's claim token.
    """

    def __init__(self, node: LabNode, device_id: str) -> None:
        self.device_id = device_id
        self._lab_node = node

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        node, device_id = self._lab_node, self.device_id

        def call(*args: Any, **kwargs: Any) -> Any:
            return node.call(device_id, name, args, kwargs, current_actor())

        call.__name__ = name
        return call

    def __repr__(self) -> str:
        return f"<RemoteDevice {self.device_id!r} on node {self._lab_node.node_of(self.device_id)!r}>"


class RemoteRun:
    """A run another node started, as this node saw it when asked: ``info()``, ``status``."""

    def __init__(self, node: str, info: dict[str, Any]) -> None:
        self.node = node
        self.task_id = str(info.get("task_id"))
        self._info = info

    def info(self) -> dict[str, Any]:
        """The run's info (``GET /tasks/{id}``) with its ``node``."""
        return dict(self._info)

    @property
    def status(self) -> str:
        """The run's state name when it was asked."""
        return str(self._info.get("status"))

    def is_running(self) -> bool:
        """True if it had not ended when asked."""
        return self.status in ("pending", "running", "paused")


class LabNode:
    """One daemon as a node of a lab; see the module docstring."""

    def __init__(
        self, daemon: Any, coordinator: Coordinator, node: str, *,
        timings: LabTimings | None = None, workers: int = 4, call_timeout: float = 30.0,
        url: str | None = None, own_coordinator: bool = True, stream_maxlen: int = 2000,
    ) -> None:
        self.daemon = daemon
        self.coordinator = coordinator
        self.name = node
        self.timings = timings or LabTimings()
        self.call_timeout = call_timeout
        self.url = url
        self._own_coordinator = own_coordinator
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex  # this process, under the node name
        self.engine_error: str | None = None  # why the engine is unreachable, or None
        self.last_heartbeat: float | None = None
        self.conflicts: dict[str, str] = {}  # device id -> the live node that holds it
        self._directory: dict[str, str] = {}  # device id -> node (other nodes), last read
        self._nodes: dict[str, dict[str, Any]] = {}
        self._mirrors: dict[str, RemoteClaim] = {}
        self._seen: dict[str, int] = {}  # device id -> highest token seen
        self._mirror_lock = threading.Lock()
        self.streams = StreamExchange(
            daemon, coordinator, node, self.timings, stream_maxlen, locate=self._locate,
            request=self._request, notify=self._notify_node)
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.claims = EngineClaims(coordinator, node, self.timings, on_lost=self._claim_lost,
                                   on_released=self._notify_released,
                                   on_claimed=self._notify_claimed)
        self._workers = RequestWorkers(coordinator, node, self._handle, workers=workers,
                                       on_engine_error=self._engine_down)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop,
                                           name=f"labd-lab-heartbeat-{node}", daemon=True)
        self._notices: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._notifier = threading.Thread(target=self._send_notices,
                                          name=f"labd-lab-notify-{node}", daemon=True)
        self._registry: ClaimRegistry | None = None
        self._stop_listening: Callable[[], None] | None = None
        self._daemon_events: Subscription | None = None
        self._announced: list[Any] | None = None  # the device summary last announced
        self._registered: list[Any] | None = None  # the device summary last registered
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Register, join the daemon to the lab and start the threads.

        Raises :class:`DeviceIdConflictError` if another live node serves one of this node's
        device ids, :class:`NodeNameConflictError` if another live process keeps using the
        node's name (an entry left by a crash is waited out); an unreachable engine is not
        an error (the node starts ``degraded``).
        """
        # A node restarted right after a crash finds its old entry: wait until it would have
        # expired; a name still refreshed after that belongs to another live process.
        give_up = time.monotonic() + self.timings.directory_ttl + self.timings.heartbeat
        while True:
            try:
                self._register()
            except EngineUnavailableError as exc:
                self._engine_down(exc)
            except NodeNameConflictError:
                if time.monotonic() >= give_up:
                    raise
                self._stop.wait(min(self.timings.heartbeat, 0.5))
                continue
            break
        self._registry = self.daemon.join_lab(self, self, self.claims)
        self._stop_listening = self.coordinator.listen(self._on_event)
        # A device added or removed here is registered (or dropped) at once, not at the next
        # heartbeat.
        self._daemon_events = self.daemon.events.subscribe(
            self._on_daemon_event, maxsize=64, name=f"labd-lab-devices-{self.name}")
        self._announce()
        self.claims.start()
        self._workers.start()
        self._notifier.start()
        self._heartbeat.start()
        self._started = True

    def close(self, timeout: float = 2.0) -> None:
        """Leave the lab: stop the threads, unregister, detach from the daemon. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._kick.set()
        if self._stop_listening is not None:
            self._stop_listening()
        if self._daemon_events is not None:
            self._daemon_events.close()
        if self._started:
            self._heartbeat.join(timeout)
            self._notices.put(None)
            self._notifier.join(timeout)
        self._workers.close(timeout)
        self.claims.close(timeout)
        self.streams.close()
        if getattr(self.daemon, "lab", None) is self:
            self.daemon.join_lab(None, None, None)
        try:
            if self.last_heartbeat is not None:  # never registered: nothing here is ours
                self.coordinator.unregister(self.name, self._local_ids(), self.instance)
                self._announce()
        except EngineUnavailableError:
            pass  # the keys expire by themselves
        if self._own_coordinator:
            self.coordinator.close()

    # -- directory -----------------------------------------------------------------------------
    def _local_ids(self) -> list[str]:
        return [d for d in self.daemon.device_ids() if d not in self.conflicts]

    def _info(self) -> dict[str, Any]:
        devices = []
        for device_id in self._local_ids():
            try:
                slot = self.daemon.device_slot(device_id)
            except UnknownDeviceError:
                continue
            owner = slot.owner
            devices.append({"device_id": device_id, "device_type": slot.device_type,
                            "state": slot.state.value,
                            "owner_label": owner.label if owner is not None else None})
        return {"node": self.name, "version": _version(), "pid": os.getpid(),
                "host": socket.gethostname(), "url": self.url, "started_at": self.started_at,
                "heartbeat_at": time.time(), "devices": devices}

    def _register(self) -> None:
        while True:
            try:
                info = self._info()
                self.coordinator.register(self.name, info, self._local_ids(),
                                          self.timings.directory_ttl, self.instance)
                self._registered = [(d["device_id"], d["device_type"]) for d in info["devices"]]
                break
            except NodeNameConflictError:
                if not self._started:
                    raise
                # Another process took the name while this one could not refresh it (a long
                # freeze): serve locally, say so, keep trying until the other one leaves.
                raise EngineUnavailableError(
                    f"another live process registered as node {self.name!r}") from None
            except DeviceIdConflictError as exc:
                if not self._started:
                    raise
                # A device added since start clashes with another node's: serve it here
                # only, and say so in /health (the other node registered it first).
                self.conflicts[exc.device_id] = exc.node
                log.warning("lab: %s", exc)
        self.last_heartbeat = time.time()
        self._read_directory()
        if self.engine_error is not None:
            log.info("lab: node %r reconnected to %s", self.name, self.coordinator.description)
        self.engine_error = None

    def _read_directory(self) -> None:
        nodes = self.coordinator.nodes()
        directory = {}
        for name, info in nodes.items():
            if name == self.name:
                continue
            for device in info.get("devices", []):
                directory[str(device.get("device_id"))] = name
        self._nodes, self._directory = nodes, directory

    def _announce(self) -> None:
        """Tell the other nodes the directory changed (a lossy hint: they re-read it now)."""
        try:
            self.coordinator.publish({"event": "directory_changed", "node": self.name})
        except EngineUnavailableError:
            pass  # they re-read it at their next heartbeat anyway

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "directory_changed" and event.get("node") != self.name:
            self._kick.set()  # register and re-read the directory now, not at the heartbeat

    def _on_daemon_event(self, event: Any) -> None:
        if isinstance(event, dict) and event.get("event") in ("device_added", "device_removed"):
            self._kick.set()

    def _announce_changes(self) -> None:
        # What was registered, not what the daemon has now: a device added since is
        # announced by the round that registers it.
        if self._registered != self._announced:
            self._announced = self._registered
            self._announce()

    def _heartbeat_loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            wait = self.timings.heartbeat
            # Cleared before the work, not after the wait: a kick that arrives while the
            # node registers is kept for the next round instead of lost.
            self._kick.clear()
            try:
                self._register()
                self._announce_changes()
                self._sweep_mirrors()
                self.streams.keep()
                backoff = 0.2
            except EngineUnavailableError as exc:
                self._engine_down(exc)
                wait = backoff  # reconnect with backoff, never slower than a heartbeat
                backoff = min(backoff * 2, self.timings.heartbeat)
            self._kick.wait(wait)

    def refresh(self) -> None:
        """Register and re-read the directory now (also done every heartbeat)."""
        self._register()

    def _engine_down(self, exc: EngineUnavailableError) -> None:
        if self.engine_error is None:
            log.warning("lab: node %r lost the engine: %s", self.name, exc)
        self.engine_error = str(exc)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Live nodes (this one included) from the engine, or the last read if unreachable."""
        try:
            self._read_directory()
        except EngineUnavailableError as exc:
            self._engine_down(exc)
        return dict(self._nodes)

    def remote_devices(self) -> list[dict[str, Any]]:
        """Devices of the other live nodes as their nodes last registered them, with ``node``."""
        found = []
        for name, info in sorted(self._nodes.items()):
            if name == self.name:
                continue
            for device in info.get("devices", []):
                found.append({**device, "node": name})
        return found

    def node_of(self, device_id: str) -> str | None:
        """The other node serving ``device_id`` (None: none, or this node)."""
        return self._directory.get(device_id)

    # -- RemoteDevices (the daemon's device table asks these for ids not served here) -------------
    def knows(self, device_id: str) -> bool:
        """True if another live node serves ``device_id`` (the directory, re-read on a miss)."""
        if device_id in self._directory:
            return True
        try:
            node = self.coordinator.node_of(device_id)
        except EngineUnavailableError:
            return False
        if node is not None and node != self.name:
            self._directory[device_id] = node
            return True
        return False

    def proxy(self, device_id: str) -> RemoteDevice:
        """A :class:`RemoteDevice` for ``device_id``."""
        return RemoteDevice(self, device_id)

    def call(
        self, device_id: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any],
        actor: Actor, timeout: float | None = None, *, queries_only: bool = False,
    ) -> Any:
        """Call ``device_id.method`` on its node as ``actor``, with ``actor``'s claim token.

        ``queries_only``: the device's node refuses a command (:class:`QueriesOnlyError`); the
        server sets it for a viewer's token, since only that node knows query from command.
        """
        node, request = self._call_request(device_id, method, args, kwargs, actor, queries_only)
        return self._request(node, request, timeout)

    async def call_async(
        self, device_id: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any],
        actor: Actor, timeout: float, slow: Callable[[Callable[[], T]], Awaitable[T]],
        finish: Callable[[Any], T], *, queries_only: bool = False,
    ) -> T:
        """:meth:`call` from an event loop (the server's), returning ``finish(result)``: a
        reply within the first second is awaited on the loop, a slower or large one handled
        on a thread through ``slow(fn)`` (:func:`labd.lab.calls.send_call_async`)."""
        node, request = self._call_request(device_id, method, args, kwargs, actor, queries_only)
        return await send_call_async(self.coordinator, node, self.name, request, timeout, slow,
                                     finish, liveness_check=self.timings.heartbeat)

    def _call_request(
        self, device_id: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any],
        actor: Actor, queries_only: bool,
    ) -> tuple[str, dict[str, Any]]:
        """The node serving ``device_id`` and the request of one call on it by ``actor``."""
        node = self._locate(device_id)
        token = self.claims.token_for(actor, device_id)
        run = actor.run
        owner = run.label if run is not None else None
        principal = actor.principal or (run.principal if run is not None else None)
        return node, call_request(device_id, method, args, kwargs, token, principal, owner,
                                  queries_only)

    def act(
        self, device_id: str, action: str, actor: Actor, timeout: float | None = None,
        bound: float | None = None,
    ) -> dict[str, Any]:
        """``connect``, ``disconnect`` or ``stop_streaming`` another node's device as ``actor``
        (with its claim token); the device's info afterwards, with its ``node``."""
        if action not in _DEVICE_ACTIONS:
            raise InvalidArgumentError(f"action must be one of {sorted(_DEVICE_ACTIONS)}, got {action!r}")
        node = self._locate(device_id)
        run = actor.run
        info = self._request(node, {
            "op": "device_action", "device": device_id, "action": action, "bound": bound,
            "token": self.claims.token_for(actor, device_id),
            "principal": actor.principal or (run.principal if run is not None else None)},
            timeout)
        return {**info, "node": node}

    def ask(self, device_id: str, op: str, timeout: float | None = None, **fields: Any) -> Any:
        """Ask the node that serves ``device_id``: its ``info`` (``GET /devices/{id}``),
        ``methods``, ``device_error`` (``tracebacks=``, or ``clear=True``) or
        ``device_errors`` (its error history, ``limit=``)."""
        return self._request(self._locate(device_id),
                             {**fields, "op": op, "device": device_id}, timeout)

    def add_device(
        self, node: str, device_id: str, device_type: str, params: Mapping[str, Any],
        connect: bool, actor: Actor, timeout: float | None = None,
    ) -> dict[str, Any]:
        """Add a device to the live node ``node`` as ``actor`` (``POST /devices`` there): its
        info, with its ``node``. The node checks ``params`` against its own device type.

        Raises :class:`UnknownNameError` naming the live nodes if ``node`` is not one.
        """
        nodes = self.nodes()
        if node not in nodes:
            raise UnknownNameError(
                f"No live node {node!r} in the lab to add device {device_id!r} to; live nodes: "
                f"{describe_choices(nodes)}.")
        info = self._request(node, {
            "op": "add_device", "device": device_id, "device_type": device_type,
            "params": dict(params), "connect": connect, "principal": actor.principal}, timeout)
        self._directory[device_id] = node  # registered before the answer: known here at once
        return {**info, "node": node}

    # -- requests from other nodes -------------------------------------------------------------
    def _handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        if op == "call":
            return self._handle_call(request)
        if op == "released":
            self._drop_mirrors(list(request.get("devices", [])), int(request.get("token", 0)))
            return None
        if op == "claimed":
            for device_id in request.get("devices", []):
                try:
                    self._admit(str(device_id), int(request.get("token", 0)))
                except (DeviceBusyError, UnknownDeviceError):
                    pass  # lost or taken meanwhile; the commands' own checks decide
            return None
        if op in ("stream_open", "stream_keep", "stream_close"):
            return self.streams.handle(op, request)
        if op == "device_action":
            return self._handle_action(request)
        if op == "task_info":
            handle = self.daemon.get_task(str(request.get("task")))
            return {**handle.info(), "result": handle.result}
        if op == "tasks":
            return [{**handle.info(), "result": handle.result}
                    for handle in self.daemon.task_handles()]
        if op == "runs":
            query = request.get("query") or {}
            return self.daemon.runs(query.get("status"), query.get("task_type"),
                                    query.get("since"), int(query.get("limit", 50)), 0)
        if op == "methods":
            return self.daemon.device_methods(str(request.get("device")))
        if op == "info":
            return self.daemon.device_info(str(request.get("device")))
        answer = ANSWERS.get(str(op))  # runs, error records, history, adding a device
        if answer is None:
            raise UnknownDeviceError(f"Node {self.name!r} does not know the request {op!r}.")
        result = answer(self.daemon, request)
        if op == "add_device":
            self._register_now()
        return result

    def _register_now(self) -> None:
        """Register a device just added, so the caller's node finds it once it has the answer."""
        try:
            self._register()
        except EngineUnavailableError:
            pass  # the heartbeat registers it once the engine is back

    def _handle_call(self, request: dict[str, Any]) -> Any:
        device_id = str(request.get("device"))
        method = str(request.get("method"))
        token = request.get("token")
        slot = self.daemon.device_slot(device_id)  # 404 for an id this node no longer serves
        mirror = None
        if slot.kinds.get(method) == "command":
            if request.get("queries_only"):
                raise QueriesOnlyError(
                    f"{device_id}.{method}() is a command and needs the 'operator' role; the "
                    "caller may call query methods only.")
            if token is not None:
                mirror = self._admit(device_id, int(token))
            else:
                self._mirror_claim_of(device_id)  # a claim of another node refuses it (409)
        actor = Actor(run=mirror, principal=request.get("principal"), remote=True)
        args, kwargs = request.get("args") or [], request.get("kwargs") or {}
        original = slot.originals.get(method)
        signature = signature_of(original) if original is not None else None
        if signature is not None:  # a remote call: checked against the annotations (422)
            args, kwargs = signature.validate(args, kwargs, f"{device_id}.{method}()")
        return self.daemon.call_device(device_id, method, args, kwargs, actor=actor)

    def _handle_action(self, request: dict[str, Any]) -> dict[str, Any]:
        """Connect, disconnect or stop the stream of a device here, for another node's caller."""
        device_id, action = str(request.get("device")), request.get("action")
        if action not in _DEVICE_ACTIONS:
            raise InvalidArgumentError(f"Unknown device action {action!r}.")
        slot = self.daemon.device_slot(device_id)
        token = request.get("token")
        mirror = self._admit(device_id, int(token)) if token is not None else None
        if token is None:
            self._mirror_claim_of(device_id)
        with acting_as(Actor(run=mirror, principal=request.get("principal"), remote=True)):
            if action == "connect":
                bound = request.get("bound")
                self.daemon.connect_device(device_id, timeout=None if bound is None else float(bound))
            elif action == "disconnect":
                self.daemon.disconnect_device(device_id)
            else:
                slot.check_command("stop_streaming")  # a command: the owner's, or nobody's
                self.daemon.stop_streaming(device_id)
        return dict(self.daemon.device_info(device_id))

    def _mirror_claim_of(self, device_id: str) -> None:
        """Make the stand-in owner here match the engine's live claim on ``device_id``: drop a
        stale one (its release notice may still be on its way), install a missing one."""
        holder = self.coordinator.holder(device_id)
        stale = self._mirrors.get(device_id)
        if stale is not None and (holder is None or holder.token != stale.token):
            self._drop_mirrors([device_id], stale.token)
        if holder is not None and holder.node != self.name:
            mirror = self._mirrors.get(device_id)
            if mirror is None or mirror.token != holder.token:
                self._admit(device_id, holder.token)

    def _admit(self, device_id: str, token: int) -> RemoteClaim:
        """Check a command's token against the live claim; install its stand-in owner here."""
        with self._mirror_lock:
            if token < self._seen.get(device_id, 0):
                raise claim_lost(device_id, token, f"is lower than token {self._seen[device_id]} "
                                 "this node has already seen for it")
            holder = self.coordinator.holder(device_id)
            if holder is None or holder.token != token:
                who = (f"the device is now claimed by {holder.label} on node {holder.node!r}"
                       if holder is not None else "the device has no live claim")
                raise claim_lost(device_id, token, f"is not its live claim ({who})")
            self._seen[device_id] = token
            mirror = self._mirrors.get(device_id)
            if mirror is not None and mirror.token == token:
                return mirror
            if mirror is not None:
                self._claims_here().release(mirror)
                del self._mirrors[device_id]
            mirror = RemoteClaim(holder)
            # DeviceBusyError (409) if an owner of this node still holds it here: that
            # owner's engine claim is gone, and its renewer cancels it within a period.
            self._claims_here().claim(mirror, [device_id], "Its previous owner is being stopped.")
            self._mirrors[device_id] = mirror
            return mirror

    def _claims_here(self) -> ClaimRegistry:
        registry = self._registry
        if registry is None:
            raise UnknownDeviceError(f"Node {self.name!r} has not joined the lab yet.")
        return registry

    def _drop_mirrors(self, device_ids: list[str], token: int) -> None:
        with self._mirror_lock:
            for device_id in device_ids:
                mirror = self._mirrors.get(device_id)
                if mirror is not None and (token == 0 or mirror.token == token):
                    del self._mirrors[device_id]
                    self._claims_here().release(mirror)

    def _sweep_mirrors(self) -> None:
        """Drop stand-in owners whose claim the engine no longer holds (lost release notices)."""
        for device_id, mirror in list(self._mirrors.items()):
            holder = self.coordinator.holder(device_id)
            if holder is None or holder.token != mirror.token:
                self._drop_mirrors([device_id], mirror.token)

    def _notify_claimed(self, device_ids: tuple[str, ...], token: int) -> None:
        """Tell the devices' nodes of a new claim, so their own callers are refused at once.

        The engine just granted these devices to an owner of this node: a stand-in here for
        another node's claim on one of them is stale (that claim expired), so it goes now.
        """
        here = [d for d in device_ids if d in self._mirrors]
        if here:
            self._drop_mirrors(here, 0)
        self._notify("claimed", device_ids, token)

    def _notify_released(self, device_ids: tuple[str, ...], token: int) -> None:
        """Tell the devices' nodes that a claim ended, so their stand-in owners go now."""
        self._notify("released", device_ids, token)

    def _notify(self, op: str, device_ids: tuple[str, ...], token: int) -> None:
        by_node: dict[str, list[str]] = {}
        for device_id in device_ids:
            node = self._directory.get(device_id)
            if node is not None:
                by_node.setdefault(node, []).append(device_id)
        for node, ids in by_node.items():
            # Hints, sent off the claimer's thread: a claim costs one engine round trip.
            self._notices.put((node, {"op": op, "devices": ids, "token": token}))

    def _send_notices(self) -> None:
        """The notifier thread: claimed/released hints to the devices' nodes, in order."""
        while True:
            batch = [self._notices.get()]
            while True:  # everything queued meanwhile goes in this round
                try:
                    batch.append(self._notices.get_nowait())
                except queue.Empty:
                    break
            notices = [notice for notice in batch if notice is not None]
            # A claim released before its "claimed" hint went out needs neither hint.
            released = {(node, r["token"]) for node, r in notices if r["op"] == "released"}
            claimed = {(node, r["token"]) for node, r in notices if r["op"] == "claimed"}
            for node, request in notices:
                if (node, request["token"]) in released & claimed:
                    continue
                self._notify_node(node, request)  # lost if the engine is away: the sweep catches up
            if len(notices) < len(batch):
                return

    def _claim_lost(self, owner: Owner, why: str) -> None:
        """A claim of this node was lost: cancel the run, or end the lease."""
        if isinstance(owner, TaskRun):
            from labd.tasks import TaskHandle

            TaskHandle(owner).cancel()
        elif isinstance(owner, Lease):
            try:
                self.daemon.break_lease(owner.lease_id, f"its claim in the lab engine was lost: {why}")
            except Exception:
                log.exception("lab: could not end lease %r", owner.lease_id)

    # -- run history ---------------------------------------------------------------------------
    def runs(
        self, status: str | None, task_type: str | None, since: float | None, limit: int,
        offset: int, timeout: float = 2.0,
    ) -> list[dict[str, Any]]:
        """The lab's run history, newest first, each run with its home ``node``.

        Each node keeps its own runs (its SQLite); this asks every live node for its newest
        ``offset + limit`` and merges them. A node that does not answer within ``timeout`` is
        left out (its runs show again once it answers).
        """
        wanted = offset + limit
        rows = [{**row, "node": self.name}
                for row in self.daemon.runs(status, task_type, since, wanted, 0)]
        query = {"status": status, "task_type": task_type, "since": since, "limit": wanted}
        for node in sorted(self._nodes):
            if node == self.name:
                continue
            try:
                found = send_call(self.coordinator, node, self.name,
                                  {"op": "runs", "query": query}, timeout)
            except Exception as exc:  # a node down or frozen: the others' history still shows
                log.info("lab: no run history from node %r: %s", node, exc)
                continue
            rows.extend({**row, "node": node} for row in found or [])
        rows.sort(key=lambda row: str(row.get("created_at") or ""), reverse=True)
        return rows[offset:offset + limit]

    def tasks(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The live and retained runs of every live node (``GET /tasks``), each with its
        ``node``: this node's first, then the others' as each answers within ``timeout``."""
        rows = [{**handle.info(), "result": handle.result, "node": self.name}
                for handle in self.daemon.task_handles()]
        for node in sorted(self._nodes):
            if node == self.name:
                continue
            try:
                found = send_call(self.coordinator, node, self.name, {"op": "tasks"}, timeout)
            except Exception as exc:  # a node down or frozen: the others' runs still show
                log.info("lab: no task list from node %r: %s", node, exc)
                continue
            rows.extend({**row, "node": node} for row in found or [])
        return rows

    def find_run(self, task_id: str, timeout: float = 2.0) -> tuple[str, dict[str, Any]]:
        """The live node whose run ``task_id`` is, and the run's info (with its ``node``).

        Raises :class:`UnknownTaskError` if no live node answering within ``timeout`` has it.
        """
        node, info = self._first_with(task_id, {"op": "task_info"}, timeout,
                                      f"No task run with id {task_id!r} on this node or any")
        return node, {**info, "node": node}

    def find_record(
        self, task_id: str, events_limit: int | None = None, timeout: float = 2.0,
    ) -> tuple[str, dict[str, Any]]:
        """The live node whose run history has run ``task_id``, and its record (``GET
        /runs/{id}``; with ``events_limit``, its last ``events_limit`` events).

        Raises :class:`UnknownTaskError` if no live node answering within ``timeout`` has it.
        """
        return self._first_with(
            task_id, {"op": "run", "events_limit": events_limit}, timeout,
            f"No run with id {task_id!r} in the run history of this node or of any")

    def _first_with(
        self, task_id: str, request: dict[str, Any], timeout: float, missing: str,
    ) -> tuple[str, Any]:
        """The first other live node (by name) that answers ``request`` about ``task_id``
        other than UnknownTaskError, and its answer; a node that does not answer is skipped.

        None does: UnknownTaskError, ``missing`` followed by the live nodes."""
        for node in sorted(self._nodes):
            if node == self.name:
                continue
            try:
                return node, self._request(node, {**request, "task": task_id}, timeout)
            except UnknownTaskError:
                continue
            except Exception as exc:  # a node down or frozen: look at the others
                log.info("lab: node %r did not say whether it has run %r: %s", node, task_id, exc)
                continue
        raise UnknownTaskError(f"{missing} live node of the lab ({describe_choices(self._nodes)}).")

    def run_stream(self, task_id: str) -> tuple[RemoteRun, StreamHub]:
        """Another node's run and this node's hub of its progress stream (relayed).

        A run that has ended gets a hub of its own with nothing in it: its record is in the
        run history (``GET /runs``) of its node.
        """
        node, info = self.find_run(task_id)
        run = RemoteRun(node, info)
        if not run.is_running():
            return run, StreamHub(f"{task_id}@{node}")
        return run, self.streams.task_hub(node, task_id)

    def control_run(
        self, node: str, task_id: str, action: str, caller: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Ask ``node`` to ``cancel``, ``pause`` or ``resume`` its run ``task_id``.

        ``caller`` (``{"user", "admin"}``) may act on its own runs only, unless an admin:
        refused, the answer is ``{"refused_owner": owner}`` (see :mod:`labd.lab.answers`).
        """
        if action not in RUN_ACTIONS:
            raise InvalidArgumentError(f"action must be one of {sorted(RUN_ACTIONS)}, got {action!r}")
        answer: dict[str, Any] | None = self._request(node, {
            "op": "task_control", "task": task_id, "action": action, "caller": caller}, None)
        return answer

    def ask_run(self, task_id: str, request: dict[str, Any], timeout: float | None = None) -> Any:
        """Send ``request`` (an op of :data:`labd.lab.answers.ANSWERS`) about run ``task_id`` to
        the live node that has it (:meth:`find_run`): its answer, or its error raised here.

        A request with a ``caller`` is one only the run's owner or an admin may make: the run's
        node decides, and the owner it named when found is checked here first too (a node of an
        older labd ignores ``caller``). A node that does not answer within ``timeout`` is
        ``DeviceTimeoutError`` naming it.
        """
        node, info = self.find_run(task_id)
        if "caller" in request and not may_act_on(info.get("owner"), request["caller"]):
            return {"refused_owner": info.get("owner")}
        return self._request(node, {**request, "task": task_id}, timeout)

    # -- streams -------------------------------------------------------------------------------
    def stream_hub(self, device_id: str) -> StreamHub:
        """This node's hub of another node's device stream (see :mod:`labd.lab.streams`)."""
        return self.streams.hub(device_id)

    def stream_stats(self) -> dict[str, Any]:
        """Relays (this node's devices read elsewhere) and readers (others' devices read here)."""
        return self.streams.stats()

    def _locate(self, device_id: str) -> str:
        """The other node that serves ``device_id``, or :class:`UnknownDeviceError`."""
        node = self._directory.get(device_id)
        if node is None and self.knows(device_id):
            node = self._directory.get(device_id)
        if node is None:
            raise UnknownDeviceError(
                f"No device found with ID: '{device_id}' on any live node of the lab. Nodes: "
                f"{describe_choices(self._nodes)}.")
        return node

    def _request(self, node: str, request: dict[str, Any], timeout: float | None) -> Any:
        return send_call(self.coordinator, node, self.name, request,
                         self.call_timeout if timeout is None else timeout,
                         liveness_check=self.timings.heartbeat)

    def _notify_node(self, node: str, request: dict[str, Any]) -> None:
        """Push a request nobody waits for (a hint); lost if the engine is away."""
        from labd.lab.calls import dumps

        try:
            self.coordinator.push_request(node, dumps({
                **request, "deadline": time.time() + self.timings.directory_ttl, "from": self.name}))
        except EngineUnavailableError:
            pass  # the other side times out by itself

    # -- reporting -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """The ``lab`` part of ``/health``."""
        return {"node": self.name, "engine": self.coordinator.description,
                "connected": self.engine_error is None, "engine_error": self.engine_error,
                "last_heartbeat": self.last_heartbeat, "nodes": sorted(self._nodes),
                "conflicts": dict(self.conflicts), "claims_held": len(self.claims.held()),
                "streams": self.stream_stats()}
