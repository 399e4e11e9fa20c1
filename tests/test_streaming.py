"""Streaming: one device stream fanned out to many subscribers, without blocking the device.

The fake devices here produce only what the test feeds them, from their own thread, so every
count is exact; SimDAQ (a free-running card that holds ``_ld_lock`` while producing) covers
the real-driver cases. Waits are bounded watchdogs (WAIT_S).
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest

import labd as ld
from labd.sim import demo_lab
from labd.streaming import StreamHub

WAIT_S = 5.0  # watchdog for every bounded wait; never reached when things work


# -- fakes --------------------------------------------------------------------------------


class FeedStreamer:
    """Streams exactly what the test feeds it (``_feed``), from its own producer thread."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.starts = 0
        self.stops = 0
        self.start_params: dict[str, Any] = {}
        self.producer_ident: int | None = None
        self._batches: queue.SimpleQueue[tuple[list[Any], threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def start_streaming(self, callback: Callable[[Any], object], **params: Any) -> None:
        self.starts += 1
        self.start_params = params
        self._thread = threading.Thread(target=self._produce, args=(callback,),
                                        name=f"feed-{self.device_id}")
        self._thread.start()

    def stop_streaming(self, timeout: float | None = None) -> None:
        self.stops += 1
        thread, self._thread = self._thread, None
        if thread is not None:
            self._batches.put(None)
            thread.join(timeout)

    def is_streaming(self) -> bool:
        return self._thread is not None

    def _produce(self, callback: Callable[[Any], object]) -> None:
        self.producer_ident = threading.get_ident()
        while (batch := self._batches.get()) is not None:
            payloads, done = batch
            for payload in payloads:
                callback(payload)
            done.set()

    def _feed(self, payloads: Iterable[Any]) -> None:
        """Have the producer thread publish ``payloads``; return once it has (watchdog)."""
        done = threading.Event()
        self._batches.put((list(payloads), done))
        assert done.wait(WAIT_S), "the device thread was blocked while publishing"

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()


class LockHoldingStreamer:
    """A driver whose acquisition thread holds ``_ld_lock`` for as long as it streams."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self._ld_lock: Any = threading.RLock()  # replaced by the daemon's device lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_streaming(self, callback: Callable[[Any], object]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._acquire, args=(callback, self._stop),
                                        name=f"lock-holder-{self.device_id}")
        self._thread.start()

    def stop_streaming(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _acquire(self, callback: Callable[[Any], object], stop: threading.Event) -> None:
        index = 0
        with self._ld_lock:
            while not stop.is_set():
                callback(index)
                index += 1
                stop.wait(0.001)


class BrokenStreamer:
    """``start_streaming`` fails, as a driver whose card is not there."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def start_streaming(self, callback: Callable[[Any], object]) -> None:
        raise OSError("no DAQ card in slot 3")

    def stop_streaming(self, timeout: float | None = None) -> None:
        pass


class WedgedStreamer:
    """Streams nothing; its ``stop_streaming`` fails, as a driver whose card hung."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def start_streaming(self, callback: Callable[[Any], object]) -> None:
        pass

    def stop_streaming(self, timeout: float | None = None) -> None:
        raise OSError("card does not answer")


class NotAStreamer:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    def get_value(self) -> int:
        return 1


class Collector:
    """A callback that records payloads and delivery threads and can wait for a count."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self._cond = threading.Condition()
        self.payloads: list[Any] = []
        self.idents: set[int] = set()
        self.entered = threading.Event()
        self._block = block

    def __call__(self, payload: Any) -> None:
        with self._cond:
            self.payloads.append(payload)
            self.idents.add(threading.get_ident())
            self._cond.notify_all()
        self.entered.set()
        if self._block is not None:
            assert self._block.wait(WAIT_S), "the test never released the blocked callback"

    def wait_for(self, count: int) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.payloads) >= count, WAIT_S)
            assert ok, f"got {len(self.payloads)} of {count} items within {WAIT_S} s"
            return list(self.payloads)


