"""The device table: one part of :class:`labd.LabDaemon` (DESIGN.md section 5).

It holds every device's :class:`~labd.devices.DeviceSlot` (the instance with its locking
wrappers, state and last error), runs ``connect()``/``disconnect()`` with their timeouts,
calls methods by name for remote callers, and owns the device streams. It asks the ownership
registry who owns a device, and reaches the rest of the daemon only through the callables it
is given: ``publish_event``, ``submit`` (a worker thread) and ``on_device_error``.

    table = DeviceTable(claims=claims, publish_event=events.publish, submit=pool.submit, ...)
    laser = table.add_device("laser1", "MyLaser", MyLaser, {"port": "GPIB0::1"})
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from labd.constructors import construct_device
from labd.device_streams import DeviceStreams
from labd.devices import DeviceSlot, DeviceState, rewrap_device, wrap_device
from labd.errors import (
    DeviceConnectionError,
    DeviceError,
    DeviceNotConnectedError,
    DeviceTimeoutError,
    ErrorRecord,
    InvalidArgumentError,
    UnknownDeviceError,
    describe_choices,
    iso_from_timestamp,
)
from labd.ownership import Actor, ClaimRegistry, Lease, Owner, acting_as, current_actor
from labd.secrets import redact
from labd.streaming import StreamHub, Subscription

__all__ = ["ID_PATTERN", "DeviceTable", "RemoteDevices", "check_id"]

log = logging.getLogger("labd")

#: Ids of devices and tasks: letters, digits and ``_ - . :``, 1 to 128 characters.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-.:]{1,128}$")

Job = Callable[[], None]

#: After a connect() timed out, how long connect_device waits for it to return and be undone
#: with disconnect() before raising (LabDaemon 1.0's clean-up waits up to 2 s too).
LATE_CONNECT_GRACE_S = 2.0


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidArgumentError`."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidArgumentError(
            f"Invalid {what} {value!r}: use 1 to 128 letters, digits or the characters _ - . :"
        )
    return value


class RemoteDevices(Protocol):
    """Devices of the other nodes of a lab (:mod:`labd.lab`), asked only for an id not here."""

    def knows(self, device_id: str) -> bool:
        """True if a live node of the lab serves ``device_id``."""

    def proxy(self, device_id: str) -> Any:
        """An object whose methods call the remote device (as the calling thread's actor)."""

    def call(
        self, device_id: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any],
        actor: Actor,
    ) -> Any:
        """Call a method of a remote device by name, as ``actor``."""

    def stream_hub(self, device_id: str) -> StreamHub:
        """This node's hub of a remote device's stream (relayed through the lab's engine)."""


def _owned_by(owner: Owner | None) -> str | None:
    """``owned_by`` as LabDaemon gives it: the task id, or the holder of a lease."""
    if owner is None:
        return None
    return owner.holder if isinstance(owner, Lease) else owner.owner_id


