"""Describe and check callables from their type annotations: the typed remote interface.

A remote caller (HTTP ``/call``, ``POST /tasks``, ``POST /devices``, the CLI, ``labd.connect``
proxies) sends JSON; :meth:`CallableSignature.validate` binds those values to the parameters
of a method or constructor and validates and converts each annotated one with pydantic in lax
mode (an int widens to a float, ``"abc"`` is no float, floats must be finite), before
anything reaches an instrument. Every problem is collected into one
:class:`ParameterValidationError` (HTTP 422), one entry per parameter. Unannotated (or
``Any``) parameters take any value; an annotation pydantic cannot describe is treated the same.

Local Python calls never come here: the locked wrappers stay plain Python.

:func:`signature_of` and :func:`constructor_signature` cache one :class:`CallableSignature` per
function (per class for constructors), and each builds its pydantic ``TypeAdapter`` s once, on
first use, so a validated call costs a dictionary lookup and one adapter call per argument.
pydantic is imported lazily; without it (a core install without the server extra) binding
and the misspelt-name diagnosis still work and values are passed through unconverted.

Example::

    sig = signature_of(laser.set_wavelength)          # def set_wavelength(self, nm: float)
    sig.validate([1550], {}, "laser1.set_wavelength()")   # ([1550.0], {})
    sig.validate(["abc"], {}, "laser1.set_wavelength()")  # ParameterValidationError (422)
"""

from __future__ import annotations

import difflib
import inspect
import re
import threading
import typing
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labd.errors import InvalidArgumentError

__all__ = [
    "CallableSignature",
    "ParameterValidationError",
    "SignatureParameter",
    "constructor_signature",
    "device_constructor_signature",
    "nearest_name",
    "signature_of",
    "type_text",
    "unexpected_name_message",
]

_EMPTY = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_NO_ADAPTER: Any = object()  # sentinel: an adapter was tried and pydantic could not build one


class ParameterValidationError(InvalidArgumentError):
    """Arguments that do not fit a method's or constructor's parameters (HTTP 422).

    :attr:`errors` has one entry per bad parameter: ``{"parameter", "expected", "schema",
    "received", "message"}`` (``received`` is absent for a missing parameter). It is also the
    error record's ``context.errors``. A ``ValueError``, as every :class:`InvalidArgumentError`.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors
        self.labd_context = {"errors": errors}


def nearest_name(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt ``name`` (difflib), or None if none is close.

    >>> nearest_name("wavelenght", ["wavelength", "power_mw"])
    'wavelength'
    """
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unexpected_name_message(name: str, choices: Iterable[str]) -> str:
    """``unexpected parameter 'wavelenght'; did you mean 'wavelength'?`` (or the valid names).

    >>> unexpected_name_message("x", ["nm"])
    "unexpected parameter 'x'; parameters: 'nm'"
    """
    names = sorted(choices)
    guess = nearest_name(name, names)
    if guess is not None:
        return f"unexpected parameter {name!r}; did you mean {guess!r}?"
    listed = ", ".join(repr(n) for n in names) if names else "none"
    return f"unexpected parameter {name!r}; parameters: {listed}"


_QUOTED_OR_MODULE = re.compile(r"'[^']*'|\"[^\"]*\"|\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])")


def type_text(annotation: Any) -> str | None:
    """A short readable type: ``float``, ``list[float]``, ``Literal['fast', 'slow']``, ``Mode``.

    None for a parameter without annotation. Module prefixes are dropped (``typing.``,
    ``mylab.drivers.``), quoted literal values are kept as written.
    """
    if annotation is _EMPTY:
        return None
    if isinstance(annotation, str):
        return annotation
    if annotation is None or annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__qualname__
    text = repr(annotation)
    return _QUOTED_OR_MODULE.sub(lambda m: m.group(0) if m.group(0)[0] in "'\"" else "", text)


def _pydantic_adapter(annotation: Any) -> Any:
    """A ``TypeAdapter`` for ``annotation`` (finite floats), or :data:`_NO_ADAPTER`."""
    try:
        from pydantic import ConfigDict, PydanticUserError, TypeAdapter
    except ImportError:  # a core install without the server extra: no conversion
        return _NO_ADAPTER
    config = ConfigDict(allow_inf_nan=False)
    try:
        try:
            return TypeAdapter(annotation, config=config)
        except PydanticUserError as exc:
            if exc.code != "type-adapter-config-unused":
                raise
            return TypeAdapter(annotation)  # a model, dataclass or TypedDict keeps its own config
    except Exception:  # e.g. np.ndarray or a driver's own class: pydantic has no schema for it
        return _NO_ADAPTER


def _json_schema(adapter: Any) -> dict[str, Any]:
    try:
        schema: dict[str, Any] = adapter.json_schema()
    except Exception:  # a type that validates but has no JSON Schema (a callable default...)
        return {}
    return schema


