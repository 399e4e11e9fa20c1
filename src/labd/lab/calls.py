"""Calls to a device on another node: request/reply through the engine.

The caller pushes a request (with a deadline and, for a command under a claim, the claim's
fencing token) on the owning node's request list and waits on its own reply list. The
owning node's worker threads pop requests, check the token (it must be the device's live
claim and not lower than any token seen for that device), call the device under its own
lock as a remote actor, and push the reply. Errors come back as the same exception types,
so the caller's server answers the same HTTP codes as the device's own server would.

    reply = encode_error(exc)          # on the device's node
    raise decode_error(reply)          # on the caller's node: same type, same message
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson

import labd.errors as core_errors
from labd import wire
from labd.errors import (
    DeviceBusyError,
    DeviceOperationError,
    DeviceTimeoutError,
    LabDaemonException,
    UnknownDeviceError,
    UnserializableResult,
)
from labd.lab import errors as lab_errors
from labd.lab.coordinator import Coordinator
from labd.lab.errors import ClaimLostError, EngineUnavailableError

__all__ = [
    "RequestWorkers", "call_request", "claim_lost", "decode_error", "encode_error", "send_call",
    "send_call_async",
]

log = logging.getLogger("labd.lab")

Handler = Callable[[dict[str, Any]], Any]
#: How long an unread reply stays in the engine (its caller may be gone).
REPLY_TTL_S = 60.0
#: A larger reply is decoded on a thread, not on the event loop (:func:`send_call_async`).
INLINE_REPLY_BYTES = 64 * 1024
T = TypeVar("T")


def dumps(value: Any, what: str = "a lab request") -> bytes:
    """JSON bytes of a request, reply or relayed item: the server's own encoder
    (:mod:`labd.wire`), so an answer from another node is the one its server would send;
    :class:`UnserializableResult` naming ``what`` for a value it cannot encode."""
    return wire.dumps(value, what)


def encode_error(exc: BaseException) -> dict[str, Any]:
    """A reply's ``error``: the exception's class name, message and context."""
    context = dict(getattr(exc, "labd_context", None) or {})
    busy = getattr(exc, "busy", None)
    return {"type": type(exc).__name__, "message": str(exc), "busy": busy, "context": context}


def _error_class(name: str) -> type[Exception]:
    for module in (lab_errors, core_errors):
        found = getattr(module, name, None)
        if isinstance(found, type) and issubclass(found, LabDaemonException | UnserializableResult):
            return found
    if name == "ParameterValidationError":
        from labd.signatures import ParameterValidationError

        return ParameterValidationError
    return DeviceOperationError


def decode_error(error: Mapping[str, Any]) -> Exception:
    """The exception an error reply describes, of the same class where labd has it."""
    cls = _error_class(str(error.get("type", "")))
    message = str(error.get("message", ""))
    exc: Exception
    context = error.get("context")
    if issubclass(cls, DeviceBusyError):
        exc = cls(message, list(error.get("busy") or []))
    elif cls.__name__ == "ParameterValidationError":
        exc = cls(message, list((context or {}).get("errors") or []))
    else:
        try:
            exc = cls(message)
        except TypeError:  # a class with its own constructor: keep the type's family
            exc = LabDaemonException(message)
    if context:
        exc.labd_context = dict(context)  # type: ignore[attr-defined]
    return exc


def _envelope(request: dict[str, Any], caller: str, timeout: float) -> tuple[str, float, bytes]:
    """A request's reply key, deadline (epoch seconds) and JSON body."""
    reply_key = f"{caller}:{uuid.uuid4().hex}"
    deadline = time.time() + timeout
    what = (f"the arguments of {request.get('device')}.{request.get('method')}()"
            if request.get("op") == "call" else f"the {request.get('op')} request")
    body = dumps({**request, "reply": reply_key, "deadline": deadline, "from": caller}, what)
    return reply_key, deadline, body


def _result(payload: bytes) -> Any:
    """A reply's result, or the exception its error describes."""
    reply = orjson.loads(payload)
    if reply.get("ok"):
        return reply.get("result")
    raise decode_error(reply.get("error") or {})


def _await_reply(
    coordinator: Coordinator, node: str, request: dict[str, Any], reply_key: str,
    deadline: float, timeout: float, liveness_check: float,
) -> Any:
    """Wait for a reply not back with the first round trip; its result (blocking)."""
    payload = None
    remaining = deadline - time.time()
    while payload is None and remaining > 0:
        # Wait in slices; between them, make sure the node is still in the directory, so a
        # call to a node that died answers as soon as its entry expires instead of hanging.
        device = request.get("device")
        if device is not None and coordinator.node_of(str(device)) != node:
            break
        payload = coordinator.pop_reply(reply_key, min(remaining, liveness_check))
        remaining = deadline - time.time()
    if payload is None and remaining > 0:
        raise UnknownDeviceError(
            f"Device {request.get('device')!r}: node {node!r} left the lab (its directory "
            "entry expired: it stopped, crashed or lost the engine) while the call waited; "
            "the call may or may not have run. Check the node (labd lab nodes).")
    if payload is None:
        what = f"{request.get('device')}.{request.get('method')}()" if request.get("method") else request.get("op")
        raise DeviceTimeoutError(
            f"Device {request.get('device')!r} on node {node!r}: {what} got no answer within "
            f"{timeout:g} s; node {node!r} may be down, frozen or overloaded. Check it "
            "(labd lab nodes) and try again.")
    return _result(payload)