class DeviceTable:
    """Device slots, their lifecycle and calls, and their streams."""

    def __init__(
        self,
        *,
        claims: ClaimRegistry,
        publish_event: Callable[[dict[str, Any]], None],
        submit: Callable[[Job], None],
        on_device_error: Callable[[ErrorRecord], None],
        on_callback_error: Callable[[ErrorRecord], None],
        strict: bool,
        call_timeout: float | None,
        stream_maxsize: int,
    ) -> None:
        self._claims = claims
        self._publish_event = publish_event
        self._submit = submit
        self._on_device_error = on_device_error
        self.strict = strict
        self.call_timeout = call_timeout
        self.stream_maxsize = stream_maxsize
        self._lock = threading.RLock()
        self._slots: dict[str, DeviceSlot] = {}
        #: Other nodes' devices when this daemon is a lab node (labd.lab); None: no lab.
        self.remote: RemoteDevices | None = None
        self.streams = DeviceStreams(
            publish_event=publish_event, submit=submit, on_callback_error=on_callback_error
        )

    # -- lookup -------------------------------------------------------------------------------
    def slot(self, device: Any) -> DeviceSlot:
        """The slot of a device given by id or by instance; :class:`UnknownDeviceError` if none."""
        device_id: object = device
        if not isinstance(device, str):
            device_id = getattr(device, "device_id", None)
            if not isinstance(device_id, str):
                for slot in list(self._slots.values()):
                    if slot.instance is device:
                        return slot
                raise TypeError(
                    "Pass a device id (str) or a device instance returned by add_device(), "
                    f"not {type(device).__name__}."
                )
        found = self._slots.get(device_id) if isinstance(device_id, str) else None
        if found is None:
            raise UnknownDeviceError(
                f"No device found with ID: '{device_id}'. Devices: {describe_choices(self._slots)}."
            )
        return found

    def slots(self) -> list[DeviceSlot]:
        """Every slot, in the order devices were added."""
        with self._lock:
            return list(self._slots.values())

    def ids(self) -> list[str]:
        """Ids of all devices, in the order they were added."""
        return list(self._slots)

    def unknown(self, device_ids: Sequence[object]) -> list[object]:
        """The entries of ``device_ids`` that name no device."""
        missing = [d for d in device_ids if not isinstance(d, str) or d not in self._slots]
        remote = self.remote
        if missing and remote is not None:
            missing = [d for d in missing if not (isinstance(d, str) and remote.knows(d))]
        return missing

    def drain(self, device_ids: Sequence[str]) -> None:
        """Wait until calls already inside these devices have returned (through the fair lock)."""
        for device_id in device_ids:
            slot = self._slots.get(device_id)
            if slot is None:
                continue
            lock = slot.lock
            got = False
            try:
                got = lock.rlock.acquire(False) or lock.acquire_slow(slot.call_timeout)
            finally:
                if got:
                    lock.rlock.release()

    # -- lifecycle ----------------------------------------------------------------------------
    def add_device(self, device_id: str, device_type: str, cls: Any, params: dict[str, Any]) -> Any:
        """Construct ``cls(device_id, **params)``, wrap its methods, and add it to the table."""
        check_id(device_id, "device id")
        with self._lock:
            if device_id in self._slots:
                raise InvalidArgumentError(
                    f"Device with ID '{device_id}' already exists. It is a "
                    f"{self._slots[device_id].device_type}; pick another id or remove it first."
                )
        instance = construct_device(cls, device_id, device_type, params)
        timeout = getattr(instance, "labd_call_timeout", None) or self.call_timeout
        slot = DeviceSlot(
            device_id, device_type, instance, params, strict=self.strict,
            call_timeout=timeout, on_error=self._device_error,
        )
        wrap_device(slot)
        with self._lock:
            if device_id in self._slots:
                raise InvalidArgumentError(
                    f"Device with ID '{device_id}' already exists. It was added while this one "
                    "was being built; pick another id."
                )
            self._slots[device_id] = slot
        self.streams.add(slot)
        if not callable(getattr(instance, "connect", None)):
            slot.state = DeviceState.CONNECTED
        self._publish_event({"event": "device_added", "device_id": device_id,
                             "device_type": device_type})
        return instance

    def remove_device(self, device_id: str, timeout: float | None = 2.0) -> None:
        """Stop streaming, disconnect and forget a device that no one owns."""
        slot = self.slot(device_id)
        owner = self._claims.owner_of(device_id)
        if owner is not None:
            self.streams.raise_if_not_permitted(slot)
        self.streams.stop(slot, timeout=timeout or 1.0)
        self.disconnect_device(device_id, timeout=timeout)
        with self._lock:
            self._slots.pop(device_id, None)
        self.streams.forget(slot)
        self._claims.forget_device(device_id)
        self._publish_event({"event": "device_removed", "device_id": device_id})

    def get_device(self, device_id: str) -> Any:
        """The device instance (its public methods are locked and ownership-checked)."""
        if self.remote is not None and device_id not in self._slots:
            return self._remote_or_raise(device_id).proxy(device_id)
        return self.slot(device_id).instance

    def _remote_or_raise(self, device_id: object) -> RemoteDevices:
        """The lab's remote devices if a live node serves ``device_id``, else the local 404."""
        remote = self.remote
        if remote is None or not isinstance(device_id, str) or not remote.knows(device_id):
            self.slot(device_id)  # raises UnknownDeviceError naming the local devices
        assert remote is not None
        return remote

    def device_ids(self) -> list[str]:
        """Ids of all devices, in the order they were added."""
        return list(self._slots)

    def device_info(self, device_id: str) -> dict[str, Any]:
        """JSON-ready state of one device (the shape of ``GET /devices/{id}``)."""
        slot = self.slot(device_id)
        owner = self._claims.owner_of(device_id)
        holder = owner[0] if owner else None
        return {
            "device_id": slot.device_id,
            "device_type": slot.device_type,
            "state": slot.state.value,
            "connected": slot.state is DeviceState.CONNECTED,
            "streaming": self.streams.is_streaming(slot),
            # LabDaemon's shape: the owner's id (a task's id, a lease's holder); labd's detail
            # (what kind of owner, its own id, a label for people) in fields of its own.
            "owned_by": _owned_by(holder),
            "owner_kind": holder.kind if holder else None,
            "owner_id": holder.owner_id if holder else None,
            "owner_label": holder.label if holder else None,
            "owned_since": iso_from_timestamp(owner[1]) if owner else None,
            "claims_waiting": self._claims.waiting_for(device_id),  # FIFO order: next first
            "unresponsive": slot.unresponsive,
            "last_error": slot.last_error.to_dict(include_traceback=False) if slot.last_error else None,
            "params": redact(slot.params),  # secret-named values as "***" (labd.secrets)
            "call_timeout": slot.call_timeout,
            "lock": slot.lock_info(),
            "stream": self.streams.stats(slot),
        }

    def list_devices(self) -> list[dict[str, Any]]:
        """:meth:`device_info` for every device."""
        return [self.device_info(device_id) for device_id in self.device_ids()]

    def device_methods(self, device_id: str) -> list[dict[str, Any]]:
        """Public methods of a device: name, kind (query/command), parameters, doc."""
        from labd.introspection import describe_method

        slot = self.slot(device_id)
        return [describe_method(name, slot.originals[name], slot.kinds[name])
                for name in sorted(slot.originals)]

    def set_call_timeout(self, device_id: str, seconds: float | None) -> None:
        """Raise :class:`DeviceTimeoutError` when a call waits longer than ``seconds`` for the device."""
        if seconds is not None and (not isinstance(seconds, int | float) or seconds <= 0):
            raise InvalidArgumentError(f"call_timeout must be a positive number or None, got {seconds!r}")
        slot = self.slot(device_id)
        slot.call_timeout = seconds
        rewrap_device(slot)

    def call_device(
        self,
        device_id: str,
        method: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        actor: Actor | None = None,
    ) -> Any:
        """Call ``device.method(*args, **kwargs)`` by name, as ``actor`` (e.g. a remote client).

        Checks the name and the arguments before calling, so bad input never reaches the device.
        """
        from labd.introspection import check_call

        if self.remote is not None and device_id not in self._slots:
            return self._remote_or_raise(device_id).call(
                device_id, method, list(args or ()), dict(kwargs or {}), actor or current_actor())
        slot = self.slot(device_id)
        bound = check_call(slot, method, args, kwargs)
        with acting_as(actor or current_actor()):
            return bound(*(args or ()), **dict(kwargs or {}))

    def connect_device(self, device: Any, timeout: float | None = None) -> None:
        """Call the device's ``connect()`` (bounded by ``timeout`` seconds if given).

        Raises :class:`DeviceConnectionError` (the driver's error as ``__cause__``) or
        :class:`DeviceTimeoutError`; the device is then ``faulted``.
        """
        slot = self.slot(device)
        connect = getattr(slot.instance, "connect", None)
        if not callable(connect):
            slot.state = DeviceState.CONNECTED
            return
        self._run_lifecycle(slot, connect, "connect", timeout, DeviceState.CONNECTED, raise_timeout=True)

    def disconnect_device(self, device: Any, timeout: float | None = None) -> None:
        """Call the device's ``disconnect()``; idempotent. A timeout is logged, not raised."""
        slot = self.slot(device)
        if slot.state in (DeviceState.DISCONNECTED, DeviceState.ADDED):
            return
        self.streams.stop(slot, timeout=1.0 if timeout is None else timeout)
        disconnect = getattr(slot.instance, "disconnect", None)
        if not callable(disconnect):
            slot.state = DeviceState.DISCONNECTED
            return
        self._run_lifecycle(
            slot, disconnect, "disconnect", timeout, DeviceState.DISCONNECTED, raise_timeout=False
        )

    def _run_lifecycle(
        self, slot: DeviceSlot, fn: Callable[[], Any], what: str, timeout: float | None,
        success: DeviceState, *, raise_timeout: bool,
    ) -> None:
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise InvalidArgumentError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        previous = slot.state
        if what == "connect":
            slot.state = DeviceState.CONNECTING
        outcome: dict[str, BaseException | None] = {}
        done = threading.Event()
        abandoned = threading.Event()  # the caller stopped waiting (its timeout ran out)
        undone = threading.Event()  # a late connect() returned and disconnect() ran
        handover = threading.Lock()  # orders "finished" against "abandoned"
        actor = current_actor()

        def job() -> None:
            # The device lock is held across the call and any clean-up, so no other caller
            # can use a device whose late connect() is being undone.
            with slot.lock.rlock:
                try:
                    with acting_as(actor):
                        fn()
                    outcome["error"] = None
                except BaseException as exc:
                    outcome["error"] = exc
                finally:
                    with handover:
                        late = abandoned.is_set()
                        done.set()
                if late and what == "connect":
                    try:
                        self._undo_late_connect(slot)
                    finally:
                        undone.set()

        if timeout is None:
            job()
        else:
            try:
                self._submit(job)
            except RuntimeError:  # the daemon was shut down: its pool no longer takes jobs
                threading.Thread(target=job, name=f"labd-{what}-{slot.device_id}", daemon=True).start()
        finished = done.wait(timeout)
        if not finished:
            with handover:
                finished = done.is_set()
                if not finished:
                    abandoned.set()
        if not finished:
            slot.state = DeviceState.FAULTED
            if what == "connect":
                slot.refusal = f"its connect() did not finish within {timeout:g} s"
            # LabDaemon 1.0 cleans up with disconnect() before it raises, waiting up to 2 s for
            # the device (its tests check disconnect ran): give the late connect that long to
            # return and be undone; a connect hung for good is undone whenever it returns.
            cleaned_up = what == "connect" and undone.wait(LATE_CONNECT_GRACE_S)
            err = DeviceTimeoutError(
                f"Device {slot.device_id!r}: {what}() did not finish within {timeout:g} s; "
                "it is marked faulted"
                + (("; its late connect() returned and was undone with disconnect()"
                    if cleaned_up else
                    "; its disconnect() will be called when the late connect() returns")
                   + ", and calls are refused until a later connect succeeds"
                   if what == "connect" else "")
                + ". Check the instrument and its connection."
            )
            slot.record_error(err, what, origin="framework")
            self._publish_device_state(slot)
            if raise_timeout:
                raise err
            log.warning("%s", err)
            return
        error = outcome.get("error")
        if error is None:
            if what == "connect":
                slot.refusal = None  # connected again: calls are accepted
            slot.state = success
            self._publish_device_state(slot)
            return
        if isinstance(error, DeviceError) and not isinstance(error, DeviceNotConnectedError):
            slot.state = previous if what == "connect" and type(error).__name__ == "DeviceBusyError" else DeviceState.FAULTED
            self._publish_device_state(slot)
            raise error
        slot.state = DeviceState.FAULTED
        self._publish_device_state(slot)
        raise DeviceConnectionError(
            f"Device {slot.device_id!r} ({slot.device_type}): {what}() failed: "
            f"{type(error).__name__}: {error}"
        ) from error

    def _undo_late_connect(self, slot: DeviceSlot) -> None:
        """A connect() that outlived its timeout returned: disconnect, as LabDaemon does.

        Runs on the connect's worker with the device lock held; the device stays faulted.
        """
        disconnect = getattr(slot.instance, "disconnect", None)
        if callable(disconnect):
            try:
                disconnect()
            except BaseException as exc:  # the device is faulted already; keep the record
                slot.record_error(exc, "disconnect")
                log.warning("Device %r: disconnect() after a late connect() failed: %r",
                            slot.device_id, exc)
        log.info("Device %r: the late connect() returned and was undone with disconnect()",
                 slot.device_id)

    def _publish_device_state(self, slot: DeviceSlot) -> None:
        self._publish_event({"event": "device_state", "device_id": slot.device_id,
                             "state": slot.state.value})

    def subscribe(
        self,
        device: Any,
        callback: Callable[[Any], object] | None = None,
        *,
        maxsize: int | None = None,
        on_ready: Callable[[], None] | None = None,
        **stream_params: Any,
    ) -> Subscription:
        """Subscribe to a device's stream, starting it if needed.

        Each subscriber has its own bounded queue (``maxsize``); ``callback`` runs on the
        subscription's delivery thread, never on the device's thread. A stream started by a
        subscription stops when its last subscriber closes.
        """
        if self.remote is not None and isinstance(device, str) and device not in self._slots:
            return self._remote_or_raise(device).stream_hub(device).subscribe(
                callback, maxsize=self.stream_maxsize if maxsize is None else maxsize,
                on_ready=on_ready)
        slot = self.slot(device)
        return self.streams.subscribe(
            slot, callback, self.stream_maxsize if maxsize is None else maxsize, on_ready,
            stream_params, pinned=False
        )

    def start_streaming(self, device: Any, callback: Callable[[Any], object], **stream_params: Any) -> Subscription:
        """Start the device's stream (or join it if running) with ``callback`` as a subscriber.

        A stream started this way runs until :meth:`stop_streaming`.
        """
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {type(callback).__name__}")
        slot = self.slot(device)
        return self.streams.subscribe(
            slot, callback, self.stream_maxsize, None, stream_params, pinned=True
        )

    def stop_streaming(self, device: Any, timeout: float | None = 1.0) -> None:
        """Stop the device's stream and end every subscription. No effect if not streaming."""
        self.streams.stop(self.slot(device), timeout=timeout)

    def stream_hub(self, device: Any) -> StreamHub | None:
        """The device's current stream hub (None if not streaming)."""
        if self.remote is not None and isinstance(device, str) and device not in self._slots:
            return self._remote_or_raise(device).stream_hub(device)
        return self.streams.hub(self.slot(device))

    def get_device_error(self, device_id: str) -> ErrorRecord | None:
        """The device's last error record, kept until cleared."""
        return self.slot(device_id).last_error

    def clear_device_error(self, device_id: str) -> None:
        """Forget the device's last error."""
        self.slot(device_id).last_error = None

    def _device_error(self, slot: DeviceSlot, record: ErrorRecord) -> None:
        self._publish_event({"event": "device_error", "device_id": slot.device_id,
                             "error": record.to_dict(include_traceback=False)})
        self._on_device_error(record)

