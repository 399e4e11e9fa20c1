"""Dashboard benchmark (not a test): live-plot lag, frame rate and browser CPU; overview render.

Runs a labd server in this process (127.0.0.1, a free port) and Debian's headless Chromium
through Playwright, and measures, for a device page's live uPlot plot:

- **event-to-pixels lag**: for every stream item drawn, the time from its publication in the
  server (the event's ``timestamp``) to the first animation frame after the plot drew it
  (so the pixels were painted), p50 and p99;
- **frames per second** drawn by the plot, and items per second received;
- **the browser's CPU share**: CPU seconds of every Chromium process of this launch (from
  ``/proc``) over the wall-clock seconds measured, as % of one core.

Scenarios: ``daq-demo`` (the demo's SimDAQ: 10 kHz in 500-sample blocks, 20 events/s) and
``scalar-5k`` (one float per event at 5,000 events/s). Then the overview with 50 simulated
devices added to the demo lab: the server's render time and the browser's time to the load
event with the full table on screen (median of 5). The plot records lags only when the page
sets ``window.labdBench = true`` (this script does, before any page script runs).

Usage: .venv/bin/python bench/dashboard.py [--seconds 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

import labd
from labd.sim import SimLaser, demo_lab
from labd.testing import running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TICKS = os.sysconf("SC_CLK_TCK")


class ScalarSource:
    """A device streaming one float per item at ``rate`` Hz from its own thread."""

    def __init__(self, device_id: str, rate: float = 5000.0) -> None:
        self.device_id = device_id
        self.rate = rate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        self.stop_streaming(2.0)

    def is_streaming(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_streaming(self, callback: Callable[[Any], object], **_: Any) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(callback, self._stop),
                                        name=f"bench-{self.device_id}", daemon=True)
        self._thread.start()

    def stop_streaming(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self, callback: Callable[[Any], object], stop: threading.Event) -> None:
        start, n = time.perf_counter(), 0
        while not stop.is_set():
            due = int((time.perf_counter() - start) * self.rate) + 1
            while n < due:
                callback(float(n % 1000) / 1000.0)
                n += 1
            stop.wait(0.001)


def _chromium_pids() -> list[int]:
    """Every Chromium process started by Playwright (its profile dir names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"chrom" in cmdline and b"playwright" in cmdline:
            pids.append(int(entry.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextmanager
def _browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def measure_plot(browser: Any, url: str, device_id: str, seconds: float) -> dict[str, Any]:
    """Open the device page, start its stream, and measure for ``seconds``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script("window.labdBench = true;")
    page.goto(f"{url}/ui/devices/{device_id}")
    page.get_by_role("button", name="Start stream").click()
    page.wait_for_function("() => Number(document.querySelector('[data-plot]').dataset.points) > 0",
                           timeout=15_000)
    time.sleep(1.0)  # warm-up: the first frames build the plot
    page.evaluate("() => { const s = document.querySelector('[data-plot]').labdPlot.stats;"
                  " s.lags.length = 0; s.frames = 0; s.events = 0; }")
    pids = _chromium_pids()
    cpu0, wall0 = _cpu_seconds(pids), time.perf_counter()
    time.sleep(seconds)
    cpu1, wall1 = _cpu_seconds(pids), time.perf_counter()
    stats = page.evaluate("() => { const s = document.querySelector('[data-plot]').labdPlot.stats;"
                          " return {lags: s.lags.slice(), frames: s.frames, events: s.events,"
                          " points: Number(document.querySelector('[data-plot]').dataset.points)}; }")
    page.get_by_role("button", name="Stop stream").click()
    page.close()
    wall = wall1 - wall0
    lags = stats["lags"]
    return {
        "device": device_id, "seconds": round(wall, 2), "events": stats["events"],
        "events_per_s": round(stats["events"] / wall, 1), "points_total": stats["points"],
        "lag_p50_ms": round(_percentile(lags, 0.50), 1), "lag_p99_ms": round(_percentile(lags, 0.99), 1),
        "lag_max_ms": round(max(lags), 1) if lags else None, "lag_samples": len(lags),
        "fps": round(stats["frames"] / wall, 1),
        "browser_cpu_pct_of_one_core": round(100 * (cpu1 - cpu0) / wall, 1),
        "chromium_processes": len(pids),
    }


def measure_overview(browser: Any, url: str, rounds: int = 5) -> dict[str, Any]:
    """Server render time and browser load time of /ui/ with every device listed."""
    expected = len(httpx.get(f"{url}/devices", timeout=30).json()["devices"])
    server_ms, browser_ms = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        httpx.get(f"{url}/ui/", timeout=30).raise_for_status()
        server_ms.append(1000 * (time.perf_counter() - start))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        start = time.perf_counter()
        page.goto(f"{url}/ui/", wait_until="load")
        page.wait_for_function(f"() => document.querySelectorAll('tr[data-device]').length === {expected}")
        browser_ms.append(1000 * (time.perf_counter() - start))
        page.close()
    return {"devices": expected, "server_render_ms_median": round(statistics.median(server_ms), 1),
            "browser_load_ms_median": round(statistics.median(browser_ms), 1),
            "browser_load_ms_max": round(max(browser_ms), 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per plot scenario")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    daemon = labd.LabDaemon()
    figures: dict[str, Any] = {"labd": labd.__version__, "cpus": os.cpu_count()}
    try:
        demo_lab(daemon)
        daemon.register_plugins(devices={"ScalarSource": ScalarSource, "SimLaser50": SimLaser})
        daemon.add_device("scalar5k", "ScalarSource", rate=5000.0)
        daemon.connect_device("scalar5k")
        with running_server(daemon) as server, _browser() as browser:
            print(f"labd {labd.__version__} at {server.url}; headless Chromium", file=sys.stderr)
            figures["daq-demo"] = measure_plot(browser, server.url, "daq1", args.seconds)
            print(json.dumps(figures["daq-demo"]), file=sys.stderr)
            figures["scalar-5k"] = measure_plot(browser, server.url, "scalar5k", args.seconds)
            print(json.dumps(figures["scalar-5k"]), file=sys.stderr)
            for n in range(50):
                daemon.add_device(f"sim{n:02d}", "SimLaser50", settling_time=0.0)
                daemon.connect_device(f"sim{n:02d}")
            figures["overview-50"] = measure_overview(browser, server.url)
            print(json.dumps(figures["overview-50"]), file=sys.stderr)
    finally:
        daemon.shutdown()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
