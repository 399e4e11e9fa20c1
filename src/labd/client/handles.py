"""``RemoteTaskHandle``: a task run on a server, driven like a local :class:`labd.TaskHandle`.

``wait`` polls ``GET /tasks/{id}`` with a bounded backoff (10 ms doubling to 250 ms), so a
short run is seen finished within milliseconds and a long one costs four requests a second.
Outcomes match the local handle: the result, or :class:`labd.TaskCancelledError` (with
``.result``), :class:`labd.TaskFailedError` (chained from the rebuilt task exception), or
``TimeoutError``.
"""

from __future__ import annotations

import ast
import re
import time
from typing import Any

from labd.client.api import ServerAPI
from labd.client.errors import exception_from_record
from labd.errors import TaskCancelledError, TaskFailedError

__all__ = ["FINISHED_STATES", "RemoteTaskHandle"]

FINISHED_STATES = frozenset({"completed", "failed", "cancelled", "interrupted"})

_FIRST_POLL_S = 0.01
_MAX_POLL_S = 0.25
_REPR = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)\((?P<args>.*)\)$", re.DOTALL)


def _record_from_repr(text: str) -> dict[str, Any]:
    """An error record from ``repr(exc)`` (``"ValueError('bad')"``), for runs without one."""
    match = _REPR.match(text)
    if match is None:
        return {"type": "RemoteError", "message": text}
    message: Any = match.group("args")
    try:
        message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
        pass
    type_name = match.group("type").rsplit(".", 1)[-1]
    return {"type": type_name, "message": message if isinstance(message, str) else text}


class RemoteTaskHandle:
    """Your handle on a task run on a labd server.

    Example::

        handle = remote.execute_task("sweep1", "WavelengthSweep", laser_id="laser1", ...)
        handle.progress            # {"done": 12, "total": 50, "fraction": 0.24, ...}
        result = handle.wait(timeout=60)
    """

    def __init__(self, api: ServerAPI, task_id: str, task_type: str | None = None) -> None:
        self._api = api
        self.task_id = task_id
        self._task_type = task_type
        self._final: dict[str, Any] | None = None  # the info once finished: it no longer changes

    def __repr__(self) -> str:
        status = self._final["status"] if self._final else "?"
        return f"<RemoteTaskHandle {self.task_id!r} on {self._api.base_url} {status}>"

    # ------------------------------------------------------------------ state
    def info(self) -> dict[str, Any]:
        """The run's TaskInfo (``GET /tasks/{id}``): status, progress, result, error..."""
        if self._final is not None:
            return self._final
        info: dict[str, Any] = self._api.get_task(self.task_id)
        if info.get("status") in FINISHED_STATES:
            self._final = info
        return info

    @property
    def status(self) -> str:
        """``pending``, ``running``, ``paused``, ``completed``, ``failed``, ``cancelled`` or ``interrupted``."""
        return str(self.info()["status"])

    @property
    def result(self) -> Any:
        """What ``run`` returned (None until it ends); never raises for the run's outcome."""
        return self.info().get("result")

    @property
    def progress(self) -> dict[str, Any] | None:
        """The last progress report: ``done``, ``total``, ``fraction``, ``message``."""
        progress = self.info().get("progress")
        return progress if isinstance(progress, dict) else None

    @property
    def task_type(self) -> str:
        """The registered task type name."""
        if self._task_type is None:
            self._task_type = str(self.info()["task_type"])
        return self._task_type

    @property
    def device_ids(self) -> list[str]:
        """Devices this run claims."""
        return list(self.info().get("device_ids") or [])

    @property
    def error(self) -> dict[str, Any] | None:
        """The run's error record (without traceback; ``api.get_task_error`` has it), or None."""
        error = self.info().get("error")
        return error if isinstance(error, dict) else None

    def is_running(self) -> bool:
        """True until the run has ended (pending and paused runs count as running)."""
        return self.status not in FINISHED_STATES

    def is_paused(self) -> bool:
        """True while a pause is requested and the run has not ended."""
        info = self.info()
        return bool(info.get("paused")) and info.get("status") not in FINISHED_STATES

    def exception(self) -> BaseException | None:
        """The exception ``run`` raised, rebuilt on this side (see ``exception_from_record``), or None."""
        info = self.info()
        if not info.get("exception"):
            return None
        record = info.get("error")
        if not isinstance(record, dict):
            record = _record_from_repr(str(info["exception"]))
        return exception_from_record(record)

    # ------------------------------------------------------------------ control
    def wait(self, timeout: float | None = None) -> Any:
        """Block until the run ends and return its result.

        Raises ``TimeoutError`` if it is still going after ``timeout`` seconds,
        :class:`TaskCancelledError` (``.result`` holds what ``run`` returned) if it was
        cancelled, :class:`TaskFailedError` (chained from the task's exception) if it failed
        or was interrupted.
        """
        deadline = None if timeout is None else time.monotonic() + max(float(timeout), 0.0)
        delay = _FIRST_POLL_S
        while True:
            info = self.info()
            if info["status"] in FINISHED_STATES:
                return self._outcome(info)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"Wait timed out for task '{self.task_id}'. It is still {info['status']} "
                    f"after {timeout} s; wait longer, or cancel() it."
                )
            time.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL_S)

    def _outcome(self, info: dict[str, Any]) -> Any:
        status = info["status"]
        if status == "completed":
            return info.get("result")
        cause = self.exception()
        if status == "cancelled":
            raise TaskCancelledError(
                f"Task {self.task_id!r} was cancelled.", result=info.get("result")
            ) from cause
        error = info.get("error")
        why = error.get("message") if isinstance(error, dict) else status
        raise TaskFailedError(
            f"Task '{self.task_id}' failed during execution. {info.get('task_type')} failed: "
            f"{why}",
            result=info.get("result"),
        ) from cause

    def cancel(self) -> None:
        """Ask the run to stop (also opens the pause gate). No effect once it has ended."""
        if self._final is None:
            self._api.cancel_task(self.task_id)

    def pause(self) -> None:
        """Close the run's pause gate: it blocks at its next ``resume_event.wait()``."""
        if self._final is None:
            self._api.pause_task(self.task_id)

    def resume(self) -> None:
        """Open the pause gate again."""
        if self._final is None:
            self._api.resume_task(self.task_id)

    def set_parameter(self, key: str, value: Any) -> None:
        """Call the task's ``set_parameter(key, value)`` on the server."""
        self._api.set_task_parameter(self.task_id, key, value)

    def get_parameter(self, key: str) -> Any:
        """The task's ``get_parameter(key)``, from the server."""
        return self._api.get_task_parameter(self.task_id, key)
