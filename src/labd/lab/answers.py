"""What a node answers about its own runs, error records, history and devices, to anyone.

A node of a lab answers other nodes' requests about the runs it started and the devices it
serves (:meth:`LabNode._handle <labd.lab.LabNode>`); the HTTP routes of every node answer
the same questions about their own. Both go through the functions here, so ``POST
/tasks/{id}/parameters`` (for example) gives the same JSON, errors included, on whichever
node of the lab it is asked:

    set_task_parameter(handle, "gain", 2.5, actor)   # the route, for a run of this node
    ANSWERS["set_parameter"](daemon, request)         # the run's node, for another node

The caller's identity travels in the request as the existing requests carry it: the
``principal`` the run or device code acts for, and for a run's owner-only actions the
``caller`` (``{"user", "admin"}`` from the token the caller's node checked; None without
tokens). The run's node decides; a refusal comes back as ``{"refused_owner": owner}``, which
the caller's node turns into the same 403 a refusal of its own would be.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from labd.errors import (
    DeviceOperationError,
    ErrorRecord,
    InvalidArgumentError,
    LabDaemonException,
)
from labd.ownership import Actor, acting_as
from labd.secrets import REDACTED, is_secret_name
from labd.signatures import device_constructor_signature
from labd.tasks import TaskHandle

__all__ = [
    "ANSWERS",
    "RUN_ACTIONS",
    "add_device",
    "device_error_history",
    "device_params",
    "guard_task_code",
    "may_act_on",
    "read_task_parameter",
    "run_record",
    "set_task_parameter",
]

T = TypeVar("T")
Answer = Callable[[Any, dict[str, Any]], Any]

#: What may be asked of a run besides its parameters (the TaskHandle methods of the same names).
RUN_ACTIONS = frozenset({"cancel", "pause", "resume"})
#: How long a history read waits for the run store to commit what is queued.
FLUSH_S = 2.0


def guard_task_code(fn: Callable[[], T], failure: str) -> T:
    """Call a task's own code: an exception of its own is bad input (400, naming its class).

    For ``set_parameter``/``get_parameter``: the task refusing a value is the caller's
    mistake, not the framework's (labd's own errors pass unchanged).
    """
    try:
        return fn()
    except LabDaemonException:
        raise
    except Exception as exc:
        refused = InvalidArgumentError(f"{failure}: {type(exc).__name__}: {exc}")
        # Also here, not only as __cause__: the cause does not travel between nodes.
        refused.labd_context = {"cause_type": type(exc).__name__}  # type: ignore[attr-defined]
        raise refused from exc


def may_act_on(owner: str | None, caller: Mapping[str, Any] | None) -> bool:
    """True if ``caller`` may cancel, pause, resume or set parameters of a run of ``owner``.

    ``caller`` is ``{"user", "admin"}`` from the caller's token, None on a server without
    tokens (nothing is checked). Its owner and admins may; a run nobody owns (started in the
    daemon's process) is anyone's.
    """
    return caller is None or bool(caller.get("admin")) or owner in (None, caller.get("user"))


def set_task_parameter(handle: TaskHandle, key: str, value: Any, actor: Actor) -> None:
    """The run's ``set_parameter(key, value)`` as ``actor``; the task refusing it is 400."""
    with acting_as(actor):
        guard_task_code(lambda: handle.set_parameter(key, value),
                        f"Task {handle.task_id!r} rejected parameter {key!r}")


def read_task_parameter(handle: TaskHandle, key: str, actor: Actor) -> Any:
    """The run's ``get_parameter(key)`` as ``actor``; a secret-named one as ``"***"``."""
    with acting_as(actor):
        value = guard_task_code(lambda: handle.get_parameter(key),
                                f"Task {handle.task_id!r} could not read parameter {key!r}")
    return REDACTED if is_secret_name(key) else value  # never sent (labd.secrets)


def run_record(daemon: Any, task_id: str, events_limit: int | None = None) -> dict[str, Any]:
    """The full record of a run of ``daemon`` (``GET /runs/{id}``), live or historical.

    ``events_limit``: with a run store, the record with its last ``events_limit`` events
    (``GET /runs/{id}/events``) rather than the store's default. Raises
    :class:`~labd.errors.UnknownTaskError` if there is none.
    """
    store = daemon.store
    if events_limit is not None and store is not None:
        store.flush(timeout=FLUSH_S)
        found: dict[str, Any] | None = store.get_run(task_id, events_limit=events_limit)
        if found is not None:
            return found
    record: dict[str, Any] = daemon.get_run(task_id)  # a live run without a store: no events
    return record


def device_error_history(daemon: Any, device_id: str, limit: int) -> list[dict[str, Any]]:
    """Every recorded error of a device, newest first, with tracebacks.

    With a run store the id need not be a current device (history outlives it); without one
    this is the device's last error only, and an unknown id is UnknownDeviceError.
    """
    store = daemon.store
    if store is not None:
        store.flush(timeout=FLUSH_S)
        errors: list[dict[str, Any]] = store.device_errors(device_id, limit=limit)
        return errors
    last = daemon.get_device_error(device_id)
    return [last.to_dict()] if last is not None else []


def device_params(daemon: Any, device_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked and converted against the constructor's annotations (422).

    Raises :class:`~labd.errors.UnknownDeviceTypeError` if ``daemon`` has no such type.
    """
    cls = daemon.device_class(device_type)
    signature = device_constructor_signature(cls, params) if isinstance(cls, type) else None
    if signature is None:
        return params
    _, checked = signature.validate((), params, f"device type {device_type!r}")
    return checked


def add_device(
    daemon: Any, device_id: str, device_type: str, params: dict[str, Any], connect: bool,
) -> None:
    """Construct the device (``params`` already checked) and connect it if asked.

    The constructor's own exception is :class:`DeviceOperationError` (502) naming it, with
    ``context.cause_type``, as every device fault the server answers.
    """
    try:
        daemon.add_device(device_id, device_type, **params)
    except LabDaemonException:
        raise
    except Exception as exc:
        fault = DeviceOperationError(
            f"Device {device_id!r}: {device_type}(...) constructor raised {type(exc).__name__}: {exc}")
        fault.labd_context = {  # type: ignore[attr-defined]
            "device_id": device_id, "cause_type": type(exc).__name__}
        raise fault from exc
    if connect:
        daemon.connect_device(device_id)


# -- the requests of other nodes ------------------------------------------------------------------
def _actor(request: Mapping[str, Any]) -> Actor:
    """The remote caller a request speaks for."""
    return Actor(principal=request.get("principal"), remote=True)


def _owners_run(daemon: Any, request: Mapping[str, Any]) -> tuple[TaskHandle, dict[str, Any] | None]:
    """The run a request names, and the refusal to answer if its ``caller`` may not act on it."""
    handle = daemon.get_task(str(request.get("task")))
    owner = handle.info()["owner"]
    return handle, None if may_act_on(owner, request.get("caller")) else {"refused_owner": owner}


def _control(daemon: Any, request: dict[str, Any]) -> dict[str, Any] | None:
    action = request.get("action")
    if action not in RUN_ACTIONS:
        raise InvalidArgumentError(f"Unknown run action {action!r}; valid: {sorted(RUN_ACTIONS)}.")
    handle, refusal = _owners_run(daemon, request)
    if refusal is None:
        getattr(handle, str(action))()
    return refusal


def _set_parameter(daemon: Any, request: dict[str, Any]) -> dict[str, Any] | None:
    handle, refusal = _owners_run(daemon, request)
    if refusal is None:
        set_task_parameter(handle, str(request.get("key")), request.get("value"), _actor(request))
    return refusal


def _get_parameter(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    key = str(request.get("key"))
    handle = daemon.get_task(str(request.get("task")))
    return {"key": key, "value": read_task_parameter(handle, key, _actor(request))}


def _error_record(
    read: Callable[[], ErrorRecord | None], clear: Callable[[], None], request: dict[str, Any],
) -> dict[str, Any] | None:
    """A stored error record (its traceback if ``tracebacks``), or clear it (``clear``)."""
    if request.get("clear"):
        clear()
        return None
    record = read()
    return record.to_dict(include_traceback=bool(request.get("tracebacks"))) if record else None


def _task_error(daemon: Any, request: dict[str, Any]) -> dict[str, Any] | None:
    task_id = str(request.get("task"))
    return _error_record(lambda: daemon.get_task_error(task_id),
                         lambda: daemon.clear_task_error(task_id), request)


def _device_error(daemon: Any, request: dict[str, Any]) -> dict[str, Any] | None:
    device_id = str(request.get("device"))
    return _error_record(lambda: daemon.get_device_error(device_id),
                         lambda: daemon.clear_device_error(device_id), request)


def _run(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    limit = request.get("events_limit")
    return run_record(daemon, str(request.get("task")), None if limit is None else int(limit))


def _device_errors(daemon: Any, request: dict[str, Any]) -> list[dict[str, Any]]:
    return device_error_history(daemon, str(request.get("device")), int(request.get("limit", 100)))


def _add_device(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    device_id, device_type = str(request.get("device")), str(request.get("device_type"))
    params = device_params(daemon, device_type, dict(request.get("params") or {}))
    with acting_as(_actor(request)):
        add_device(daemon, device_id, device_type, params, bool(request.get("connect")))
    info: dict[str, Any] = daemon.device_info(device_id)
    return info


#: op -> the answer of this node, given its daemon and the request.
ANSWERS: dict[str, Answer] = {
    "task_control": _control,
    "set_parameter": _set_parameter,
    "get_parameter": _get_parameter,
    "task_error": _task_error,
    "device_error": _device_error,
    "run": _run,
    "device_errors": _device_errors,
    "add_device": _add_device,
}