class EventWatch:
    """Collects ``daemon.events`` payloads and waits (bounded) for one that matches."""

    def __init__(self, daemon: ld.LabDaemon) -> None:
        self._cond = threading.Condition()
        self.seen: list[dict[str, Any]] = []
        self.sub = daemon.events.subscribe(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.seen.append(event)
            self._cond.notify_all()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next((e for e in self.seen if match(e)), None), WAIT_S
            )
        assert found is not None, f"no {what} event within {WAIT_S} s; saw {self.seen}"
        return found

    def count(self, name: str, device_id: str) -> int:
        with self._cond:
            return sum(1 for e in self.seen
                       if e["event"] == name and e.get("device_id") == device_id)

    def close(self) -> None:
        self.sub.close()
        assert self.sub.join(WAIT_S)


def take(sub: ld.Subscription, count: int) -> list[ld.StreamItem]:
    items = []
    for _ in range(count):
        item = sub.get(timeout=WAIT_S)
        assert item is not None, f"got {len(items)} of {count} items within {WAIT_S} s"
        items.append(item)
    return items


@pytest.fixture
def rig(daemon: ld.LabDaemon) -> ld.LabDaemon:
    daemon.register_plugins(devices={
        "Feed": FeedStreamer, "LockHolder": LockHoldingStreamer,
        "Broken": BrokenStreamer, "Wedged": WedgedStreamer, "Plain": NotAStreamer,
    })
    daemon.add_device("feed", "Feed")
    return daemon


@pytest.fixture
def feed(rig: ld.LabDaemon) -> FeedStreamer:
    device: FeedStreamer = rig.get_device("feed")
    return device


@pytest.fixture
def events(rig: ld.LabDaemon) -> Iterator[EventWatch]:
    watch = EventWatch(rig)
    yield watch
    watch.close()


# -- subscribe, fan-out, start/stop ---------------------------------------------------------


def test_subscribers_share_one_stream_and_its_sequence_numbers(rig: ld.LabDaemon,
                                                                feed: FeedStreamer) -> None:
    first = rig.subscribe("feed", maxsize=100, gain=2)
    second = rig.subscribe(feed, maxsize=100)

    assert feed.starts == 1 and feed.start_params == {"gain": 2}
    feed._feed(["a", "b", "c", "d", "e"])

    one, two = take(first, 5), take(second, 5)
    assert [i.sequence for i in one] == [i.sequence for i in two] == [1, 2, 3, 4, 5]
    assert [i.payload for i in one] == [i.payload for i in two] == list("abcde")
    assert [i.timestamp for i in one] == [i.timestamp for i in two]
    assert (first.delivered, second.delivered, first.dropped) == (5, 5, 0)
    stream = rig.stream_hub("feed")
    assert stream is not None and stream.stats()["subscribers"] == 2
    first.close()
    second.close()


def test_simdaq_subscribers_see_the_same_blocks_under_the_same_numbers(
    daemon: ld.LabDaemon,
) -> None:
    demo_lab(daemon, daq_rate=50_000.0, daq_block_size=100)
    early = daemon.subscribe("daq1", maxsize=10_000)
    take(early, 1)  # the card is running
    late = daemon.subscribe("daq1", maxsize=10_000)

    late_items = take(late, 3)
    early_items = [i for i in take(early, late_items[-1].sequence - 1)
                   if i.sequence >= late_items[0].sequence]

    assert [i.sequence for i in early_items] == [i.sequence for i in late_items]
    assert all(a.payload is b.payload for a, b in zip(early_items, late_items, strict=True))
    assert [i.payload["index"] for i in late_items] == [i.sequence - 1 for i in late_items]
    assert isinstance(late_items[0].payload["samples"], np.ndarray)
    early.close()
    late.close()
    daemon.stop_streaming("daq1")


def test_start_streaming_on_a_streaming_device_adds_a_subscriber(rig: ld.LabDaemon,
                                                                  feed: FeedStreamer) -> None:
    pulled = rig.subscribe("feed")
    first, second = Collector(), Collector()

    rig.start_streaming("feed", first)
    rig.start_streaming(feed, second)

    assert feed.starts == 1  # joined, never restarted
    feed._feed(range(3))
    assert first.wait_for(3) == second.wait_for(3) == [0, 1, 2]
    assert [i.payload for i in take(pulled, 3)] == [0, 1, 2]
    rig.stop_streaming("feed")
    assert feed.stops == 1


