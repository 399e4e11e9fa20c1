"""``make bench``: labd against LabDaemon 1.0.1 on the same machine, side by side.

Why: labd promises to be a faster, fairer drop-in for LabDaemon; this prints
the evidence. Three benchmarks run in child processes: ``bench/core.py`` once
per group and implementation (LabDaemon in ``bench/.venv-labdaemon``, made on
first use), ``bench/store.py`` (labd's run store; LabDaemon has none) and
``bench/server.py`` once per scenario (it starts each implementation's HTTP
server in a process of its own). One table compares the figures against the
targets in bench/README.md.

Example::

    .venv/bin/python bench/run.py --quick --only task_start --only call --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import GROUPS, parse_cpus, select_groups
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CORE = BENCH_DIR / "core.py"
STORE = BENCH_DIR / "store.py"
SERVER = BENCH_DIR / "server.py"
PUBLISH = BENCH_DIR / "publish_cost.py"
# The server scenarios of bench/server.py (it is not imported: it runs as a child).
SERVER_SCENARIOS = ("call", "slow", "latency", "fanout", "blocks")
# LabDaemon's server runs on the same web stack as labd's (these packages at the versions
# installed in labd's venv), so the comparison measures the servers, not their libraries.
SERVER_STACK = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sse-starlette",
    "pydantic",
    "pydantic-core",
    "anyio",
    "h11",
    "httptools",
    "uvloop",
)
LABDAEMON_PIN = "labdaemon==1.0.1"
LABDAEMON_VENV = BENCH_DIR / ".venv-labdaemon"
# Written only after the install is verified, so a half-made venv is redone.
LABDAEMON_STAMP = LABDAEMON_VENV / f".installed-{LABDAEMON_PIN.replace('==', '-')}"
CHILD_TIMEOUT_S = 120.0  # one group takes ~10 s; a hung daemon must not hang `make bench`
STORE_TIMEOUT_S = 300.0  # the store run takes ~20 s
PUBLISH_TIMEOUT_S = 300.0  # the publish-cost run takes ~30 s (1,000 clients connect first)
SERVER_TIMEOUT_S = 240.0  # one scenario, all implementations: ~30 s; server.py bounds its own waits

# Piped output (make, CI logs) would otherwise wrap the table at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)

Run = dict[str, Any]  # one child's JSON: impl, env, metrics, details, errors


@dataclass(frozen=True)
class Plan:
    """What to measure: core groups, whether the store runs, server scenarios."""

    core: list[str]
    store: bool
    server: list[str]
    publish: bool = False


# --- the metrics and their targets -------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One row of the table: how to show it, which way is better, the target."""

    name: str
    unit: str  # ns | us | ms | rate | share | x (a ratio) | count
    higher_is_better: bool
    target: str = ""
    # (labd value, ratio labd-vs-LabDaemon or None) -> met? None: cannot tell (no LabDaemon run)
    check: Callable[[float, float | None], bool | None] | None = None
    section: str = "core"  # core | store | publish | server: the benchmark that measures it


def _ratio_at_least(minimum: float) -> Callable[[float, float | None], bool | None]:
    return lambda _value, ratio: None if ratio is None else ratio >= minimum


