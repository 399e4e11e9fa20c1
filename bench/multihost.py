"""A lab of several nodes on one machine: what the engine adds (issue 12). Not a test.

Starts a redis-server (persistence off) on a free loopback port and three ``labd serve``
nodes as processes (``a``: ping and a 1 kHz × 8 KB streamer; ``b``: ping; ``c``: a third
device), then measures side by side in one run:

- ``call``: ``POST /devices/{id}/call`` of a trivial query on node a, to a device of node a
  (same node) and to a device of node b (through the engine), alternating; p50/p99 and the
  p50 added.
  Target: at most 500 µs added at p50 on loopback.
- ``claim``: a lease of 3 devices on 3 nodes taken and released from a gateway node in this
  process (``daemon.claim(...)`` then ``lease.release()``), and the bare Lua claim/release.
  Target: p50 <= 1 ms.
- ``stream``: a 1,000 msg/s × 8 KB device stream on node a to 10 SSE clients on node b for
  a few seconds: each client's share delivered (target >= 99 %) and the engine's memory.
- ``freeze``: node c leases a device of node a, is frozen with SIGSTOP, and a gateway polls
  until it can claim the device: the time from freezing to free (default timings: claim TTL
  30 s, renewed every 5 s, so 25-30 s; ``--claim-ttl`` shortens it).

    .venv/bin/python bench/multihost.py                # about a minute with default timings
    .venv/bin/python bench/multihost.py --claim-ttl 3  # shorter freeze measurement
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from server_client import _call_once

HERE = Path(__file__).resolve().parent
DEVICES = '''
import threading, time

class Ping:
    def __init__(self, device_id):
        self.device_id = device_id
    def get_value(self):
        return 1

class Ticker:
    """Publishes ``rate`` items per second of ``size`` bytes while streaming."""
    def __init__(self, device_id, rate=1000.0, size=8192):
        self.device_id, self.rate, self.size = device_id, rate, size
        self._stop = threading.Event()
        self._thread = None
        self.published = 0
    def start_streaming(self, callback, **params):
        self._stop.clear()
        payload = "x" * self.size
        def run():
            period, next_at = 1.0 / self.rate, time.monotonic()
            while not self._stop.is_set():
                callback(payload)
                self.published += 1
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.05:
                    next_at = time.monotonic()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
    def stop_streaming(self, timeout=None):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
    def is_streaming(self):
        return self._thread is not None and self._thread.is_alive()
    def get_published(self):
        return self.published
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


class Lab:
    def __init__(self, tmp: Path, claim_ttl: float) -> None:
        self.tmp = tmp
        self.redis_port = free_port()
        self.engine = f"redis://127.0.0.1:{self.redis_port}/0"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        (tmp / "benchdevices.py").write_text(DEVICES)
        renew = max(claim_ttl / 6, 0.1)
        self.lab_table = f"[lab]\nclaim_ttl = {claim_ttl}\nclaim_renew = {renew}\n"

    def start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("bench: redis-server is not installed (apt-get install redis-server)")
        self.procs["redis"] = subprocess.Popen(
            [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes = {"a": {"pa": "Ping", "ticker": "Ticker"}, "b": {"pb": "Ping"}, "c": {"pc": "Ping"}}
        for name, devices in nodes.items():
            lines = [f'[devices.{d}]\ntype = "benchdevices:{t}"' for d, t in devices.items()]
            config = self.tmp / f"{name}.toml"
            config.write_text("\n".join(lines) + "\n" + self.lab_table)
            port = free_port()
            self.urls[name] = f"http://127.0.0.1:{port}"
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "labd.cli", "serve", str(config), "--port", str(port),
                 "--no-db", "--engine", self.engine, "--node", name,
                 "--device-max-in-flight", "64", "--stream-max-clients", "64"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        for name in nodes:
            wait_for(lambda name=name: self._healthy(name), 30, f"node {name}")
        wait_for(lambda: len(httpx.get(self.urls["a"] + "/devices").json()["devices"]) == 4, 15,
                 "the directory")

    def _healthy(self, name: str) -> bool:
        try:
            return httpx.get(self.urls[name] + "/health", timeout=1).json()["status"] == "healthy"
        except (httpx.HTTPError, KeyError, ValueError):
            return False

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                if name != "redis":
                    os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_call(lab: Lab, samples: int) -> dict[str, Any]:
    """Calls to ``pa`` (node a's) and ``pb`` (node b's) through node a, alternating, so both
    see the same moments of a shared machine and their difference is the engine's share."""
    figures: dict[str, Any] = {}
    times: dict[str, list[float]] = {"same_node": [], "other_node": []}
    # The server benchmark's client (http.client, one persistent connection): httpx costs
    # this 2-core machine more CPU per call than the node serving it.
    port = int(lab.urls["a"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = b'{"method": "get_value"}'
    try:
        for i in range(samples + 200):
            for label, device in (("same_node", "pa"), ("other_node", "pb")):
                started = time.perf_counter()
                status = _call_once(conn, f"/devices/{device}/call", body)
                elapsed = time.perf_counter() - started
                assert status == 200, f"{device}: HTTP {status}"
                if i >= 200:
                    times[label].append(elapsed * 1e6)
    finally:
        conn.close()
    for label, values in times.items():
        figures[f"{label}_p50_us"] = round(percentile(values, 0.5), 1)
        figures[f"{label}_p99_us"] = round(percentile(values, 0.99), 1)
    figures["added_p50_us"] = round(figures["other_node_p50_us"] - figures["same_node_p50_us"], 1)
    return figures


_ECHO = """
import sys, redis
c = redis.Redis.from_url(sys.argv[1])
while True:
    _, value = c.blpop(["bench:req"])
    if value == b"stop":
        break
    c.rpush("bench:rep", value)
"""


def bench_floor(lab: Lab, samples: int) -> dict[str, Any]:
    """What one request/reply through the engine costs with nothing around it (redis-py both
    ends, an echo process): the floor under ``added_p50_us``."""
    import redis

    echo = subprocess.Popen([sys.executable, "-c", _ECHO, lab.engine])
    client = redis.Redis.from_url(lab.engine)
    times, pings = [], []
    try:
        for i in range(samples + 200):
            started = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            pipe.rpush("bench:req", b"x")
            pipe.blpop(["bench:rep"], 5)
            pipe.execute()
            if i >= 200:
                times.append((time.perf_counter() - started) * 1e6)
            started = time.perf_counter()
            client.ping()
            if i >= 200:
                pings.append((time.perf_counter() - started) * 1e6)
    finally:
        client.rpush("bench:req", b"stop")
        echo.wait(10)
        client.close()
    return {"ping_p50_us": round(percentile(pings, 0.5), 1),
            "list_roundtrip_p50_us": round(percentile(times, 0.5), 1)}


def bench_inproc(samples: int) -> dict[str, Any]:
    """labd's own share of a call to another node: two nodes in this process on the
    in-process coordinator (no engine, no sockets), against a call on the same node."""
    import labd
    from labd.lab import LabNode, LocalCoordinator
    from labd.testing import FakeDevice

    coordinator = LocalCoordinator()
    here, there = labd.LabDaemon(), labd.LabDaemon()
    here.register_plugins(devices={"Fake": FakeDevice})
    here.add_device("x", "Fake")
    a = LabNode(here, coordinator, "a", own_coordinator=False, workers=1)
    b = LabNode(there, coordinator, "b", own_coordinator=False)
    a.start()
    b.start()
    b.refresh()
    figures = {}
    try:
        for label, daemon in (("same_node", here), ("other_node", there)):
            times = []
            for i in range(samples + 200):
                started = time.perf_counter()
                daemon.call_device("x", "get_value")
                if i >= 200:
                    times.append((time.perf_counter() - started) * 1e6)
            figures[f"{label}_p50_us"] = round(percentile(times, 0.5), 1)
    finally:
        for daemon in (there, here):
            daemon.shutdown()
        b.close()
        a.close()
    return figures


def _gateway(lab: Lab, name: str = "bench") -> Any:
    import labd
    from labd.lab import LabNode, connect_engine

    daemon = labd.LabDaemon()
    node = LabNode(daemon, connect_engine(lab.engine), name)
    node.start()
    return daemon, node


def bench_claim(lab: Lab, samples: int) -> dict[str, Any]:
    from labd.lab import ClaimSpec
    from labd.lab.redis_engine import RedisCoordinator

    daemon, node = _gateway(lab)
    try:
        times = []
        for i in range(samples + 50):
            started = time.perf_counter()
            lease = daemon.claim(["pa", "pb", "pc"], owner="bench")
            lease.release()
            if i >= 50:
                times.append((time.perf_counter() - started) * 1e6)
    finally:
        daemon.shutdown()
        node.close()
    coordinator = RedisCoordinator(lab.engine)
    spec = ClaimSpec("bench/lease/x/1", "lease 'x'", "lease", "x", "bench")
    bare = []
    try:
        for i in range(samples + 50):
            started = time.perf_counter()
            token = coordinator.claim(spec, ["pa", "pb", "pc"], 30).token
            assert token is not None
            coordinator.release(["pa", "pb", "pc"], token)
            if i >= 50:
                bare.append((time.perf_counter() - started) * 1e6)
    finally:
        coordinator.close()
    return {"lease_3_nodes_p50_us": round(percentile(times, 0.5), 1),
            "lease_3_nodes_p99_us": round(percentile(times, 0.99), 1),
            "lua_claim_release_p50_us": round(percentile(bare, 0.5), 1),
            "lua_claim_release_p99_us": round(percentile(bare, 0.99), 1)}


def _sse_client(url: str, stop: threading.Event, counts: list[int], index: int,
                first_seq: list[int | None], last_seq: list[int | None]) -> None:
    with httpx.Client(timeout=httpx.Timeout(30.0, read=60.0)) as client, \
            client.stream("GET", url + "/stream/devices/ticker") as answer:
        for line in answer.iter_lines():
            if line.startswith("id:"):
                seq = int(line[3:].strip())
                if first_seq[index] is None:
                    first_seq[index] = seq
                last_seq[index] = seq
                counts[index] += 1
            if stop.is_set():
                return


def bench_stream(lab: Lab, seconds: float, clients: int = 10) -> dict[str, Any]:
    """10 SSE clients on node b read node a's 1 kHz × 8 KB stream; then the device stops.

    The reading node numbers what it relays 1, 2, 3, ...: a client that saw sequence numbers
    first..last got ``count`` of ``last - first + 1`` (its own losses). What the relay or the
    reader lost on the way shows as the reader's ``gaps`` and the relay's ``dropped``.
    """
    import redis

    engine = redis.Redis.from_url(lab.engine)
    before = int(engine.info("memory")["used_memory"])
    stop = threading.Event()
    counts = [0] * clients
    first: list[int | None] = [None] * clients
    last: list[int | None] = [None] * clients
    threads = [threading.Thread(target=_sse_client, args=(lab.urls["b"], stop, counts, i, first, last))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(c > 0 for c in counts), 30, "every SSE client's first item")
    started = time.monotonic()
    time.sleep(seconds)
    stream_len = int(engine.xlen("labd:stream:dev:ticker"))
    peak = int(engine.info("memory")["used_memory"])
    with httpx.Client() as client:
        assert client.post(lab.urls["a"] + "/devices/ticker/stream/stop").status_code == 200
        elapsed = time.monotonic() - started
        previous: list[int] = []
        while previous != counts:  # the clients have everything once their counts settle
            previous = list(counts)
            time.sleep(1.0)
        b_streams = client.get(lab.urls["b"] + "/health").json()["lab"]["streams"]
        a_streams = client.get(lab.urls["a"] + "/health").json()["lab"]["streams"]
    stop.set()
    for thread in threads:
        thread.join(10)
    engine.close()
    gaps = sum(reader["gaps"] for reader in b_streams["readers"])
    relay_dropped = sum(relay["dropped"] for relay in a_streams["relays"])
    shares = []
    for count, low, high in zip(counts, first, last, strict=True):
        assert low is not None and high is not None
        shares.append(count / (high - low + 1 + gaps + relay_dropped))
    return {"clients": clients, "seconds": round(elapsed, 1), "rate_per_s": 1000,
            "payload_bytes": 8192, "items_per_client": statistics.median(counts),
            "min_delivered_share": round(min(shares), 4),
            "median_delivered_share": round(statistics.median(shares), 4),
            "reader_gaps": gaps, "relay_dropped": relay_dropped,
            "engine_stream_len": stream_len,
            "engine_memory_added_mb": round((peak - before) / 2**20, 1)}


def bench_freeze(lab: Lab) -> dict[str, Any]:
    with httpx.Client(base_url=lab.urls["c"]) as client:
        answer = client.post("/leases", json={"device_ids": ["pa"], "owner": "carol", "ttl": 3600})
        assert answer.status_code in (200, 201), answer.text
    daemon, node = _gateway(lab, "bench-freeze")
    from labd.errors import DeviceBusyError

    try:
        frozen_at = time.monotonic()
        os.kill(lab.procs["c"].pid, signal.SIGSTOP)
        while True:
            try:
                lease = daemon.claim(["pa"], owner="dave")
            except DeviceBusyError:
                time.sleep(0.01)
                continue
            free_after = time.monotonic() - frozen_at
            lease.release()
            break
    finally:
        os.kill(lab.procs["c"].pid, signal.SIGCONT)
        daemon.shutdown()
        node.close()
    return {"freeze_to_free_s": round(free_after, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--stream-seconds", type=float, default=5.0)
    parser.add_argument("--claim-ttl", type=float, default=30.0,
                        help="claim TTL of the nodes (default 30 s, the issue's); renew = TTL/6")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="labd-multihost-") as tmp:
        lab = Lab(Path(tmp), args.claim_ttl)
        try:
            lab.start()
            figures = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
            for name, run in (("floor", lambda: bench_floor(lab, args.samples)),
                              ("inproc", lambda: bench_inproc(args.samples)),
                              ("call", lambda: bench_call(lab, args.samples)),
                              ("claim", lambda: bench_claim(lab, args.samples)),
                              ("stream", lambda: bench_stream(lab, args.stream_seconds)),
                              ("freeze", lambda: bench_freeze(lab))):
                print(f"bench: {name}...", file=sys.stderr, flush=True)
                figures[name] = run()
                print(json.dumps({name: figures[name]}), flush=True)
        finally:
            lab.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
