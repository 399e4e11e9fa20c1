"""Server benchmark: labd's HTTP/SSE server against LabDaemon 1.0.1's, same devices, same client.

Why: the issue "The labd server" set targets for call throughput, parallel slow calls, SSE
latency and SSE fan-out; this measures both servers side by side. Each scenario starts a
fresh server process per implementation (``server_host.py`` under that implementation's
venv, on a free 127.0.0.1 port) and drives it from this process with ``server_client.py``.
Progress goes to stderr; the last stdout line is one JSON object
``{"runs": {impl: {"impl", "env", "metrics", "details", "errors"}}}``.

Example::

    .venv/bin/python bench/server.py --quick --only call --impl labd --impl fastapi
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from server_client import STALL_S, StreamReader, percentile, run_callers, window_shares

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HOST_SCRIPT = BENCH_DIR / "server_host.py"
CLIENT_SCRIPT = BENCH_DIR / "server_client.py"
DEFAULT_LABDAEMON_PYTHON = BENCH_DIR / ".venv-labdaemon" / "bin" / "python"
IMPLS = ("labdaemon", "labd", "fastapi")
STOP_TIMEOUT_S = 6.0  # a server that does not exit this long after its stdin closed is killed
SSE_CLIENTS = 10
CONNECT_PHASE_S = 12.0  # the longest the SSE clients may take to connect, all together


@dataclass(frozen=True)
class Settings:
    """How long each scenario runs; ``--quick`` shrinks all of it."""

    warmup_s: float = 0.5
    call_s: float = 3.0
    slow_s: float = 3.0
    latency_s: float = 8.0
    fanout_s: float = 4.0
    blocks_s: float = 4.0


QUICK = Settings(warmup_s=0.3, call_s=1.0, slow_s=1.0, latency_s=3.0, fanout_s=1.5, blocks_s=1.5)

Figures = dict[str, float]
Details = dict[str, Any]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- server processes ---------------------------------------------------------------


@dataclass
class Host:
    """A running server process: its port, the versions it reported, its stderr file."""

    port: int
    versions: dict[str, str]
    process: subprocess.Popen[str]
    stderr: IO[str]


def host_command(
    impl: str, scenario: str, labdaemon_python: Path
) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    python = str(labdaemon_python) if impl == "labdaemon" else sys.executable
    if impl == "labd":  # works with or without the editable install
        src = str(REPO_DIR / "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return [python, str(HOST_SCRIPT), "--impl", impl, "--scenario", scenario], env


def _read_port_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The host's first stdout line, or "" if it printed none within ``timeout``."""
    line: list[str] = []
    reader = threading.Thread(
        target=lambda: line.append(process.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    return line[0] if line else ""


def _tail(stderr: IO[str], lines: int = 6) -> str:
    stderr.flush()
    stderr.seek(0)
    return " | ".join(stderr.read().strip().splitlines()[-lines:]) or "(no stderr)"


@contextmanager
def served(impl: str, scenario: str, labdaemon_python: Path) -> Iterator[Host]:
    """Start ``impl``'s server for ``scenario``; always stop (or kill) it on exit."""
    command, env = host_command(impl, scenario, labdaemon_python)
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=BENCH_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            line = _read_port_line(process, timeout=30.0)
            if not line:
                raise RuntimeError(f"{impl} server for {scenario!r} did not start: {_tail(stderr)}")
            ready = json.loads(line)
            yield Host(int(ready["port"]), ready["versions"], process, stderr)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    try:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait(timeout=STOP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        log(f"  server process {process.pid} did not stop within {STOP_TIMEOUT_S:g} s: killed")
        process.kill()
        process.wait(timeout=5.0)


# --- scenarios ------------------------------------------------------------------------


def bench_call(host: Host, impl: str, s: Settings) -> tuple[Figures, Details]:
    """(a) POST /devices/ping/call on a trivial method, then a typed one: 1 and 8 clients."""
    figures: Figures = {}
    details: Details = {}
    for clients in (1, 8):
        got = run_callers(host.port, [("ping", "ping")] * clients, s.warmup_s, s.call_s)
        figures[f"http_call{clients}_req_per_s"] = got["per_s"]
        figures[f"http_call{clients}_p50_ms"] = got["p50_ms"]
        details[f"http_call{clients}"] = _call_details(got)
    # A typed command, ``set_level(level: float, mode: str)`` called with an int: labd
    # validates and converts it (int -> float) before the call; the others pass it through.
    for clients in (1, 8):
        typed = [("ping", "set_level", [1550, "slow"])] * clients
        got = run_callers(host.port, typed, s.warmup_s, s.call_s)
        figures[f"http_call_typed{clients}_req_per_s"] = got["per_s"]
        figures[f"http_call_typed{clients}_p50_ms"] = got["p50_ms"]
        details[f"http_call_typed{clients}"] = _call_details(got)
    return figures, details


def bench_slow(host: Host, impl: str, s: Settings) -> tuple[Figures, Details]:
    """(b) 8 clients, each calling its own device whose method sleeps 10 ms."""
    got = run_callers(host.port, [(f"slow{i}", "work") for i in range(8)], s.warmup_s, s.slow_s)
    return {"http_slow8_calls_per_s": got["per_s"]}, {"http_slow8": _call_details(got)}


def _call_details(got: dict[str, Any]) -> dict[str, Any]:
    keep = ("calls", "errors", "last_error", "per_thread", "p99_ms")
    return {key: got[key] for key in keep}


def _start_readers(port: int, device_id: str, clients: int) -> list[StreamReader]:
    """Connect ``clients`` SSE readers one after the other, each once the last one is served.

    One at a time, as clients arrive in a lab (and as the issue measured LabDaemon: all at
    once hangs its server). A reader that gets neither data nor a refusal within 3 s, or
    all of them within ``CONNECT_PHASE_S``, no longer holds up the next.
    """
    readers = [StreamReader(port, device_id, math.inf, name=f"sse-{i}") for i in range(clients)]
    phase_ends = time.monotonic() + CONNECT_PHASE_S
    for reader in readers:
        reader.start()
        reader.ready.wait(timeout=max(min(3.0, phase_ends - time.monotonic()), 0.0))
    return readers


def _read_until(readers: list[StreamReader], until: float) -> None:
    """Tell the readers when to hang up, then wait for them (bounded)."""
    for reader in readers:
        reader.until = until
    for reader in readers:
        reader.join(timeout=max(until - time.time(), 0.0) + STALL_S + 2.0)


def _reader_details(readers: list[StreamReader]) -> list[dict[str, Any]]:
    return [
        {
            "status": r.status if not r.is_alive() else "hung",
            "detail": r.detail,
            "items": len(r.ns),
            "bytes": r.bytes,
        }
        for r in readers
    ]


def bench_latency(host: Host, impl: str, s: Settings) -> tuple[Figures, Details]:
    """(c) One SSE client on a 20 Hz stream: device timestamp to receipt."""
    readers = _start_readers(host.port, "s20", 1)
    _read_until(readers, time.time() + s.warmup_s + s.latency_s)
    reader = readers[0]
    t0 = reader.sent[0] + s.warmup_s if reader.sent else math.inf
    latencies = [
        (got - sent) * 1e3
        for sent, got in zip(reader.sent, reader.received, strict=True)
        if sent >= t0
    ]
    details = {
        "sse_latency_samples": len(latencies),
        "sse_latency_reader": _reader_details(readers),
        "sse_latency_max_ms": max(latencies, default=math.nan),
    }
    if not latencies:
        return {}, details
    return {
        "sse_latency_p50_ms": percentile(latencies, 50),
        "sse_latency_p99_ms": percentile(latencies, 99),
    }, details


def _stream_window(
    host: Host,
    device_id: str,
    s: Settings,
    seconds: float,
) -> tuple[list[StreamReader], float, float]:
    """10 SSE clients on one device; returns them and the window ``(t0, t1)`` they read.

    ``t0`` is ``warmup_s`` after the last client connected (or was refused).
    """
    readers = _start_readers(host.port, device_id, SSE_CLIENTS)
    t0 = time.time() + s.warmup_s
    return readers, t0, t0 + seconds


def _shares(readers: list[StreamReader], t0: float, t1: float) -> tuple[float, Details]:
    """The smallest share of the window's items any client got, and each client's."""
    got = window_shares(readers, t0, t1)
    details = {
        "shares": [round(x, 4) for x in got["shares"]],
        "expected": got["expected"],
        "published_per_s": round(got["published_per_s"]),
        "readers": _reader_details(readers),
    }
    return min(got["shares"]), details


def bench_fanout(host: Host, impl: str, s: Settings) -> tuple[Figures, Details]:
    """(d) A 5,000 items/s scalar stream to 10 SSE clients on one device."""
    readers, t0, t1 = _stream_window(host, "s5k", s, s.fanout_s)
    _read_until(readers, t1 + 0.5)  # items stamped by t1 may still be on their way
    share, details = _shares(readers, t0, t1)
    return {"sse_fanout_min_share": share}, {"sse_fanout": details}


def bench_blocks(host: Host, impl: str, s: Settings) -> tuple[Figures, Details]:
    """(e) 1,000-sample float64 blocks at 1 kHz to 10 clients, /health polled meanwhile.

    The poller is its own process, so the readers' work cannot delay its answers.
    """
    readers, t0, t1 = _stream_window(host, "blk", s, s.blocks_s)
    seconds = t1 - time.time()
    poller = subprocess.Popen(
        [
            sys.executable,
            str(CLIENT_SCRIPT),
            "health",
            "--port",
            str(host.port),
            "--seconds",
            f"{seconds:.3f}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    _read_until(readers, t1 + 0.5)
    share, details = _shares(readers, t0, t1)
    figures = {"sse_blocks_min_share": share}
    try:
        out, _ = poller.communicate(timeout=seconds + 30.0)
        health = json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        poller.kill()
        poller.wait()
        details["health_error"] = f"{type(exc).__name__}: {exc}"
        return figures, {"sse_blocks": details}
    latencies = health["latencies_ms"]
    details["health"] = {
        "samples": len(latencies),
        "failures": health["failures"],
        "last_error": health["last_error"],
        "p50_ms": percentile(latencies, 50),
        "max_ms": max(latencies, default=math.nan),
    }
    if latencies and not health["failures"]:
        figures["health_p99_ms_under_blocks"] = percentile(latencies, 99)
    return figures, {"sse_blocks": details}


Bench = Callable[[Host, str, Settings], tuple[Figures, Details]]

#: scenario -> (implementations it runs on, the benchmark)
SCENARIOS: dict[str, tuple[tuple[str, ...], Bench]] = {
    "call": (("labdaemon", "labd", "fastapi"), bench_call),
    "slow": (("labdaemon", "labd"), bench_slow),
    "latency": (("labdaemon", "labd"), bench_latency),
    "fanout": (("labdaemon", "labd"), bench_fanout),
    "blocks": (("labdaemon", "labd"), bench_blocks),
}


# --- entry point ------------------------------------------------------------------------


def new_run(impl: str) -> dict[str, Any]:
    return {"impl": impl, "env": {}, "metrics": {}, "details": {}, "errors": {}}


def run_scenario(
    run: dict[str, Any], impl: str, scenario: str, s: Settings, labdaemon_python: Path
) -> None:
    """Measure one scenario on one implementation into ``run``; failures become errors."""
    bench = SCENARIOS[scenario][1]
    log(f"[{impl}] server {scenario} ...")
    started = time.perf_counter()
    try:
        with served(impl, scenario, labdaemon_python) as host:
            run["env"] = {
                "impl": impl,
                "impl_version": host.versions.get(impl, ""),
                "stack": host.versions,
            }
            figures, details = bench(host, impl, s)
    except Exception as exc:  # one broken scenario must not hide the others
        run["errors"][f"server_{scenario}"] = f"{type(exc).__name__}: {exc}"
        log(f"[{impl}] server {scenario} FAILED: {exc}")
        return
    run["metrics"].update(figures)
    run["details"].update(details)
    shown = {key: round(value, 3) for key, value in figures.items()}
    log(f"[{impl}] server {scenario} done in {time.perf_counter() - started:.1f}s: {shown}")


def check_labdaemon(python: Path) -> str | None:
    """Why LabDaemon's server cannot run under ``python``, or None if it can."""
    if not python.exists():
        return f"{python} does not exist; run bench/run.py once to create it"
    probe = [str(python), "-c", "import labdaemon.server, fastapi, uvicorn, sse_starlette"]
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import LabDaemon's server ({last}); run bench/run.py to install it"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", help=f"scenario(s): {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--impl", action="append", choices=IMPLS, help="implementation(s) (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    parser.add_argument(
        "--labdaemon-python",
        type=Path,
        default=DEFAULT_LABDAEMON_PYTHON,
        help="interpreter with labdaemon[server]==1.0.1 installed",
    )
    return parser.parse_args(argv)


def selected(only: list[str] | None) -> list[str]:
    """Scenario names from ``--only`` (repeatable, comma-separated); ValueError if unknown."""
    if not only:
        return list(SCENARIOS)
    names = [name.strip() for raw in only for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown server scenario(s) {unknown}; valid: {', '.join(SCENARIOS)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scenarios = selected(args.only)
    except ValueError as exc:
        log(f"server.py: {exc}")
        return 2
    impls = args.impl or list(IMPLS)
    runs = {impl: new_run(impl) for impl in impls}
    if "labdaemon" in runs:
        problem = check_labdaemon(args.labdaemon_python)
        if problem:
            runs["labdaemon"]["errors"]["run"] = problem
            log(f"[labdaemon] not measured: {problem}")
    settings = QUICK if args.quick else Settings()
    for scenario in scenarios:
        for impl in SCENARIOS[scenario][0]:  # interleaved, like core.py's groups
            if impl in runs and "run" not in runs[impl]["errors"]:
                run_scenario(runs[impl], impl, scenario, settings, args.labdaemon_python)
    print(json.dumps({"runs": runs}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