METRICS: tuple[Metric, ...] = (
    Metric("bare_call_ns", "ns", False),
    # Targets from issue 7 (trust under faults): speed that remains required once every
    # hand-made trick not proven safe was removed, always side by side with LabDaemon.
    Metric("locked_call_ns", "ns", False, "<= 0.67x LabDaemon", _ratio_at_least(1 / 0.67)),
    Metric("locked_overhead_ns", "ns", False),
    Metric("threads8_calls_per_s", "rate", True, ">= 2x", _ratio_at_least(2.0)),
    Metric("task_start_p50_us", "us", False, "<= 0.67x LabDaemon", _ratio_at_least(1 / 0.67)),
    Metric("task_start_p90_us", "us", False),
    Metric("task_start_p99_us", "us", False),
    Metric("tasks_per_s", "rate", True, ">= 1.0x LabDaemon", _ratio_at_least(1.0)),
    Metric("fairness_min_share", "share", True, ">= 15% each", lambda value, _ratio: value >= 0.15),
    # bench/store.py: labd only (LabDaemon has no run store); "store" figures vs store=None.
    Metric("store_paced_ratio", "x", True, ">= 0.8x no store", lambda v, _r: v >= 0.8, "store"),
    Metric("store_paced_records_lost", "count", False, "0", lambda v, _r: v == 0, "store"),
    Metric("store_unpaced_ratio", "x", True, section="store"),
    Metric("store_unpaced_records_lost", "count", False, "0", lambda v, _r: v == 0, "store"),
    Metric("store_trivial_tasks_per_s_store", "rate", True, section="store"),
    Metric("store_trivial_ratio", "x", True, section="store"),
    # bench/publish_cost.py: labd only; publish() on the producer's thread, N SSE clients.
    Metric("publish_p50_us_1", "us", False, section="publish"),
    Metric("publish_p99_us_1", "us", False, section="publish"),
    Metric("publish_p99_us_10", "us", False, section="publish"),
    Metric("publish_p99_us_100", "us", False, section="publish"),
    Metric("publish_p50_us_1000", "us", False, section="publish"),
    Metric("publish_p99_us_1000", "us", False, "<= 50 us", lambda v, _r: v <= 50, "publish"),
    # bench/server.py: HTTP calls, then SSE streams.
    Metric("http_call1_req_per_s", "rate", True, ">= 1.3x", _ratio_at_least(1.3), "server"),
    Metric("http_call1_p50_ms", "ms", False, section="server"),
    Metric("http_call8_req_per_s", "rate", True, ">= 2x", _ratio_at_least(2.0), "server"),
    Metric("http_call8_p50_ms", "ms", False, section="server"),
    Metric("http_call_typed1_req_per_s", "rate", True, ">= 1.3x", _ratio_at_least(1.3), "server"),
    Metric("http_call_typed1_p50_ms", "ms", False, section="server"),
    Metric("http_call_typed8_req_per_s", "rate", True, ">= 2x", _ratio_at_least(2.0), "server"),
    Metric("http_call_typed8_p50_ms", "ms", False, section="server"),
    Metric("http_slow8_calls_per_s", "rate", True, ">= 600/s", lambda v, _r: v >= 600, "server"),
    Metric("sse_latency_p50_ms", "ms", False, "<= 2 ms", lambda v, _r: v <= 2, "server"),
    Metric("sse_latency_p99_ms", "ms", False, "<= 10 ms", lambda v, _r: v <= 10, "server"),
    Metric("sse_fanout_min_share", "share", True, ">= 99% each", lambda v, _r: v >= 0.99, "server"),
    Metric("sse_blocks_min_share", "share", True, ">= 95% each", lambda v, _r: v >= 0.95, "server"),
    Metric("health_p99_ms_under_blocks", "ms", False, "< 50 ms", lambda v, _r: v < 50, "server"),
)
SECTIONS = ("core", "store", "publish", "server")


def ratio_of(metric: Metric, labd: float | None, labdaemon: float | None) -> float | None:
    """labd vs LabDaemon, oriented so that > 1 always means labd is better."""
    if labd is None or labdaemon is None:
        return None
    better, worse = (labd, labdaemon) if metric.higher_is_better else (labdaemon, labd)
    return better / worse if worse else None


def fmt_value(unit: str, value: float | None) -> str:
    if value is None:
        return "[dim]n/a[/]"
    if unit == "ns":
        return f"{value:,.0f} ns"
    if unit == "us":
        return f"{value:,.1f} µs"
    if unit == "ms":
        return f"{value:,.2f} ms"
    if unit == "share":
        return f"{value:.1%}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "count":
        return f"{value:,.0f}"
    if value >= 1e6:
        return f"{value / 1e6:,.2f} M/s"
    return f"{value:,.0f}/s"


def verdict(metric: Metric, labd: float | None, ratio: float | None) -> str:
    if metric.check is None:
        return ""
    if labd is None:
        return "[yellow]not run[/]"
    met = metric.check(labd, ratio)
    if met is None:
        return "[yellow]needs LabDaemon[/]"
    return "[green]PASS[/]" if met else "[red]FAIL[/]"


# --- venvs and children ------------------------------------------------------------


