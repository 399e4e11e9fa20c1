"""LabDaemon 1.0.1's own daemon tests (``labdaemon/tests/test_daemon.py``), run against labd.

The test module shipped in the ``labdaemon`` package is read and executed with its three
imports of ``labdaemon`` pointed at ``labd`` (``import labd as ld``, ``from labd import
LabDaemon``, ``from labd.exceptions import ...``): the switch DESIGN.md section 3 promises.
Its tests and fixtures are then collected from here, so pytest runs them under labd's own
guards (leaked threads, warnings as errors, timeouts).

Not collected: tests that read LabDaemon's private attributes (``daemon._tasks``,
``handle._task_instance``, ...) or build LabDaemon's own server internals; they test
LabDaemon's implementation, not its API. Every test of the file is either collected or listed
in :data:`NOT_COLLECTED` with why, and :func:`test_every_labdaemon_test_is_accounted_for`
fails if LabDaemon's file and these lists drift apart.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import labdaemon
import pytest

SOURCE = Path(labdaemon.__file__).parent / "tests" / "test_daemon.py"

SWAPS = {
    "import labdaemon as ld\n": "import labd as ld\n",
    "from labdaemon.daemon import LabDaemon\n": "from labd import LabDaemon\n",
    "from labdaemon.exceptions import ": "from labd.exceptions import ",
}

_PRIVATE = "reads LabDaemon's private attributes ({})"
NOT_COLLECTED = {
    "test_daemon_initialisation": _PRIVATE.format("_devices, _tasks, _device_classes"),
    "test_register_plugins": _PRIVATE.format("_device_classes, _task_classes"),
    "test_add_device": _PRIVATE.format("_devices"),
    "test_task_cancellation_returns_partial_result": _PRIVATE.format("handle._task_instance"),
    "test_task_pause_and_resume": _PRIVATE.format("handle._task_instance"),
    "test_task_pause_blocks_execution": _PRIVATE.format("handle._task_instance"),
    "test_completed_task_buffer_cleanup": _PRIVATE.format("_tasks, _task_completion_times"),
    "test_task_id_history_limit_cleanup": _PRIVATE.format("_recent_task_ids"),
    "test_task_cleanup_preserves_running_tasks": _PRIVATE.format("_tasks"),
    "test_task_cleanup_with_zero_buffer": _PRIVATE.format("_tasks"),
    "test_task_cleanup_uses_true_lru": _PRIVATE.format("_tasks"),
    "test_error_manager_follows_task_buffer": (
        "builds labdaemon.server.LabDaemonServer (LabDaemon's server internals) on the daemon"
    ),
}

# Collected, and expected to fail (strict): a deliberate difference, named here.
DIFFERENCES: dict[str, str] = {}


def _load_on_labd() -> types.ModuleType:
    text = SOURCE.read_text(encoding="utf-8")
    for old, new in SWAPS.items():
        assert old in text, f"{SOURCE} no longer contains {old!r}; update SWAPS"
        text = text.replace(old, new)
    module = types.ModuleType("labdaemon_test_daemon_on_labd")
    module.__file__ = str(SOURCE)
    exec(compile(text, str(SOURCE), "exec"), module.__dict__)
    return module


_SUITE = _load_on_labd()
_TESTS = {n: f for n, f in vars(_SUITE).items() if n.startswith("test_") and inspect.isfunction(f)}

# Their fixtures (``daemon``, ``registered_daemon``) override conftest's for this module only.
globals().update({
    name: value for name, value in vars(_SUITE).items()
    if not name.startswith("test_") and name not in globals() and not name.startswith("__")
})
for _name, _test in _TESTS.items():
    if _name in NOT_COLLECTED:
        continue
    if _name in DIFFERENCES:
        _test = pytest.mark.xfail(reason=DIFFERENCES[_name], strict=True)(_test)
    globals()[_name] = _test

pytestmark = pytest.mark.slow  # LabDaemon's tests sleep: about 20 s in all


def test_every_labdaemon_test_is_accounted_for() -> None:
    unknown = (set(NOT_COLLECTED) | set(DIFFERENCES)) - set(_TESTS)
    assert not unknown, f"listed here but not in LabDaemon's file: {sorted(unknown)}"
    collected = set(_TESTS) - set(NOT_COLLECTED)
    assert len(collected) == 53, f"LabDaemon's public-API tests changed: {sorted(collected)}"
