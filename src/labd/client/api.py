"""``ServerAPI``: every labd endpoint as a method, over one pooled ``httpx.Client``.

The endpoints are described once, in :class:`Endpoints`, as :class:`~labd.client._http.Call`
objects; :class:`ServerAPI` sends them synchronously and :class:`~labd.client.aio.AsyncServerAPI`
asynchronously. Method names and signatures are LabDaemon 1.0's ``ServerAPI``, plus leases,
health, metrics and task parameters. Answers are the server's JSON dicts, except where noted.

Example::

    with ServerAPI("http://127.0.0.1:5000", owner="alice") as api:
        api.call("laser1", "set_wavelength", args=[1550.0])
        print(api.call("laser1", "get_wavelength"))   # 1550.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import httpx

from labd.client._http import (
    Call,
    build_request,
    client_headers,
    connection_error,
    path,
    read_answer,
)
from labd.client.errors import ClientClosedError
from labd.client.history import RunHistoryEndpoints
from labd.errors import InvalidArgumentError

__all__ = ["DEFAULT_URL", "TIMEOUT_MARGIN_S", "Endpoints", "ServerAPI", "http_timeout"]

DEFAULT_URL = "http://127.0.0.1:5000"

# Extra HTTP time over a server-side timeout, so the server answers 504 with a diagnosis
# before the client gives up without one.
TIMEOUT_MARGIN_S = 5.0

R = TypeVar("R")


def http_timeout(timeout: float) -> httpx.Timeout:
    """The client's HTTP timeouts for a request timeout of ``timeout`` seconds.

    Connecting may take ``timeout``; reading the answer ``timeout`` plus a margin, since the
    server itself gives up on a request after its own timeout (30 s by default) with a 504.
    """
    return httpx.Timeout(timeout, read=timeout + TIMEOUT_MARGIN_S)


def _error_or_none(answer: Any) -> Any:
    # LabDaemon's get_*_error returned {"error": record} or None; labd answers
    # {"error": record | null}. Keep LabDaemon's shape.
    if isinstance(answer, dict) and answer.get("error"):
        return answer
    return None


def _value(answer: Any) -> Any:
    return answer["value"]


def _result(answer: Any) -> Any:
    return answer["result"]


def _answer(answer: Any) -> Any:
    return answer


def _ignore(answer: Any) -> None:
    return None


def _call(
    device_id: str, method: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None,
    timeout: float | None, expect: Callable[[Any], Any],
) -> Call:
    """The ``POST /devices/{id}/call`` request of :meth:`Endpoints.call` and friends."""
    body = {"method": method, "args": _call_args(args), "kwargs": _call_kwargs(kwargs)}
    return Call("POST", path("devices", device_id, "call"), body=body, expect=expect,
                **_timed(timeout))


def _timed(timeout: float | None) -> dict[str, Any]:
    """Call fields for a per-request timeout: the server's ``?timeout=`` and the HTTP read bound.

    The HTTP bound is a little longer, so the server's 504 (which names the device) arrives
    before the client gives up with a bare timeout.
    """
    if timeout is None:
        return {}
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise InvalidArgumentError(
            f"timeout must be a positive number of seconds, got {timeout!r}."
        )
    return {
        "params": {"timeout": repr(float(timeout))},
        "timeout": float(timeout) + TIMEOUT_MARGIN_S,
    }


def _call_args(args: Sequence[Any] | None) -> list[Any]:
    # A string is a Sequence too; list("abc") would silently send three arguments.
    if args is None:
        return []
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise InvalidArgumentError(
            f"args must be a list of positional arguments, got {args!r}; write [{args!r}] for one."
        )
    return list(args)


def _call_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise InvalidArgumentError(f"kwargs must be a dict of keyword arguments, got {kwargs!r}.")
    return dict(kwargs)


def _add_device_params(
    params: dict[str, Any] | None, device_params: dict[str, Any]
) -> dict[str, Any]:
    if params is not None and not isinstance(params, dict):
        raise InvalidArgumentError(f"add_device: params must be a dict, got {params!r}.")
    merged = dict(params or {})
    clash = sorted(set(merged) & set(device_params))
    if clash:
        raise InvalidArgumentError(
            f"add_device: parameter(s) {clash} given both in params= and as keywords; give each once."
        )
    merged.update(device_params)
    return merged


class Endpoints(RunHistoryEndpoints[R], Generic[R]):
    """The labd HTTP API, one method per endpoint; ``R`` is what sending a call returns.

    The run-history methods (``list_runs``, ``get_run``...) come from RunHistoryEndpoints.

    Subclasses implement :meth:`_send` (sync: the value; async: a coroutine of the value).
    """

    owner: str | None
    timeout: float

    def _send(self, call: Call) -> R:
        raise NotImplementedError

    # ------------------------------------------------------------------ server
    def server_info(self) -> R:
        """``GET /``: server name, version and endpoint list."""
        return self._send(Call("GET", "/"))

    def health(self, timeout: float | None = None) -> R:
        """``GET /health``: ``{"status": "healthy", "uptime_s", "devices", "tasks_running", ...}``."""
        return self._send(Call("GET", "/health", timeout=timeout))

    def metrics_text(self) -> R:
        """``GET /metrics``: the Prometheus text exposition, as a string."""
        return self._send(Call("GET", "/metrics", text=True))

    # ------------------------------------------------------------------ devices
    def list_devices(self) -> R:
        """``{"devices": [DeviceInfo, ...]}``: every device with state, owner and stream stats."""
        return self._send(Call("GET", "/devices"))

    def get_device(self, device_id: str) -> R:
        """DeviceInfo of one device; :class:`RemoteUnknownDeviceError` (a ValueError) if none."""
        return self._send(Call("GET", path("devices", device_id)))

    def get_device_methods(self, device_id: str) -> R:
        """``{"methods": [{"name", "kind", "parameters", "returns", "doc"}, ...]}``."""
        return self._send(Call("GET", path("devices", device_id, "methods")))

    def device_types(self) -> R:
        """``{"device_types": [{"name", "class", "doc", "parameters"}, ...]}``: what may be added.

        Each parameter has ``name``, ``required``, ``default``, ``kind`` and ``schema`` (JSON
        Schema of its annotation); the device id is not among them.
        """
        return self._send(Call("GET", "/device-types"))

    def task_types(self) -> R:
        """``{"task_types": [{"name", "class", "doc", "parameters"}, ...]}``: what may be run."""
        return self._send(Call("GET", "/task-types"))

    def add_device(
        self,
        device_id: str,
        device_type: str,
        params: dict[str, Any] | None = None,
        *,
        connect: bool = False,
        **device_params: Any,
    ) -> R:
        """Add a device of a registered type; returns its DeviceInfo.

        Parameters go in ``params`` or, as in LabDaemon, as keywords:
        ``api.add_device("laser2", "SimLaser", settling_time=0.01, connect=True)``.
        """
        body = {
            "device_id": device_id,
            "device_type": device_type,
            "params": _add_device_params(params, device_params),
            "connect": bool(connect),
        }
        return self._send(Call("POST", "/devices", body=body))

    def connect_device(self, device_id: str, timeout: float | None = None) -> R:
        """Connect a device (server-side ``timeout`` in seconds); returns its DeviceInfo."""
        body = None if timeout is None else {"timeout": timeout}
        bound = None if timeout is None else self._timeout_over(timeout)
        return self._send(
            Call("POST", path("devices", device_id, "connect"), body=body, timeout=bound)
        )

    def disconnect_device(self, device_id: str) -> R:
        """Disconnect a device (idempotent); returns its DeviceInfo."""
        return self._send(Call("POST", path("devices", device_id, "disconnect")))

    def call(
        self,
        device_id: str,
        method: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> R:
        """Call ``device.method(*args, **kwargs)`` on the server and return what it returned.

        ``timeout`` (seconds) overrides the request timeout for a slow method: the server
        answers 504 (:class:`RemoteDeviceTimeoutError`) if the call takes longer.
        """
        return self._send(_call(device_id, method, args, kwargs, timeout, _result))

    def call_device_method(
        self,
        device_id: str,
        method: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> R:
        """LabDaemon's call: the answer ``{"result": value, "success": True}``; see :meth:`call`."""
        return self._send(_call(device_id, method, args, kwargs, timeout, _answer))

    def get_device_error(self, device_id: str) -> R:
        """``{"error": record}`` (with traceback) for the device's last error, or None."""
        return self._send(Call("GET", path("devices", device_id, "error"), expect=_error_or_none))

    def clear_device_error(self, device_id: str) -> R:
        """Forget the device's last error."""
        return self._send(Call("DELETE", path("devices", device_id, "error"), expect=_ignore))

    def stop_device_stream(self, device_id: str) -> R:
        """Stop the device's stream and end every subscription (SSE clients) to it."""
        return self._send(Call("POST", path("devices", device_id, "stream", "stop")))

    # ------------------------------------------------------------------ tasks
    def list_tasks(self) -> R:
        """``{"tasks": [TaskInfo, ...]}``: live and retained runs."""
        return self._send(Call("GET", "/tasks"))

    def get_task(self, task_id: str, timeout: float | None = None) -> R:
        """TaskInfo (status, progress, result, error...) of one run."""
        return self._send(Call("GET", path("tasks", task_id), **_timed(timeout)))

    def execute_task(
        self,
        task_id: str | None,
        task_type: str,
        params: dict[str, Any] | None = None,
        wait_for_devices: bool | float = False,
    ) -> R:
        """Start a run; ``{"task_id", "task_type", "device_ids", "status"}``.

        ``task_id=None`` lets the server pick one. ``wait_for_devices=True`` (or seconds)
        queues the run until its devices are free instead of failing with DeviceBusyError.
        """
        body = {
            "task_id": task_id,
            "task_type": task_type,
            "params": dict(params or {}),
            "wait_for_devices": wait_for_devices,
        }
        return self._send(Call("POST", "/tasks", body=body))

    def get_task_error(self, task_id: str) -> R:
        """``{"error": record}`` (with traceback) for the run's error, or None."""
        return self._send(Call("GET", path("tasks", task_id, "error"), expect=_error_or_none))

    def clear_task_error(self, task_id: str) -> R:
        """Forget the run's stored error."""
        return self._send(Call("DELETE", path("tasks", task_id, "error"), expect=_ignore))

    def cancel_task(self, task_id: str) -> R:
        """Ask a run to stop: ``{"status": "cancellation_requested", "task_id"}``."""
        return self._send(Call("POST", path("tasks", task_id, "cancel")))

    def pause_task(self, task_id: str) -> R:
        """Close the run's pause gate: ``{"status": "paused", ...}``."""
        return self._send(Call("POST", path("tasks", task_id, "pause")))

    def resume_task(self, task_id: str) -> R:
        """Open the run's pause gate: ``{"status": "resumed", ...}``."""
        return self._send(Call("POST", path("tasks", task_id, "resume")))

    def set_task_parameter(self, task_id: str, key: str, value: Any) -> R:
        """Call the running task's ``set_parameter(key, value)``."""
        body = {"key": key, "value": value}
        return self._send(Call("POST", path("tasks", task_id, "parameters"), body=body))

    def get_task_parameter(self, task_id: str, key: str) -> R:
        """The value of the running task's ``get_parameter(key)``."""
        return self._send(Call("GET", path("tasks", task_id, "parameters", key), expect=_value))

    # ------------------------------------------------------------------ leases
    def list_leases(self) -> R:
        """``{"leases": [lease, ...]}``: active leases."""
        return self._send(Call("GET", "/leases"))

    def claim(
        self, device_ids: Sequence[str], owner: str | None = None, ttl: float | None = None
    ) -> R:
        """Lease devices to ``owner`` (default: this client's owner); returns the lease dict.

        Commands to leased devices are then accepted only from that owner (header
        ``X-Labd-Owner``). The lease expires after ``ttl`` seconds unless renewed.
        """
        if isinstance(device_ids, str):
            raise InvalidArgumentError(
                f"claim: device_ids must be a list of ids, got the string {device_ids!r}; "
                f"write [{device_ids!r}]."
            )
        body = {"device_ids": list(device_ids), "owner": owner or self.owner, "ttl": ttl}
        return self._send(Call("POST", "/leases", body=body))

    def renew_lease(self, lease_id: str, ttl: float | None = None) -> R:
        """Push a lease's expiry ``ttl`` seconds (default: its own ttl) into the future."""
        return self._send(Call("POST", path("leases", lease_id, "renew"), body={"ttl": ttl}))

    def release_lease(self, lease_id: str, reason: str | None = None) -> R:
        """Release a lease you hold; with ``reason``, an admin breaks someone else's."""
        params = None if reason is None else {"reason": reason}
        return self._send(Call("DELETE", path("leases", lease_id), params=params))

    # ------------------------------------------------------------------ helpers
    def _timeout_over(self, server_timeout: float) -> float:
        # The server waits for connect(timeout) plus 1 s before its own 504.
        return max(self.timeout, float(server_timeout) + 1.0) + TIMEOUT_MARGIN_S


