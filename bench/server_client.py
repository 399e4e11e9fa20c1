"""HTTP and SSE clients of the server benchmark (standard library only).

Why: one client for both servers, as a lab script would talk to them: ``http.client`` with
one persistent connection per thread for calls, and a streaming reader per SSE client that
splits lines incrementally and reads only the device's sequence number ``n`` and timestamp
``t`` from each event (never parsing a whole NumPy block), so the client stays cheap.

Run as a script, it polls ``GET /health`` and prints the latencies as JSON (the benchmark
runs that in its own process so the readers' work cannot delay it)::

    python bench/server_client.py health --port 5000 --seconds 4
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
#: A reader that gets no byte for this long calls the stream stalled and gives up.
STALL_S = 3.0
#: ``"n": 12, "t": 1764000000.123`` as orjson (labd) and json.dumps (LabDaemon) write them.
_N_T = re.compile(rb'"n":\s*(\d+),\s*"t":\s*([0-9.eE+-]+)')
#: The payload starts within this many bytes of a data line (after labd's envelope fields).
_HEAD = 400


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# --- calls -----------------------------------------------------------------------------


@dataclass
class CallStats:
    """What one calling thread saw in the timed window."""

    calls: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    last_error: str = ""


def _call_once(conn: http.client.HTTPConnection, path: str, body: bytes) -> int:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def call_loop(
    port: int,
    device_id: str,
    method: str,
    start: threading.Barrier,
    warmup_s: float,
    measure_s: float,
    timeout: float = 10.0,
    args: list[Any] | None = None,
) -> CallStats:
    """Call ``device_id.method()`` back to back: warm up, wait at ``start``, then time it.

    A failed call (status other than 200, or a socket error) is counted and the connection
    remade; after 50 failures the thread gives up, so a broken server cannot stall the bench.
    """
    path = f"/devices/{device_id}/call"
    body = json.dumps({"method": method, "args": args or [], "kwargs": {}}).encode()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    stats = CallStats()
    try:
        warm_until = time.perf_counter() + warmup_s
        while time.perf_counter() < warm_until and stats.errors < 50:
            _timed_call(conn, path, body, stats, record=False)
        stats.errors = 0
        start.wait(timeout=warmup_s + 30.0)
        deadline = time.perf_counter() + measure_s
        while time.perf_counter() < deadline and stats.errors < 50:
            _timed_call(conn, path, body, stats, record=True)
    finally:
        conn.close()
    return stats


def _timed_call(
    conn: http.client.HTTPConnection, path: str, body: bytes, stats: CallStats, record: bool
) -> None:
    t0 = time.perf_counter()
    try:
        status = _call_once(conn, path, body)
    except (OSError, http.client.HTTPException) as exc:
        stats.errors += 1
        stats.last_error = f"{type(exc).__name__}: {exc}"
        conn.close()  # http.client reconnects on the next request
        return
    if status != 200:
        stats.errors += 1
        stats.last_error = f"HTTP {status}"
        return
    if record:
        stats.calls += 1
        stats.latencies_s.append(time.perf_counter() - t0)


def run_callers(
    port: int, targets: list[tuple[str, str]] | list[tuple[str, str, list[Any]]],
    warmup_s: float, measure_s: float,
) -> dict[str, Any]:
    """One thread per ``(device_id, method[, args])`` target; total calls/s and latency percentiles."""
    start = threading.Barrier(len(targets) + 1)
    results: list[CallStats] = [CallStats() for _ in targets]

    def body(i: int, device_id: str, method: str, args: list[Any] | None = None) -> None:
        results[i] = call_loop(port, device_id, method, start, warmup_s, measure_s, args=args)

    threads = [
        threading.Thread(target=body, args=(i, *target), name=f"caller-{i}", daemon=True)
        for i, target in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    start.wait(timeout=warmup_s + 30.0)
    t0 = time.perf_counter()
    for thread in threads:
        thread.join(timeout=measure_s + 30.0)
    elapsed = time.perf_counter() - t0
    latencies = [lat for stats in results for lat in stats.latencies_s]
    calls = sum(stats.calls for stats in results)
    return {
        "per_s": calls / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "calls": calls,
        "errors": sum(stats.errors for stats in results),
        "last_error": next((s.last_error for s in results if s.last_error), ""),
        "per_thread": [stats.calls for stats in results],
    }


# --- SSE -----------------------------------------------------------------------------


class StreamReader(threading.Thread):
    """One SSE client: counts the device's items ``n`` it receives, with their timestamps.

    ``status`` ends as ``ok`` (read until ``until``), ``refused`` (an error answer, or a
    ``stream_error`` event before any data: LabDaemon's answer to a second client),
    ``ended`` (the server closed the stream early), ``stalled`` (no byte for ``STALL_S``)
    or ``failed`` (could not connect). ``ready`` is set once the first item (or the
    refusal) arrived. ``ns``, ``sent`` (device ``t``) and ``received`` are parallel lists.
    """

    def __init__(self, port: int, device_id: str, until: float, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.path = f"/stream/devices/{device_id}"
        self.until = until  # time.time() at which to hang up
        self.status = "connecting"
        self.detail = ""
        self.ready = threading.Event()
        self.ns: list[int] = []
        self.sent: list[float] = []
        self.received: list[float] = []
        self.bytes = 0
        self._event = b""

    def run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=STALL_S)
        try:
            self._read(conn)
        except TimeoutError:
            self.status, self.detail = "stalled", f"no data for {STALL_S:g} s"
        except (OSError, http.client.HTTPException) as exc:
            self.status = "failed" if self.status == "connecting" else "ended"
            self.detail = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
            self.ready.set()

    def _read(self, conn: http.client.HTTPConnection) -> None:
        conn.request("GET", self.path, headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        if response.status != 200:
            self.status = "refused"
            self.detail = f"HTTP {response.status}: {response.read(300)!r}"
            return
        self.status = "streaming"
        parts: list[bytes] = []  # the unfinished last line, in pieces: no rescans
        while time.time() < self.until and self.status == "streaming":
            chunk = response.read1(1 << 18)
            now = time.time()
            if not chunk:
                self.status, self.detail = "ended", "the server closed the stream"
                return
            self.bytes += len(chunk)
            cut = chunk.rfind(b"\n")
            if cut < 0:
                parts.append(chunk)
                continue
            text = b"".join((*parts, chunk[:cut])) if parts else chunk[:cut]
            parts = [chunk[cut + 1 :]] if cut + 1 < len(chunk) else []
            for line in text.split(b"\n"):
                self._line(line, now)
        if self.status == "streaming":
            self.status = "ok"

    def _line(self, line: bytes, now: float) -> None:
        if line.startswith(b"data:"):
            if self._event not in (b"", b"device_data"):
                if self._event == b"stream_error" and not self.ns:
                    self.status, self.detail = "refused", line[5:200].decode(errors="replace")
                    self.ready.set()
                return
            found = _N_T.search(line, 0, _HEAD)
            if found is not None:
                self.ns.append(int(found[1]))
                self.sent.append(float(found[2]))
                self.received.append(now)
                if len(self.ns) == 1:
                    self.ready.set()
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()
        elif not line.strip():
            self._event = b""  # a blank line ends the event


def window_shares(readers: list[StreamReader], t0: float, t1: float) -> dict[str, Any]:
    """Each reader's share of the items the device stamped within ``[t0, t1]``.

    The items expected are those between the first and last ``n`` stamped in the window as
    seen by any reader (the device's ``n`` count up with ``t``), so a device that publishes
    slower than configured is not mistaken for a lossy server.
    """
    lo: int | None = None
    hi: int | None = None
    for reader in readers:
        for n, t in zip(reader.ns, reader.sent, strict=True):
            if t0 <= t <= t1:
                lo = n if lo is None else min(lo, n)
                hi = n if hi is None else max(hi, n)
    if lo is None or hi is None:
        return {"expected": 0, "shares": [0.0] * len(readers), "published_per_s": 0.0}
    expected = hi - lo + 1
    shares = [len({n for n in reader.ns if lo <= n <= hi}) / expected for reader in readers]
    return {"expected": expected, "shares": shares, "published_per_s": expected / (t1 - t0)}


# --- /health, in its own process ------------------------------------------------------


def poll_health(port: int, seconds: float, interval: float) -> dict[str, Any]:
    """``GET /health`` every ``interval`` s for ``seconds`` s on one connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    latencies: list[float] = []
    failures, last_error = 0, ""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and failures < 20:
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                latencies.append((time.perf_counter() - t0) * 1e3)
            else:
                failures, last_error = failures + 1, f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            failures, last_error = failures + 1, f"{type(exc).__name__}: {exc}"
            conn.close()
        time.sleep(max(interval - (time.perf_counter() - t0), 0.0))
    conn.close()
    return {"latencies_ms": latencies, "failures": failures, "last_error": last_error}


def main() -> None:
    parser = argparse.ArgumentParser(description="poll GET /health and print latencies as JSON")
    parser.add_argument("what", choices=["health"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    print(json.dumps(poll_health(args.port, args.seconds, args.interval)), flush=True)


if __name__ == "__main__":
    main()
