"""Publish cost on the producer's thread with 1, 10, 100 and 1,000 SSE clients on one stream.

Why: a device's acquisition thread calls ``StreamHub.publish`` for every item; if that costs
more as SSE clients join, a busy dashboard slows the instrument. Target (issue 7): p99 <= 50 us
per publish at 1,000 clients.

This process runs a LabDaemon with one streaming device and a real LabDaemonServer on
127.0.0.1. For each client count, a child process (this script with ``--clients-for``) opens
that many real SSE connections with httpx and reads them; once the server has them all, this
process publishes paced items from its own thread, timing each ``publish`` call
(``perf_counter_ns`` around the device's callback). The clients count what they received, so
the figures show how much each client got (a client that cannot keep up loses its own oldest
items on the server, as designed). Prints one line per client count, then one JSON object on
its last line. Run through ``make bench`` (bench/run.py) or alone::

    .venv/bin/python bench/publish_cost.py [--quick] [--clients 1,10,100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_CLIENTS = (1, 10, 100, 1000)
READY_TIMEOUT_S = 120.0  # connecting 1,000 clients on a loaded 2-core machine
TARGET_P99_US_AT_1000 = 50.0
WARMUP = 100  # untimed publishes before the timed ones (the clients receive them too)


class Source:
    """A streaming device whose items the benchmark publishes from its own thread."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.callback: Callable[[Any], object] | None = None

    def start_streaming(self, callback: Callable[[Any], object]) -> None:
        self.callback = callback

    def stop_streaming(self, timeout: float | None = None) -> None:
        self.callback = None


def raise_fd_limit() -> None:
    """1,000 connections need more than the common soft limit of 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# -- the child: N SSE clients --------------------------------------------------------------


async def read_clients(url: str, count: int) -> dict[str, int]:
    """Open ``count`` SSE streams; say "ready" once all answered; count until stdin closes."""
    import httpx

    received = [0] * count
    connected = 0
    all_connected = asyncio.Event()

    async def one(index: int, http: httpx.AsyncClient) -> None:
        nonlocal connected
        async with http.stream("GET", url) as answer:
            if answer.status_code != 200:
                raise RuntimeError(f"client {index}: HTTP {answer.status_code}: {await answer.aread()!r}")
            connected += 1
            if connected == count:
                all_connected.set()
            tail = b""
            async for chunk in answer.aiter_raw():
                data = tail + chunk
                received[index] += data.count(b"event: device_data")
                tail = data[-24:] if not data.endswith(b"\n") else b""
                received[index] -= tail.count(b"event: device_data")

    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=60.0), limits=limits) as http:
        tasks = [asyncio.create_task(one(i, http)) for i in range(count)]
        ready = asyncio.create_task(all_connected.wait())
        done, _ = await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not ready and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"received_total": sum(received), "received_min": min(received)}


def client_main(url: str, count: int) -> None:
    raise_fd_limit()
    print(json.dumps(asyncio.run(read_clients(url, count))), flush=True)


# -- the parent: server, producer, timing ---------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s")
        time.sleep(0.01)


def measure(daemon: Any, url: str, clients: int, publishes: int, rate: float) -> dict[str, Any]:
    """Publish ``publishes`` paced items to ``clients`` SSE clients; time each publish."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--clients-for", url, "--count", str(clients)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{clients} SSE clients did not connect (child said {line!r})")
        source: Source = daemon.get_device("src")
        hub = daemon.stream_hub("src")
        wait_for(lambda: hub is not None and hub.stats()["subscribers"] == clients,
                 f"the server did not register {clients} clients")
        samples = publish_paced(source, publishes, rate)
        child.stdin.close()
        received = json.loads(child.stdout.readline())
    finally:
        if child.poll() is None:
            if not child.stdin.closed:
                child.stdin.close()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    wait_for(lambda: daemon.stream_hub("src") is None, "the stream did not stop after the clients left")
    samples.sort()
    return {
        "clients": clients,
        "p50_us": round(percentile(samples, 0.50) / 1000, 2),
        "p99_us": round(percentile(samples, 0.99) / 1000, 2),
        "max_us": round(samples[-1] / 1000, 2),
        "mean_us": round(statistics.fmean(samples) / 1000, 2),
        "received_share": round(received["received_total"] / ((WARMUP + publishes) * clients), 4),
        "received_min_share": round(received["received_min"] / (WARMUP + publishes), 4),
    }


def publish_paced(source: Source, publishes: int, rate: float) -> list[float]:
    """Call the device's stream callback ``publishes`` times at ``rate`` Hz; ns per call."""
    callback = source.callback
    assert callback is not None, "the stream is not running"
    clock = time.perf_counter_ns
    period_ns = int(1e9 / rate)
    samples: list[float] = []
    payload_values = [0.25] * 8
    for _ in range(WARMUP):  # not timed
        callback({"i": -1, "values": payload_values})
    next_at = clock()
    for index in range(publishes):
        payload = {"i": index, "values": payload_values}
        began = clock()
        callback(payload)
        samples.append(clock() - began)
        next_at += period_ns
        pause = (next_at - clock()) / 1e9
        if pause > 0:
            time.sleep(pause)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description="publish() cost with 1..1,000 SSE clients")
    parser.add_argument("--quick", action="store_true", help="fewer publishes per client count")
    parser.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)),
                        help="comma-separated client counts (default 1,10,100,1000)")
    parser.add_argument("--rate", type=float, default=500.0, help="publishes per second")
    parser.add_argument("--clients-for", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients_for:
        client_main(args.clients_for, args.count)
        return
    raise_fd_limit()
    counts = [int(part) for part in args.clients.split(",") if part.strip()]
    publishes = 1000 if args.quick else 3000

    import labd as ld
    from labd.server import LabDaemonServer

    daemon = ld.LabDaemon()
    server = LabDaemonServer(daemon, "127.0.0.1", 0, stream_max_clients=max(counts),
                             request_timeout=60.0)
    figures: dict[str, Any] = {}
    try:
        daemon.register_plugins(devices={"Source": Source})
        daemon.add_device("src", "Source")
        daemon.connect_device("src")
        server.start()
        url = f"{server.url}/stream/devices/src"
        for count in counts:
            result = measure(daemon, url, count, publishes, args.rate)
            print(f"{count:5d} SSE clients: publish p50 {result['p50_us']:8.2f} us  "
                  f"p99 {result['p99_us']:8.2f} us  max {result['max_us']:9.2f} us  "
                  f"(clients got {result['received_share']:.1%} of the items, "
                  f"the slowest {result['received_min_share']:.1%})", file=sys.stderr, flush=True)
            for key in ("p50_us", "p99_us", "received_min_share"):
                figures[f"{key}_{count}"] = result[key]
    finally:
        server.stop()
        daemon.shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
