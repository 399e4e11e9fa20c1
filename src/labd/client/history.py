"""The run-history endpoints of the client: ``/runs`` and a device's error history.

:class:`RunHistoryEndpoints` is a base of :class:`labd.client.api.Endpoints`, so
:class:`~labd.client.ServerAPI` and :class:`~labd.client.AsyncServerAPI` both have these
methods. The server validates every value and answers 400 naming the bad one; here values
are only put into their wire form.

Example::

    with ServerAPI("http://127.0.0.1:5000") as api:
        page = api.list_runs(status="failed", since="2024-05-01T00:00:00Z")
        for run in page["runs"]:
            print(run["task_id"], run["error"]["message"])
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from labd.client._http import Call, path
from labd.errors import InvalidArgumentError

__all__ = ["RunHistoryEndpoints", "since_param"]

R = TypeVar("R")


def since_param(since: str | float | datetime) -> str:
    """``since`` as the server reads it: ISO 8601 text as given, numbers as POSIX seconds.

    A naive ``datetime`` is local time (as ``datetime.timestamp`` reads it).
    """
    if isinstance(since, datetime):
        return repr(since.timestamp())
    if isinstance(since, bool) or not isinstance(since, str | int | float):
        raise InvalidArgumentError(
            f"since must be an ISO 8601 string, POSIX seconds or a datetime, got {since!r}."
        )
    return since if isinstance(since, str) else repr(float(since))


def _int(name: str, value: object) -> str:
    # str(True) would send "True"; the server would refuse it, but say it here with the name.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}.")
    return str(value)


class RunHistoryEndpoints(Generic[R]):
    """Run history and error history; ``R`` is what sending a call returns (see Endpoints)."""

    def _send(self, call: Call) -> R:
        raise NotImplementedError

    def list_runs(
        self,
        status: str | None = None,
        task_type: str | None = None,
        since: str | float | datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> R:
        """``GET /runs``: ``{"runs": [summary, ...], "limit", "offset", "next_offset"}``.

        Newest first; ``next_offset`` is None on the last page. ``since`` is ISO 8601, POSIX
        seconds or a datetime; ``limit`` is 1 to 1000.
        """
        params = {"limit": _int("limit", limit), "offset": _int("offset", offset)}
        if status is not None:
            params["status"] = str(status)
        if task_type is not None:
            params["task_type"] = str(task_type)
        if since is not None:
            params["since"] = since_param(since)
        return self._send(Call("GET", "/runs", params=params))

    def get_run(self, task_id: str) -> R:
        """``GET /runs/{id}``: the full record (params, result, error with traceback, events).

        Works for runs of earlier server sessions too; :class:`RemoteUnknownTaskError` if none.
        """
        return self._send(Call("GET", path("runs", task_id)))

    def get_run_events(self, task_id: str, limit: int = 100) -> R:
        """``GET /runs/{id}/events``: ``{"task_id", "events": [...]}``, the last ``limit``."""
        params = {"limit": _int("limit", limit)}
        return self._send(Call("GET", path("runs", task_id, "events"), params=params))

    def get_device_error_history(self, device_id: str, limit: int = 100) -> R:
        """``GET /devices/{id}/errors/history``: ``{"device_id", "errors": [...]}``, newest first."""
        params = {"limit": _int("limit", limit)}
        where = path("devices", device_id, "errors", "history")
        return self._send(Call("GET", where, params=params))