def test_stop_streaming_ends_every_subscription_and_stops_the_device(
    rig: ld.LabDaemon, feed: FeedStreamer, events: EventWatch
) -> None:
    pulls = [rig.subscribe("feed"), rig.subscribe("feed")]
    collector = Collector()
    pushed = rig.subscribe("feed", collector)
    feed._feed(["x"])
    collector.wait_for(1)

    rig.stop_streaming("feed", timeout=WAIT_S)

    assert feed.stops == 1 and not feed._alive()
    assert rig.stream_hub("feed") is None
    for sub in [*pulls, pushed]:
        assert sub.closed
    assert pushed.join(WAIT_S)  # its delivery thread ended
    for sub in pulls:
        leftover = sub.drain()
        assert [i.payload for i in leftover] == ["x"]  # queued items stay readable
        assert sub.get(timeout=WAIT_S) is None  # then the closed subscription says so
    events.wait_for(lambda e: e["event"] == "stream_stopped", "stream_stopped")
    rig.stop_streaming("feed")  # no effect when not streaming
    assert feed.stops == 1
    assert not rig.device_info("feed")["streaming"]


def test_a_subscription_started_stream_stops_when_its_last_subscriber_leaves(
    rig: ld.LabDaemon, feed: FeedStreamer, events: EventWatch
) -> None:
    first, second = rig.subscribe("feed"), rig.subscribe("feed")

    first.close()
    assert rig.stream_hub("feed") is not None and feed.stops == 0  # one subscriber is left
    feed._feed([1])
    assert second.get(timeout=WAIT_S) is not None

    second.close()

    events.wait_for(lambda e: e["event"] == "stream_stopped" and e["device_id"] == "feed",
                    "stream_stopped")
    assert feed.stops == 1 and not feed._alive() and rig.stream_hub("feed") is None


def test_a_start_streaming_stream_keeps_running_when_subscribers_leave(
    rig: ld.LabDaemon, feed: FeedStreamer, events: EventWatch
) -> None:
    collector = Collector()
    joined = rig.subscribe("feed")  # the stream starts unpinned...
    pinned = rig.start_streaming("feed", collector)  # ...and start_streaming pins it
    other = rig.subscribe("feed")

    joined.close()
    other.close()
    feed._feed(["still here"])
    assert collector.wait_for(1) == ["still here"]
    pinned.close()  # even the last subscriber leaving does not stop it

    assert rig.stream_hub("feed") is not None and feed.stops == 0 and feed._alive()
    assert events.count("stream_stopped", "feed") == 0
    late = rig.subscribe("feed")
    feed._feed(["later"])
    assert late.get(timeout=WAIT_S) is not None
    rig.stop_streaming("feed")
    assert feed.stops == 1 and late.closed


def test_callbacks_run_on_delivery_threads_not_the_device_thread(rig: ld.LabDaemon,
                                                                  feed: FeedStreamer) -> None:
    first, second = Collector(), Collector()
    subs = [rig.subscribe("feed", first), rig.subscribe("feed", second)]

    feed._feed(range(5))

    first.wait_for(5)
    second.wait_for(5)
    assert feed.producer_ident is not None
    assert len(first.idents) == len(second.idents) == 1
    assert first.idents.isdisjoint(second.idents)  # one delivery thread per subscriber
    for idents in (first.idents, second.idents):
        assert feed.producer_ident not in idents
        assert threading.get_ident() not in idents
    for sub in subs:
        sub.close()


def test_slow_subscribers_lose_only_their_own_data(rig: ld.LabDaemon, feed: FeedStreamer) -> None:
    release = threading.Event()
    blocked = Collector(block=release)
    fast = Collector()
    never_read = rig.subscribe("feed", maxsize=10)
    stuck = rig.subscribe("feed", blocked, maxsize=10)
    quick = rig.subscribe("feed", fast, maxsize=5_000)
    feed._feed([0])
    assert blocked.entered.wait(WAIT_S)  # the blocked callback now holds item 0 forever

    feed._feed(range(1, 1000))  # returns: the device is never held up by a subscriber

    assert fast.wait_for(1000) == list(range(1000))  # the fast subscriber got everything
    assert (len(never_read), never_read.delivered, never_read.dropped) == (10, 0, 990)
    assert (len(stuck), stuck.delivered, stuck.dropped) == (10, 1, 989)
    assert [i.sequence for i in never_read.drain()] == list(range(991, 1001))  # newest kept
    stats = rig.device_info("feed")["stream"]
    assert stats["published"] == 1000 and stats["dropped"] == 990 + 989
    assert {s["name"]: s["dropped"] for s in stats["subscriptions"]}[stuck.name] == 989
    assert quick.dropped == 0
    release.set()
    assert blocked.wait_for(11)[-1] == 999  # it resumes with its newest items
    for sub in (never_read, stuck, quick):
        sub.close()


