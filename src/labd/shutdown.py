"""Bounded, ordered shutdown of the daemon's parts, and the report of what did not stop.

Order: the task runner stops taking runs and cancels the ones it has (pending ones never
start, children with their parents), device streams stop, runs are awaited, devices are
disconnected in reverse order of adding. Tasks share one ``timeout`` budget, devices another,
so the total never grows with the number of devices or tasks (LabDaemon 1.0 gave each its own).
The facade (:class:`labd.LabDaemon`) then closes the timer, the event stream, the worker pool
and the store, in that order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from labd.device_table import DeviceTable
from labd.devices import DeviceState
from labd.ownership import FRAMEWORK, acting_as
from labd.task_runner import TaskRunner

__all__ = ["ShutdownReport", "stop_runs_and_devices"]

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
    submit: Callable[[Callable[[], None]], None], fn: Callable[[], object],
    report: ShutdownReport, label: str,
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

    submit(job)
    return done


def stop_runs_and_devices(
    runner: TaskRunner, devices: DeviceTable, submit: Callable[[Callable[[], None]], None],
    timeout: float,
) -> ShutdownReport:
    """Stop every run and stream and disconnect every device within about ``2 * timeout`` s."""
    started = time.monotonic()
    report = ShutdownReport()
    runs = runner.close()  # no run can register after this
    for run in runs:
        run.request_cancel()

    deadline = time.monotonic() + timeout
    stream_jobs = {
        slot.device_id: _start(
            submit, lambda s=slot: devices.streams.stop(s, timeout),  # type: ignore[misc]
            report, f"stopping the stream of {slot.device_id!r}",
        )
        for slot in devices.streams.active()
    }
    report.tasks_not_stopped.extend(runner.wait_for(runs, deadline))
    for device_id, done in stream_jobs.items():
        if not done.wait(max(deadline - time.monotonic(), 0.0)):
            report.streams_not_stopped.append(device_id)

    device_deadline = time.monotonic() + timeout
    for slot in reversed(devices.slots()):
        if slot.state in (DeviceState.ADDED, DeviceState.DISCONNECTED):
            continue
        done = _start(
            submit, lambda s=slot: devices.disconnect_device(s.device_id),  # type: ignore[misc]
            report, f"disconnecting {slot.device_id!r}",
        )
        if not done.wait(max(device_deadline - time.monotonic(), GRACE)):
            report.devices_not_disconnected.append(slot.device_id)
            slot.state = DeviceState.FAULTED
    runner.close_streams(timeout=0.2)
    report.seconds = time.monotonic() - started
    return report
