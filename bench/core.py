"""Core micro-benchmarks for one implementation: labd or LabDaemon 1.0.1.

Run as ``python bench/core.py --impl labd`` (or ``--impl labdaemon`` under a
venv that has LabDaemon). It uses only the API the two share, so the same
code measures both. Progress goes to stderr; the last stdout line is one JSON
object: ``{"impl", "env", "metrics", "details", "errors"}``.

Example::

    python bench/core.py --impl labdaemon --quick --only task_start
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from _common import GROUPS, IMPLS, parse_cpus, select_groups


@dataclass(frozen=True)
class Settings:
    """How much work each benchmark does; ``--quick`` shrinks all of it."""

    calls: int = 1_000_000  # per timeit repeat
    repeats: int = 5
    threads_s: float = 2.0
    task_samples: int = 2_000
    tasks_s: float = 2.0
    fairness_s: float = 3.0
    rounds: int = 3  # timed windows for the two throughput benchmarks


QUICK = Settings(
    calls=200_000,
    repeats=3,
    threads_s=0.5,
    task_samples=300,
    tasks_s=0.5,
    fairness_s=1.0,
    rounds=1,
)

Figures = dict[str, float]
Details = dict[str, Any]


# --- the plugins: plain classes, as a lab would write them -----------------


class PingDevice:
    """A device whose methods cost (almost) nothing, to expose framework cost."""

    def __init__(self, device_id: str, **params: Any) -> None:
        self.device_id = device_id
        self._x = params.get("x", 1)

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def ping(self) -> Any:
        return self._x

    def io(self) -> None:
        # Stands in for a 1 ms instrument round trip (releases the GIL).
        time.sleep(0.001)


# perf_counter() at the first line of TrivialTask.run; a module global rather
# than a task parameter so that no implementation pays to record it.
_RUN_STARTED = [0.0]


class TrivialTask:
    """A task that notes when it started and returns at once."""

    def __init__(self, task_id: str, **params: Any) -> None:
        self.task_id = task_id

    def run(self, context: Any) -> dict[str, str]:
        _RUN_STARTED[0] = time.perf_counter()
        return {"status": "completed"}


# --- helpers ----------------------------------------------------------------


def load_impl(impl: str) -> ModuleType:
    """Import the implementation and silence LabDaemon's per-task INFO logging."""
    module = importlib.import_module(impl)
    if impl == "labdaemon":
        # LabDaemon logs every execute_task at INFO via loguru; labd does not
        # log on the hot path, so remove loguru's sink to compare like with like.
        importlib.import_module("loguru").logger.remove()
    return module


def new_daemon(ld: ModuleType) -> Any:
    daemon = ld.LabDaemon()
    daemon.register_plugins(devices={"Ping": PingDevice}, tasks={"Trivial": TrivialTask})
    return daemon


def added_device(daemon: Any) -> Any:
    device = daemon.add_device("dev1", "Ping", x=1)
    daemon.connect_device(device)
    return device