def test_a_raising_callback_is_recorded_and_delivery_continues(
    rig: ld.LabDaemon, feed: FeedStreamer, events: EventWatch
) -> None:
    records: list[ld.ErrorRecord] = []
    rig.add_error_listener(records.append)
    seen: list[int] = []
    done = threading.Event()

    def fragile(payload: int) -> None:
        if payload == 2:
            raise ZeroDivisionError("subscriber bug on item 2")
        seen.append(payload)
        if payload == 4:
            done.set()

    sub = rig.subscribe("feed", fragile)
    feed._feed([1, 2, 3, 4])

    assert done.wait(WAIT_S)
    assert seen == [1, 3, 4] and sub.callback_errors == 1 and sub.delivered == 4
    event = events.wait_for(lambda e: e["event"] == "callback_error", "callback_error")
    assert event["device_id"] == "feed" and event["error"]["origin"] == "callback"
    [record] = records
    assert (record.origin, record.type) == ("callback", "ZeroDivisionError")
    assert "item 2" in record.message and record.context["device_id"] == "feed"
    assert record.context["subscription"] == sub.name and "fragile" in (record.traceback or "")
    assert rig.get_device_error("feed") is None  # the device did nothing wrong
    sub.close()


# -- drivers that hold the device lock -------------------------------------------------------


def stop_in_thread(daemon: ld.LabDaemon, device_id: str) -> None:
    """Call ``daemon.stop_streaming`` on a helper thread; fail (not hang) on a deadlock."""
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            daemon.stop_streaming(device_id, timeout=WAIT_S)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=stop, name="stopper")
    thread.start()
    thread.join(2 * WAIT_S)
    assert not thread.is_alive(), f"stop_streaming({device_id!r}) deadlocked"
    assert errors == []


def test_stopping_a_driver_thread_that_holds_the_device_lock(rig: ld.LabDaemon) -> None:
    device = rig.add_device("holder", "LockHolder")
    sub = rig.subscribe("holder")
    assert sub.get(timeout=WAIT_S) is not None  # the driver thread now holds _ld_lock
    assert rig.device_info("holder")["lock"]["holder"] == "lock-holder-holder"

    stop_in_thread(rig, "holder")

    assert device._thread is not None and not device._thread.is_alive()
    assert sub.closed and rig.device_info("holder")["lock"]["holder"] is None


def test_stopping_simdaq_which_takes_its_lock_for_every_block(daemon: ld.LabDaemon) -> None:
    demo_lab(daemon, daq_rate=100_000.0, daq_block_size=50)
    daq = daemon.get_device("daq1")
    collector = Collector()
    daemon.start_streaming(daq, collector)
    collector.wait_for(20)

    stop_in_thread(daemon, "daq1")

    assert not daq.is_streaming() and daemon.stream_hub("daq1") is None
    assert daq.read_block().shape == (50,)  # the lock is free again


def test_a_failing_driver_stop_still_ends_every_subscription(rig: ld.LabDaemon,
                                                             events: EventWatch) -> None:
    rig.add_device("wedged", "Wedged")
    pulled = rig.subscribe("wedged")
    pushed = rig.subscribe("wedged", Collector())

    with pytest.raises(ld.DeviceOperationError, match="card does not answer") as info:
        rig.stop_streaming("wedged")

    assert isinstance(info.value.__cause__, OSError)
    assert pulled.closed and pushed.closed and pushed.join(WAIT_S)  # no delivery thread left
    assert rig.stream_hub("wedged") is None
    record = rig.get_device_error("wedged")
    assert record is not None and record.context["method"] == "stop_streaming"
    events.wait_for(lambda e: e["event"] == "stream_stopped" and e["device_id"] == "wedged",
                    "stream_stopped")


