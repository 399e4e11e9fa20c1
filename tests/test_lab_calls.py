"""Calls to another node's device from an event loop (the server's), and the request workers'
one-round-trip answers: :func:`labd.lab.calls.send_call_async`, ``exchange_async`` and
``reply_and_pop`` of the coordinators.

The server awaits a prompt reply on its loop; a slow one (past the first wait) and a large
one (over ``INLINE_REPLY_BYTES``) go to a thread. The same behaviour through HTTP on every
engine: the in-process coordinator and fakeredis (which never wait on a loop), and a real
redis-server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import test_lab_node
from labd.errors import InvalidArgumentError
from labd.lab import LabNode
from labd.lab.calls import INLINE_REPLY_BYTES, RequestWorkers, send_call_async
from labd.lab.coordinator import Coordinator
from labd.lab.errors import EngineUnavailableError
from labd.testing import running_server
from test_lab_support import RedisServer, free_port, needs_redis_server, wait_until


class Meter:
    """A device whose answers can be small, large, slow or refused."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.entered = threading.Event()
        self.release = threading.Event()

    def get_value(self) -> float:
        return 1.5

    def trace(self, points: int) -> list[float]:
        return [i / 7 for i in range(points)]

    def hold(self, seconds: float) -> str:
        """Answers after ``seconds`` (a call slower than the caller's first wait)."""
        self.entered.set()
        self.release.wait(seconds)
        return "held"

    def get_table(self) -> dict[int, str]:
        return {2: "b", 1: "a"}

    def get_tags(self) -> set[str]:
        return {"dark", "cold", "aligned"}

    def get_handle(self) -> object:
        return object()  # a driver handle: not JSON

    def set_range(self, volts: float) -> None:
        if volts > 10:
            raise InvalidArgumentError(f"range must be at most 10 V, got {volts}")


# The three engines of test_lab_node (in-process, fakeredis, a real redis-server) for these too.
connect = test_lab_node.connect
redis_server = test_lab_node.redis_server


@dataclass
class Pair:
    """Node ``a`` (no devices, served over HTTP) and node ``b`` (the meter)."""

    a: LabNode
    b: LabNode


@pytest.fixture
def pair(connect: Callable[[], Coordinator]) -> Iterator[Pair]:
    lab = test_lab_node.Lab(connect)
    try:
        b = lab.node("b", start=False)
        b.daemon.register_plugins(devices={"Meter": Meter})
        b.daemon.add_device("meter", "Meter")
        b.start()
        a = lab.node("a")
        wait_until(lambda: a.knows("meter"), 5, "node a to see the meter")
        yield Pair(a, b)
    finally:
        lab.close()


def _call(url: str, method: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/devices/meter/call", json={"method": method, "kwargs": kwargs},
                      timeout=15)


# -- through HTTP, every engine ---------------------------------------------------------------------
def test_small_large_and_slow_answers_from_another_node_match_the_devices_own(pair: Pair) -> None:
    points = INLINE_REPLY_BYTES // 4  # JSON of these floats is well over the inline limit
    with running_server(pair.a.daemon) as here, running_server(pair.b.daemon) as there:
        for method, kwargs in (("get_value", {}), ("trace", {"points": 3}), ("get_table", {}),
                               ("get_tags", {}), ("trace", {"points": points})):
            remote, local = _call(here.url, method, **kwargs), _call(there.url, method, **kwargs)
            assert remote.status_code == local.status_code == 200, remote.text
            assert remote.json() == local.json()
        assert len(_call(here.url, "trace", points=points).json()["result"]) == points
        # slower than the caller's first wait (the heartbeat, 0.2 s): finished on a thread
        slow = _call(here.url, "hold", seconds=0.6)
        assert slow.status_code == 200, slow.text
        assert slow.json() == {"result": "held", "success": True}


def test_errors_from_another_node_answer_as_the_devices_own_server(pair: Pair) -> None:
    with running_server(pair.a.daemon) as here, running_server(pair.b.daemon) as there:
        for method, kwargs in (("set_range", {"volts": 50}), ("set_range", {"volts": "high"}),
                               ("no_such_method", {}), ("get_handle", {})):
            remote, local = _call(here.url, method, **kwargs), _call(there.url, method, **kwargs)
            assert remote.status_code == local.status_code, (method, remote.text, local.text)
            assert remote.status_code in (400, 404, 422, 502)
            assert remote.json()["error"]["type"] == local.json()["error"]["type"]
            assert remote.json()["error"]["message"] == local.json()["error"]["message"]


def test_calls_from_many_clients_at_once_each_get_their_own_answer(pair: Pair) -> None:
    """Concurrent calls share the loop's engine connections: no answer reaches another call."""
    with running_server(pair.a.daemon) as here:
        results: dict[int, Any] = {}

        def client(n: int) -> None:
            with httpx.Client(base_url=here.url, timeout=15) as http:
                for k in range(20):
                    points = 1 + (n * 20 + k) % 9
                    answer = http.post("/devices/meter/call",
                                       json={"method": "trace", "kwargs": {"points": points}})
                    results[n * 100 + k] = (points, answer.json().get("result"))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 120
        for points, result in results.values():
            assert result == [i / 7 for i in range(points)]


