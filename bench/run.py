"""``make bench``: labd against LabDaemon 1.0.1 on the same machine, side by side.

Why: labd promises to be a faster, fairer drop-in for LabDaemon; this prints
the evidence. Each implementation runs ``bench/core.py`` in its own process
and venv (LabDaemon in ``bench/.venv-labdaemon``, made on first use), and the
figures are compared against the targets in bench/README.md.

Example::

    .venv/bin/python bench/run.py --quick --only task_start --json out.json
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

from _common import parse_cpus, select_groups
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CORE = BENCH_DIR / "core.py"
LABDAEMON_PIN = "labdaemon==1.0.1"
LABDAEMON_VENV = BENCH_DIR / ".venv-labdaemon"
# Written only after the install is verified, so a half-made venv is redone.
LABDAEMON_STAMP = LABDAEMON_VENV / f".installed-{LABDAEMON_PIN.replace('==', '-')}"
CHILD_TIMEOUT_S = 120.0  # one group takes ~10 s; a hung daemon must not hang `make bench`

# Piped output (make, CI logs) would otherwise wrap the table at 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)

Run = dict[str, Any]  # one child's JSON: impl, env, metrics, details, errors


# --- the metrics and their targets -------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One row of the table: how to show it, which way is better, the target."""

    name: str
    unit: str  # ns | us | rate | share
    higher_is_better: bool
    target: str = ""
    # (labd value, ratio labd-vs-LabDaemon or None) -> met? None: cannot tell (no LabDaemon run)
    check: Callable[[float, float | None], bool | None] | None = None


def _ratio_at_least(minimum: float) -> Callable[[float, float | None], bool | None]:
    return lambda _value, ratio: None if ratio is None else ratio >= minimum


METRICS: tuple[Metric, ...] = (
    Metric("bare_call_ns", "ns", False),
    Metric(
        "locked_call_ns",
        "ns",
        False,
        "<= 200 ns and >= 1.5x",
        lambda value, ratio: None if ratio is None else value <= 200 and ratio >= 1.5,
    ),
    Metric("locked_overhead_ns", "ns", False),
    Metric("threads8_calls_per_s", "rate", True, ">= 2x", _ratio_at_least(2.0)),
    Metric("task_start_p50_us", "us", False, "<= 40 us", lambda value, _ratio: value <= 40),
    Metric("task_start_p90_us", "us", False),
    Metric("task_start_p99_us", "us", False),
    Metric("tasks_per_s", "rate", True, ">= 12,000/s", lambda value, _ratio: value >= 12_000),
    Metric("fairness_min_share", "share", True, ">= 15% each", lambda value, _ratio: value >= 0.15),
)


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
    if unit == "share":
        return f"{value:.1%}"
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


def run_child(
    python: Path | str, impl: str, group: str, args: argparse.Namespace, env: dict[str, str] | None
) -> Run:
    """Run one benchmark group of core.py for one implementation.

    The child's progress streams to our stderr; raises RuntimeError when it
    dies or hangs without printing its figures.
    """
    cmd = [str(python), str(CORE), "--impl", impl, "--only", group]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--cpus", args.cpus] if args.cpus else []
    try:
        done = subprocess.run(
            cmd, env=env, cwd=BENCH_DIR, stdout=subprocess.PIPE, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"{impl} {group}: still running after {CHILD_TIMEOUT_S:.0f}s, killed"
        ) from exc
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{impl} {group}: core.py exited {done.returncode} with no figures (its stderr is above)"
        )
    result: Run = json.loads(lines[-1])
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


def measure(impls: list[str], groups: list[str], args: argparse.Namespace) -> dict[str, Run]:
    """Every group for every implementation, one child process each.

    Groups are interleaved (LabDaemon then labd for each group) so that a
    burst of other load on the machine hits both sides of a comparison alike.
    """
    runs = {impl: new_run(impl) for impl in impls}
    ready: dict[str, tuple[str, dict[str, str] | None]] = {}
    for impl in impls:
        try:
            ready[impl] = prepare(impl)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            console.print(f"[red]{impl} not measured:[/] {exc}")
            runs[impl]["errors"]["run"] = str(exc)
    for group in groups:
        for impl, (python, env) in ready.items():
            console.print(f"[bold]{group}[/]: {impl}")
            try:
                merge(runs[impl], run_child(python, impl, group, args, env))
            except (RuntimeError, OSError, ValueError) as exc:
                console.print(f"[red]{exc}[/]")
                runs[impl]["errors"][group] = str(exc)
    return runs


