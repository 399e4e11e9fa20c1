"""Prometheus metrics for one server: its own registry, counters, and gauges read at scrape time.

Counters (calls, errors, task starts and finishes) are incremented as things happen; task
starts and finishes come from the daemon's event hub, so runs started from Python count too.
Gauges that describe current state (running tasks, stream subscribers, drops) are read from
the daemon and its stream hubs when ``/metrics`` is scraped, so they can never drift.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from labd.errors import UnknownNameError
from labd.streaming import Subscription

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = ["ServerMetrics"]

_FINISHED = frozenset({"completed", "failed", "cancelled", "interrupted"})
_STARTED = frozenset({"running", "paused"})


class _DaemonCollector:
    """Gauges computed from the daemon's current state at scrape time."""

    def __init__(self, daemon: LabDaemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self._daemon
        statuses = [handle.status for handle in daemon.task_handles()]
        running = GaugeMetricFamily("labd_tasks_running", "Task runs running or paused now.")
        running.add_metric([], sum(1 for s in statuses if s in _STARTED))
        yield running
        pending = GaugeMetricFamily("labd_tasks_pending", "Task runs waiting for their devices.")
        pending.add_metric([], sum(1 for s in statuses if s == "pending"))
        yield pending
        subscribers = GaugeMetricFamily(
            "labd_stream_subscribers", "Subscribers of each device stream.", labels=["device"])
        dropped = GaugeMetricFamily(
            "labd_stream_dropped", "Items dropped by current subscribers of each device stream "
            "(slow consumers lose their own oldest items).", labels=["device"])
        published = GaugeMetricFamily(
            "labd_stream_published", "Items published by each device stream since it started.",
            labels=["device"])
        unresponsive = GaugeMetricFamily(
            "labd_device_unresponsive", "1 while a device has a call past its request timeout.",
            labels=["device"])
        for device_id in daemon.device_ids():
            try:
                hub = daemon.stream_hub(device_id)
                slot = daemon.device_slot(device_id)
            except UnknownNameError:  # removed while we scrape
                continue
            unresponsive.add_metric([device_id], 1.0 if slot.unresponsive else 0.0)
            if hub is None:
                continue
            stats = hub.stats()
            subscribers.add_metric([device_id], stats["subscribers"])
            dropped.add_metric([device_id], stats["dropped"])
            published.add_metric([device_id], stats["published"])
        yield from (subscribers, dropped, published, unresponsive)


class ServerMetrics:
    """The metrics of one server app (a private :class:`CollectorRegistry`, not the global one)."""

    def __init__(self, daemon: LabDaemon) -> None:
        self._daemon = daemon
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "labd_device_calls", "Device method calls over HTTP, by outcome (ok or error type).",
            ["device", "method", "outcome"], registry=self.registry)
        self.errors = Counter(
            "labd_http_errors", "Error answers, by HTTP status and error type.",
            ["status", "type"], registry=self.registry)
        self.task_starts = Counter(
            "labd_task_starts", "Task runs that started running.", ["task_type"],
            registry=self.registry)
        self.task_finishes = Counter(
            "labd_task_finishes", "Task runs that ended, by final status.",
            ["task_type", "status"], registry=self.registry)
        self.stream_clients = Gauge(
            "labd_sse_clients", "Connected Server-Sent Events clients, by stream kind.",
            ["kind"], registry=self.registry)
        self.registry.register(_DaemonCollector(daemon))
        self._live_runs: set[str] = set()
        self._events: Subscription | None = None
        self._lock = threading.Lock()

    def attach(self) -> None:
        """Start counting task starts and finishes from the daemon's events. Idempotent."""
        with self._lock:
            if self._events is None:
                self._events = self._daemon.events.subscribe(
                    self._on_event, maxsize=4096, name="labd-server-metrics")

    def detach(self, timeout: float = 1.0) -> None:
        """Stop listening to the daemon's events."""
        with self._lock:
            events, self._events = self._events, None
        if events is not None:
            events.close()
            events.join(timeout)

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict) or event.get("event") != "task_state":
            return
        task_id = str(event.get("task_id"))
        task_type, status = str(event.get("task_type")), str(event.get("status"))
        if status in _STARTED and task_id not in self._live_runs:
            self._live_runs.add(task_id)
            self.task_starts.labels(task_type).inc()
        elif status in _FINISHED:
            self._live_runs.discard(task_id)
            self.task_finishes.labels(task_type, status).inc()

    def count_call(self, device: str, method: str, outcome: str) -> None:
        """Count one device call; pass ``"(unknown)"`` labels for names that do not exist."""
        self.calls.labels(device, method, outcome).inc()

    def count_error(self, status: int, error_type: str) -> None:
        """Count one error answer."""
        self.errors.labels(str(status), error_type).inc()

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