def ns_per_call(device: Any, s: Settings) -> float:
    """Best-of-``repeats`` nanoseconds per ``device.ping()`` (timeit disables GC).

    The statement is compiled into timeit's loop, so only the attribute lookup
    and the call are timed, not an extra lambda frame around them.
    """
    timer = timeit.Timer("device.ping()", globals={"device": device})
    best = min(timer.repeat(repeat=s.repeats, number=s.calls))
    return best / s.calls * 1e9


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run_threads(
    n: int, work: Callable[[threading.Event], int], duration: float
) -> tuple[list[int], float]:
    """Run ``work`` on ``n`` threads released together; stop them after ``duration``.

    Returns each thread's count and the elapsed time from release to the
    last join (so calls made while stopping are inside the interval).
    """
    barrier = threading.Barrier(n + 1)
    stop = threading.Event()
    counts = [0] * n

    def body(i: int) -> None:
        barrier.wait()
        counts[i] = work(stop)

    threads = [threading.Thread(target=body, args=(i,), name=f"bench-{i}") for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    return counts, time.perf_counter() - start


# --- the benchmarks ------------------------------------------------------------


def bench_bare_call(ld: ModuleType, s: Settings) -> tuple[Figures, Details]:
    """Baseline: the method on a plain instance, no framework involved."""
    device = PingDevice("plain", x=1)
    return {"bare_call_ns": ns_per_call(device, s)}, {}


def bench_locked_call(ld: ModuleType, s: Settings) -> tuple[Figures, Details]:
    """The same method through the daemon's lock, one thread, no contention."""
    daemon = new_daemon(ld)
    try:
        device = added_device(daemon)
        assert device.ping() == 1
        locked = ns_per_call(device, s)
    finally:
        daemon.shutdown()
    # Re-measured here so the overhead is a difference within one process.
    plain = PingDevice("plain", x=1)
    bare = ns_per_call(plain, s)
    return {"locked_call_ns": locked, "locked_overhead_ns": locked - bare}, {}


def bench_threads8(ld: ModuleType, s: Settings) -> tuple[Figures, Details]:
    """Eight threads share one device; total calls per second under contention.

    Reports the median of ``rounds`` windows: on a small machine other load
    can push this figure either way (one busy core means fewer GIL handoffs).
    """
    daemon = new_daemon(ld)
    rates: list[float] = []
    try:
        device = added_device(daemon)

        def work(stop: threading.Event) -> int:
            ping, n = device.ping, 0
            while not stop.is_set():
                for _ in range(100):
                    ping()
                n += 100
            return n

        for _ in range(s.rounds):
            counts, elapsed = run_threads(8, work, s.threads_s)
            rates.append(sum(counts) / elapsed)
    finally:
        daemon.shutdown()
    details = {"threads8_rounds": [round(r) for r in rates], "threads8_last_per_thread": counts}
    return {"threads8_calls_per_s": statistics.median(rates)}, details


def bench_task_start(ld: ModuleType, s: Settings) -> tuple[Figures, Details]:
    """Latency from just before execute_task to the first line of run()."""
    daemon = new_daemon(ld)
    samples: list[float] = []
    try:
        for i in range(s.task_samples + 50):  # the first 50 warm up
            t0 = time.perf_counter()
            daemon.execute_task(f"start-{i}", "Trivial").wait()
            if i >= 50:
                samples.append((_RUN_STARTED[0] - t0) * 1e6)
    finally:
        daemon.shutdown()
    samples.sort()
    figures = {f"task_start_p{q}_us": percentile(samples, q) for q in (50, 90, 99)}
    return figures, {"task_start_samples": len(samples), "task_start_max_us": samples[-1]}


def bench_tasks_per_s(ld: ModuleType, s: Settings) -> tuple[Figures, Details]:
    """Back-to-back execute_task(...).wait() of a trivial task, unique ids.

    Reports the best of ``rounds`` windows on one daemon (other load only
    ever slows this down). Both daemons run with their default
    completed_task_buffer (20): LabDaemon also remembers 100x that many recent
    ids and trims that history on every task once it is full, which the first
    window reaches.
    """
    daemon = new_daemon(ld)
    rates: list[float] = []
    n = 0
    try:
        for i in range(50):
            daemon.execute_task(f"warm-{i}", "Trivial").wait()
        for _ in range(s.rounds):
            done_before = n
            start = time.perf_counter()
            deadline = start + s.tasks_s
            while time.perf_counter() < deadline:
                daemon.execute_task(f"rate-{n}", "Trivial").wait()
                n += 1
            rates.append((n - done_before) / (time.perf_counter() - start))
    finally:
        daemon.shutdown()
    return {"tasks_per_s": max(rates)}, {"tasks_rounds": [round(r) for r in rates], "tasks_run": n}


def bench_fairness(ld: ModuleType, s: Settings) -> tuple[Figures, Details]:
    """Four threads hammer one device whose call does 1 ms of I/O.

    A fair lock gives each about 25% of the calls; an unfair one lets the
    thread that just released it take it again, starving the others.
    """
    daemon = new_daemon(ld)
    try:
        device = added_device(daemon)

        def work(stop: threading.Event) -> int:
            io, n = device.io, 0
            while not stop.is_set():
                io()
                n += 1
            return n

        counts, elapsed = run_threads(4, work, s.fairness_s)
    finally:
        daemon.shutdown()
    total = sum(counts) or 1
    shares = [c / total for c in counts]
    details = {
        "fairness_shares": [round(x, 4) for x in shares],
        "fairness_calls_per_s": total / elapsed,
    }
    return {"fairness_min_share": min(shares)}, details


BENCHES: dict[str, Callable[[ModuleType, Settings], tuple[Figures, Details]]] = {
    "bare_call": bench_bare_call,
    "locked_call": bench_locked_call,
    "threads8": bench_threads8,
    "task_start": bench_task_start,
    "tasks_per_s": bench_tasks_per_s,
    "fairness": bench_fairness,
}
assert set(BENCHES) == set(GROUPS), "core.BENCHES and _common.GROUPS disagree"


# --- environment and entry point ---------------------------------------------------


def version_of(ld: ModuleType, dist: str) -> str:
    found = getattr(ld, "__version__", None)
    if isinstance(found, str):
        return found
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # an uninstalled source tree has no metadata
        return "unknown (source tree)"


def environment(impl: str, ld: ModuleType) -> dict[str, Any]:
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = "not installed"
    return {
        "impl": impl,
        "impl_version": version_of(ld, impl),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy_version,
        "switch_interval_s": sys.getswitchinterval(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def run_all(impl: str, groups: list[str], s: Settings) -> dict[str, Any]:
    ld = load_impl(impl)
    out: dict[str, Any] = {
        "impl": impl,
        "env": environment(impl, ld),
        "metrics": {},
        "details": {},
        "errors": {},
    }
    for group in groups:
        print(f"[{impl}] {group} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            figures, details = BENCHES[group](ld, s)
        except Exception as exc:  # one broken benchmark must not hide the rest
            out["errors"][group] = f"{type(exc).__name__}: {exc}"
            print(f"[{impl}] {group} FAILED: {exc!r}", file=sys.stderr, flush=True)
            continue
        out["metrics"].update(figures)
        out["details"].update(details)
        print(
            f"[{impl}] {group} done in {time.perf_counter() - started:.1f}s: {figures}",
            file=sys.stderr,
            flush=True,
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--impl", required=True, choices=IMPLS, help="which package to import as ld"
    )
    parser.add_argument(
        "--only",
        action="append",
        help="benchmark group or metric name (repeatable, comma-separated)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    parser.add_argument("--cpus", help="pin this process to these CPUs first (taskset -c syntax)")
    return parser.parse_args(argv)


def pin(text: str) -> None:
    """Restrict this process (and the threads it starts later) to the CPUs in ``text``."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs os.sched_setaffinity, which this platform lacks")
    try:
        os.sched_setaffinity(0, parse_cpus(text))
    except OSError as exc:
        raise ValueError(f"cannot pin to CPUs {text!r}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        groups = select_groups(args.only)
        if args.cpus:
            pin(args.cpus)
    except ValueError as exc:
        print(f"core.py: {exc}", file=sys.stderr)
        return 2
    result = run_all(args.impl, groups, QUICK if args.quick else Settings())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
