"""The Redis coordinator: the lab's state in Redis 7 or Valkey, through ``redis-py``.

Imported only when a node is given a ``redis://`` or ``rediss://`` engine, so labd's core
never imports ``redis`` (it is the optional extra ``labd[lab]``). Claims, the directory's
registration and renewals are Lua scripts (:mod:`labd.lab.scripts`), each one atomic step
in the engine; requests and replies are lists (``RPUSH``/``BLPOP``); streams are capped
Redis Streams (``XADD MAXLEN ~``). Every connection is outbound from the node.

    coordinator = RedisCoordinator("redis://labd-node1:secret@lab-engine:6379/0")
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
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
#: Connections of one event loop's client (calls waiting at once; more queue for one).
_ASYNC_CONNECTIONS = 64
_ENGINE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                  OSError)
#: What the engine answers when it is away or refuses this node (EngineUnavailableError).
_REFUSED = (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError,
            *_ENGINE_ERRORS)


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
        # exchange_async's connections, one link per event loop (a connection belongs to the
        # loop that made it); none without a URL of our own (a test's client).
        self._async_pool = None if client is not None else redis.asyncio.ConnectionPool.from_url(
            url, socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout, 2.0), retry_on_timeout=False,
            health_check_interval=0)
        self._links: dict[asyncio.AbstractEventLoop, _AsyncLink] = {}
        self._links_lock = threading.Lock()
        # The request workers' blocking commands, each on a connection of its thread's own.
        self._own = _ThreadLinks(self._client.connection_pool)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _REFUSED as exc:
            raise self._unavailable(what, exc) from exc

    def _unavailable(self, what: str, exc: BaseException) -> EngineUnavailableError:
        """The error for an engine that refused or did not answer ``what``."""
        if isinstance(exc, redis.exceptions.AuthenticationError):
            return EngineUnavailableError(
                f"The lab's engine {self.description} refused this node's credentials ({what}: "
                f"{exc}). Check the ACL user and password in the engine URL (docs/multi-host.md).")
        if isinstance(exc, redis.exceptions.NoPermissionError):
            return EngineUnavailableError(
                f"The lab's engine {self.description} does not let this node's ACL user do "
                f"{what} ({exc}). Give the user ~labd:* &labd:* and the commands of "
                "docs/multi-host.md.")
        return EngineUnavailableError(
            f"The lab's engine {self.description} did not answer ({what}: "
            f"{type(exc).__name__}: {exc}). Check that it runs and that this PC reaches it; "
            "this node keeps serving its own devices and reconnects by itself.")

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

    def _blocking_pop(
        self, key: str, timeout: float, what: str, own: bool = False,
    ) -> bytes | None:
        remaining = timeout
        while True:
            wait = min(max(remaining, 0.0), _BLOCK_SLICE_S)
            if wait < 0.001:  # BLPOP's timeout 0 means forever: poll once instead
                found = self._call(what, lambda: self._client.lpop(key))
                return found if isinstance(found, bytes) else None
            answer: Any = self._call(what, functools.partial(
                self._own.command, "BLPOP", key, wait) if own else functools.partial(
                self._client.blpop, [key], wait))
            if answer is not None:
                return bytes(answer[1])
            remaining -= wait
            if remaining <= 0:
                return None

    def pop_request(self, node: str, timeout: float) -> bytes | None:
        """See :meth:`Coordinator.pop_request`."""
        return self._blocking_pop(f"{self.prefix}req:{node}", timeout, "wait for requests",
                                  own=True)

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

    def _link(self) -> _AsyncLink | None:
        """The running loop's link (made on first use), or None without a URL of our own."""
        if self._async_pool is None:
            return None
        loop = asyncio.get_running_loop()
        with self._links_lock:
            link = self._links.get(loop)
            if link is None:
                link = self._links[loop] = _AsyncLink(self._async_pool)
            return link

    async def exchange_async(
        self, node: str, payload: bytes, reply_key: str, wait: float,
    ) -> bytes | None:
        """See :meth:`Coordinator.exchange_async`: the commands of :meth:`exchange` in one
        round trip on a connection of the loop's own (a test's client: no wait)."""
        link = self._link()
        if link is None:  # a test's in-memory client: nothing to await
            self.push_request(node, payload)
            return self.pop_reply(reply_key, 0.0)
        wait = min(wait, _BLOCK_SLICE_S)
        key, reply = f"{self.prefix}req:{node}", f"{self.prefix}reply:{reply_key}"
        # BLPOP's timeout 0 means forever: below a millisecond, look once instead.
        take: tuple[Arg, ...] = ("BLPOP", reply, wait) if wait >= 0.001 else ("LPOP", reply)
        try:
            answer: Any = (await link.roundtrip(
                ("RPUSH", key, payload), ("PEXPIRE", key, _REQUEST_LIST_TTL_MS), take))[-1]
        except _REFUSED as exc:
            raise self._unavailable("send a request and wait for its reply", exc) from exc
        if answer is None or isinstance(answer, bytes):
            return answer
        return bytes(answer[1])

    async def close_async(self) -> None:
        """See :meth:`Coordinator.close_async`."""
        with self._links_lock:
            link = self._links.pop(asyncio.get_running_loop(), None)
        if link is not None:
            await link.close()

    def push_reply(self, reply_key: str, payload: bytes, ttl: float) -> None:
        """See :meth:`Coordinator.push_reply`."""
        key = f"{self.prefix}reply:{reply_key}"
        self._call("send a reply", lambda: self._push_expire(
            keys=[key], args=[payload, max(int(ttl * 1000), 1)]))

    def reply_and_pop(
        self, reply_key: str, payload: bytes, ttl: float, node: str, timeout: float,
    ) -> bytes | None:
        """See :meth:`Coordinator.reply_and_pop`: the reply's script and the ``BLPOP`` of the
        next request in one write, on the thread's own connection (an engine restarted empty
        has lost the script: it is loaded again and the reply sent again; the request popped
        meanwhile is kept)."""
        wait = min(max(timeout, 0.0), _BLOCK_SLICE_S)
        if wait < 0.001:
            self.push_reply(reply_key, payload, ttl)
            return self.pop_request(node, 0.0)
        pushed, popped = self._call("send a reply and wait for requests", lambda: self._own.roundtrip(
            ("EVALSHA", self._push_expire.sha, 1, f"{self.prefix}reply:{reply_key}", payload,
             max(int(ttl * 1000), 1)),
            ("BLPOP", f"{self.prefix}req:{node}", wait)))
        if isinstance(pushed, redis.exceptions.NoScriptError):
            self.push_reply(reply_key, payload, ttl)
        elif isinstance(pushed, Exception):
            raise self._unavailable("send a reply", pushed)
        if isinstance(popped, Exception):
            raise self._unavailable("wait for requests", popped)
        return None if popped is None else bytes(popped[1])

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
        self._own.close()
        self._client.close()
        self._client.connection_pool.disconnect()


