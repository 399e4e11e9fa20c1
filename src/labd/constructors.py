"""Plugin classes -> instances: devices as ``cls(device_id, **params)``, tasks as
``cls(task_id=..., **params)``, with parameters checked against the constructor first.

A parameter the constructor does not take names itself and the nearest valid name::

    Device type 'SimLaser': unexpected parameter 'wavelenght'; did you mean 'wavelength'? ...

Checking before calling (``inspect.Signature.bind``) also means a constructor never runs
half-way on bad parameters. A class whose signature cannot be read is simply called.

Which device classes receive the id (DESIGN.md 2.1, LabDaemon's ``cls(device_id, **params)``):
a first positional parameter named ``device_id``, a required one not given by keyword (any
name: LabDaemon passes the id positionally), or ``*args`` (a subclass passing through). A
class whose first parameter is optional and named otherwise (``port="COM1"``), or that takes
no positional parameter, is built from the keywords alone and gets ``device_id`` set as an
attribute afterwards, so the id never lands in a parameter by mistake.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from typing import Any

from labd.errors import InvalidArgumentError

__all__ = ["construct_device", "construct_task"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def construct_device(cls: Any, device_id: str, device_type: str, params: dict[str, Any]) -> Any:
    """``cls(device_id, **params)``, or ``cls(**params)`` for a class that takes no id."""
    signature = _signature(cls)
    if signature is None:
        return cls(device_id, **params)
    pass_id = _takes_device_id(signature, params)
    args = (device_id,) if pass_id else ()
    _check_binds(signature, args, params, f"Device type {device_type!r}", cls,
                 skip={"device_id"} | _first_positional_name(signature, pass_id))
    instance = cls(*args, **params)
    if not pass_id:
        with contextlib.suppress(AttributeError):  # __slots__ or a read-only property
            instance.device_id = device_id
    return instance


def construct_task(cls: Any, task_id: str, task_type: str, params: dict[str, Any]) -> Any:
    """``cls(task_id=task_id, **params)``, as LabDaemon builds tasks."""
    signature = _signature(cls)
    if signature is not None:
        _check_binds(signature, (), {"task_id": task_id, **params}, f"Task type {task_type!r}",
                     cls, skip={"task_id"})
    return cls(task_id=task_id, **params)


def _signature(cls: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):  # builtins and C extensions may have none
        return None


def _takes_device_id(signature: inspect.Signature, params: dict[str, Any]) -> bool:
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameter.kind not in _POSITIONAL:
            return False
        if parameter.name == "device_id":
            return True
        return parameter.default is parameter.empty and parameter.name not in params
    return False


def _first_positional_name(signature: inspect.Signature, pass_id: bool) -> set[str]:
    """The parameter the id fills (not a name the caller may pass as a keyword)."""
    if not pass_id:
        return set()
    first = next(iter(signature.parameters.values()), None)
    return {first.name} if first is not None and first.kind in _POSITIONAL else set()


def _check_binds(
    signature: inspect.Signature, args: tuple[Any, ...], params: dict[str, Any], what: str,
    cls: Any, skip: set[str],
) -> None:
    try:
        signature.bind(*args, **params)
    except TypeError as exc:
        problem = _diagnose(signature, params, skip) or str(exc)
        name = getattr(cls, "__name__", repr(cls))
        stop = "" if problem.endswith("?") else "."
        raise InvalidArgumentError(
            f"{what}: {problem}{stop} Its constructor is {name}{signature}."
        ) from exc


def _diagnose(signature: inspect.Signature, params: dict[str, Any], skip: set[str]) -> str | None:
    """Each unexpected keyword with its nearest valid name, else the missing required ones."""
    parameters = signature.parameters.values()
    valid = [p.name for p in parameters
             if p.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY) and p.name not in skip]
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unexpected = [] if takes_any_keyword else [k for k in params if k not in valid and k not in skip]
    if unexpected:
        return "; ".join(_unexpected(name, valid) for name in unexpected)
    missing = [p.name for p in parameters
               if p.name in valid and p.default is p.empty and p.name not in params
               and p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    if missing:
        extra = [k for k in params if k not in valid and k not in skip]  # taken by **kwargs
        return "; ".join(_missing(name, extra) for name in missing)
    return None


def _missing(name: str, given: list[str]) -> str:
    close = difflib.get_close_matches(name, given, n=1)
    hint = f" (got {close[0]!r}; did you mean {name!r}?)" if close else ""
    return f"missing required parameter {name!r}{hint}"


def _unexpected(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return f"unexpected parameter {name!r}; did you mean {close[0]!r}?"
    choices = ", ".join(repr(v) for v in valid) or "none"
    return f"unexpected parameter {name!r} (its parameters: {choices})"
