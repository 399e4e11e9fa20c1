"""Fan-out of one stream (a device's data, a task's progress) to many subscribers.

The producer (a device's acquisition thread) calls :meth:`StreamHub.publish`, which never
blocks: it stamps the item with a sequence number and appends it to each subscriber's bounded
queue. A full queue drops *its own* oldest item and counts the drop, so a slow subscriber
loses only its data and never slows the device or the other subscribers.

The sequence is assigned, and the item enqueued to every subscriber and to the replay
history, under the hub's one lock: with several publishing threads every subscriber still
sees strictly increasing sequences, and a replay after ``Last-Event-ID`` skips nothing.

A subscriber either gets a delivery thread that runs its callback (``callback=...``), or is
pulled by its owner (the HTTP server) which is told when data arrives (``on_ready=...``).
``on_ready`` fires once, then stays quiet until the owner has drained and re-armed the
subscription (:meth:`Subscription.arm`), so a burst costs the producer one wake-up. The
server fans one such subscription out to all its SSE clients of the stream (see
``labd.server.fanout``) and reports them through :attr:`Subscription.fanout`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["DEFAULT_MAXSIZE", "FanoutStats", "StreamHub", "StreamItem", "Subscription"]

log = logging.getLogger(__name__)

#: Default per-subscriber queue length.
DEFAULT_MAXSIZE = 1000


class StreamItem(NamedTuple):
    """One published item: a per-stream sequence number, a wall-clock timestamp, the payload."""

    sequence: int
    timestamp: float
    payload: Any


class FanoutStats(NamedTuple):
    """The receivers a subscription hands its items on to (the server's SSE clients)."""

    receivers: int  # how many receivers share this subscription
    dropped: int  # items the receivers lost from their own bounded buffers
    detail: list[dict[str, Any]]  # one dict of counters per receiver


class Subscription:
    """One subscriber of a stream: a bounded queue plus either a callback thread or a pull API.

    ``delivered`` and ``dropped`` count this subscriber's items. :meth:`close` is idempotent.
    """

    def __init__(
        self,
        hub: StreamHub,
        maxsize: int,
        callback: Callable[[Any], object] | None,
        on_ready: Callable[[], None] | None,
        name: str,
    ) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive integer, got {maxsize!r}")
        self.hub = hub
        self.maxsize = maxsize
        self.name = name
        self.delivered = 0
        self.dropped = 0
        self.callback_errors = 0
        self.closed = False
        self._queue: deque[StreamItem] = deque(maxlen=maxsize)
        self._callback = callback
        self._on_ready = on_ready
        self._armed = on_ready is not None
        # A binary semaphore: held while the delivery thread has nothing to do.
        self._signal = threading.Lock()
        self._signal.acquire()
        self._thread: threading.Thread | None = None
        #: Set by an owner that fans this subscription out further (the server's SSE clients):
        #: their count and drops then show in the stream's stats.
        self.fanout: Callable[[], FanoutStats] | None = None
        if callback is not None:
            self._thread = threading.Thread(target=self._deliver_loop, name=name, daemon=True)

    # -- producer side (any thread, never blocks) ------------------------------------------
    def _offer(self, item: StreamItem) -> None:
        queue = self._queue
        if len(queue) == self.maxsize:
            self.dropped += 1  # deque(maxlen) discards the oldest on append
        queue.append(item)
        if self._armed:
            self._armed = False
            try:
                self._on_ready()  # type: ignore[misc]
            except Exception:
                log.exception("stream %s: on_ready hook failed", self.name)
        elif self._signal.locked():
            try:
                self._signal.release()
            except RuntimeError:  # another producer released it first
                pass

    # -- pull API (for the server) ---------------------------------------------------------
    def drain(self, limit: int | None = None) -> list[StreamItem]:
        """Take up to ``limit`` queued items, oldest first (counts them as delivered)."""
        out: list[StreamItem] = []
        queue = self._queue
        while queue and (limit is None or len(out) < limit):
            try:
                out.append(queue.popleft())
            except IndexError:
                break
        self.delivered += len(out)
        return out

    def arm(self) -> bool:
        """Ask for one ``on_ready`` call when data arrives or the stream ends.

        Returns False (and arms nothing) if data is already queued or the subscription closed:
        the caller must drain again instead of waiting. Armed first, checked second, so a
        producer (or :meth:`close`) racing this either sees the arm or is seen by the check.
        """
        self._armed = True
        if self._queue or self.closed:
            self._armed = False
            return False
        return True

    def get(self, timeout: float | None = None) -> StreamItem | None:
        """Block for the next item (pull mode without ``on_ready``); None on timeout or close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            items = self.drain(1)
            if items:
                return items[0]
            if self.closed:
                return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._signal.acquire(True, 0.25 if remaining is None else min(remaining, 0.25))

    def __len__(self) -> int:
        return len(self._queue)

    # -- callback delivery -----------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def _deliver_loop(self) -> None:
        callback = self._callback
        assert callback is not None
        queue = self._queue
        while True:
            try:
                item = queue.popleft()
            except IndexError:
                if self.closed:
                    return
                self._signal.acquire(True, 0.5)
                continue
            self.delivered += 1
            try:
                callback(item.payload)
            except Exception as exc:
                self.callback_errors += 1
                self.hub._callback_failed(self, exc)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop receiving; the delivery thread finishes what is queued and exits. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.hub._remove(self)
        self._wake()

    def _end(self) -> None:
        # Called by the hub when the whole stream ends.
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._on_ready is not None and self._armed:
            self._armed = False
            try:
                self._on_ready()
            except Exception:
                log.exception("stream %s: on_ready hook failed", self.name)
        if self._signal.locked():
            try:
                self._signal.release()
            except RuntimeError:
                pass

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the delivery thread to exit; True if it did (or there is none)."""
        thread = self._thread
        if thread is None or thread is threading.current_thread() or thread.ident is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters for this subscriber (and, for a fanned-out one, its receivers)."""
        stats: dict[str, Any] = {
            "name": self.name,
            "queued": len(self._queue),
            "maxsize": self.maxsize,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "callback_errors": self.callback_errors,
            "closed": self.closed,
        }
        fanout = self.fanout
        if fanout is not None:
            shared = fanout()
            stats["receivers"] = shared.receivers
            stats["receivers_dropped"] = shared.dropped
            stats["receiver_stats"] = shared.detail
        return stats


class StreamHub:
    """One stream fanned out to any number of :class:`Subscription` objects.

    ``on_empty`` is called (outside any hub lock) when the last subscription closes itself;
    ``on_callback_error(sub, exc)`` when a subscriber's callback raises.
    """

    def __init__(
        self,
        name: str,
        *,
        history: int = 0,
        on_empty: Callable[[StreamHub], None] | None = None,
        on_callback_error: Callable[[Subscription, BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self._subs: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.sequence = 0
        self.published = 0
        self.closed = False
        self._history: deque[StreamItem] | None = deque(maxlen=history) if history else None
        self._on_empty = on_empty
        self._on_callback_error = on_callback_error
        self._names = itertools.count(1)

    def subscribe(
        self,
        callback: Callable[[Any], object] | None = None,
        *,
        maxsize: int = DEFAULT_MAXSIZE,
        on_ready: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> Subscription:
        """Add a subscriber; with ``callback`` it gets its own delivery thread."""
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        label = name or f"labd-stream-{self.name}-{next(self._names)}"
        sub = Subscription(self, maxsize, callback, on_ready, label)
        with self._lock:
            if self.closed:
                raise RuntimeError(f"stream {self.name!r} has ended")
            self._subs = (*self._subs, sub)
        sub._start()
        return sub

    def publish(self, payload: Any) -> int:
        """Stamp ``payload`` and offer it to every subscriber; never blocks. Returns its sequence.

        Numbering and enqueueing happen under one lock, so concurrent publishers cannot put
        items into any queue (or the history) out of sequence order. The lock is held for a
        few appends per subscriber, never for a callback.
        """
        with self._lock:
            seq = next(self._counter)
            item = StreamItem(seq, time.time(), payload)
            self.sequence = seq
            self.published += 1
            if self._history is not None:
                self._history.append(item)
            for sub in self._subs:
                sub._offer(item)
        return seq

    @property
    def keeps_history(self) -> bool:
        """True when published items are kept for replay (``history`` > 0)."""
        return self._history is not None

    def replay(self, after: int) -> list[StreamItem]:
        """Items still in the history buffer with a sequence greater than ``after``."""
        if self._history is None:
            return []
        with self._lock:  # copying a deque that another thread appends to would raise
            history = list(self._history)
        return [item for item in history if item.sequence > after]

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """Current subscribers."""
        return self._subs

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            before = len(self._subs)
            self._subs = tuple(s for s in self._subs if s is not sub)
            now_empty = before > 0 and not self._subs and not self.closed
        if now_empty and self._on_empty is not None:
            self._on_empty(self)

    def _callback_failed(self, sub: Subscription, exc: BaseException) -> None:
        if self._on_callback_error is not None:
            self._on_callback_error(sub, exc)
        else:
            log.warning("stream %s: subscriber %s callback raised %r", self.name, sub.name, exc)

    def close(self, timeout: float | None = 1.0) -> list[Subscription]:
        """End the stream and every subscription; returns subscribers whose thread did not exit."""
        with self._lock:
            self.closed = True
            subs, self._subs = self._subs, ()
        for sub in subs:
            sub._end()
        deadline = None if timeout is None else time.monotonic() + timeout
        stuck = []
        for sub in subs:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not sub.join(remaining):
                stuck.append(sub)
        return stuck

    def stats(self) -> dict[str, Any]:
        """Sequence, counts and per-subscriber counters (drops included).

        ``subscribers`` and ``dropped`` count the receivers of fanned-out subscriptions (each
        SSE client) rather than the one subscription they share.
        """
        subs = [s.stats() for s in self._subs]
        return {
            "name": self.name,
            "sequence": self.sequence,
            "published": self.published,
            "subscribers": sum(s.get("receivers", 1) for s in subs),
            "dropped": sum(s["dropped"] + s.get("receivers_dropped", 0) for s in subs),
            "subscriptions": subs,
        }
