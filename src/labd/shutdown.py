"""Bounded, ordered shutdown of a daemon, and the report of what did not stop.

Order: cancel runs (pending ones never start), stop streams, wait for runs, disconnect
devices in reverse order of adding. Tasks share one ``timeout`` budget, devices another, so
the total never grows with the number of devices or tasks (LabDaemon 1.0 gave each its own).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labd.devices import DeviceState
from labd.ownership import FRAMEWORK, acting_as

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["ShutdownReport", "run_shutdown"]

log = logging.getLogger("labd")

#: Devices reached after the budget ran out still get this long to disconnect.
GRACE = 0.05


@dataclass
class ShutdownReport:
    """What :meth:`LabDaemon.shutdown` could and could not stop."""

    tasks_not_stopped: list[str] = field(default_factory=list)
    devices_not_disconnected: list[str] = field(default_factory=list)
    streams_not_stopped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """True when everything stopped in time and nothing raised."""
        return not (self.tasks_not_stopped or self.devices_not_disconnected
                    or self.streams_not_stopped or self.errors)

    def __str__(self) -> str:
        if self.clean:
            return f"labd shut down cleanly in {self.seconds:.2f} s"
        parts = []
        if self.tasks_not_stopped:
            parts.append(f"tasks still running (ignored cancel): {', '.join(self.tasks_not_stopped)}")
        if self.devices_not_disconnected:
            parts.append(f"devices not disconnected: {', '.join(self.devices_not_disconnected)}")
        if self.streams_not_stopped:
            parts.append(f"streams not stopped: {', '.join(self.streams_not_stopped)}")
        parts.extend(self.errors)
        return f"labd shut down in {self.seconds:.2f} s with problems: " + "; ".join(parts)


def _start(
    daemon: LabDaemon, fn: Callable[[], object], report: ShutdownReport, label: str
) -> threading.Event:
    done = threading.Event()

    def job() -> None:
        try:
            with acting_as(FRAMEWORK):
                fn()
        except Exception as exc:
            report.errors.append(f"{label}: {type(exc).__name__}: {exc}")
        finally:
            done.set()

    daemon._pool.submit(job)
    return done


def _close_task_streams(daemon: LabDaemon, timeout: float) -> None:
    """End every run's stream: a subscriber that never called close() must not keep a thread."""
    deadline = time.monotonic() + timeout
    for run in list(daemon._runs.values()):
        hub = run._hub
        if hub is not None:
            hub.close(timeout=max(deadline - time.monotonic(), 0.0))


def run_shutdown(daemon: LabDaemon, timeout: float) -> ShutdownReport:
    """Shut ``daemon`` down within about ``2 * timeout`` seconds and report what did not stop."""
    started = time.monotonic()
    report = ShutdownReport()
    # The daemon is closed (under its lock) before this runs, so no run can register after
    # this snapshot: execute_task checks `closed` under the same lock.
    with daemon._lock:
        runs = list(daemon._runs.values())
    for run in runs:
        run.request_cancel()

    deadline = time.monotonic() + timeout
    stream_jobs = {
        slot.device_id: _start(
            daemon, lambda s=slot: daemon._streams.stop(s, timeout),  # type: ignore[misc]
            report, f"stopping the stream of {slot.device_id!r}",
        )
        for slot in daemon._streams.active()
    }
    for run in runs:
        if not run.done_event.wait(max(deadline - time.monotonic(), 0.0)):
            report.tasks_not_stopped.append(run.task_id)
    for device_id, done in stream_jobs.items():
        if not done.wait(max(deadline - time.monotonic(), 0.0)):
            report.streams_not_stopped.append(device_id)

    device_deadline = time.monotonic() + timeout
    for slot in reversed(list(daemon._slots.values())):
        if slot.state in (DeviceState.ADDED, DeviceState.DISCONNECTED):
            continue
        done = _start(
            daemon, lambda s=slot: daemon.disconnect_device(s.device_id),  # type: ignore[misc]
            report, f"disconnecting {slot.device_id!r}",
        )
        if not done.wait(max(device_deadline - time.monotonic(), GRACE)):
            report.devices_not_disconnected.append(slot.device_id)
            slot.state = DeviceState.FAULTED

    daemon._timer.close()
    daemon.events.close(timeout=0.2)
    _close_task_streams(daemon, timeout=0.2)
    busy = daemon._pool.close(timeout=0.05)
    daemon._close_store()
    del busy  # hung jobs are already named by task id or device id above
    report.seconds = time.monotonic() - started
    return report
