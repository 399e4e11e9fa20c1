"""Names shared by the benchmark parent (run.py) and its children (core.py).

Standard library only: core.py runs under LabDaemon's own venv, which has no
rich and no labd. Keeping the metric groups here means ``--only`` means the
same thing to both processes.
"""

from __future__ import annotations

# Each group is measured by one function in core.py and yields these metrics.
GROUPS: dict[str, tuple[str, ...]] = {
    "bare_call": ("bare_call_ns",),
    "locked_call": ("locked_call_ns", "locked_overhead_ns"),
    "threads8": ("threads8_calls_per_s",),
    "task_start": ("task_start_p50_us", "task_start_p90_us", "task_start_p99_us"),
    "tasks_per_s": ("tasks_per_s",),
    "fairness": ("fairness_min_share",),
}

IMPLS: tuple[str, ...] = ("labdaemon", "labd")


def select_groups(only: list[str] | None) -> list[str]:
    """Map ``--only`` names (a group or any metric it yields) to group names.

    Raises ValueError naming every valid choice when a name is unknown.
    """
    if not only:
        return list(GROUPS)
    chosen: list[str] = []
    for raw in only:
        for name in filter(None, (part.strip() for part in raw.split(","))):
            group = _group_of(name)
            if group not in chosen:
                chosen.append(group)
    return chosen


def _group_of(name: str) -> str:
    if name in GROUPS:
        return name
    for group, metrics in GROUPS.items():
        if name in metrics:
            return group
    valid = sorted(set(GROUPS) | {m for ms in GROUPS.values() for m in ms})
    raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(valid)}")


def parse_cpus(text: str) -> set[int]:
    """CPU numbers from ``"0"``, ``"0,1"`` or ``"0-3"`` (the ``taskset -c`` syntax).

    Raises ValueError saying what was wrong and what is valid.
    """
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        cpus.clear()
    if not cpus or min(cpus) < 0:
        raise ValueError(f"bad CPU list {text!r}; write it like taskset -c: 0 or 0,1 or 0-3")
    return cpus
