"""The coordinator: plugins, devices, task runs, ownership, streams and shutdown.

:class:`LabDaemon` is LabDaemon 1.0's class with the same names and meanings, plus labd's
ownership (claims, leases, strict mode), fan-out streaming, progress, error records and a
bounded shutdown. Everything here is threads and locks; the HTTP server sits on top.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from labd.daemon_core import _check_wait, _live_daemons
from labd.daemon_devices import DeviceOps
from labd.daemon_tasks import TaskOps
from labd.errors import (
    InvalidArgumentError,
    UnknownDeviceError,
    UnknownLeaseError,
    describe_choices,
)
from labd.ownership import (
    Lease,
)
from labd.shutdown import ShutdownReport, run_shutdown

__all__ = ["LabDaemon", "ShutdownReport", "_live_daemons"]

log = logging.getLogger("labd")


class LabDaemon(DeviceOps, TaskOps):
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

    def claim(
        self,
        device_ids: Sequence[str],
        owner: str,
        ttl: float | None = None,
        *,
        wait: bool | float = False,
    ) -> Lease:
        """Lease devices to ``owner`` (a person or program) so nobody else can command them.

        The lease expires after ``ttl`` seconds unless renewed (``lease.renew()``). Use it as a
        context manager to release on exit. Raises :class:`DeviceBusyError` if a device is owned.

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
        ids = self._check_device_list(device_ids, "claim")
        # With wait, the lease queues in the same fair FIFO as task runs (first come first
        # served), and an interrupt while waiting leaves nothing queued or held.
        return self._claims.grant_lease(ids, owner, ttl, wait=_check_wait(wait))

    def _check_device_list(self, device_ids: Any, what: str) -> tuple[str, ...]:
        if isinstance(device_ids, str) or not isinstance(device_ids, list | tuple) or not device_ids:
            raise InvalidArgumentError(
                f"{what}: device_ids must be a non-empty list of device ids, got {device_ids!r}."
            )
        unknown = [d for d in device_ids if not isinstance(d, str) or d not in self._slots]
        if unknown:
            raise UnknownDeviceError(
                f"{what}: unknown device(s) {unknown!r}. Devices: {describe_choices(self._slots)}."
            )
        return tuple(dict.fromkeys(device_ids))

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
        lease = self.get_lease(lease_id)
        self._claims.end_lease(lease, "broken", reason)

    def owner_of(self, device_id: str) -> str | None:
        """Label of the device's current owner (``task 'sweep1'``, ``lease ...``) or None."""
        self._slot(device_id)
        owner = self._claims.owner_of(device_id)
        return owner[0].label if owner else None

    def _close_store(self) -> None:
        store = self._store
        if store is None:
            return
        if self._owns_store:
            store.close()
        else:
            store.flush()

    def shutdown(self, timeout: float | None = 2.0) -> ShutdownReport:
        """Stop streams, cancel tasks, disconnect devices; bounded by ``timeout``. Idempotent.

        Tasks get ``timeout`` seconds in total to stop after cancel; devices are disconnected
        in reverse order within another ``timeout``. Returns (and logs) what did not stop.
        """
        with self._shutdown_lock:
            if self._shutdown_report is not None:
                return self._shutdown_report
            with self._lock:  # execute_task registers runs under this lock, checking _closed
                self._closed = True
            report = run_shutdown(self, 2.0 if timeout is None else float(timeout))
            self._shutdown_report = report
        if report.clean:
            log.info("%s", report)
        else:
            log.warning("%s", report)
        return report

    def __enter__(self) -> LabDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"<LabDaemon devices={len(self._slots)} runs={len(self._runs)}"
                f"{' closed' if self._closed else ''}>")

