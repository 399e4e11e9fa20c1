"""The facade: :class:`LabDaemon` owns the daemon's parts and shuts them down in order.

LabDaemon 1.0's class with the same names and meanings, plus labd's ownership (claims,
leases, strict mode), fan-out streaming, progress, error records and a bounded shutdown.
Every method is a thin entry point into one of the parts (DESIGN.md section 5,
docs/architecture.md):

- :class:`~labd.plugins.PluginRegistry`: device and task classes by name;
- :class:`~labd.device_table.DeviceTable`: device slots, lifecycle, calls and streams;
- :class:`~labd.task_runner.TaskRunner`: runs, their handles, retention and history;
- :class:`~labd.ownership.ClaimRegistry`: claims, leases and the fair FIFO of waiters;
- :class:`~labd.store.RunStore` (optional): the SQLite history.

No part reaches into another's state; each gets the callables it needs at construction.
Everything here is threads and locks; the HTTP server sits on top.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from labd.deadlines import DeadlineTimer
from labd.device_table import DeviceTable, RemoteDevices
from labd.devices import DeviceSlot
from labd.errors import (
    DaemonClosedError,
    ErrorRecord,
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownLeaseError,
    describe_choices,
)
from labd.ownership import Actor, ClaimGate, ClaimRegistry, Lease
from labd.plugins import PluginRegistry
from labd.shutdown import ShutdownReport, stop_runs_and_devices
from labd.store import RunStore
from labd.streaming import DEFAULT_MAXSIZE, StreamHub, Subscription
from labd.task_runner import TaskRunner
from labd.tasks import TaskHandle
from labd.workers import AffineWorkerPool

__all__ = ["LabDaemon", "ShutdownReport", "_live_daemons"]

log = logging.getLogger("labd")

_LIVE: weakref.WeakSet[LabDaemon] = weakref.WeakSet()


def _live_daemons() -> list[LabDaemon]:
    """Daemons created in this process and not shut down yet (used by the test suite)."""
    return [d for d in list(_LIVE) if not d.closed]


def _check_wait(value: object) -> bool | float:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value > 0:
        return float(value)
    raise InvalidArgumentError(
        f"wait must be True, False or a positive number of seconds, got {value!r}"
    )


class LabDaemon:
    """Holds your device and task classes, runs them safely, and shares them.

    Every public device method is serialised per device; tasks run on background threads and
    own the devices they declare in ``device_ids``; streams fan out to any number of
    subscribers. Use it as a context manager or call :meth:`shutdown`.

    Example::

        import labd as ld
        daemon = ld.LabDaemon()
        daemon.register_plugins(devices={"MyLaser": MyLaser}, tasks={"Sweep": Sweep})
        laser = daemon.add_device("laser1", "MyLaser", address="GPIB0::1")
        daemon.connect_device(laser)
        result = daemon.execute_task("sweep1", "Sweep", laser_id="laser1").wait()
    """

    def __init__(
        self,
        completed_task_buffer: int = 20,
        *,
        strict_ownership: bool = False,
        call_timeout: float | None = None,
        stream_maxsize: int = DEFAULT_MAXSIZE,
        store: RunStore | str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(completed_task_buffer, int) or completed_task_buffer < 0:
            raise InvalidArgumentError(
                f"completed_task_buffer must be an integer >= 0, got {completed_task_buffer!r}"
            )
        self.strict_ownership = bool(strict_ownership)
        self.call_timeout = call_timeout
        self.stream_maxsize = stream_maxsize
        #: The daemon's event stream (device and task state, claims, leases, errors).
        self.events = StreamHub("events", history=512)
        self._closed = False
        self._shutdown_report: ShutdownReport | None = None
        self._shutdown_lock = threading.Lock()
        self._error_listeners: list[Callable[[ErrorRecord], None]] = []
        self._store: RunStore | None = None
        self._owns_store = False
        if store is not None:
            self._owns_store = not isinstance(store, RunStore)
            self._store = store if isinstance(store, RunStore) else RunStore(store)
        # The parts, each given only what it needs (shut down in reverse, see shutdown()).
        self._timer = DeadlineTimer()
        self._pool = AffineWorkerPool()
        self._plugins = PluginRegistry()
        self._claims = ClaimRegistry(self._slot_for_claims, self._timer, self._publish_event)
        self._devices = DeviceTable(
            claims=self._claims, publish_event=self._publish_event, submit=self._pool.submit,
            on_device_error=self._device_error, on_callback_error=self._report_error,
            strict=self.strict_ownership, call_timeout=call_timeout,
            stream_maxsize=stream_maxsize,
        )
        self._runner = TaskRunner(
            daemon=self, claims=self._claims, devices=self._devices, store=self._store,
            submit=self._pool.submit, events=self.events, on_task_error=self._report_error,
            completed_task_buffer=completed_task_buffer,
        )
        #: The lab node (labd.lab.LabNode) when this daemon is part of a lab; None otherwise.
        self.lab: Any = None
        _LIVE.add(self)

    # -- wiring between the parts -----------------------------------------------------------
    def _slot_for_claims(self, device_id: str) -> DeviceSlot:
        return self._devices.slot(device_id)

    def _publish_event(self, event: dict[str, Any]) -> None:
        self.events.publish(event)
        name = event.get("event", "")
        if self._store is not None and name.startswith("lease_"):
            self._store.lease_event(name[6:], event.get("lease", {}))

    def _device_error(self, record: ErrorRecord) -> None:
        if self._store is not None:
            self._store.device_error(record.to_dict())
        self._report_error(record)

    def _report_error(self, record: ErrorRecord) -> None:
        for listener in list(self._error_listeners):
            try:
                listener(record)
            except Exception:
                log.exception("labd error listener failed")

    def _check_open(self) -> None:
        if self._closed:
            raise DaemonClosedError("This LabDaemon has been shut down; create a new one.")

    # -- plugins ------------------------------------------------------------------------------
    def register_plugins(
        self, devices: Mapping[str, Any] | None = None, tasks: Mapping[str, Any] | None = None,
    ) -> None:
        """Register device and task classes by name. Re-registering a name is an error.

        All names are checked before any is registered, so a bad entry changes nothing.
        """
        self._plugins.register(devices, tasks)

    @property
    def device_types(self) -> list[str]:
        """Registered device type names."""
        return self._plugins.device_types()

    @property
    def task_types(self) -> list[str]:
        """Registered task type names."""
        return self._plugins.task_types()

    def device_class(self, device_type: str) -> Any:
        """The class registered as ``device_type``."""
        return self._plugins.device_class(device_type)

    def task_class(self, task_type: str) -> Any:
        """The class registered as ``task_type``."""
        return self._plugins.task_class(task_type)

    # -- devices ------------------------------------------------------------------------------
    def add_device(self, device_id: str, device_type: str, **params: Any) -> Any:
        """Construct ``device_type(device_id, **params)`` and return it, with locked methods."""
        self._check_open()
        cls = self._plugins.device_class(device_type)
        return self._devices.add_device(device_id, device_type, cls, params)

    def remove_device(self, device_id: str, timeout: float | None = 2.0) -> None:
        """Stop streaming, disconnect and forget a device that no one owns."""
        self._devices.remove_device(device_id, timeout)

    def get_device(self, device_id: str) -> Any:
        """The device instance (its public methods are locked and ownership-checked)."""
        return self._devices.get_device(device_id)

    def device_ids(self) -> list[str]:
        """Ids of all devices, in the order they were added."""
        return self._devices.ids()

    def device_slot(self, device_id: str) -> DeviceSlot:
        """The framework's record of a device: state, last error, lock, ``unresponsive`` flag.

        For servers and tools that report on devices; scripts use :meth:`device_info`.
        """
        return self._devices.slot(device_id)

    def device_info(self, device_id: str) -> dict[str, Any]:
        """JSON-ready state of one device (the shape of ``GET /devices/{id}``)."""
        return self._devices.device_info(device_id)

    def list_devices(self) -> list[dict[str, Any]]:
        """:meth:`device_info` for every device."""
        return self._devices.list_devices()

    def device_methods(self, device_id: str) -> list[dict[str, Any]]:
        """Public methods of a device: name, kind (query/command), parameters, doc."""
        return self._devices.device_methods(device_id)

    def set_call_timeout(self, device_id: str, seconds: float | None) -> None:
        """Raise :class:`DeviceTimeoutError` when a call waits longer than ``seconds`` for the device."""
        self._devices.set_call_timeout(device_id, seconds)

    def call_device(
        self, device_id: str, method: str, args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None, *, actor: Actor | None = None,
    ) -> Any:
        """Call ``device.method(*args, **kwargs)`` by name, as ``actor`` (e.g. a remote client).

        Checks the name and the arguments before calling, so bad input never reaches the device.
        """
        return self._devices.call_device(device_id, method, args, kwargs, actor=actor)

    def connect_device(self, device: Any, timeout: float | None = None) -> None:
        """Call the device's ``connect()`` (bounded by ``timeout`` seconds if given).

        Raises :class:`DeviceConnectionError` (the driver's error as ``__cause__``) or
        :class:`DeviceTimeoutError`; the device is then ``faulted``. After a timeout the
        device's ``disconnect()`` runs when the late ``connect()`` returns, and its methods
        raise :class:`DeviceNotConnectedError` until a later connect succeeds.
        """
        self._check_open()
        self._devices.connect_device(device, timeout)

    def disconnect_device(self, device: Any, timeout: float | None = None) -> None:
        """Call the device's ``disconnect()``; idempotent. A timeout is logged, not raised."""
        self._devices.disconnect_device(device, timeout)

    @contextlib.contextmanager
    def device_context(self, device_id: str, device_type: str, **params: Any) -> Iterator[Any]:
        """Add and connect a device for the block; disconnect it on exit."""
        instance = self.add_device(device_id, device_type, **params)
        try:
            self.connect_device(instance)
            yield instance
        finally:
            try:
                self.disconnect_device(instance)
            except Exception:
                log.exception("Failed to disconnect device %r on context exit", device_id)

    def subscribe(
        self, device: Any, callback: Callable[[Any], object] | None = None, *,
        maxsize: int | None = None, on_ready: Callable[[], None] | None = None,
        **stream_params: Any,
    ) -> Subscription:
        """Subscribe to a device's stream, starting it if needed.

        Each subscriber has its own bounded queue (``maxsize``); ``callback`` runs on the
        subscription's delivery thread, never on the device's thread. A stream started by a
        subscription stops when its last subscriber closes.
        """
        return self._devices.subscribe(
            device, callback, maxsize=maxsize, on_ready=on_ready, **stream_params
        )

    def start_streaming(
        self, device: Any, callback: Callable[[Any], object], **stream_params: Any
    ) -> Subscription:
        """Start the device's stream (or join it if running) with ``callback`` as a subscriber.

        A stream started this way runs until :meth:`stop_streaming`.
        """
        return self._devices.start_streaming(device, callback, **stream_params)

    def stop_streaming(self, device: Any, timeout: float | None = 1.0) -> None:
        """Stop the device's stream and end every subscription. No effect if not streaming."""
        self._devices.stop_streaming(device, timeout)

    def stream_hub(self, device: Any) -> StreamHub | None:
        """The device's current stream hub (None if not streaming)."""
        return self._devices.stream_hub(device)

    def get_device_error(self, device_id: str) -> ErrorRecord | None:
        """The device's last error record, kept until cleared."""
        return self._devices.get_device_error(device_id)

    def clear_device_error(self, device_id: str) -> None:
        """Forget the device's last error."""
        self._devices.clear_device_error(device_id)

    def add_error_listener(self, listener: Callable[[ErrorRecord], None]) -> None:
        """Call ``listener(record)`` for every device, callback and task error."""
        self._error_listeners.append(listener)

    # -- tasks --------------------------------------------------------------------------------
    def execute_task(
        self, task_id: str | None, task_type: str, *, wait_for_devices: bool | float = False,
        **params: Any,
    ) -> TaskHandle:
        """Start ``task_type(task_id=..., **params).run(context)`` on a background thread.

        Claims every device in the task's ``device_ids`` first, all or none: if one is owned
        by someone else this raises :class:`DeviceBusyError` and nothing starts, unless
        ``wait_for_devices`` is True (wait in a fair queue) or a number of seconds (wait that
        long, then fail the run). ``task_id=None`` generates an id. After :meth:`shutdown`
        started it raises :class:`DaemonClosedError`.
        """
        self._check_open()
        cls = self._plugins.task_class(task_type)
        if not isinstance(wait_for_devices, bool) and not (
            isinstance(wait_for_devices, int | float) and wait_for_devices > 0
        ):
            raise InvalidArgumentError(
                "wait_for_devices must be True, False or a positive number of seconds, "
                f"got {wait_for_devices!r}"
            )
        return self._runner.start(cls, task_id, task_type, params, wait_for_devices)

    def get_task(self, task_id: str) -> TaskHandle:
        """A handle on a live or retained run."""
        return TaskHandle(self._runner.run(task_id))

    @property
    def completed_task_buffer(self) -> int:
        """How many finished runs stay in memory (LabDaemon 1.0's ``completed_task_buffer``)."""
        return self._runner.completed_task_buffer

    @property
    def store(self) -> RunStore | None:
        """The run store, or None when history is kept in memory only."""
        return self._store

    def runs(
        self, status: str | None = None, task_type: str | None = None,
        since: float | None = None, limit: int = 50, offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Run history, newest first: from the run store, or the retained runs without one.

        ``since`` is a POSIX timestamp; each entry is a summary without result or events.
        """
        return self._runner.history(status, task_type, since, limit, offset)

    def get_run(self, task_id: str) -> dict[str, Any]:
        """The full record of a run (``result`` and ``events`` included), live or historical."""
        return self._runner.record(task_id)

    def list_tasks(self) -> list[dict[str, Any]]:
        """Summaries of live and retained runs, oldest first."""
        return [run.info() for run in self._runner.all_runs()]

    def task_handles(self) -> list[TaskHandle]:
        """Handles of live and retained runs."""
        return [TaskHandle(run) for run in self._runner.all_runs()]

    @contextlib.contextmanager
    def task_context(
        self, task_id: str | None, task_type: str, **params: Any
    ) -> Iterator[TaskHandle]:
        """Start a task for the block; cancel it on exit if it is still running."""
        handle = self.execute_task(task_id, task_type, **params)
        try:
            yield handle
        finally:
            if handle.is_running():
                handle.cancel()

    def subscribe_task(
        self, task_id: str, callback: Callable[[Any], object] | None = None, *,
        maxsize: int = DEFAULT_MAXSIZE, on_ready: Callable[[], None] | None = None,
    ) -> Subscription:
        """Receive a run's progress, data and state events."""
        return self._runner.run(task_id).stream.subscribe(
            callback, maxsize=maxsize, on_ready=on_ready
        )

    def get_task_error(self, task_id: str) -> ErrorRecord | None:
        """The run's error record, kept until cleared."""
        return self._runner.run(task_id).error

    def clear_task_error(self, task_id: str) -> None:
        """Forget the run's error record."""
        self._runner.run(task_id).error = None

    # -- ownership ------------------------------------------------------------------------------
    def claim(
        self, device_ids: Sequence[str], owner: str, ttl: float | None = None, *,
        wait: bool | float = False,
    ) -> Lease:
        """Lease devices to ``owner`` (a person or program) so nobody else can command them.

        The lease expires after ``ttl`` seconds unless renewed (``lease.renew()``). Use it as a
        context manager to release on exit. Raises :class:`DeviceBusyError` if a device is
        owned, or with ``wait`` (True or seconds) queues in the same fair FIFO as task runs.

        Example::

            with daemon.claim(["laser1"], owner="alice", ttl=30) as lease:
                laser.set_wavelength(1550.0)
                lease.renew()
        """
        self._check_open()
        if not isinstance(owner, str) or not owner:
            raise InvalidArgumentError(f"owner must be a non-empty string naming who holds the lease, got {owner!r}")
        if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl <= 0):
            raise InvalidArgumentError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        if isinstance(device_ids, str) or not isinstance(device_ids, list | tuple) or not device_ids:
            raise InvalidArgumentError(
                f"claim: device_ids must be a non-empty list of device ids, got {device_ids!r}."
            )
        unknown = self._devices.unknown(device_ids)
        if unknown:
            raise UnknownDeviceError(
                f"claim: unknown device(s) {unknown!r}. Devices: "
                f"{describe_choices(self._devices.ids())}."
            )
        ids = tuple(dict.fromkeys(device_ids))
        return self._claims.grant_lease(ids, owner, ttl, wait=_check_wait(wait))

    def leases(self) -> list[Lease]:
        """Active leases."""
        return self._claims.leases()

    def get_lease(self, lease_id: str) -> Lease:
        """The active lease with that id."""
        lease = self._claims.get_lease(lease_id)
        if lease is None:
            raise UnknownLeaseError(
                f"No active lease {lease_id!r} (it may have expired or been released). Active leases: "
                f"{describe_choices(lease.lease_id for lease in self._claims.leases())}."
            )
        return lease

    def break_lease(self, lease_id: str, reason: str = "broken by an admin") -> None:
        """End someone's lease now (admin action); their next command is refused."""
        self._claims.end_lease(self.get_lease(lease_id), "broken", reason)

    def owner_of(self, device_id: str) -> str | None:
        """Label of the device's current owner (``task 'sweep1'``, ``lease ...``) or None."""
        self._devices.slot(device_id)
        owner = self._claims.owner_of(device_id)
        return owner[0].label if owner else None

    # -- a lab of several nodes ---------------------------------------------------------------
    def join_lab(
        self, node: Any, remote: RemoteDevices | None, gate: ClaimGate | None,
    ) -> ClaimRegistry:
        """Make this daemon a node of a lab: other nodes' devices and the engine's claims.

        Called by :class:`labd.lab.LabNode` (``join_lab(None, None, None)`` leaves); returns
        the claim registry, in which the node stands in for other nodes' claims. Without it
        the daemon is one process, exactly as before.
        """
        self.lab = node
        self._devices.remote = remote
        self._claims.gate = gate
        return self._claims

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` started."""
        return self._closed

    def shutdown(self, timeout: float | None = 2.0) -> ShutdownReport:
        """Stop streams, cancel tasks, disconnect devices; bounded by ``timeout``. Idempotent.

        Tasks get ``timeout`` seconds in total to stop after cancel; devices are disconnected
        in reverse order within another ``timeout``. Returns (and logs) what did not stop.
        """
        with self._shutdown_lock:
            if self._shutdown_report is not None:
                return self._shutdown_report
            started = time.monotonic()
            self._closed = True
            budget = 2.0 if timeout is None else float(timeout)
            report = stop_runs_and_devices(self._runner, self._devices, self._pool.submit, budget)
            self._timer.close()
            self.events.close(timeout=0.2)
            self._pool.close(timeout=0.05)  # hung jobs are named by task or device id above
            self._close_store()
            report.seconds = time.monotonic() - started
            self._shutdown_report = report
        if report.clean:
            log.info("%s", report)
        else:
            log.warning("%s", report)
        return report

    def _close_store(self) -> None:
        store = self._store
        if store is None:
            return
        if self._owns_store:
            store.close()
        else:
            store.flush()

    def __enter__(self) -> LabDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"<LabDaemon devices={len(self._devices.ids())} "
                f"runs={len(self._runner.all_runs())}{' closed' if self._closed else ''}>")