class _AsyncLink:
    """One event loop's connections to the engine: the idle ones, at most
    :data:`_ASYNC_CONNECTIONS` in use (each waiting call holds one; more wait for one).

    Commands go out packed in one write and their replies are read in order, on a
    connection of redis-py's (its RESP parser, TLS and ACL login), without a client's
    per-command machinery: a call to another node spends its time in the engine, not here.
    """

    def __init__(self, pool: redis.asyncio.ConnectionPool) -> None:
        self._pool = pool
        self._idle: list[redis.asyncio.connection.AbstractConnection] = []
        self._slots = asyncio.Semaphore(_ASYNC_CONNECTIONS)
        self._closed = False

    async def roundtrip(self, *commands: tuple[Arg, ...]) -> list[Any]:
        """The replies of ``commands``; an error reply raises (its connection is dropped)."""
        async with self._slots:
            connection = self._idle.pop() if self._idle else self._pool.connection_class(
                **self._pool.connection_kwargs)
            try:
                await connection.send_packed_command(connection.pack_commands(commands),
                                                     check_health=False)
                replies = [await connection.read_response() for _ in commands]
            except BaseException:
                # An error, a timeout or a cancelled request (its client left): replies may
                # be unread on this connection, so it is never used again.
                await connection.disconnect()
                raise
            if self._closed:
                await connection.disconnect()
            else:
                self._idle.append(connection)
            return replies

    async def close(self) -> None:
        """Close the idle connections (those in use close when their call ends)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()


class _ThreadLinks:
    """A connection of each thread's own (the request workers': a blocking pop never waits
    for a pooled connection, and a reply and the next pop go out in one write).

    Like :class:`_AsyncLink`, commands are packed in one write and replies read in order.
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._local = threading.local()
        self._made: list[redis.connection.AbstractConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connection(self) -> redis.connection.AbstractConnection:
        if self._closed:
            raise redis.exceptions.ConnectionError("the coordinator is closed")
        connection: redis.connection.AbstractConnection | None = getattr(
            self._local, "connection", None)
        if connection is None:
            connection = self._pool.connection_class(**self._pool.connection_kwargs)
            with self._lock:
                if self._closed:
                    raise redis.exceptions.ConnectionError("the coordinator is closed")
                self._made.append(connection)
            self._local.connection = connection
        return connection

    def roundtrip(self, *commands: tuple[Arg, ...]) -> list[Any]:
        """The replies of ``commands``; an error reply is returned as its exception."""
        connection = self._connection()
        replies: list[Any] = []
        try:
            packed = connection.pack_commands(commands)  # type: ignore[no-untyped-call,unused-ignore]
            connection.send_packed_command(packed, check_health=False)  # type: ignore[no-untyped-call,unused-ignore]
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            # Replies may be unread: the next command reconnects.
            connection.disconnect()  # type: ignore[no-untyped-call,unused-ignore]
            raise
        return replies

    def command(self, *args: Arg) -> Any:
        """One command's reply (an error reply raises)."""
        (reply,) = self.roundtrip(args)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        """Disconnect every thread's connection (a later command raises ConnectionError)."""
        with self._lock:
            self._closed = True
            made, self._made = self._made, []
        for connection in made:
            connection.disconnect()  # type: ignore[no-untyped-call,unused-ignore]
