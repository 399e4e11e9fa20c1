"""Shared fixtures, and a guard that fails any test which leaves threads or daemons behind.

labd is threads underneath (device calls, task runs, stream delivery, servers), so a
test that forgets to stop something leaks a thread that slows or breaks later tests far
from the cause. The autouse guard makes the test that leaked fail, by name.

    def test_register(daemon):            # a fresh LabDaemon, shut down after the test
        daemon.register_plugins(devices={"Laser": Laser})
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import hypothesis
import pytest

if TYPE_CHECKING:
    import labd

# Threads whose name starts with one of these may outlive a test, each for a reason:
ALLOWED_THREAD_PREFIXES: tuple[str, ...] = (
    # asyncio's default executor (loop.run_in_executor) names its workers asyncio_N; the
    # executor belongs to its event loop and is reused, not owned by the test.
    "asyncio_",
)
# pytest-timeout needs no entry: its timer thread (timeout_method=thread) starts before
# the first fixture and stops after the last, so it is never new to this guard.

# How long a thread may take to finish after the test ends, before it counts as leaked.
THREAD_GRACE_S = 5.0
# Each wait inside that grace is short, so a fast shutdown costs the test almost nothing.
THREAD_POLL_S = 0.05

# Hypothesis profiles. None has a per-example deadline: that is a timing assertion, and on
# a loaded CI machine with background threads it fails for reasons unrelated to the code.
#   labd  (a developer's `make test`): random draws, failures remembered in .hypothesis/
#   ci    (CI=true, so every landing): derandomized, so a landing never depends on a draw;
#         inputs a random run once found are pinned with @example in the tests themselves
#   fuzz  (`make fuzz`): random seeds and many more examples, to find new failing inputs
# LABD_HYPOTHESIS_PROFILE picks one explicitly.
hypothesis.settings.register_profile("labd", deadline=None)
hypothesis.settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True
)
hypothesis.settings.register_profile(
    "fuzz", deadline=None, max_examples=5000, print_blob=True, derandomize=False
)


def _hypothesis_profile() -> str:
    import os

    chosen = os.environ.get("LABD_HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    return "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "labd"


hypothesis.settings.load_profile(_hypothesis_profile())

# A suite started from a background job (`make test &` in a script) inherits SIGINT ignored,
# and so would every `labd serve` child it spawns: the Ctrl+C tests would then hang until
# their watchdogs. Give the test process Python's default handler back (children get SIG_DFL
# at exec, and Python then installs its own KeyboardInterrupt handler).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _private_default_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands that record to the default run store (``labd demo``, ``labd serve``) must not
    touch the user's ``~/.local/share/labd/labd.db``: point ``LABD_DB`` at a temp file."""
    import os

    previous = os.environ.get("LABD_DB")
    os.environ["LABD_DB"] = str(tmp_path_factory.mktemp("labd-default-db") / "labd.db")
    yield
    if previous is None:
        os.environ.pop("LABD_DB", None)
    else:
        os.environ["LABD_DB"] = previous


def _is_allowed(thread: threading.Thread) -> bool:
    return thread.name.startswith(ALLOWED_THREAD_PREFIXES)


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread not in before and thread.is_alive() and not _is_allowed(thread)
    ]


def _threads_alive_after_grace(before: set[threading.Thread]) -> list[threading.Thread]:
    """Wait up to THREAD_GRACE_S for threads started by the test to end; return the rest."""
    deadline = time.monotonic() + THREAD_GRACE_S
    while True:
        leaked = _new_threads(before)
        remaining = deadline - time.monotonic()
        if not leaked or remaining <= 0:
            return leaked
        # join() returns as soon as the thread ends; re-list afterwards because a
        # stopping thread may itself start (and stop) another.
        leaked[0].join(timeout=min(remaining, THREAD_POLL_S))


def _live_daemons() -> list[Any]:
    """Daemons not yet shut down, from the core's hook; [] if labd.daemon is not loaded.

    A test that never imported labd.daemon cannot have created a daemon, so the guard
    does not import it (and works before the core exists).
    """
    module = sys.modules.get("labd.daemon")
    hook = getattr(module, "_live_daemons", None)
    if hook is None:
        return []
    return list(hook())


def _shut_down_leaked(daemons: list[Any]) -> list[str]:
    """Shut down daemons a test left running, so they cannot disturb later tests."""
    lines = []
    for daemon in daemons:
        try:
            daemon.shutdown(timeout=2)
        except Exception as exc:  # the report matters more than this second failure
            lines.append(f"  {daemon!r} (shutdown by the guard also failed: {exc!r})")
        else:
            lines.append(f"  {daemon!r}")
    return lines


def _describe(thread: threading.Thread) -> str:
    kind = "daemon thread" if thread.daemon else "thread"
    return f"  {thread.name!r} ({kind}, ident {thread.ident})"


@pytest.fixture(autouse=True)
def _no_leaked_threads_or_daemons() -> Iterator[None]:
    """Fail the test if it leaves a LabDaemon running or a new thread alive."""
    threads_before = set(threading.enumerate())
    daemons_before = _live_daemons()
    yield
    problems = []
    leaked_daemons = [
        daemon for daemon in _live_daemons() if not any(daemon is known for known in daemons_before)
    ]
    if leaked_daemons:
        problems.append(
            f"The test left {len(leaked_daemons)} LabDaemon(s) running; call "
            "daemon.shutdown() or use the `daemon` fixture:\n"
            + "\n".join(_shut_down_leaked(leaked_daemons))
        )
    leaked_threads = _threads_alive_after_grace(threads_before)
    if leaked_threads:
        problems.append(
            f"The test left {len(leaked_threads)} thread(s) alive {THREAD_GRACE_S:g} s after "
            "it ended; stop what started them (daemon.shutdown(), server.stop(), "
            "subscription.close()) before the test returns:\n"
            + "\n".join(_describe(thread) for thread in leaked_threads)
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def daemon() -> Iterator[labd.LabDaemon]:
    """A fresh LabDaemon, shut down when the test ends (pass or fail)."""
    import labd

    instance = labd.LabDaemon()
    yield instance
    instance.shutdown(timeout=2)


@pytest.fixture
def lab(daemon: labd.LabDaemon) -> labd.LabDaemon:
    """The `daemon` fixture with the simulated lab (labd.sim.demo_lab) registered and added."""
    import labd.sim

    labd.sim.demo_lab(daemon)
    return daemon
