"""Run-store overhead: task throughput with the SQLite store against ``store=None``.

Prints one JSON object on its last line. Run through ``make bench`` (bench/run.py) or alone:
``.venv/bin/python bench/store.py [--quick]``.

Scenarios, each run with ``store=None`` and with a store in a temporary directory:
- ``paced``: 8 concurrent tasks, each reporting progress at 1 kHz (sleep 1 ms per step) for
  ``steps`` steps; figure = progress steps per second in total. Target: store >= 0.8x none.
- ``unpaced``: the same 8 tasks reporting progress as fast as they can (worst case for the
  store: pure queue-put overhead).
- ``trivial``: back-to-back ``execute_task(...).wait()`` of a trivial task, tasks per second.
After each store run, every progress record is counted in the database (none may be lost).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import labd as ld


class Progress:
    def __init__(self, task_id: str, steps: int, paced: bool) -> None:
        self.steps = steps
        self.paced = paced

    def run(self, context: ld.TaskContext) -> int:
        next_at = time.perf_counter()
        for i in range(self.steps):
            context.progress(i + 1, self.steps)
            if self.paced:
                next_at += 0.001
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        return self.steps


class Trivial:
    def __init__(self, task_id: str) -> None:
        pass

    def run(self, context: ld.TaskContext) -> int:
        return 1


def _daemon(db: Path | None) -> ld.LabDaemon:
    daemon = ld.LabDaemon(store=db)
    daemon.register_plugins(tasks={"Progress": Progress, "Trivial": Trivial})
    return daemon


def progress_rate(db: Path | None, steps: int, paced: bool) -> tuple[float, int | None]:
    daemon = _daemon(db)
    try:
        start = time.perf_counter()
        handles = [
            daemon.execute_task(None, "Progress", steps=steps, paced=paced) for _ in range(8)
        ]
        for handle in handles:
            handle.wait(timeout=600)
        elapsed = time.perf_counter() - start
        stored = None
        if daemon.store is not None:
            daemon.store.flush(timeout=120)
            conn = sqlite3.connect(daemon.store.path)
            stored = conn.execute(
                "SELECT COUNT(*) FROM run_events WHERE kind='progress'"
            ).fetchone()[0]
            conn.close()
    finally:
        daemon.shutdown()
    return 8 * steps / elapsed, stored


def trivial_rate(db: Path | None, seconds: float) -> float:
    daemon = _daemon(db)
    try:
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            daemon.execute_task(None, "Trivial").wait(timeout=10)
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        daemon.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    steps = 1000 if args.quick else 3000
    seconds = 1.0 if args.quick else 3.0
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, paced in (("paced", True), ("unpaced", False)):
            none_rate, _ = progress_rate(None, steps, paced)
            store_rate, stored = progress_rate(Path(tmp) / f"{name}.db", steps, paced)
            figures[f"{name}_steps_per_s_none"] = round(none_rate)
            figures[f"{name}_steps_per_s_store"] = round(store_rate)
            figures[f"{name}_ratio"] = round(store_rate / none_rate, 3)
            figures[f"{name}_records_lost"] = 8 * steps - (stored or 0)
        none_tasks = trivial_rate(None, seconds)
        store_tasks = trivial_rate(Path(tmp) / "trivial.db", seconds)
        figures["trivial_tasks_per_s_none"] = round(none_tasks)
        figures["trivial_tasks_per_s_store"] = round(store_tasks)
        figures["trivial_ratio"] = round(store_tasks / none_tasks, 3)
    for key, value in figures.items():
        print(f"{key:32s} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