def test_shutdown_stops_streams() -> None:
    daemon = ld.LabDaemon()
    daemon.register_plugins(devices={"Feed": FeedStreamer})
    feed: FeedStreamer = daemon.add_device("feed", "Feed")
    pulled = daemon.subscribe("feed")
    collector = Collector()
    pushed = daemon.start_streaming("feed", collector)
    feed._feed([1])
    collector.wait_for(1)

    report = daemon.shutdown(timeout=WAIT_S)

    assert report.clean, str(report)
    assert feed.stops == 1 and not feed._alive()
    assert pulled.closed and pushed.closed and pushed.join(WAIT_S)


# -- bad input -----------------------------------------------------------------------------


def test_bad_subscriptions_raise_and_leave_no_stream(rig: ld.LabDaemon, feed: FeedStreamer) -> None:
    rig.add_device("plain", "Plain")
    rig.add_device("broken", "Broken")

    with pytest.raises(ld.DeviceOperationError, match=r"^Device 'plain' does not support streaming"):
        rig.subscribe("plain")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="maxsize"):
            rig.subscribe("feed", maxsize=bad)
    with pytest.raises(ld.InvalidArgumentError, match="callable"):
        rig.subscribe("feed", "not a function")  # type: ignore[arg-type]
    with pytest.raises(ld.InvalidArgumentError, match="callable"):
        rig.start_streaming("feed", None)  # type: ignore[arg-type]
    with pytest.raises(ld.UnknownDeviceError):
        rig.subscribe("nope")
    assert feed.starts == 0 and rig.stream_hub("feed") is None

    with pytest.raises(OSError, match="slot 3"):
        rig.subscribe("broken", Collector())  # its delivery thread must not leak
    assert rig.stream_hub("broken") is None
    record = rig.get_device_error("broken")
    assert record is not None and record.origin == "device"


def test_subscribe_refuses_maxsize_zero(rig: ld.LabDaemon, feed: FeedStreamer) -> None:
    try:
        with pytest.raises(ValueError, match="maxsize"):
            rig.subscribe("feed", maxsize=0)
        assert feed.starts == 0
    finally:
        rig.stop_streaming("feed")


# -- task streams --------------------------------------------------------------------------


class Reporter:
    """Sets ``started``, waits for ``go``, then reports progress and emits data."""

    def __init__(self, task_id: str, started: threading.Event, go: threading.Event) -> None:
        self.task_id = task_id
        self.started = started
        self.go = go

    def run(self, context: ld.TaskContext) -> dict[str, Any]:
        self.started.set()
        assert self.go.wait(WAIT_S)
        context.progress(1, 2, "half way")
        context.emit({"x": 1})
        context.progress(2, 2)
        return {"status": "completed"}


def until_finished(sub: ld.Subscription) -> list[ld.StreamItem]:
    items: list[ld.StreamItem] = []
    while not items or items[-1].payload["event"] != "finished":
        item = sub.get(timeout=WAIT_S)
        assert item is not None, f"no 'finished' event within {WAIT_S} s; got {items}"
        items.append(item)
    return items