@dataclass
class SignatureParameter:
    """One parameter: name, kind, default and annotation, with its adapter built on first use."""

    name: str
    kind: inspect._ParameterKind
    default: Any
    annotation: Any  # the evaluated annotation, or inspect.Parameter.empty (takes anything)
    _adapter: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def required(self) -> bool:
        """True if a caller must give it (no default, not ``*args``/``**kwargs``)."""
        return self.default is _EMPTY and self.kind in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY)

    @property
    def adapter(self) -> Any:
        """The pydantic ``TypeAdapter``, or None when any value is accepted."""
        adapter = self._adapter
        if adapter is None:
            with self._lock:
                if self._adapter is None:
                    self._adapter = (_NO_ADAPTER if self.annotation is _EMPTY
                                     else _pydantic_adapter(self.annotation))
                adapter = self._adapter
        return None if adapter is _NO_ADAPTER else adapter

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the values it takes (``{}``: anything)."""
        adapter = self.adapter
        return {} if adapter is None else _json_schema(adapter)

    def describe(self) -> dict[str, Any]:
        """``{"name", "required", "default", "annotation", "kind", "schema", "type"}`` (JSON-ready).

        ``type`` is LabDaemon's field: the schema's JSON type (``"number"``...) or ``"any"``.
        """
        schema = self.schema()
        return {
            "name": self.name,
            "required": self.required,
            "default": _json_default(self.default),
            "annotation": type_text(self.annotation),
            "kind": self.kind.name.lower(),
            "schema": schema,
            "type": _json_type(schema),
        }


def _json_type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    return kind if isinstance(kind, str) else "any"


def _json_default(value: Any) -> Any:
    if value is _EMPTY:
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    enum_value = getattr(value, "value", None)  # an Enum member's value is what a caller sends
    if enum_value is not None and isinstance(enum_value, bool | int | float | str):
        return enum_value
    return repr(value)


class CallableSignature:
    """The parameters of one callable, with cached pydantic adapters. Thread-safe."""

    def __init__(self, func: Callable[..., Any], skip: frozenset[str] = frozenset()) -> None:
        signature = inspect.signature(func)
        hints = _type_hints(func)
        self.parameters: tuple[SignatureParameter, ...] = tuple(
            SignatureParameter(p.name, p.kind, p.default, _annotation_of(p, hints))
            for p in signature.parameters.values() if p.name not in skip
        )
        self._return = SignatureParameter("return", inspect.Parameter.POSITIONAL_ONLY, _EMPTY,
                                          hints.get("return", _EMPTY))
        self._positional = tuple(p for p in self.parameters if p.kind in _POSITIONAL)
        self._by_name = {p.name: p for p in self.parameters if p.kind in _BY_NAME}
        self._var_args = next((p for p in self.parameters
                               if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
        self._var_kwargs = next((p for p in self.parameters
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._required = tuple(p for p in self.parameters if p.required)

    def describe(self, *, var_keyword: bool = True) -> list[dict[str, Any]]:
        """Each parameter's :meth:`SignatureParameter.describe` (``**kwargs`` left out if asked)."""
        return [p.describe() for p in self.parameters
                if var_keyword or p.kind is not inspect.Parameter.VAR_KEYWORD]

    def returns(self) -> tuple[str | None, dict[str, Any]]:
        """The return annotation as text, and its JSON Schema (``{}`` if unannotated)."""
        return type_text(self._return.annotation), self._return.schema()

    def validate(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], what: str,
    ) -> tuple[list[Any], dict[str, Any]]:
        """``(args, kwargs)`` bound, validated and converted, or :class:`ParameterValidationError`.

        ``what`` names the callable in the message (``"laser1.set_wavelength()"``). Every bad,
        missing or unexpected parameter is reported, not only the first.
        """
        errors: list[dict[str, Any]] = []
        out_args: list[Any] = []
        given: set[str] = set()
        positional = self._positional
        for index, value in enumerate(args):
            if index < len(positional):
                param = positional[index]
                given.add(param.name)
            elif self._var_args is not None:
                param = self._var_args
            else:
                errors.append(_too_many(positional, index, len(args), value))
                continue
            label = param.name if param is not self._var_args else f"{param.name}[{index}]"
            out_args.append(_convert(param, label, value, errors))
        out_kwargs: dict[str, Any] = {}
        for name, value in kwargs.items():
            param_or_none = self._by_name.get(name)
            if param_or_none is None:
                if self._var_kwargs is None:
                    errors.append({"parameter": name, "expected": None, "schema": None,
                                   "received": value,
                                   "message": unexpected_name_message(name, self._by_name)})
                    continue
                param_or_none = self._var_kwargs
            elif name in given:
                errors.append({"parameter": name, "expected": type_text(param_or_none.annotation),
                               "schema": None, "received": value,
                               "message": f"parameter {name!r} is given twice (by position "
                                          "and by name)"})
                continue
            given.add(name)
            out_kwargs[name] = _convert(param_or_none, name, value, errors)
        for param in self._required:
            if param.name not in given:
                errors.append({"parameter": param.name, "expected": type_text(param.annotation),
                               "schema": param.schema(),
                               "message": f"missing required parameter {param.name!r}"})
        if errors:
            raise ParameterValidationError(_message(what, errors), errors)
        return out_args, out_kwargs


