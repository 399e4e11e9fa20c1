"""Interrupts never jam a device: no lock left held, no waiter left queued (issue 7, item 1).

DESIGN.md's trust rules: an interrupt (Ctrl+C, any BaseException) at any point of a device
call leaves the device lock free and its FIFO queue without the interrupted caller. These
tests deliver real signals to the main thread, where Python runs signal handlers:

* one ``SIGINT`` while the main thread waits in the device lock's queue, then a call from a
  third thread must get the lock (a bounded wait is the watchdog);
* a stress test under ``sys.setswitchinterval(1e-6)``: an injector thread sends ``SIGINT``
  again and again while the main thread calls the device and two other threads contend
  for it; a handler raises at whatever point of the call the signal lands (in the wrapper,
  the fair queue, the lock itself). Afterwards the lock must be free, nobody queued, and
  the device's calls must never have overlapped.

The injector sends one signal at a time and waits until the main thread dealt with it, so
each interrupt is a single fault at a random point (the points differ run to run; the
assertions do not depend on which ones were hit).
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

import labd as ld

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work
STRESS_WATCHDOG_S = 45.0  # the stress loop normally ends after a few seconds
STRESS_INTERRUPTS = 2000  # interrupts that must land inside device calls, and of them
STRESS_EACH = 100  # at least this many while holding the lock and while queued for it


class Interrupted(Exception):
    """Raised by the stress test's SIGINT handler (a stand-in for KeyboardInterrupt)."""


class Counter:
    """A device that detects overlapping calls (the lock's job is to prevent them).

    ``ping`` makes no calls, so the only point where an interrupt can land inside it is its
    first instruction, before it changes anything.
    """

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.inside = 0
        self.overlaps = 0
        self.calls = 0

    def ping(self) -> None:
        inside = self.inside + 1
        self.inside = inside
        if inside != 1:
            self.overlaps += 1
        self.calls += 1
        self.inside = inside - 1

    def dwell(self, seconds: float) -> None:
        """Hold the lock for ``seconds``, so callers from other threads queue (FIFO mode)."""
        self.inside += 1
        if self.inside != 1:
            self.overlaps += 1
        time.sleep(seconds)
        self.inside -= 1

    def hold(self, entered: threading.Event, release: threading.Event) -> None:
        entered.set()
        assert release.wait(WAIT_S), "hold() was never released"


@pytest.fixture
def counter(daemon: ld.LabDaemon) -> Counter:
    daemon.register_plugins(devices={"Counter": Counter})
    device: Counter = daemon.add_device("c1", "Counter")
    return device


@pytest.fixture
def restore_sigint() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def lock_info(daemon: ld.LabDaemon) -> dict[str, Any]:
    info: dict[str, Any] = daemon.device_info("c1")["lock"]
    return info


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.0005)


def start(target: Callable[[], Any], name: str) -> threading.Thread:
    # Daemon threads: if the lock is jammed (the bug), a blocked caller must not keep the
    # test process alive; the assertions report the jam.
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def joined(threads: list[threading.Thread], timeout: float = WAIT_S) -> list[str]:
    """Join with a watchdog; return the names of threads still blocked."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return [t.name for t in threads if t.is_alive()]


def call_from_other_thread(call: Callable[[], object], name: str) -> None:
    """Run ``call`` on a new thread; fail unless it returns within the watchdog."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    start(run, name)
    assert done.wait(WAIT_S), (
        f"{name}: a call from another thread did not get the free device lock within "
        f"{WAIT_S} s (a ghost waiter or a lock left held by the interrupted thread?)"
    )
    assert not errors, errors


# -- one Ctrl+C while waiting --------------------------------------------------------------


@pytest.mark.parametrize("call_timeout", [None, 30.0], ids=["plain", "bounded"])
def test_ctrl_c_while_waiting_for_a_busy_device_leaves_no_ghost_waiter(
    daemon: ld.LabDaemon, counter: Counter, restore_sigint: None, call_timeout: float | None
) -> None:
    daemon.set_call_timeout("c1", call_timeout)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl+C raises KeyboardInterrupt
    main = threading.get_ident()
    entered, release = threading.Event(), threading.Event()
    holder = start(lambda: counter.hold(entered, release), "holder-thread")
    assert entered.wait(WAIT_S)

    def interrupt_when_queued() -> None:
        wait_until(lambda: lock_info(daemon)["waiting"] == 1, "the main thread queued")
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = start(interrupt_when_queued, "interrupter")
    try:
        with pytest.raises(KeyboardInterrupt):
            counter.ping()  # waits for holder-thread, in the FIFO queue once it waited 1 ms
    finally:
        release.set()
        assert not joined([interrupter, holder])

    call_from_other_thread(counter.ping, "third-caller")
    assert lock_info(daemon) == {"holder": None, "waiting": 0, "fifo": False}
    assert counter.calls == 1 and counter.overlaps == 0