def test_task_progress_and_data_fan_out_to_every_subscriber(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(tasks={"Reporter": Reporter})
    started, go = threading.Event(), threading.Event()
    handle = daemon.execute_task("rep", "Reporter", started=started, go=go)
    assert started.wait(WAIT_S)  # its "running" state event is already out
    first, second = daemon.subscribe_task("rep"), daemon.subscribe_task("rep")
    collector = Collector()
    pushed = daemon.subscribe_task("rep", collector)

    go.set()
    handle.wait(WAIT_S)

    one, two = until_finished(first), until_finished(second)
    assert [i.sequence for i in one] == [i.sequence for i in two]
    payloads = [i.payload for i in one]
    assert payloads == [i.payload for i in two]
    kinds = [p["event"] for p in payloads]
    assert kinds == ["progress", "data", "progress", "state", "finished"]
    assert payloads[0] == {"event": "progress", "task_id": "rep", "done": 1, "total": 2,
                           "fraction": 0.5, "message": "half way"}
    assert payloads[1]["data"] == {"x": 1} and payloads[3]["status"] == "completed"
    assert collector.wait_for(5) == payloads  # the callback subscriber got the same events
    assert handle.progress is not None and handle.progress["fraction"] == 1.0
    for sub in (first, second, pushed):
        sub.close()
    assert pushed.join(WAIT_S)


def test_shutdown_ends_task_stream_subscriptions() -> None:
    daemon = ld.LabDaemon()
    daemon.register_plugins(tasks={"Reporter": Reporter})
    started, go = threading.Event(), threading.Event()
    go.set()
    handle = daemon.execute_task("rep", "Reporter", started=started, go=go)
    pushed = daemon.subscribe_task("rep", Collector())
    try:
        handle.wait(WAIT_S)
        daemon.shutdown(timeout=WAIT_S)
        assert pushed.closed and pushed.join(WAIT_S)
    finally:
        pushed.close()
        daemon.shutdown(timeout=WAIT_S)


# -- trust under faults (issue 7) -------------------------------------------------------------


class SelfStreamer:
    """Streams on its own (no daemon hub); records whether each is_streaming() held its lock."""

    _ld_lock: Any  # injected by the daemon

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.lock_held: list[bool] = []

    def is_streaming(self) -> bool:
        self.lock_held.append(bool(self._ld_lock._is_owned()))
        return True


def test_device_info_asks_is_streaming_under_the_device_lock(daemon: ld.LabDaemon) -> None:
    daemon.register_plugins(devices={"Self": SelfStreamer})
    device: SelfStreamer = daemon.add_device("self1", "Self")

    assert daemon.device_info("self1")["streaming"] is True
    assert [info["streaming"] for info in daemon.list_devices()] == [True]

    assert device.lock_held == [True, True], "is_streaming() ran without the device lock"


def test_device_info_never_waits_for_a_busy_device_nor_probes_it_unlocked(
    daemon: ld.LabDaemon,
) -> None:
    daemon.register_plugins(devices={"Self": SelfStreamer})
    device: SelfStreamer = daemon.add_device("self1", "Self")
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:  # a long device call, or a driver thread holding _ld_lock
        with device._ld_lock:
            holding.set()
            release.wait(WAIT_S)

    holder = threading.Thread(target=hold_the_lock, name="test-lock-holder")
    holder.start()
    answers: list[dict[str, Any]] = []
    answered = threading.Event()
    try:
        assert holding.wait(WAIT_S)
        def ask() -> None:
            answers.append(daemon.device_info("self1"))
            answered.set()

        asker = threading.Thread(target=ask, name="test-asker")
        asker.start()
        assert answered.wait(WAIT_S), "device_info() waited for a busy device's lock"
        asker.join(WAIT_S)
        assert device.lock_held == [], "is_streaming() ran while another thread held the lock"
        assert answers[0]["streaming"] is False  # nothing known yet: the last answer stands
    finally:
        release.set()
        holder.join(WAIT_S)
    assert daemon.device_info("self1")["streaming"] is True
    assert device.lock_held == [True]


def test_concurrent_publishers_reach_every_subscriber_and_replay_in_sequence_order() -> None:
    publishers, per_thread = 4, 20_000
    total = publishers * per_thread
    hub = StreamHub("stress", history=total)
    subs = [hub.subscribe(maxsize=total) for _ in range(3)]
    start = threading.Barrier(publishers)

    def publish() -> None:
        start.wait(WAIT_S)
        for index in range(per_thread):
            hub.publish(index)

    threads = [threading.Thread(target=publish, name=f"test-publisher-{n}")
               for n in range(publishers)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), "publishers did not finish (watchdog)"

    everything = list(range(1, total + 1))
    for sub in subs:
        seen = [item.sequence for item in sub.drain()]
        out_of_order = sum(1 for a, b in itertools.pairwise(seen) if b <= a)
        assert out_of_order == 0, f"{sub.name}: {out_of_order} of {total} items out of order"
        assert seen == everything
    assert [item.sequence for item in hub.replay(0)] == everything
    for after in (1, total // 3, total - 5):
        assert [item.sequence for item in hub.replay(after)] == everything[after:]
    hub.close()
