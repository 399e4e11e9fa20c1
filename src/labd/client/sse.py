"""``SSEClient``: follow a labd Server-Sent-Events stream on a background thread.

The thread runs its own asyncio loop with ``httpx.AsyncClient`` and ``httpx-sse``, whose
decoder is incremental (each byte is looked at once, however the stream is chunked), so a
long stream costs O(n) in its size. Running the reader as an asyncio task lets
:meth:`SSEClient.stop_stream` cancel a read that is blocked waiting for data, so stopping
never waits for the next event or keep-alive.

After a drop (the server closed the stream, a reset, a 5xx) the client reconnects with
``Last-Event-ID`` so the server replays what it still has, backing off exponentially up to
``max_backoff`` seconds. It counts ``received`` events and ``gaps`` (sequence numbers that
never arrived), and ``reconnects``.

Example::

    def on_event(event):                      # LabDaemon's callback: one dict
        print(event["event"], event["data"]["sequence"])

    client = SSEClient("http://127.0.0.1:5000", on_event)
    client.start_device_stream("daq1")
    ...
    client.stop_stream()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse

from labd.client._http import client_headers, path
from labd.client.api import DEFAULT_URL
from labd.client.errors import ServerAPIError, ServerConnectionError, error_from_answer
from labd.errors import InvalidArgumentError

__all__ = ["SSEClient"]

log = logging.getLogger("labd.client.sse")

EventCallback = Callable[..., object]


class _Retryable(Exception):
    """A failed connection attempt worth retrying (5xx); wraps the error."""

    def __init__(self, error: ServerAPIError) -> None:
        super().__init__(str(error))
        self.error = error


def _callback_arity(on_event: EventCallback | None) -> int:
    """1 for LabDaemon's ``on_event(event_dict)``, 2 for ``on_event(name, data)``."""
    if on_event is None:
        return 1
    if not callable(on_event):
        raise InvalidArgumentError(f"on_event must be callable, got {on_event!r}.")
    try:
        signature = inspect.signature(on_event)
    except (TypeError, ValueError):  # a builtin without a signature: assume LabDaemon's style
        return 1
    for arity in (1, 2):
        try:
            signature.bind(*([None] * arity))
        except TypeError:
            continue
        return arity
    raise InvalidArgumentError(
        f"on_event {on_event!r} must accept one argument (the event dict, as in LabDaemon) "
        "or two (event name, data)."
    )


def _sequence_of(data: Any, event_id: str) -> int | None:
    if isinstance(data, dict):
        sequence = data.get("sequence")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            return sequence
    return int(event_id) if event_id.isdigit() else None


