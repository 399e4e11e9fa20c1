"""``labd watch DEVICE``: live values of one device in the terminal until Ctrl-C.

A device that streams (it has ``start_streaming``) is followed over ``/stream/devices/{id}``:
the view shows the sequence number, event and sample rates, items lost (sequence gaps) and a
summary of the last payload. Any other device is polled: a query method (``--method``,
default ``get_power`` or its first argument-free query) every ``--interval`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from labd.cli.errors import DEFAULT_URL, CliError, reports_errors
from labd.cli.output import console, numeric_values, one_line, summarize_value
from labd.cli.remote import TokenOption, UrlOption, items, open_api

if TYPE_CHECKING:
    from labd.client import ServerAPI

__all__ = ["watch"]

REFRESH_S = 0.25
PREFERRED_QUERY = "get_power"


@dataclass
class _Readings:
    """What the view shows; written by the stream thread or the poll loop, read by the view."""

    source: str
    count: int = 0
    started: float = field(default_factory=time.monotonic)
    last_at: float | None = None
    sequence: int | None = None
    samples: int = 0
    lost: int = 0
    last_value: Any = None
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    enough: threading.Event = field(default_factory=threading.Event)

    def add(self, value: Any, limit: int | None, sequence: int | None = None) -> None:
        with self.lock:
            self.count += 1
            self.last_at = time.monotonic()
            self.last_value = value
            if sequence is not None:
                self.sequence = sequence
            found = numeric_values(value)
            self.samples += len(found) if found else 1
            if limit is not None and self.count >= limit:
                self.enough.set()

    def view(self, title: str) -> Table:
        with self.lock:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rows = [
                ("source", self.source),
                ("updates", f"{self.count}  ({self.count / elapsed:.1f}/s)"),
                ("samples", f"{self.samples}  ({self.samples / elapsed:.4g}/s)"),
                ("sequence", "-" if self.sequence is None else str(self.sequence)),
                ("lost", str(self.lost)),
                ("last value", summarize_value(self.last_value)),
                (
                    "age",
                    "-" if self.last_at is None else f"{time.monotonic() - self.last_at:.1f} s",
                ),
            ]
            if self.last_error:
                rows.append(("last error", self.last_error))
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, value)
        return table

    def summary(self, device: str) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"{device}: {self.count} updates, {self.samples} samples, {self.lost} lost in "
            f"{elapsed:.1f} s; last: {summarize_value(self.last_value)}"
        )


@reports_errors
def watch(
    device: Annotated[str, typer.Argument(help="Device id, e.g. daq1 or pm1.")],
    method: Annotated[
        str | None,
        typer.Option(
            help="Query method to poll (default: stream if the device streams, else get_power or "
            "its first argument-free query)."
        ),
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.", min=0.01)] = 0.5,
    count: Annotated[
        int | None,
        typer.Option(help="Stop after this many updates (default: run until Ctrl-C).", min=1),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Show a device's live values: its stream if it streams, else a polled query.

    Example: labd watch daq1   |   labd watch pm1 --method get_power --interval 0.2
    """
    with open_api(url, token=token) as api:
        api.get_device(device)  # an unknown id fails here, with the list of devices
        methods = items(api.get_device_methods(device), "methods")
        names = {str(m.get("name")) for m in methods}
        if method is None and "start_streaming" in names:
            readings = _Readings(source=f"stream {url}/stream/devices/{device}")
            _follow_stream(url, token, device, readings, count)
        else:
            chosen = method or _default_query(device, methods)
            readings = _Readings(source=f"{chosen}() every {interval:g} s")
            _poll(api, device, chosen, interval, readings, count)
    console.print(readings.summary(device), soft_wrap=True)


def _default_query(device: str, methods: list[Mapping[str, Any]]) -> str:
    """``get_power`` if the device has it, else its first query that needs no arguments."""
    queries = sorted(
        str(m.get("name"))
        for m in methods
        if m.get("kind") == "query"
        and not any(isinstance(p, Mapping) and p.get("required") for p in m.get("parameters") or [])
    )
    if PREFERRED_QUERY in queries:
        return PREFERRED_QUERY
    if not queries:
        raise CliError(
            f"device {device!r} does not stream and has no query method without arguments to "
            "poll; pass --method NAME (see `labd methods DEVICE`)"
        )
    return queries[0]


def _live_until_done(readings: _Readings, title: str, alive: Any = None) -> None:
    """Refresh the view until enough updates, Ctrl-C, or ``alive()`` turns False."""
    with Live(
        readings.view(title), console=console, refresh_per_second=1 / REFRESH_S, transient=False
    ) as live:
        try:
            while not readings.enough.wait(REFRESH_S):
                live.update(readings.view(title))
                if alive is not None and not alive():
                    break
        except KeyboardInterrupt:
            pass
        live.update(readings.view(title))
    if not console.is_terminal:
        console.line()  # Live leaves a redirected output without its last newline


def _follow_stream(
    url: str, token: str | None, device: str, readings: _Readings, count: int | None
) -> None:
    from labd.client import SSEClient

    def on_event(name: str, data: Any) -> None:
        if name != "device_data" or not isinstance(data, Mapping):
            return
        sequence = data.get("sequence")
        readings.add(data.get("payload"), count, sequence if isinstance(sequence, int) else None)
        readings.lost = client.gaps

    client = SSEClient(url, on_event, token=token, reconnect=False)
    client.start_device_stream(device)
    try:
        _live_until_done(readings, f"watching {device}", alive=client.is_running)
    finally:
        client.stop_stream(timeout=5.0)
    if client.error is not None and not readings.enough.is_set():
        raise CliError(f"the stream of {device!r} ended: {one_line(client.error)}")


def _poll(
    api: ServerAPI,
    device: str,
    method: str,
    interval: float,
    readings: _Readings,
    count: int | None,
) -> None:
    # The first call raises (unknown method, bad device) before the live view starts.
    readings.add(api.call(device, method), count)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval) and not readings.enough.is_set():
            try:
                readings.add(api.call(device, method), count)
            except Exception as exc:  # shown in the view; the next poll may succeed
                with readings.lock:
                    readings.last_error = one_line(exc)

    poller = threading.Thread(target=loop, name=f"labd-watch-{device}", daemon=True)
    poller.start()
    try:
        _live_until_done(readings, f"watching {device}.{method}()")
    finally:
        stop.set()
        poller.join(timeout=interval + 35.0)