# --- report ------------------------------------------------------------------------


def build_rows(labdaemon: Run, labd: Run) -> list[dict[str, Any]]:
    rows = []
    for metric in METRICS:
        old = labdaemon["metrics"].get(metric.name)
        new = labd["metrics"].get(metric.name)
        if old is None and new is None:
            continue
        ratio = ratio_of(metric, new, old)
        met = None if metric.check is None or new is None else metric.check(new, ratio)
        rows.append({"metric": metric, "labdaemon": old, "labd": new, "ratio": ratio, "met": met})
    return rows


def print_table(rows: list[dict[str, Any]], labdaemon: Run, labd: Run) -> None:
    old_version = labdaemon["env"].get("impl_version", "1.0.1")
    table = Table(
        title="labd vs LabDaemon: core benchmark",
        caption="ratio > 1 means labd is better (times: LabDaemon/labd; rates, shares: labd/LabDaemon)",
    )
    table.add_column("metric")
    table.add_column(f"LabDaemon {old_version}", justify="right")
    table.add_column(f"labd {labd['env'].get('impl_version', '')}".strip(), justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target")
    table.add_column("pass/fail")
    for row in rows:
        metric: Metric = row["metric"]
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        table.add_row(
            metric.name,
            fmt_value(metric.unit, row["labdaemon"]),
            fmt_value(metric.unit, row["labd"]),
            ratio,
            metric.target,
            verdict(metric, row["labd"], row["ratio"]),
        )
    console.print(table)


def print_environment(runs: list[Run]) -> None:
    env: dict[str, Any] = next((run["env"] for run in runs if run["env"]), {})
    if env:
        console.print(
            f"python {env['python']} ({env['implementation']}), {env['machine']}, {env['cpu_count']} CPUs, "
            f"numpy {env['numpy']}, {env['platform']}"
        )
        console.print(f"benchmark processes ran on CPUs {env.get('cpus')}")
    for run in runs:
        if run["env"]:
            console.print(f"  {run['impl']} {run['env']['impl_version']}")


def print_details(runs: list[Run]) -> None:
    for run in runs:
        details = run["details"]
        if "fairness_shares" in details:
            shares = ", ".join(f"{share:.1%}" for share in details["fairness_shares"])
            console.print(f"  {run['impl']} fairness shares per thread: {shares}")
        for group, error in run["errors"].items():
            if group != "run":  # already said when the child could not run
                console.print(f"  [red]{run['impl']} {group} failed:[/] {error}")


def write_json(path: Path, rows: list[dict[str, Any]], runs: list[Run]) -> None:
    table = [
        {
            "metric": row["metric"].name,
            "labdaemon": row["labdaemon"],
            "labd": row["labd"],
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
    parser = argparse.ArgumentParser(description="labd vs LabDaemon 1.0.1 core benchmark")
    parser.add_argument(
        "--only",
        action="append",
        help="benchmark group or metric name (repeatable, comma-separated)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter runs, noisier figures (about 10 s in all)"
    )
    parser.add_argument(
        "--impl", choices=("both", "labd", "labdaemon"), default="both", help="which side to run"
    )
    parser.add_argument(
        "--cpus",
        help="pin each benchmark process to these CPUs, e.g. 0 (taskset -c syntax); "
        "one CPU removes cross-core wake-ups, the largest source of run-to-run noise",
    )
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="also write every figure to this JSON file"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        groups = select_groups(args.only)  # fail fast, before building a venv
        if args.cpus:
            parse_cpus(args.cpus)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    impls = ["labdaemon", "labd"] if args.impl == "both" else [args.impl]
    runs = measure(impls, groups, args)
    labdaemon, labd = runs.get("labdaemon", new_run("")), runs.get("labd", new_run(""))
    rows = build_rows(labdaemon, labd)
    print_environment(list(runs.values()))
    print_table(rows, labdaemon, labd)
    print_details(list(runs.values()))
    if args.json:
        write_json(args.json, rows, list(runs.values()))
    return 1 if any("run" in run["errors"] for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