class SSEClient:
    """Receive one labd stream (a device's data, a task's progress, daemon events).

    ``on_event`` runs on the client's thread for each event, as ``on_event({"event", "data",
    "id"})`` (LabDaemon's form) or ``on_event(name, data)`` if it takes two arguments. It must
    be quick: while it runs, the stream is not read (the server drops this client's oldest
    items if it falls behind, which shows up in ``gaps``).

    ``reconnect=False`` ends the thread at the first drop; ``max_retries`` bounds consecutive
    failed reconnects (None: keep trying until :meth:`stop_stream`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        on_event: EventCallback | None = None,
        *,
        owner: str | None = None,
        token: str | None = None,
        reconnect: bool = True,
        max_retries: int | None = None,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if max_retries is not None and max_retries < 0:
            raise InvalidArgumentError(f"max_retries must be None or >= 0, got {max_retries!r}.")
        if backoff <= 0 or max_backoff < backoff:
            raise InvalidArgumentError(
                f"Need 0 < backoff <= max_backoff, got backoff={backoff!r}, max_backoff={max_backoff!r}."
            )
        self.base_url = base_url.rstrip("/")
        self.on_event = on_event
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # The read timeout is a dead-connection detector: the server sends a keep-alive every
        # 15 s, so silence for much longer means the connection is gone; reconnect.
        self._timeout = httpx.Timeout(connect_timeout, read=read_timeout)
        self._headers = client_headers(owner, token)
        self._arity = _callback_arity(on_event)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stop_requested = False
        self._connected = threading.Event()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.received = 0  # events delivered (keep-alive comments do not count)
        self.gaps = 0  # sequence numbers skipped: items this client lost
        self.reconnects = 0  # connection attempts after the first
        self.connections = 0  # successful connections (200 + event stream)
        self.callback_errors = 0  # exceptions raised by on_event (logged, then ignored)
        self.last_event_id: str | None = None
        self.last_sequence: int | None = None
        self.error: BaseException | None = None  # why the stream ended on its own, if it failed
        self.stream_path: str | None = None
        self._server_retry: float | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return (
            f"<SSEClient {self.base_url}{self.stream_path or ''} {state} received={self.received}>"
        )

    # ------------------------------------------------------------------ public API
    def start_device_stream(self, device_id: str, *, maxsize: int | None = None) -> None:
        """Follow ``/stream/devices/{device_id}`` (``device_data`` events).

        ``maxsize`` sets this client's buffer on the server. Raises RuntimeError if a stream
        is already running on this client.
        """
        params = None if maxsize is None else {"maxsize": str(int(maxsize))}
        self._start(path("stream", "devices", device_id), params)

    def start_task_stream(self, task_id: str) -> None:
        """Follow ``/stream/tasks/{task_id}`` (state, progress, data, parameter, finished).

        The thread ends by itself after the ``finished`` event; :meth:`join` waits for that.
        """
        self._start(path("stream", "tasks", task_id), None)

    def start_event_stream(self) -> None:
        """Follow ``/stream/events``: every daemon event (device_state, task_state, lease_*...)."""
        self._start("/stream/events", None)

    def stop_stream(self, timeout: float = 5.0) -> bool:
        """Stop reading and wait up to ``timeout`` s for the thread; True if it has ended.

        Safe to call from ``on_event`` (then it returns False at once and the thread ends
        when the callback returns), twice, or when nothing runs.
        """
        with self._lock:
            self._stop_requested = True
            thread, loop, task = self._thread, self._loop, self._task
        if thread is None:
            return True
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop already finished: the thread is ending anyway
                pass
        if thread is threading.current_thread():
            return False
        thread.join(max(float(timeout), 0.0))
        if thread.is_alive():
            log.warning("SSE thread %s did not stop within %s s", thread.name, timeout)
            return False
        return True

    def is_running(self) -> bool:
        """True while the background thread follows (or reconnects to) the stream."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def is_connected(self) -> bool:
        """True while a connection is open and reading events."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until a connection is open (or ``timeout``); True if it is."""
        return self._connected.wait(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end by itself (a task stream after ``finished``); True if it did."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_stream()

    # ------------------------------------------------------------------ thread
    def _start(self, stream_path: str, params: dict[str, str] | None) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError(
                    f"SSEClient is already following {self.stream_path}; call stop_stream() "
                    "first or use another SSEClient."
                )
            self._reset_stats()
            self.stream_path = stream_path
            self._stop_requested = False
            self._loop = self._task = None
            self._connected.clear()
            name = "labd-sse" + stream_path.replace("/stream", "", 1).replace("/", "-")
            self._thread = threading.Thread(
                target=self._thread_main, args=(stream_path, params), name=name, daemon=True
            )
            self._thread.start()

    def _thread_main(self, stream_path: str, params: dict[str, str] | None) -> None:
        try:
            asyncio.run(self._follow(stream_path, params))
        except Exception as exc:  # a bug here must not vanish with the thread
            self.error = exc
            log.exception("SSE stream %s%s crashed", self.base_url, stream_path)
        finally:
            self._connected.clear()

    async def _follow(self, stream_path: str, params: dict[str, str] | None) -> None:
        with self._lock:
            if self._stop_requested:
                return
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
        try:
            async with httpx.AsyncClient(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout
            ) as client:
                await self._connect_loop(client, stream_path, params)
        except asyncio.CancelledError:  # stop_stream(): a normal end
            pass

    async def _connect_loop(
        self, client: httpx.AsyncClient, stream_path: str, params: dict[str, str] | None
    ) -> None:
        failures = 0
        while True:
            opened_before = self.connections
            try:
                if await self._read_once(client, stream_path, params):
                    return  # a task stream said `finished`: the end, not a drop
                reason: BaseException | None = None
            except ServerAPIError as exc:  # 4xx, not an event stream: retrying cannot help
                self.error = exc
                log.warning("SSE stream %s refused: %s", stream_path, exc)
                return
            except _Retryable as exc:
                reason = exc.error
            except httpx.TransportError as exc:
                reason = exc
            if self.connections > opened_before:
                failures = 0  # it worked for a while: start the backoff afresh
            failures += 1
            if not self._may_retry(failures, stream_path, reason):
                return
            await asyncio.sleep(self._delay(failures))
            self.reconnects += 1

    def _may_retry(self, failures: int, stream_path: str, reason: BaseException | None) -> bool:
        why = f"{type(reason).__name__}: {reason}" if reason else "the server closed the stream"
        if not self.reconnect:
            self.error = reason
            return False
        if self.max_retries is not None and failures > self.max_retries:
            self.error = ServerConnectionError(
                f"Gave up on {self.base_url}{stream_path} after {self.max_retries} reconnect "
                f"attempt(s); last failure: {why}."
            )
            return False
        log.info("SSE stream %s dropped (%s); reconnecting", stream_path, why)
        return True

    def _delay(self, failures: int) -> float:
        base = self._server_retry if self._server_retry is not None else self.backoff
        return float(min(self.max_backoff, base * 2 ** (failures - 1)))

    async def _read_once(
        self, client: httpx.AsyncClient, stream_path: str, params: dict[str, str] | None
    ) -> bool:
        """One connection: deliver its events; True if it ended with ``finished``."""
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        async with aconnect_sse(
            client, "GET", stream_path, params=params, headers=headers
        ) as source:
            response = source.response
            await self._check_opened(response)
            self.connections += 1
            self._connected.set()
            try:
                async for sse in source.aiter_sse():
                    self._dispatch(sse)
                    if sse.event == "finished":
                        return True
            finally:
                self._connected.clear()
        return False

    async def _check_opened(self, response: httpx.Response) -> None:
        url = str(response.request.url)
        if response.status_code >= 400:
            await response.aread()
            error = error_from_answer(response.status_code, response.content, "GET", url)
            if response.status_code >= 500:
                raise _Retryable(error)
            raise error
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            raise ServerAPIError(
                f"GET {url} answered {content_type!r}, not an event stream; is the URL a labd "
                "server and the path a /stream/... endpoint?",
                status_code=response.status_code,
            )

    def _dispatch(self, sse: ServerSentEvent) -> None:
        if self._stop_requested:
            # Events decoded from the same chunk arrive without a pause in which the
            # cancellation could land; after stop_stream() none reaches the callback.
            return
        if not sse.data and sse.event == "message":
            # httpx-sse turns the blank line after a keep-alive comment into an empty
            # event (it keeps the last id); the SSE spec dispatches nothing there.
            return
        if sse.id:
            self.last_event_id = sse.id
        if sse.retry is not None:
            self._server_retry = max(sse.retry / 1000.0, 0.001)
        try:
            data: Any = orjson.loads(sse.data) if sse.data else {}
        except orjson.JSONDecodeError:
            data = sse.data
        self._count_sequence(_sequence_of(data, sse.id))
        self.received += 1
        callback = self.on_event
        if callback is None:
            return
        try:
            if self._arity == 2:
                callback(sse.event, data)
            else:
                event: dict[str, Any] = {"event": sse.event, "data": data}
                if sse.id:
                    event["id"] = sse.id
                callback(event)
        except Exception:  # the callback's bug must not end the stream
            self.callback_errors += 1
            log.exception("SSE on_event callback failed for %s event", sse.event)

    def _count_sequence(self, sequence: int | None) -> None:
        if sequence is None:
            return
        last = self.last_sequence
        if last is not None and sequence > last + 1:
            self.gaps += sequence - last - 1
        # A smaller number means the server's sequence restarted (it was restarted): follow it.
        self.last_sequence = sequence
