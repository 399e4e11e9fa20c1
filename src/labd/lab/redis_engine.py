"""The Redis coordinator: the lab's state in Redis 7 or Valkey, through ``redis-py``.

Imported only when a node is given a ``redis://`` or ``rediss://`` engine, so labd's core
never imports ``redis`` (it is the optional extra ``labd[lab]``). Claims, the directory's
registration and renewals are Lua scripts (:mod:`labd.lab.scripts`), each one atomic step
in the engine; requests and replies are lists (``RPUSH``/``BLPOP``); streams are capped
Redis Streams (``XADD MAXLEN ~``). Every connection is outbound from the node.

    coordinator = RedisCoordinator("redis://labd-node1:secret@lab-engine:6379/0")
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import redis
import redis.exceptions

from labd.lab import scripts
from labd.lab.coordinator import ClaimHolder, ClaimOutcome, ClaimSpec, StreamEntry
from labd.lab.errors import (
    DeviceIdConflictError,
    EngineUnavailableError,
    NodeNameConflictError,
)
from labd.lab.settings import describe_engine

__all__ = ["RedisCoordinator"]

log = logging.getLogger("labd.lab")

T = TypeVar("T")
Arg = bytes | str | int | float
_US = "\x1f"
#: Longest single blocking pop; longer waits loop, so a silent engine is noticed.
_BLOCK_SLICE_S = 1.0
#: A request list expires this long after its last request (its node never came back).
_REQUEST_LIST_TTL_MS = 120_000
_ENGINE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                  OSError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCoordinator:
    """The coordinator on a Redis-protocol engine; see the module docstring."""

    def __init__(
        self, url: str, *, prefix: str = "labd:", socket_timeout: float = 5.0,
        client: redis.Redis | None = None,
    ) -> None:
        self.description = describe_engine(url)
        self.prefix = prefix
        # ``client``: an already made client (tests pass a fakeredis one).
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=min(socket_timeout, 2.0),
            retry_on_timeout=False, health_check_interval=0)
        self._claim = self._client.register_script(scripts.CLAIM)
        self._renew = self._client.register_script(scripts.RENEW)
        self._release = self._client.register_script(scripts.RELEASE)
        self._register = self._client.register_script(scripts.REGISTER)
        self._unregister = self._client.register_script(scripts.UNREGISTER)
        self._push_expire = self._client.register_script(scripts.PUSH_EXPIRE)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.exceptions.AuthenticationError as exc:
            raise EngineUnavailableError(
                f"The lab's engine {self.description} refused this node's credentials ({what}: "
                f"{exc}). Check the ACL user and password in the engine URL (docs/multi-host.md)."
            ) from exc
        except redis.exceptions.NoPermissionError as exc:
            raise EngineUnavailableError(
                f"The lab's engine {self.description} does not let this node's ACL user do "
                f"{what} ({exc}). Give the user ~labd:* &labd:* and the commands of "
                "docs/multi-host.md."
            ) from exc
        except _ENGINE_ERRORS as exc:
            raise EngineUnavailableError(
                f"The lab's engine {self.description} did not answer ({what}: "
                f"{type(exc).__name__}: {exc}). Check that it runs and that this PC reaches it; "
                "this node keeps serving its own devices and reconnects by itself."
            ) from exc

    def ping(self) -> None:
        """See :meth:`Coordinator.ping`."""
        self._call("PING", self._client.ping)

    # -- directory -------------------------------------------------------------------------
    def register(
        self, node: str, info: Mapping[str, Any], device_ids: Sequence[str], ttl: float,
        instance: str = "",
    ) -> None:
        """See :meth:`Coordinator.register`."""
        args: list[Arg] = [self.prefix, node, int(ttl * 1000), orjson.dumps(dict(info)),
                           instance, *device_ids]
        answer = self._call("register", lambda: self._register(args=args))
        if int(answer[0]) == 0:
            raise DeviceIdConflictError(_text(answer[1]), _text(answer[2]))
        if int(answer[0]) == 2:
            raise NodeNameConflictError(node)

    def unregister(self, node: str, device_ids: Sequence[str], instance: str = "") -> None:
        """See :meth:`Coordinator.unregister`."""
        self._call("unregister",
                   lambda: self._unregister(args=[self.prefix, node, instance, *device_ids]))

    def nodes(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Coordinator.nodes` (a SCAN of the node keys; a lab has few)."""
        def read() -> dict[str, dict[str, Any]]:
            keys = list(self._client.scan_iter(match=f"{self.prefix}node:*", count=500))
            if not keys:
                return {}
            values = self._client.mget(keys)
            found = {}
            for key, value in zip(keys, values, strict=True):
                if value is not None:
                    found[_text(key)[len(self.prefix) + 5:]] = orjson.loads(value)
            return found
        return self._call("list nodes", read)

    def node_of(self, device_id: str) -> str | None:
        """See :meth:`Coordinator.node_of`."""
        value = self._call("find a device's node",
                           lambda: self._client.get(f"{self.prefix}dev:{device_id}"))
        return None if value is None else _text(value)

    def publish(self, event: Mapping[str, Any]) -> None:
        """See :meth:`Coordinator.publish` (Redis pub/sub on ``<prefix>events``)."""
        self._call("publish", lambda: self._client.publish(f"{self.prefix}events",
                                                            orjson.dumps(dict(event))))

    def listen(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """See :meth:`Coordinator.listen`: one thread on Redis pub/sub, resubscribing after an
        engine outage (events sent meanwhile are lost, as hints may be)."""
        stop = threading.Event()
        channel = f"{self.prefix}events"

        def run() -> None:
            backoff = 0.2
            while not stop.is_set():
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
                try:
                    pubsub.subscribe(channel)
                    backoff = 0.2
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message is not None and message.get("type") == "message":
                            try:
                                callback(orjson.loads(message["data"]))
                            except Exception:
                                log.exception("lab: an event listener failed")
                except (*_ENGINE_ERRORS, redis.exceptions.RedisError) as exc:
                    # Away, or an ACL without SUBSCRIBE: the hints are lost, the heartbeat
                    # still re-reads the directory.
                    log.debug("lab: event channel unavailable: %r", exc)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                finally:
                    try:
                        pubsub.close()
                    except (*_ENGINE_ERRORS, redis.exceptions.RedisError):
                        pass

        thread = threading.Thread(target=run, name="labd-lab-events", daemon=True)
        thread.start()

        def stop_listening() -> None:
            stop.set()
            try:  # wakes the listener's blocking read at once
                self._client.publish(channel, b'{"event": "wake"}')
            except (*_ENGINE_ERRORS, redis.exceptions.RedisError):
                pass  # it notices within its 0.5 s read timeout
            thread.join(2.0)
        return stop_listening

    # -- claims ----------------------------------------------------------------------------
    def claim(
        self, spec: ClaimSpec, device_ids: Sequence[str], ttl: float, ticket: int | None = None,
    ) -> ClaimOutcome:
        """See :meth:`Coordinator.claim`."""
        args: list[Arg] = [
                self.prefix, spec.owner_key, spec.label, spec.kind, spec.owner_id, spec.node,
                max(int(ttl * 1000), 1), "" if ticket is None else str(ticket),
                *dict.fromkeys(device_ids)]
        answer = self._call("claim", lambda: self._claim(args=args))
        if int(answer[0]) == 1:
            return ClaimOutcome(int(answer[1]))
        busy = tuple(
            ClaimHolder(_text(dev), _text(key), _text(label), _text(kind), _text(oid), _text(node),
                        float(since), int(token))
            for dev, key, label, kind, oid, node, since, token in answer[1])
        return ClaimOutcome(None, busy)

    def enqueue(self, spec: ClaimSpec, device_ids: Sequence[str], ttl: float) -> int:
        """See :meth:`Coordinator.enqueue`."""
        def enqueue() -> int:
            ticket = int(self._client.incr(f"{self.prefix}tickets"))
            self._set_waiter(ticket, spec, device_ids, ttl, None)
            self._client.zadd(f"{self.prefix}queue", {str(ticket): ticket})
            return ticket
        return self._call("queue a claim", enqueue)

    def _set_waiter(
        self, ticket: int, spec: ClaimSpec, device_ids: Sequence[str], ttl: float,
        since: float | None,
    ) -> None:
        if since is None:
            seconds, micros = self._client.time()
            since = seconds + micros / 1e6
        desc = _US.join([spec.owner_key, spec.label, spec.kind, spec.owner_id, spec.node,
                         f"{since:.6f}", " ".join(device_ids)])
        self._client.set(f"{self.prefix}waiter:{ticket}", desc, px=max(int(ttl * 1000), 1))

    def refresh_waiter(
        self, ticket: int, spec: ClaimSpec, device_ids: Sequence[str], ttl: float,
    ) -> None:
        """See :meth:`Coordinator.refresh_waiter`."""
        def refresh() -> None:
            key = f"{self.prefix}waiter:{ticket}"
            if not self._client.pexpire(key, max(int(ttl * 1000), 1)):
                # Expired (a long pause, an engine restart): queue again under the same ticket.
                self._set_waiter(ticket, spec, device_ids, ttl, None)
                self._client.zadd(f"{self.prefix}queue", {str(ticket): ticket})
        self._call("refresh a queued claim", refresh)

    def dequeue(self, ticket: int) -> None:
        """See :meth:`Coordinator.dequeue`."""
        def dequeue() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrem(f"{self.prefix}queue", str(ticket))
            pipe.delete(f"{self.prefix}waiter:{ticket}")
            pipe.execute()
        self._call("leave the claim queue", dequeue)

    def renew(self, device_ids: Sequence[str], token: int, ttl: float) -> list[str]:
        """See :meth:`Coordinator.renew`."""
        args: list[Arg] = [self.prefix, str(token), max(int(ttl * 1000), 1), *device_ids]
        lost = self._call("renew claims", lambda: self._renew(args=args))
        return [_text(device_id) for device_id in lost]

    def release(self, device_ids: Sequence[str], token: int) -> None:
        """See :meth:`Coordinator.release`."""
        args: list[Arg] = [self.prefix, str(token), *device_ids]
        self._call("release claims", lambda: self._release(args=args))

    def holder(self, device_id: str) -> ClaimHolder | None:
        """See :meth:`Coordinator.holder`."""
        fields = self._call("read a claim", lambda: self._client.hmget(
            f"{self.prefix}claim:{device_id}", "key", "label", "kind", "oid", "node", "since",
            "token"))
        if fields[0] is None:
            return None
        key, label, kind, oid, node, since, token = (_text(f) for f in fields)
        return ClaimHolder(device_id, key, label, kind, oid, node, float(since), int(token))

    # -- request / reply -------------------------------------------------------------------
    def push_request(self, node: str, payload: bytes) -> None:
        """See :meth:`Coordinator.push_request`."""
        def push() -> None:
            # The list lives a while after its last request, not forever: a node that died
            # leaves nothing behind in the engine's memory.
            key = f"{self.prefix}req:{node}"
            pipe = self._client.pipeline(transaction=False)
            pipe.rpush(key, payload)
            pipe.pexpire(key, _REQUEST_LIST_TTL_MS)
            pipe.execute()
        self._call("send a request", push)

    def _blocking_pop(self, key: str, timeout: float, what: str) -> bytes | None:
        remaining = timeout
        while True:
            wait = min(max(remaining, 0.0), _BLOCK_SLICE_S)
            if wait < 0.001:  # BLPOP's timeout 0 means forever: poll once instead
                found = self._call(what, lambda: self._client.lpop(key))
                return found if isinstance(found, bytes) else None
            answer: Any = self._call(what, functools.partial(self._client.blpop, [key], wait))
            if answer is not None:
                return bytes(answer[1])
            remaining -= wait
            if remaining <= 0:
                return None

    def pop_request(self, node: str, timeout: float) -> bytes | None:
        """See :meth:`Coordinator.pop_request`."""
        return self._blocking_pop(f"{self.prefix}req:{node}", timeout, "wait for requests")

    def exchange(self, node: str, payload: bytes, reply_key: str, wait: float) -> bytes | None:
        """See :meth:`Coordinator.exchange`: RPUSH and BLPOP pipelined (one round trip)."""
        wait = min(wait, _BLOCK_SLICE_S)
        if wait < 0.001:
            self.push_request(node, payload)
            return self.pop_reply(reply_key, 0.0)

        def exchange() -> bytes | None:
            key = f"{self.prefix}req:{node}"
            pipe = self._client.pipeline(transaction=False)
            pipe.rpush(key, payload)
            pipe.pexpire(key, _REQUEST_LIST_TTL_MS)
            pipe.blpop([f"{self.prefix}reply:{reply_key}"], wait)
            answer: Any = pipe.execute()[-1]
            return None if answer is None else bytes(answer[1])
        return self._call("send a request and wait for its reply", exchange)

    def push_reply(self, reply_key: str, payload: bytes, ttl: float) -> None:
        """See :meth:`Coordinator.push_reply`."""
        key = f"{self.prefix}reply:{reply_key}"
        self._call("send a reply", lambda: self._push_expire(
            keys=[key], args=[payload, max(int(ttl * 1000), 1)]))

    def pop_reply(self, reply_key: str, timeout: float) -> bytes | None:
        """See :meth:`Coordinator.pop_reply`."""
        return self._blocking_pop(f"{self.prefix}reply:{reply_key}", timeout, "wait for a reply")

    # -- streams ---------------------------------------------------------------------------
    def stream_add(self, stream: str, entries: Sequence[StreamEntry], maxlen: int) -> None:
        """See :meth:`Coordinator.stream_add` (``XADD MAXLEN ~``, one pipeline)."""
        def add() -> None:
            pipe = self._client.pipeline(transaction=False)
            for entry in entries:
                pipe.xadd(f"{self.prefix}stream:{stream}",
                          {"seq": entry.sequence, "ts": repr(entry.timestamp), "p": entry.payload},
                          maxlen=maxlen, approximate=True)
            pipe.execute()
        self._call("relay a stream", add)

    def stream_read(
        self, stream: str, after: str, timeout: float, count: int,
    ) -> list[StreamEntry]:
        """See :meth:`Coordinator.stream_read`."""
        block = max(int(min(timeout, _BLOCK_SLICE_S) * 1000), 1)
        key = f"{self.prefix}stream:{stream}"
        answer: Any = self._call("read a stream", lambda: self._client.xread(
            {key: after}, count=count, block=block))
        entries = []
        for _, items in answer or []:
            for entry_id, fields in items:
                entries.append(StreamEntry(_text(entry_id), int(fields[b"seq"]),
                                           float(fields[b"ts"]), fields[b"p"]))
        return entries

    def stream_tail(self, stream: str) -> str:
        """See :meth:`Coordinator.stream_tail` (``XREVRANGE ... COUNT 1``)."""
        newest: Any = self._call("read a stream's end", lambda: self._client.xrevrange(
            f"{self.prefix}stream:{stream}", count=1))
        return _text(newest[0][0]) if newest else "0"

    def stream_length(self, stream: str) -> int:
        """See :meth:`Coordinator.stream_length`."""
        return int(self._call("measure a stream",
                              lambda: self._client.xlen(f"{self.prefix}stream:{stream}")))

    def close(self) -> None:
        """Drop the connections. Idempotent."""
        self._client.close()
        self._client.connection_pool.disconnect()