# -- send_call_async and the engine's loop path ---------------------------------------------------------
def _answering(coordinator: Coordinator, node: str, handler: Callable[[dict[str, Any]], Any],
               ) -> RequestWorkers:
    workers = RequestWorkers(coordinator, node, handler, workers=1,
                             on_engine_error=lambda exc: None)
    workers.start()
    return workers


@needs_redis_server
def test_the_loop_awaits_a_prompt_small_reply_and_hands_slow_or_large_ones_to_a_thread(
    redis_server: RedisServer,
) -> None:
    from labd.lab.redis_engine import RedisCoordinator

    engine = RedisCoordinator(redis_server.url)
    release = threading.Event()

    def handle(request: dict[str, Any]) -> Any:
        if request["method"] == "hold":
            release.wait(5)
        return [0.5] * int(request["args"][0])

    workers = _answering(engine, "dev", handle)
    handed: list[str] = []

    async def slow(job: Callable[[], Any]) -> Any:
        handed.append("thread")
        return await asyncio.to_thread(job)

    async def call(method: str, points: int, first_wait: float = 1.0) -> Any:
        request = {"op": "call", "device": None, "method": method, "args": [points]}
        return await send_call_async(engine, "dev", "me", request, 10.0, slow, len,
                                     liveness_check=first_wait)

    async def main() -> None:
        assert [await call("trace", 3) for _ in range(5)] == [3] * 5
        # A reply later than the first wait (1 s) goes to a thread: on a loaded machine one
        # may, not all five.
        assert len(handed) < 5, "every prompt small reply left the loop"
        before = len(handed)
        assert await call("trace", INLINE_REPLY_BYTES) == INLINE_REPLY_BYTES
        assert len(handed) == before + 1, "a large reply was decoded on the loop"
        waiting = asyncio.ensure_future(call("hold", 2, first_wait=0.1))
        for _ in range(1000):  # the first wait (0.1 s) passes: the rest waits on a thread
            if len(handed) > before + 1:
                break
            await asyncio.sleep(0.01)
        assert len(handed) == before + 2, "a slow reply was awaited on the loop"
        release.set()
        assert await asyncio.wait_for(waiting, 10) == 2
        await engine.close_async()

    try:
        asyncio.run(main())
    finally:
        workers.close()
        engine.close()


@needs_redis_server
def test_a_cancelled_exchange_never_hands_its_late_reply_to_the_next_call(
    redis_server: RedisServer,
) -> None:
    """A request whose client left is cancelled mid-wait: its connection is dropped, so the
    reply that comes later stays for nobody instead of answering the next call."""
    from labd.lab.redis_engine import RedisCoordinator

    engine = RedisCoordinator(redis_server.url)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.exchange_async("dev", b"first", "k-first", 1.0), 0.05)
        assert engine.pop_request("dev", 1.0) == b"first"
        engine.push_reply("k-first", b"late", 60)
        responder = threading.Thread(target=lambda: engine.push_reply(
            "k-second", b"re:" + (engine.pop_request("dev", 5) or b"?"), 60))
        responder.start()
        assert await engine.exchange_async("dev", b"second", "k-second", 1.0) == b"re:second"
        responder.join(10)
        assert engine.pop_reply("k-first", 1.0) == b"late"
        await engine.close_async()

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_an_unreachable_engine_fails_an_exchange_on_the_loop_with_engine_unavailable() -> None:
    from labd.lab.redis_engine import RedisCoordinator

    engine = RedisCoordinator(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)

    async def main() -> None:
        with pytest.raises(EngineUnavailableError, match=r"127\.0\.0\.1:\d+/0 did not answer"):
            await engine.exchange_async("dev", b"ping", "k", 1.0)
        await engine.close_async()

    try:
        asyncio.run(main())
    finally:
        engine.close()


@needs_redis_server
@pytest.mark.slow
def test_many_callers_threads_and_a_loop_each_get_their_own_answer_under_thread_switching(
    redis_server: RedisServer,
) -> None:
    """Stress: four workers answer on connections of their own (each reply sent with the
    next pop) while eight threads and forty loop tasks call at once, with the interpreter
    switching threads every microsecond: every caller gets exactly its own answer."""
    import sys

    from labd.lab.calls import send_call
    from labd.lab.redis_engine import RedisCoordinator

    engine = RedisCoordinator(redis_server.url)
    workers = RequestWorkers(engine, "dev", lambda request: request["args"], workers=4,
                             on_engine_error=lambda exc: None)
    workers.start()
    wrong: list[Any] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def thread_caller(n: int) -> None:
        for k in range(100):
            request = {"op": "call", "device": None, "method": "echo", "args": [n, k]}
            got = send_call(engine, "dev", f"t{n}", request, 10.0)
            if got != [n, k]:
                wrong.append((n, k, got))

    async def loop_callers() -> None:
        async def slow(job: Callable[[], Any]) -> Any:
            return await asyncio.to_thread(job)

        async def one(n: int) -> None:
            for k in range(25):
                request = {"op": "call", "device": None, "method": "echo", "args": [n, k]}
                got = await send_call_async(engine, "dev", f"l{n}", request, 10.0, slow,
                                            lambda result: result)
                if got != [n, k]:
                    wrong.append((n, k, got))

        await asyncio.gather(*(one(100 + n) for n in range(40)))
        await engine.close_async()

    try:
        threads = [threading.Thread(target=thread_caller, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        asyncio.run(loop_callers())
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        sys.setswitchinterval(interval)
        workers.close()
        engine.close()
    assert wrong == []