class ServerAPI(Endpoints[Any]):
    """Blocking client for a labd (or LabDaemon) server; one pooled connection per server.

    ``owner`` is sent as ``X-Labd-Owner`` (the principal for leases); ``token`` as a bearer
    token. Failed requests raise :class:`ServerAPIError` subclasses that are also the matching
    labd exceptions (``except labd.DeviceBusyError`` works).

    Example::

        api = ServerAPI("http://127.0.0.1:5000")
        api.list_devices()["devices"]
        api.close()
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 30.0,
        owner: str | None = None,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.owner = owner
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=http_timeout(timeout),
            headers=client_headers(owner, token),
        )

    def __repr__(self) -> str:
        state = "closed" if self._client.is_closed else "open"
        return f"<ServerAPI {self.base_url} owner={self.owner!r} {state}>"

    def _send(self, call: Call) -> Any:
        if self._client.is_closed:
            raise ClientClosedError(
                f"This ServerAPI for {self.base_url} was closed; create a new one."
            )
        request = build_request(self._client, self, call)
        try:
            response = self._client.send(request)
        except httpx.TransportError as exc:
            raise connection_error(exc, call, self.base_url) from exc
        return read_answer(call, response)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._client.is_closed

    def close(self) -> None:
        """Close the connection pool. Idempotent."""
        self._client.close()

    def __enter__(self) -> ServerAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