def send_call(
    coordinator: Coordinator, node: str, caller: str, request: dict[str, Any], timeout: float,
    liveness_check: float = 1.0,
) -> Any:
    """Send ``request`` to ``node`` and wait up to ``timeout`` s for its reply's result."""
    reply_key, deadline, body = _envelope(request, caller, timeout)
    payload = coordinator.exchange(node, body, reply_key, min(timeout, liveness_check))
    if payload is not None:
        return _result(payload)
    return _await_reply(coordinator, node, request, reply_key, deadline, timeout, liveness_check)


async def send_call_async(
    coordinator: Coordinator, node: str, caller: str, request: dict[str, Any], timeout: float,
    slow: Callable[[Callable[[], T]], Awaitable[T]], finish: Callable[[Any], T],
    liveness_check: float = 1.0,
) -> T:
    """:func:`send_call` for an event loop; ``finish(result)`` (such as encoding the answer).

    The request and a reply that comes back within the first wait (up to one second) never
    leave the loop, so a call to another node costs no thread hand-off. A slower reply is
    awaited, and a large one (over :data:`INLINE_REPLY_BYTES`) decoded and finished, on a
    thread through ``slow(fn)`` (the server's offloader), so the loop never waits on either.
    """
    reply_key, deadline, body = _envelope(request, caller, timeout)
    payload = await coordinator.exchange_async(node, body, reply_key, min(timeout, liveness_check))
    if payload is None:
        return await slow(lambda: finish(_await_reply(
            coordinator, node, request, reply_key, deadline, timeout, liveness_check)))
    if len(payload) > INLINE_REPLY_BYTES:
        return await slow(lambda: finish(_result(payload)))
    return finish(_result(payload))


class RequestWorkers:
    """Threads that answer this node's requests; see the module docstring."""

    def __init__(
        self, coordinator: Coordinator, node: str, handler: Handler, *, workers: int,
        on_engine_error: Callable[[EngineUnavailableError], None],
    ) -> None:
        self._coordinator = coordinator
        self._node = node
        self._handler = handler
        self._on_engine_error = on_engine_error
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"labd-lab-worker-{node}-{i}",
                                          daemon=True) for i in range(workers)]

    def start(self) -> None:
        """Start answering."""
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after the current requests (each pop waits at most 1 s)."""
        self._stop.set()
        for _ in self._threads:  # wake every blocked pop at once
            try:
                self._coordinator.push_request(self._node, b'{"op": "wake"}')
            except EngineUnavailableError:
                break  # their pops fail by themselves
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0.0))

    def _loop(self) -> None:
        backoff = 0.1
        reply: tuple[str, bytes] | None = None  # the last answer, sent with the next pop
        while not self._stop.is_set():
            try:
                if reply is None:
                    payload = self._coordinator.pop_request(self._node, 0.5)
                else:
                    # One round trip: the answer goes out and the wait for the next starts.
                    payload = self._coordinator.reply_and_pop(
                        reply[0], reply[1], REPLY_TTL_S, self._node, 0.5)
            except EngineUnavailableError as exc:
                reply = None  # lost with the engine: its caller times out (the deadline)
                self._on_engine_error(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            reply = None if payload is None else self._answer(payload)
        if reply is not None:  # closing: the last answer still goes out
            try:
                self._coordinator.push_reply(reply[0], reply[1], REPLY_TTL_S)
            except EngineUnavailableError as exc:
                self._on_engine_error(exc)

    def _answer(self, payload: bytes) -> tuple[str, bytes] | None:
        """Handle one request; its reply key and reply, or None for a notice (no reply)."""
        try:
            request = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("lab: node %r dropped a request that is not JSON", self._node)
            return None
        if request.get("op") == "wake":
            return None
        reply_key = request.get("reply")
        if time.time() > float(request.get("deadline", 0)):
            reply: dict[str, Any] = {"ok": False, "error": encode_error(DeviceTimeoutError(
                f"Node {self._node!r} got the request for {request.get('device')!r} after its "
                "deadline and did not run it."))}
        else:
            try:
                result = self._handler(request)
                what = (f"{request.get('device')}.{request.get('method')}()"
                        if request.get("op") == "call" else f"the {request.get('op')} answer")
                body = dumps({"ok": True, "result": result}, f"the result of {what}")
            except (LabDaemonException, TypeError, ValueError) as exc:
                reply = {"ok": False, "error": encode_error(exc)}
            except Exception as exc:  # the driver's own error: wrapped as the server does
                fault = DeviceOperationError(
                    f"Device {request.get('device')!r}: {request.get('method')}() raised "
                    f"{type(exc).__name__}: {exc}")
                fault.labd_context = {"device_id": request.get("device"),  # type: ignore[attr-defined]
                                      "cause_type": type(exc).__name__, "node": self._node}
                reply = {"ok": False, "error": encode_error(fault)}
            else:
                return (reply_key, body) if isinstance(reply_key, str) else None
        # A notice (no reply key) has nobody waiting for its answer.
        return (reply_key, dumps(reply)) if isinstance(reply_key, str) else None


def call_request(
    device_id: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any],
    token: int | None, principal: str | None, owner: str | None, queries_only: bool = False,
) -> dict[str, Any]:
    """The request for one method call (``queries_only``: the device's node refuses commands)."""
    return {"op": "call", "device": device_id, "method": method, "args": list(args),
            "kwargs": dict(kwargs), "token": token, "principal": principal, "owner": owner,
            "queries_only": queries_only}


def claim_lost(device_id: str, token: int, why: str) -> ClaimLostError:
    """The 409 a device's node answers to a command whose token is not the live claim."""
    return ClaimLostError(
        f"Device {device_id!r}: claim lost: the command carried claim token {token}, which "
        f"{why}. Nothing was sent to the device; claim it again.",
        [{"device_id": device_id, "owner": "", "owner_kind": "lost", "owner_id": "",
          "since": "", "token": token}])