def _convert(
    param: SignatureParameter, label: str, value: Any, errors: list[dict[str, Any]],
) -> Any:
    adapter = param.adapter
    if adapter is None:
        return value
    try:
        return adapter.validate_python(value)
    except Exception as exc:  # pydantic's ValidationError (or a validator's own error)
        errors.append(_mismatch(param, label, value, exc))
        return value


def _mismatch(
    param: SignatureParameter, label: str, value: Any, exc: Exception,
) -> dict[str, Any]:
    details = getattr(exc, "errors", None)
    text = str(exc)
    if callable(details):
        parts = []
        for error in details(include_url=False):
            where = "".join(f"[{part!r}]" for part in error.get("loc", ()))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        text = "; ".join(parts)
    expected = type_text(param.annotation)
    return {"parameter": label, "expected": expected, "schema": param.schema(),
            "received": value,
            "message": f"parameter {label!r} expects {expected}, got {_show(value)}: {text}"}


def _too_many(
    positional: Sequence[SignatureParameter], index: int, count: int, value: Any,
) -> dict[str, Any]:
    return {"parameter": f"args[{index}]", "expected": None, "schema": None, "received": value,
            "message": f"takes {len(positional)} positional argument(s) but {count} were given"}


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _message(what: str, errors: list[dict[str, Any]]) -> str:
    problems = "; ".join(str(e["message"]) for e in errors)
    end = "" if problems.endswith("?") else "."
    return f"Invalid arguments for {what}: {problems}{end} Nothing was done."


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """Evaluated annotations; one that cannot be evaluated is left out (takes anything)."""
    target: Any = inspect.unwrap(func)
    if isinstance(target, type):
        target = vars(target).get("__init__") or getattr(target, "__init__", target)
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # a name only imported under TYPE_CHECKING, a typo in a string...
        pass
    raw = getattr(target, "__annotations__", None) or {}
    namespace = getattr(target, "__globals__", {})
    hints: dict[str, Any] = {}
    for name, annotation in raw.items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        except Exception:
            continue
    return hints


def _annotation_of(param: inspect.Parameter, hints: Mapping[str, Any]) -> Any:
    annotation = hints.get(param.name, _EMPTY)
    if annotation is Any or annotation is object:
        return _EMPTY
    return annotation


_cache: weakref.WeakKeyDictionary[Any, CallableSignature | None] = weakref.WeakKeyDictionary()
_constructors: weakref.WeakKeyDictionary[type, dict[frozenset[str], CallableSignature | None]] = (
    weakref.WeakKeyDictionary())
_cache_lock = threading.Lock()


def signature_of(func: Callable[..., Any]) -> CallableSignature | None:
    """The cached signature of a (bound) method or function; None if Python cannot tell it.

    Cached per underlying function, so every instance of a device class shares one.
    """
    key = getattr(func, "__func__", func)
    try:
        found = _cache.get(key, _NO_ADAPTER)
    except TypeError:  # not weak-referenceable (a builtin): compute each time
        return _compute(func, frozenset())
    if found is not _NO_ADAPTER:
        return typing.cast("CallableSignature | None", found)
    computed = _compute(func, frozenset())
    with _cache_lock:
        return _cache.setdefault(key, computed)


def constructor_signature(cls: type, skip: Iterable[str] = ()) -> CallableSignature | None:
    """The cached signature of ``cls(...)`` without the parameters in ``skip``.

    Example: ``constructor_signature(SimLaser, {"device_id"})``.
    """
    skipped = frozenset(skip)
    with _cache_lock:
        per_class = _constructors.setdefault(cls, {})
        if skipped not in per_class:
            per_class[skipped] = _compute(cls, skipped)
        return per_class[skipped]


def device_constructor_signature(
    cls: type, given: Iterable[str] = (),
) -> CallableSignature | None:
    """The parameters of a device class that a caller gives by name (``add_device`` keywords).

    Leaves out ``device_id`` and the parameter the id fills, as :mod:`labd.constructors`
    decides it: a first positional parameter that is required and not in ``given`` receives
    the id positionally (LabDaemon's ``cls(device_id, **params)``).
    """
    base = constructor_signature(cls, {"device_id"})
    if base is None or not base.parameters:
        return base
    first = base.parameters[0]
    if first.kind in _POSITIONAL and first.required and first.name not in set(given):
        return constructor_signature(cls, {"device_id", first.name})
    return base


def _compute(func: Callable[..., Any], skip: frozenset[str]) -> CallableSignature | None:
    try:
        return CallableSignature(func, skip)
    except (TypeError, ValueError):  # no signature (some builtins and C extensions)
        return None
