"""Device streams: start a device's stream once, fan it out, stop it when asked or unused.

The daemon passes :meth:`StreamHub.publish` to the device's ``start_streaming`` as the
callback, so the device's thread only stamps and enqueues. ``stop_streaming`` is called on
the *original* (unlocked) method: a driver whose acquisition thread takes ``_ld_lock`` must be
stoppable while that thread holds it. ``is_streaming`` (asked by every ``GET /devices``) runs
only while holding the device lock, and only if the lock is free at once: a busy device is
never waited for, it reports what it answered last.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

from labd.devices import DeviceSlot
from labd.errors import DeviceError, DeviceOperationError, ErrorRecord, InvalidArgumentError
from labd.ownership import FRAMEWORK, acting_as, current_actor
from labd.streaming import StreamHub, Subscription

__all__ = ["DeviceStreams"]


class _StreamState:
    """Per-device stream bookkeeping, guarded by its own lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.hub: StreamHub | None = None
        self.pinned = False  # started with start_streaming(): runs until stop_streaming()
        self.device_says_streaming = False  # the device's last is_streaming() answer


class DeviceStreams:
    """The device table's stream part: one hub per streaming device.

    It knows the rest of the daemon only through three callables: ``publish_event`` (the
    daemon's event stream), ``submit`` (run a job on a worker thread) and
    ``on_callback_error`` (a subscriber's callback raised).
    """

    def __init__(
        self,
        *,
        publish_event: Callable[[dict[str, Any]], None],
        submit: Callable[[Callable[[], None]], None],
        on_callback_error: Callable[[ErrorRecord], None],
    ) -> None:
        self._publish_event = publish_event
        self._submit = submit
        self._on_callback_error = on_callback_error
        self._states: dict[str, _StreamState] = {}
        self._slots: dict[str, DeviceSlot] = {}

    def add(self, slot: DeviceSlot) -> None:
        """Start bookkeeping for a new device."""
        self._states[slot.device_id] = _StreamState()
        self._slots[slot.device_id] = slot

    def forget(self, slot: DeviceSlot) -> None:
        """Drop bookkeeping for a removed device (its stream is stopped already)."""
        self._states.pop(slot.device_id, None)
        self._slots.pop(slot.device_id, None)

    def _state(self, slot: DeviceSlot) -> _StreamState:
        return self._states.setdefault(slot.device_id, _StreamState())

    def hub(self, slot: DeviceSlot) -> StreamHub | None:
        """The live hub of the device's stream, or None."""
        return self._state(slot).hub

    def is_streaming(self, slot: DeviceSlot) -> bool:
        """True if the daemon runs the device's stream (or the device says it streams).

        The device's own ``is_streaming()`` is called under the device lock, like every device
        method the framework calls; if the lock is busy (a long call, a driver thread holding
        ``_ld_lock``, callers queued) the last answer stands instead of waiting.
        """
        state = self._state(slot)
        if state.hub is not None:
            return True
        probe = slot.originals.get("is_streaming")
        if probe is None:
            return False
        rlock = slot.lock.rlock
        locked = False
        try:
            # Never barge past queued callers (FIFO mode), as the method wrappers do not.
            locked = not slot.lock.fifo and rlock.acquire(False)
            if locked:
                state.device_says_streaming = bool(probe())
        except Exception:
            state.device_says_streaming = False  # as before: a probe that fails says "no"
        finally:
            if locked:
                rlock.release()
        return state.device_says_streaming

    def stats(self, slot: DeviceSlot) -> dict[str, Any] | None:
        """Hub statistics (sequence, subscribers, drops) or None when not streaming."""
        hub = self._state(slot).hub
        return hub.stats() if hub is not None else None

    def raise_if_not_permitted(self, slot: DeviceSlot) -> None:
        """Ownership check for stream control as a command."""
        slot.check_command("stop_streaming")

    def subscribe(
        self,
        slot: DeviceSlot,
        callback: Callable[[Any], object] | None,
        maxsize: int,
        on_ready: Callable[[], None] | None,
        stream_params: dict[str, Any],
        *,
        pinned: bool,
    ) -> Subscription:
        """Add a subscriber, starting the device's stream first if it is not running."""
        start = slot.originals.get("start_streaming")
        if start is None or "stop_streaming" not in slot.originals:
            raise DeviceOperationError(
                f"Device '{slot.device_id}' does not support streaming. Its class "
                f"{slot.device_type} has no start_streaming(callback, **kw) / "
                "stop_streaming(timeout=None) methods."
            )
        if callback is not None and not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {type(callback).__name__}")
        state = self._state(slot)
        with state.lock:
            hub = state.hub
            if hub is not None and not hub.closed:
                if pinned:
                    state.pinned = True
                return hub.subscribe(callback, maxsize=maxsize, on_ready=on_ready)
            hub = StreamHub(
                f"device-{slot.device_id}", history=256,
                on_empty=lambda h: self._last_left(slot, h),
                on_callback_error=lambda sub, exc: self._callback_failed(slot, sub, exc),
            )
            sub = hub.subscribe(callback, maxsize=maxsize, on_ready=on_ready)
            wrapped: Callable[..., Any] = getattr(slot.instance, "start_streaming")  # noqa: B009
            # A remote caller starts the device as itself, so the wrapper checks its right to
            # (ownership, under the device lock: no claim can slip in between); a local
            # subscriber starts it as the framework, as LabDaemon's scripts expect.
            caller = current_actor()
            actor = caller if pinned or caller.remote else FRAMEWORK
            try:
                with acting_as(actor):
                    wrapped(callback=hub.publish, **stream_params)
            except BaseException:
                hub.close(timeout=0.5)
                raise
            state.hub = hub
            state.pinned = pinned
        self._publish_event({"event": "stream_started", "device_id": slot.device_id})
        return sub

    def stop(
        self, slot: DeviceSlot, timeout: float | None, *, if_unused: StreamHub | None = None
    ) -> list[str]:
        """Stop the device's stream and end every subscription; returns stuck subscriber names.

        With ``if_unused=hub`` it stops only if that hub is still the live one, unpinned and
        without subscribers, decided atomically with respect to :meth:`subscribe`.
        """
        state = self._state(slot)
        with state.lock:
            hub = state.hub
            if hub is None:
                return []
            if if_unused is not None and (
                hub is not if_unused or state.pinned or hub.subscriptions
            ):
                return []
            state.hub = None
            state.pinned = False
            try:
                # Under the lock: the device is stopped before a new subscriber may restart it.
                self._stop_device(slot, timeout)
            finally:
                # Detached either way, so subscribers must hear that the stream ended even when
                # the driver's stop failed; otherwise their delivery threads wait forever.
                stuck = self._end_hub(slot, hub, timeout)
        return [sub.name for sub in stuck]

    def _end_hub(self, slot: DeviceSlot, hub: StreamHub, timeout: float | None) -> list[Subscription]:
        stuck = hub.close(timeout=timeout)
        self._publish_event({"event": "stream_stopped", "device_id": slot.device_id})
        return stuck

    def _stop_device(self, slot: DeviceSlot, timeout: float | None) -> None:
        stop = slot.originals["stop_streaming"]
        try:
            if "timeout" in inspect.signature(stop).parameters:
                stop(timeout=timeout)
            else:
                stop()
        except Exception as exc:
            slot.record_error(exc, "stop_streaming")
            if isinstance(exc, DeviceError):
                raise
            raise DeviceOperationError(
                f"Device {slot.device_id!r}: stop_streaming() failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _last_left(self, slot: DeviceSlot, hub: StreamHub) -> None:
        # Runs on whatever thread closed the last subscription (maybe the server's event loop),
        # so the device is stopped on a worker thread.
        state = self._state(slot)
        if state.pinned or state.hub is not hub:
            return

        def stop_if_still_unused() -> None:
            try:
                self.stop(slot, timeout=1.0, if_unused=hub)
            except Exception:
                pass  # recorded as the device's error by stop()

        try:
            self._submit(stop_if_still_unused)
        except RuntimeError:  # pool closed: the daemon is shutting down and stops streams itself
            pass

    def _callback_failed(self, slot: DeviceSlot, sub: Subscription, exc: BaseException) -> None:
        record = ErrorRecord.from_exception(
            exc, "callback", {"device_id": slot.device_id, "subscription": sub.name}
        )
        self._publish_event({"event": "callback_error", "device_id": slot.device_id,
                             "error": record.to_dict(include_traceback=False)})
        self._on_callback_error(record)

    def active(self) -> list[DeviceSlot]:
        """Slots whose stream the daemon runs."""
        slots = []
        for device_id, state in list(self._states.items()):
            if state.hub is not None:
                slot = self._slots.get(device_id)
                if slot is not None:
                    slots.append(slot)
        return slots