def ensure_labdaemon_venv() -> Path:
    """Return the python of bench/.venv-labdaemon, creating it on first use."""
    python = LABDAEMON_VENV / "bin" / "python"
    if LABDAEMON_STAMP.exists() and python.exists():
        return python
    console.print(
        f"[bold]Creating {LABDAEMON_VENV.relative_to(REPO_DIR)} with {LABDAEMON_PIN}[/] (once)"
    )
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LABDAEMON_VENV)], check=True)
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        LABDAEMON_PIN,
    ]
    subprocess.run(pip, check=True)
    check = (
        "import labdaemon, loguru; assert labdaemon.__version__ == '1.0.1', labdaemon.__version__"
    )
    subprocess.run([str(python), "-c", check], check=True)
    # Like Python 3.13's venv: the venv ignores itself, so `git add bench` never takes it.
    (LABDAEMON_VENV / ".gitignore").write_text("# created by bench/run.py\n*\n")
    LABDAEMON_STAMP.write_text(LABDAEMON_PIN + "\n")
    return python


def server_pins() -> list[str]:
    """``name==version`` of each web-stack package installed here (labd's venv)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in SERVER_STACK:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue  # e.g. no uvloop on Windows: then neither side has it
    return pins


def ensure_labdaemon_server(python: Path) -> None:
    """Install LabDaemon's ``server`` extra into its venv, on labd's web-stack versions.

    Redone when labd's venv moves to other versions (the stamp lists the pins).
    """
    pins = server_pins()
    stamp = LABDAEMON_VENV / ".installed-server"
    wanted = "\n".join(pins) + "\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return
    console.print(f"[bold]Installing LabDaemon's server extra into {LABDAEMON_VENV.name}[/] (once)")
    extra = LABDAEMON_PIN.replace("==", "[server]==")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", extra]
    done = subprocess.run([*pip, *pins], capture_output=True, text=True)
    if done.returncode != 0:  # pip's output only when it failed: it can be long and noisy
        console.print(done.stdout + done.stderr)
        raise subprocess.CalledProcessError(done.returncode, pip)
    subprocess.run(
        [str(python), "-c", "import labdaemon.server, uvicorn, sse_starlette"], check=True
    )
    stamp.write_text(wanted)


def labd_env() -> dict[str, str]:
    """Environment in which this interpreter can ``import labd``.

    The Makefile installs labd editable into .venv; a bare checkout falls
    back to PYTHONPATH=src. Raises RuntimeError saying what was tried.
    """
    probe = [sys.executable, "-c", "import labd; labd.LabDaemon"]
    env = dict(os.environ)
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return env
    src = str(REPO_DIR / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    failed = subprocess.run(probe, env=env, capture_output=True, text=True)
    if failed.returncode == 0:
        return env
    last = (failed.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(
        f"cannot import labd.LabDaemon with {sys.executable}, nor with PYTHONPATH={src}: {last}"
    )


def child_json(cmd: list[str], env: dict[str, str] | None, timeout: float, label: str) -> Any:
    """Run a benchmark child and parse the JSON object on its last stdout line.

    The child's progress streams to our stderr; raises RuntimeError when it
    dies or hangs without printing its figures.
    """
    try:
        done = subprocess.run(
            cmd, env=env, cwd=BENCH_DIR, stdout=subprocess.PIPE, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{label}: still running after {timeout:.0f}s, killed") from exc
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{label}: {Path(cmd[1]).name} exited {done.returncode} with no figures "
            "(its stderr is above)"
        )
    return json.loads(lines[-1])


def run_child(
    python: Path | str, impl: str, group: str, args: argparse.Namespace, env: dict[str, str] | None
) -> Run:
    """Run one benchmark group of core.py for one implementation."""
    cmd = [str(python), str(CORE), "--impl", impl, "--only", group]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--cpus", args.cpus] if args.cpus else []
    result: Run = child_json(cmd, env, CHILD_TIMEOUT_S, f"{impl} {group}")
    return result


def new_run(impl: str) -> Run:
    return {"impl": impl, "env": {}, "metrics": {}, "details": {}, "errors": {}}


def prepare(impl: str) -> tuple[str, dict[str, str] | None]:
    """The interpreter and environment that run ``impl``; raises if it cannot run."""
    if impl == "labdaemon":
        return str(ensure_labdaemon_venv()), None
    return sys.executable, labd_env()


def merge(into: Run, child: Run) -> None:
    into["env"] = into["env"] or child["env"]
    for key in ("metrics", "details", "errors"):
        into[key].update(child[key])


def measure_core(
    runs: dict[str, Run],
    ready: dict[str, tuple[str, dict[str, str] | None]],
    groups: list[str],
    args: argparse.Namespace,
) -> None:
    """Every core group for every implementation, one child process each.

    Groups are interleaved (LabDaemon then labd for each group) so that a
    burst of other load on the machine hits both sides of a comparison alike.
    """
    for group in groups:
        for impl, (python, env) in ready.items():
            console.print(f"[bold]{group}[/]: {impl}")
            try:
                merge(runs[impl], run_child(python, impl, group, args, env))
            except (RuntimeError, OSError, ValueError) as exc:
                console.print(f"[red]{exc}[/]")
                runs[impl]["errors"][group] = str(exc)


def measure_store(run: Run, env: dict[str, str] | None, args: argparse.Namespace) -> None:
    """bench/store.py (labd only): its figures become ``store_*`` metrics."""
    console.print("[bold]store[/]: labd")
    cmd = [sys.executable, str(STORE), *(["--quick"] if args.quick else [])]
    try:
        figures = child_json(cmd, env, STORE_TIMEOUT_S, "labd store")
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        run["errors"]["store"] = str(exc)
        return
    run["metrics"].update({f"store_{key}": value for key, value in figures.items()})


def measure_publish(run: Run, env: dict[str, str] | None, args: argparse.Namespace) -> None:
    """bench/publish_cost.py (labd only): its figures become ``publish_*`` metrics."""
    console.print("[bold]publish cost[/]: labd")
    cmd = [sys.executable, str(PUBLISH), *(["--quick"] if args.quick else [])]
    try:
        figures = child_json(cmd, env, PUBLISH_TIMEOUT_S, "labd publish cost")
    except (RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]{exc}[/]")
        run["errors"]["publish"] = str(exc)
        return
    run["metrics"].update({f"publish_{key}": value for key, value in figures.items()})


def measure_server(
    runs: dict[str, Run],
    labdaemon_python: str | None,
    scenarios: list[str],
    args: argparse.Namespace,
) -> None:
    """bench/server.py once per scenario; it interleaves the implementations itself.

    The bare-FastAPI reference runs whenever labd does.
    """
    impls = [impl for impl in runs if impl != "fastapi"]
    if "labd" in impls:
        impls.append("fastapi")
        runs.setdefault("fastapi", new_run("fastapi"))
    base = [sys.executable, str(SERVER), *(["--quick"] if args.quick else [])]
    base += [arg for impl in impls for arg in ("--impl", impl)]
    if labdaemon_python:
        base += ["--labdaemon-python", labdaemon_python]
    for scenario in scenarios:
        console.print(f"[bold]server {scenario}[/]")
        try:
            found = child_json(
                [*base, "--only", scenario], None, SERVER_TIMEOUT_S, f"server {scenario}"
            )
        except (RuntimeError, OSError, ValueError) as exc:
            console.print(f"[red]{exc}[/]")
            for impl in impls:
                runs[impl]["errors"][f"server_{scenario}"] = str(exc)
            continue
        for impl, child in found["runs"].items():
            env = child.pop("env")
            for key in ("metrics", "details", "errors"):
                runs[impl][key].update(child[key])
            if env:
                runs[impl]["env"].setdefault("impl_version", env["impl_version"])
                runs[impl]["env"].setdefault("server_stack", env["stack"])


def measure(impls: list[str], plan: Plan, args: argparse.Namespace) -> dict[str, Run]:
    """Core, store and server benchmarks, each in child processes."""
    runs = {impl: new_run(impl) for impl in impls}
    ready: dict[str, tuple[str, dict[str, str] | None]] = {}
    for impl in impls:
        try:
            ready[impl] = prepare(impl)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            console.print(f"[red]{impl} not measured:[/] {exc}")
            runs[impl]["errors"]["run"] = str(exc)
    measure_core(runs, ready, plan.core, args)
    if plan.store and "labd" in ready:
        measure_store(runs["labd"], ready["labd"][1], args)
    if plan.publish and "labd" in ready:
        measure_publish(runs["labd"], ready["labd"][1], args)
    if plan.server:
        labdaemon_python = ready["labdaemon"][0] if "labdaemon" in ready else None
        if labdaemon_python:
            try:
                ensure_labdaemon_server(Path(labdaemon_python))
            except (subprocess.SubprocessError, OSError) as exc:
                console.print(f"[red]LabDaemon's server not measured:[/] {exc}")
                runs["labdaemon"]["errors"]["server"] = str(exc)
                labdaemon_python = None
        server_runs = {
            impl: runs[impl] for impl in ready if impl != "labdaemon" or labdaemon_python
        }
        measure_server(server_runs, labdaemon_python, plan.server, args)
        if "fastapi" in server_runs:
            runs["fastapi"] = server_runs["fastapi"]
    return runs


# --- report ------------------------------------------------------------------------


def build_rows(runs: dict[str, Run]) -> list[dict[str, Any]]:
    labdaemon, labd = runs.get("labdaemon", new_run("")), runs.get("labd", new_run(""))
    fastapi = runs.get("fastapi", new_run(""))
    rows = []
    for metric in METRICS:
        old = labdaemon["metrics"].get(metric.name)
        new = labd["metrics"].get(metric.name)
        if old is None and new is None:
            continue
        ratio = ratio_of(metric, new, old)
        met = None if metric.check is None or new is None else metric.check(new, ratio)
        rows.append(
            {
                "metric": metric,
                "labdaemon": old,
                "labd": new,
                "ratio": ratio,
                "met": met,
                "fastapi": fastapi["metrics"].get(metric.name),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], runs: dict[str, Run]) -> None:
    labdaemon, labd = runs.get("labdaemon", new_run("")), runs.get("labd", new_run(""))
    old_version = labdaemon["env"].get("impl_version", "1.0.1")
    reference = any(row["fastapi"] is not None for row in rows)
    table = Table(
        title="labd vs LabDaemon: core, store and server benchmarks",
        caption="ratio > 1 means labd is better (times: LabDaemon/labd; rates, shares: "
        "labd/LabDaemon)"
        + ("; bare FastAPI: the same call route with no framework" if reference else ""),
    )
    table.add_column("metric")
    table.add_column(f"LabDaemon {old_version}", justify="right")
    table.add_column(f"labd {labd['env'].get('impl_version', '')}".strip(), justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target")
    table.add_column("pass/fail")
    if reference:
        table.add_column("bare FastAPI", justify="right")
    section = ""
    for row in rows:
        metric: Metric = row["metric"]
        if section and metric.section != section:
            table.add_section()
        section = metric.section
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        cells = [
            metric.name,
            "—" if metric.section in ("store", "publish") else fmt_value(metric.unit, row["labdaemon"]),
            fmt_value(metric.unit, row["labd"]),
            ratio,
            metric.target,
            verdict(metric, row["labd"], row["ratio"]),
        ]
        if reference:
            cells.append("" if row["fastapi"] is None else fmt_value(metric.unit, row["fastapi"]))
        table.add_row(*cells)
    console.print(table)


def print_environment(runs: list[Run]) -> None:
    env: dict[str, Any] = next((run["env"] for run in runs if run["env"].get("python")), {})
    if env:
        console.print(
            f"python {env['python']} ({env['implementation']}), {env['machine']}, {env['cpu_count']} CPUs, "
            f"numpy {env['numpy']}, {env['platform']}"
        )
        console.print(f"core benchmark processes ran on CPUs {env.get('cpus')}")
    for run in runs:
        if run["impl"] == "fastapi":
            continue  # the reference app, not an implementation: its stack is printed below
        if run["env"].get("impl_version"):
            console.print(f"  {run['impl']} {run['env']['impl_version']}")
    stack = next(
        (run["env"]["server_stack"] for run in runs if run["env"].get("server_stack")), None
    )
    if stack:
        web = ", ".join(
            f"{name} {ver}" for name, ver in stack.items() if name not in ("labd", "labdaemon")
        )
        console.print(f"  servers' web stack: {web}")


def _stream_summary(details: dict[str, Any]) -> str:
    statuses: dict[str, int] = {}
    for reader in details.get("readers", []):
        statuses[reader["status"]] = statuses.get(reader["status"], 0) + 1
    shares = ", ".join(f"{share:.1%}" for share in details.get("shares", []))
    counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    rate = details.get("published_per_s")
    return f"shares {shares} ({counts}; device published {rate}/s)"


def print_details(runs: list[Run]) -> None:
    for run in runs:
        details = run["details"]
        if "fairness_shares" in details:
            shares = ", ".join(f"{share:.1%}" for share in details["fairness_shares"])
            console.print(f"  {run['impl']} fairness shares per thread: {shares}")
        for key in ("sse_fanout", "sse_blocks"):
            if key in details:
                console.print(f"  {run['impl']} {key}: {_stream_summary(details[key])}")
        health = details.get("sse_blocks", {}).get("health")
        if health and health["failures"]:
            console.print(
                f"  {run['impl']} /health under blocks: {health['failures']} failed "
                f"({health['last_error']}), {health['samples']} answered"
            )
        for group, error in run["errors"].items():
            if group != "run":  # already said when the child could not run
                console.print(f"  [red]{run['impl']} {group} failed:[/] {error}")


def write_json(path: Path, rows: list[dict[str, Any]], runs: list[Run]) -> None:
    table = [
        {
            "metric": row["metric"].name,
            "section": row["metric"].section,
            "labdaemon": row["labdaemon"],
            "labd": row["labd"],
            "fastapi": row["fastapi"],
            "ratio": row["ratio"],
            "target": row["metric"].target,
            "met": row["met"],
        }
        for row in rows
    ]
    path.write_text(
        json.dumps({"rows": table, "runs": {run["impl"]: run for run in runs}}, indent=2) + "\n"
    )
    console.print(f"Wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="labd vs LabDaemon 1.0.1: core, store and server")
    parser.add_argument(
        "--only",
        action="append",
        help="core, store, publish, server, a core group, a server scenario or a metric name "
        "(repeatable, comma-separated)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    parser.add_argument(
        "--impl", choices=("both", "labd", "labdaemon"), default="both", help="which side to run"
    )
    parser.add_argument(
        "--cpus",
        help="pin each core benchmark process to these CPUs, e.g. 0 (taskset -c syntax); "
        "one CPU removes cross-core wake-ups, the largest source of run-to-run noise",
    )
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="also write every figure to this JSON file"
    )
    return parser.parse_args(argv)


def make_plan(only: list[str] | None) -> Plan:
    """What ``--only`` selects; everything when it is empty. ValueError names valid choices."""
    if not only:
        return Plan(list(GROUPS), True, list(SERVER_SCENARIOS), publish=True)
    server_metrics = {m.name: m for m in METRICS if m.section == "server"}
    core: list[str] = []
    store, server, publish = False, [], False
    for raw in only:
        for name in filter(None, (part.strip() for part in raw.split(","))):
            if name == "core":
                core += list(GROUPS)
            elif name == "store" or name.startswith("store_"):
                store = True
            elif name == "publish" or name.startswith("publish_"):
                publish = True
            elif name == "server":
                server += list(SERVER_SCENARIOS)
            elif name in SERVER_SCENARIOS:
                server.append(name)
            elif name in server_metrics:
                server.append(_scenario_of(name))
            else:
                try:
                    core += select_groups([name])
                except ValueError as exc:
                    raise ValueError(
                        f"{exc}; or core, store, publish, server, or a server scenario: "
                        f"{', '.join(SERVER_SCENARIOS)}"
                    ) from None
    return Plan(list(dict.fromkeys(core)), store, list(dict.fromkeys(server)), publish)


def _scenario_of(metric: str) -> str:
    for prefix, scenario in (
        ("http_call", "call"),
        ("http_slow", "slow"),
        ("sse_latency", "latency"),
        ("sse_fanout", "fanout"),
    ):
        if metric.startswith(prefix):
            return scenario
    return "blocks"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args.only)  # fail fast, before building a venv
        if args.cpus:
            parse_cpus(args.cpus)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    impls = ["labdaemon", "labd"] if args.impl == "both" else [args.impl]
    runs = measure(impls, plan, args)
    rows = build_rows(runs)
    print_environment(list(runs.values()))
    print_table(rows, runs)
    print_details(list(runs.values()))
    if args.json:
        write_json(args.json, rows, list(runs.values()))
    return 1 if any("run" in run["errors"] for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
