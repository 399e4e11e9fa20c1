"""Small helpers for scripts and GUIs that talk to a labd server (LabDaemon's ``patterns``).

- :func:`ensure_server`: wait until a server answers ``/health``, or fail with a message
  that says how to start one. It never starts anything itself.
- :func:`ensure_device`: make sure a device exists on the server (add it if missing) and,
  by default, is connected.

Example::

    from labd.client import ServerAPI
    from labd.patterns import ensure_device, ensure_server

    ensure_server("http://127.0.0.1:5000", timeout=10)
    with ServerAPI("http://127.0.0.1:5000") as api:
        ensure_device(api, "laser2", "SimLaser", settling_time=0.01)
"""

from __future__ import annotations

import time
from typing import Any

from labd.client.api import DEFAULT_URL, ServerAPI
from labd.client.errors import (
    RemoteInvalidArgumentError,
    ServerAPIError,
    ServerConnectionError,
    ServerTimeoutError,
)
from labd.client.remote import RemoteDaemon
from labd.errors import InvalidArgumentError, UnknownNameError

__all__ = ["ensure_device", "ensure_server"]

_FIRST_POLL_S = 0.05
_MAX_POLL_S = 0.5
# One /health request may take at most this long, so a hung server cannot eat the timeout.
_MAX_ATTEMPT_S = 2.0


def _health_once(server_url: str, timeout: float, token: str | None) -> dict[str, Any]:
    with ServerAPI(server_url, timeout=timeout, token=token) as api:
        answer: dict[str, Any] = api.health()
    return answer


def ensure_server(
    server_url: str | None = DEFAULT_URL,
    timeout: float = 5.0,
    *,
    token: str | None = None,
    raise_on_failure: bool = False,
) -> bool:
    """Wait up to ``timeout`` seconds for a healthy labd server at ``server_url``.

    Returns True once ``GET /health`` answers ``{"status": "healthy"}`` (or ``"degraded"``: the
    server works but cannot save history), and False (as in
    LabDaemon) when none does in time. With ``raise_on_failure=True`` it raises
    :class:`ServerConnectionError` naming the URL and how to start a server instead, so a
    script stops with the reason.

    Example: ``ensure_server("http://127.0.0.1:5000", timeout=10)``.
    """
    url = (server_url or DEFAULT_URL).rstrip("/")
    deadline = time.monotonic() + max(float(timeout), 0.0)
    delay = _FIRST_POLL_S
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            answer = _health_once(url, max(min(remaining, _MAX_ATTEMPT_S), 0.05), token)
        except ServerConnectionError as exc:  # nobody listening yet, or too slow: keep trying
            last = exc
        else:
            if answer.get("status") in ("healthy", "degraded"):  # degraded: history not saved
                return True
            last = ServerAPIError(f"{url}/health answered {answer!r}, not status 'healthy'.")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_POLL_S)
    if raise_on_failure:
        raise _not_ready(url, timeout, last)
    return False


def _not_ready(url: str, timeout: float, last: BaseException | None) -> ServerAPIError:
    if last is not None and not isinstance(last, ServerConnectionError):
        return ServerAPIError(f"The server at {url} is not healthy after {timeout} s: {last}")
    why = (
        "it did not answer in time" if isinstance(last, ServerTimeoutError) else "nothing answered"
    )
    return ServerConnectionError(
        f"No labd server at {url} ({why} within {timeout} s). Start one with `labd serve` "
        f"(or `labd demo` for the simulated lab), or check the URL and port."
    )


def _as_api(api: ServerAPI | RemoteDaemon) -> ServerAPI:
    return api.api if isinstance(api, RemoteDaemon) else api


def ensure_device(
    api: ServerAPI | RemoteDaemon,
    device_id: str,
    device_type: str,
    connect: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Make sure ``device_id`` exists on the server (adding it with ``params`` if not).

    With ``connect`` (default) also connect it. Returns the device's info dict. A device that
    exists with another type raises :class:`InvalidArgumentError` rather than being used as
    if it were the type you asked for. Safe when two clients race to add the same device.

    Example: ``ensure_device(api, "laser2", "SimLaser", settling_time=0.01)``.
    """
    client = _as_api(api)
    info = _existing(client, device_id)
    if info is None:
        try:
            info = client.add_device(device_id, device_type, params)
        except RemoteInvalidArgumentError:
            # Someone else may have added it between our check and our add: use theirs.
            info = _existing(client, device_id)
            if info is None:
                raise
    if info.get("device_type") not in (None, device_type):
        raise InvalidArgumentError(
            f"Device {device_id!r} already exists on {client.base_url} as a "
            f"{info['device_type']!r}, not a {device_type!r}; pick another id or remove it first."
        )
    if connect and not info.get("connected", False):
        info = client.connect_device(device_id)
    return info


def _existing(api: ServerAPI, device_id: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = api.get_device(device_id)
    except UnknownNameError:
        return None
    return info