def test_ctrl_c_while_waiting_leaves_later_waiters_in_order(
    daemon: ld.LabDaemon, counter: Counter, restore_sigint: None
) -> None:
    """The interrupted caller was queued between two others: both still get their turn."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.get_ident()
    entered, release = threading.Event(), threading.Event()
    holder = start(lambda: counter.hold(entered, release), "holder-thread")
    assert entered.wait(WAIT_S)
    order: list[str] = []
    def ping_then(label: str) -> None:
        counter.ping()
        order.append(label)

    first = start(lambda: ping_then("first"), "first-waiter")
    wait_until(lambda: lock_info(daemon)["waiting"] == 1, "first-waiter queued")

    def interrupt_when_queued() -> None:
        wait_until(lambda: lock_info(daemon)["waiting"] == 2, "the main thread queued")
        signal.pthread_kill(main, signal.SIGINT)

    interrupter = start(interrupt_when_queued, "interrupter")
    threads = [first, interrupter, holder]
    try:
        with pytest.raises(KeyboardInterrupt):
            counter.ping()
        assert lock_info(daemon)["waiting"] == 1  # only first-waiter is left
        last = start(lambda: ping_then("last"), "last-waiter")
        threads.append(last)
        wait_until(lambda: lock_info(daemon)["waiting"] == 2, "last-waiter queued")
    finally:
        release.set()
        assert not joined(threads)
    assert order == ["first", "last"]
    assert lock_info(daemon) == {"holder": None, "waiting": 0, "fifo": False}


# -- interrupts at random points, under stress ---------------------------------------------


class Injector:
    """Sends SIGINT to the main thread, one at a time, at random moments.

    The handler raises :class:`Interrupted` only when the signal lands inside a device call
    (a labd wrapper frame is on the stack), so the test's own loop is never interrupted. It
    also records where each interrupt landed, to show the test reached the risky points.
    """

    def __init__(self, lock_owned: Callable[[], bool]) -> None:
        self.main = threading.get_ident()
        self.lock_owned = lock_owned
        self.handled = 0  # handler runs (written by the main thread only)
        self.raised = 0  # ... of which raised Interrupted
        self.caught = 0  # ... and the main loop caught it (main thread only)
        self.holding = 0  # landed while the main thread held the device lock
        self.queued = 0  # landed while the main thread waited in the fair queue
        self.stop = False
        self.error: str | None = None
        self.rng = random.Random(7)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        names = []
        in_call = False
        while frame is not None:
            names.append(frame.f_code.co_name)
            in_call = in_call or frame.f_code.co_filename.startswith("<labd wrapper")
            frame = frame.f_back
        if in_call:
            if self.lock_owned():
                self.holding += 1
            elif any(name in ("_acquire_in_turn", "acquire_slow") for name in names):
                self.queued += 1
            self.raised += 1
        # Counted last: the injector sends the next signal only after this and the catch.
        self.handled += 1
        if in_call:
            raise Interrupted

    def run(self) -> None:
        try:
            while not self.stop:
                self._send()
                self._wait(lambda: self.caught >= self.raised or self.stop, "the loop caught it")
                for _ in range(self.rng.randrange(400)):  # a random moment for the next one
                    pass
                if self.rng.random() < 0.3:
                    time.sleep(0)
        except AssertionError as exc:
            self.error = str(exc)

    def enough(self) -> bool:
        """Enough interrupts landed in device calls, and enough at each risky point."""
        return self.raised >= STRESS_INTERRUPTS and min(self.holding, self.queued) >= STRESS_EACH

    def _send(self) -> None:
        sent = self.handled
        signal.pthread_kill(self.main, signal.SIGINT)
        self._wait(lambda: self.handled > sent or self.stop, "the handler ran")

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert time.monotonic() < deadline, f"injector: {what} did not happen in {WAIT_S} s"
            time.sleep(0)


@pytest.mark.parametrize("call_timeout", [None, 30.0], ids=["plain", "bounded"])
def test_interrupts_at_random_points_never_jam_the_device(
    daemon: ld.LabDaemon, counter: Counter, restore_sigint: None, call_timeout: float | None
) -> None:
    daemon.set_call_timeout("c1", call_timeout)
    rlock: Any = counter._ld_lock  # type: ignore[attr-defined]
    injector = Injector(rlock._is_owned)
    contender_errors: list[BaseException] = []
    stop_contenders = threading.Event()

    def contend(call: Callable[[], object]) -> None:
        try:
            while not stop_contenders.is_set():
                call()
        except BaseException as exc:  # reported below
            contender_errors.append(exc)

    def dwell_now_and_then() -> None:
        """Hold the lock 2 ms in every 6 ms: the main thread both queues and finds it free."""
        counter.dwell(0.002)
        time.sleep(0.004)

    previous_interval = sys.getswitchinterval()
    signal.signal(signal.SIGINT, injector.handler)
    sys.setswitchinterval(1e-6)
    threads = [
        start(lambda: contend(dwell_now_and_then), "dweller"),
        start(lambda: contend(counter.ping), "pinger"),
    ]
    try:
        threads.append(start(injector.run, "injector"))
        deadline = time.monotonic() + STRESS_WATCHDOG_S
        while injector.error is None and time.monotonic() < deadline and not injector.enough():
            try:
                counter.ping()
            except Interrupted:
                injector.caught += 1
    finally:
        injector.stop = True
        stop_contenders.set()
        blocked = joined(threads, timeout=2 * WAIT_S)
        sys.setswitchinterval(previous_interval)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late signal must not hit pytest

    where = (f"{injector.raised} interrupts in calls: {injector.holding} while holding the "
             f"lock, {injector.queued} while queued")
    assert injector.error is None, injector.error
    assert not blocked, f"threads blocked on the device after the interrupts ({where}): {blocked}"
    assert not contender_errors, f"{contender_errors!r} ({where})"
    assert counter.overlaps == 0, f"calls overlapped {counter.overlaps} times ({where})"
    assert lock_info(daemon) == {"holder": None, "waiting": 0, "fifo": False}, where
    call_from_other_thread(counter.ping, "caller-after-the-storm")
    assert injector.enough(), (
        f"the stress loop hit its {STRESS_WATCHDOG_S:g} s watchdog: only {where}"
    )
