"""Device slots and the locking wrapper around every public device method.

``add_device`` keeps the user's instance (so ``isinstance`` holds and attributes read as
usual) and replaces each public bound method on the *instance* with a generated wrapper that
has the method's own signature. The wrapper:

1. takes the device lock (one C-level ``acquire(False)`` when uncontended; the fair slow path
   of :class:`labd.locks.DeviceLock` otherwise, bounded by ``call_timeout``);
2. for commands on an owned device, checks that the caller may command it;
3. calls the original function, records any exception as the device's last error, and
   releases the lock.

The acquire sits inside the ``try`` whose ``finally`` releases, so an interrupt at any point
(Python checks for signals right after each call, so also just after the lock was taken)
never leaves the lock held. The ``finally`` cannot know whether the interrupt came before or
after the acquire; it does not need to: ``acquire(False)`` is tried first, so a caller that
already held the lock (re-entrant) always got one more level, and a caller that did not hold
it holds it now only if this call took it. ``RLock.release()`` raises ``RuntimeError`` when
this thread does not hold the lock, and changes nothing, so "release, ignore RuntimeError" is
exactly "release what this call took", in one C call that a second interrupt cannot split.

Generating the wrapper with the method's exact parameters (instead of ``*args, **kwargs``)
halves the per-call overhead; see docs/decisions/0002-device-wrapper.md.
"""

from __future__ import annotations

import enum
import inspect
import keyword
import time
from collections.abc import Callable
from types import MethodType
from typing import Any, TypeVar

from labd.errors import (
    DeviceBusyError,
    DeviceNotConnectedError,
    DeviceTimeoutError,
    ErrorRecord,
    InvalidArgumentError,
    iso_from_timestamp,
)
from labd.locks import DeviceLock
from labd.ownership import Owner, busy_message, current_actor

__all__ = [
    "COMMAND",
    "QUERY",
    "DeviceSlot",
    "DeviceState",
    "command",
    "method_kind",
    "public_methods",
    "query",
    "rewrap_device",
    "wrap_device",
]

QUERY = "query"
COMMAND = "command"
QUERY_PREFIXES = ("get_", "is_", "has_", "list_")
#: Never locked: it must be able to stop a streaming thread that holds the device lock.
UNLOCKED_METHODS = frozenset({"stop_streaming"})

F = TypeVar("F", bound=Callable[..., Any])


def query(func: F) -> F:
    """Mark a device method as a query: always allowed, even while another owner holds the device.

    Example::

        class Laser:
            @labd.query
            def wavelength(self) -> float: ...
    """
    func.__labd_kind__ = QUERY  # type: ignore[attr-defined]
    return func


def command(func: F) -> F:
    """Mark a device method as a command: refused to non-owners while the device is owned.

    Example::

        class Laser:
            @labd.command
            def get_and_reset_counter(self) -> int: ...
    """
    func.__labd_kind__ = COMMAND  # type: ignore[attr-defined]
    return func


def method_kind(cls: type, name: str) -> str:
    """``"query"`` or ``"command"`` for method ``name`` of device class ``cls``.

    Explicit marks win (``@labd.query``/``@labd.command``, then the class attribute
    ``labd_queries``); otherwise names starting ``get_``, ``is_``, ``has_``, ``list_`` are queries.
    """
    func = inspect.getattr_static(cls, name, None)
    func = getattr(func, "__func__", func)
    mark = getattr(func, "__labd_kind__", None)
    if mark in (QUERY, COMMAND):
        return str(mark)
    if name in set(getattr(cls, "labd_queries", ()) or ()):
        return QUERY
    if name in set(getattr(cls, "labd_commands", ()) or ()):
        return COMMAND
    return QUERY if name.startswith(QUERY_PREFIXES) else COMMAND


def public_methods(instance: object) -> dict[str, MethodType]:
    """Public bound methods of ``instance`` (properties are not evaluated)."""
    cls = type(instance)
    names = set(dir(cls)) | set(getattr(instance, "__dict__", {}))
    found: dict[str, MethodType] = {}
    for name in sorted(names):
        if name.startswith("_"):
            continue
        static = inspect.getattr_static(instance, name, None)
        if isinstance(static, property | staticmethod) or static is None:
            continue
        if not (inspect.isfunction(static) or isinstance(static, classmethod | MethodType)):
            continue
        bound = getattr(instance, name, None)
        if isinstance(bound, MethodType):
            found[name] = bound
    return found


class DeviceState(enum.Enum):
    """Lifecycle of a device slot."""

    ADDED = "added"  # constructed, connect() not called yet
    CONNECTING = "connecting"  # connect() running
    CONNECTED = "connected"  # connect() succeeded (or the class has no connect())
    DISCONNECTED = "disconnected"  # disconnect() finished
    FAULTED = "faulted"  # connect/disconnect failed or timed out; see last_error


class DeviceSlot:
    """Everything the daemon knows about one device instance.

    The attributes read on every call (``owner``, ``strict``, ``lock``) are plain fields so
    the generated wrappers stay cheap; ownership fields are written by the claim registry.
    """

    def __init__(
        self,
        device_id: str,
        device_type: str,
        instance: object,
        params: dict[str, Any],
        *,
        strict: bool,
        call_timeout: float | None,
        on_error: Callable[[DeviceSlot, ErrorRecord], None],
    ) -> None:
        self.device_id = device_id
        self.device_type = device_type
        self.instance = instance
        self.params = params
        self.strict = strict
        self.call_timeout = call_timeout
        self.lock = DeviceLock(device_id)
        self.state = DeviceState.ADDED
        self._owner: Owner | None = None
        self.owner_since: float | None = None
        self.last_error: ErrorRecord | None = None
        self.unresponsive = False
        self._refusal: str | None = None
        # The one flag each generated wrapper reads per call, besides its try at the lock:
        # True sends the call down the slow path, which does the fair wait and the checks.
        self.gate_query = False  # FIFO mode, or calls refused
        self.gate_command = False  # FIFO mode, calls refused, or the device is owned
        self.gate_lifecycle = False  # FIFO mode, or owned (connect/disconnect: never refused)
        self.lock.on_fifo_change = self._update_gates
        self.added_at = time.time()
        self.kinds: dict[str, str] = {}
        self.originals: dict[str, MethodType] = {}
        self._on_error = on_error

    @property
    def owner(self) -> Owner | None:
        """The device's current owner (written by the claim registry), or None."""
        return self._owner

    @owner.setter
    def owner(self, value: Owner | None) -> None:
        self._owner = value
        self._update_gates()

    @property
    def refusal(self) -> str | None:
        """Why calls are refused (a connect() timed out), or None. Set and cleared by the daemon."""
        return self._refusal

    @refusal.setter
    def refusal(self, value: str | None) -> None:
        self._refusal = value
        self._update_gates()

    def _update_gates(self) -> None:
        # A wrapper that reads a gate a moment before it changes behaves as a call that began
        # just before the change: claims drain such calls before their run starts.
        fifo = self.lock.fifo
        refused = self._refusal is not None
        owned = self._owner is not None
        self.gate_query = fifo or refused
        self.gate_command = fifo or refused or owned
        self.gate_lifecycle = fifo or owned

    def record_error(self, exc: BaseException, method: str | None, origin: str = "device") -> None:
        """Keep ``exc`` as this device's last error and pass it to the daemon's listeners."""
        context = {"device_id": self.device_id}
        if method is not None:
            context["method"] = method
        record = ErrorRecord.from_exception(exc, origin, context)  # type: ignore[arg-type]
        self.last_error = record
        self._on_error(self, record)

    def check_command(self, method: str) -> None:
        """Raise :class:`DeviceBusyError` unless the caller may command this (owned) device."""
        owner = self.owner
        if owner is None:
            return
        fenced: Owner | None = owner
        while fenced is not None:  # a lab node: every engine claim it is nested in must be live
            if fenced.fence is not None:
                fenced.fence()
            fenced = fenced.parent
        actor = current_actor()
        if actor.bypass or owner.permits(actor):
            return
        if not actor.remote and not self.strict:
            return
        since = self.owner_since or time.time()
        busy = [{
            "device_id": self.device_id,
            "owner": owner.label,
            "owner_kind": owner.kind,
            "owner_id": owner.owner_id,
            "since": iso_from_timestamp(since),
        }]
        raise DeviceBusyError(
            busy_message(busy, f"Queries are allowed, commands such as {method!r} are not. "
                         "Wait for the owner to finish, cancel it, or claim the device first."),
            busy,
        )

    def lock_info(self) -> dict[str, Any]:
        """Who holds the device lock (thread name), how many callers queue, FIFO mode."""
        stats = self.lock.statistics()
        return {"holder": stats.holder_thread, "waiting": stats.waiting, "fifo": stats.fifo_mode}

    def acquire_contended(self, method: str, command: bool, refusable: bool) -> None:
        """The slow path of every wrapper: fair waiting, then the refusal and ownership checks.

        Called when the wrapper's ``acquire(False)`` failed (another thread holds the lock) or
        its gate was up (FIFO mode, calls refused, or a command to an owned device). With the
        lock taken by this call in FIFO mode, a re-entrant call keeps its level and a newcomer
        gives it back and queues behind the waiters it would have barged past. The checks run
        with the lock held; when they raise, the wrapper's ``finally`` releases it.
        """
        lock = self.lock
        rlock = lock.rlock
        if rlock._is_owned():  # type: ignore[attr-defined]
            if lock.fifo and rlock._recursion_count() == 1:  # type: ignore[attr-defined]
                rlock.release()
                self._acquire_fair(method)
        else:
            self._acquire_fair(method)
        if refusable and self._refusal is not None:
            self.refuse(method)
        if command and self._owner is not None:
            self.check_command(method)

    def _acquire_fair(self, method: str) -> None:
        if self.lock.acquire_slow(self.call_timeout):
            return
        stats = self.lock.statistics()
        holder = stats.holder_thread or "another thread"
        raise DeviceTimeoutError(
            f"Device {self.device_id!r}: waited more than call_timeout={self.call_timeout:g} s "
            f"for its lock to call {method!r}; {holder} holds it"
            + (f" and {stats.waiting} other caller(s) wait" if stats.waiting else "")
            + ". The instrument may be hung; check it, or raise call_timeout."
        )

    def refuse(self, method: str) -> None:
        """Raise :class:`DeviceNotConnectedError`: calls are refused until a connect succeeds."""
        raise DeviceNotConnectedError(
            f"Device {self.device_id!r} cannot run {method!r}: {self.refusal}. "
            f"Connect it again (daemon.connect_device({self.device_id!r})) once the instrument "
            "answers."
        )

    def fail(self, exc: BaseException, method: str) -> None:
        """Called by wrappers when the method raised; busy refusals are not device errors."""
        if isinstance(exc, DeviceBusyError | DeviceTimeoutError):
            return
        if self.refusal is not None and isinstance(exc, DeviceNotConnectedError):
            return  # our own refusal: the device's last error stays the reason for it
        self.record_error(exc, method)


# A generated wrapper. Names starting with __ld_ are closure constants; the parameter list and
# the call arguments are filled in from the method's signature.
_TEMPLATE = """
def __ld_make(__ld_slot, __ld_func, __ld_inst, __ld_defaults):
    __ld_lock = __ld_slot.lock
    __ld_acquire = __ld_lock.rlock.acquire
    __ld_release = __ld_lock.rlock.release
    __ld_slow = __ld_slot.acquire_contended
    __ld_fail = __ld_slot.fail
    def {name}({params}):
        try:
            if not __ld_acquire(False) or {gate}:
                __ld_slow({name!r}, {command}, {refusable})
            try:
                return __ld_func(__ld_inst{call})
            except BaseException as __ld_exc:
                __ld_fail(__ld_exc, {name!r})
                raise
        finally:
            try:
                __ld_release()
            except RuntimeError:  # interrupted or timed out before this call took the lock
                pass
    return {name}
"""

# The fast path is one C-level try at the lock plus one attribute read (the method's gate).
# A plain blocking acquire() would save ~25 ns of argument parsing, but measured on a loaded
# 2-core machine a plain RLock gave one of four hammering threads 1 call in 400; the fair slow
# path needs the non-blocking attempt (see ADR 0002). The attempt comes before the gate so
# that a re-entrant call always takes its level here, where the finally can account for it.
# Every method except the lifecycle ones is refused while the slot says why (a connect that
# timed out): connect() must stay callable to recover, disconnect() to clean up.
_NEVER_REFUSED = frozenset({"connect", "disconnect", "is_streaming", "stop_streaming"})


def _gate(name: str, kind: str) -> tuple[str, bool, bool]:
    """(the gate expression, command?, refusable?) for the wrapper of method ``name``."""
    command = kind == COMMAND
    refusable = name not in _NEVER_REFUSED
    if command:
        return ("__ld_slot.gate_command" if refusable else "__ld_slot.gate_lifecycle",
                True, refusable)
    return ("__ld_slot.gate_query" if refusable else "__ld_lock.fifo", False, refusable)


def _signature_parts(func: Callable[..., Any]) -> tuple[str, str, list[Any]] | None:
    """(parameter list, call arguments, defaults) for ``func`` without its first parameter."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1:]
    defaults: list[Any] = []
    decl: list[str] = []
    call: list[str] = []
    seen_kwonly = False
    last_posonly = -1
    for index, p in enumerate(params):
        if p.kind is p.POSITIONAL_ONLY:
            last_posonly = index
    for index, p in enumerate(params):
        if not p.name.isidentifier() or keyword.iskeyword(p.name) or p.name.startswith("__ld_"):
            return None
        text = p.name
        if p.default is not p.empty:
            text += f"=__ld_defaults[{len(defaults)}]"
            defaults.append(p.default)
        if p.kind is p.VAR_POSITIONAL:
            decl.append("*" + p.name)
            call.append("*" + p.name)
            seen_kwonly = True
        elif p.kind is p.VAR_KEYWORD:
            decl.append("**" + p.name)
            call.append("**" + p.name)
        elif p.kind is p.KEYWORD_ONLY:
            if not seen_kwonly:
                decl.append("*")
                seen_kwonly = True
            decl.append(text)
            call.append(f"{p.name}={p.name}")
        else:
            decl.append(text)
            call.append(p.name)
        if index == last_posonly:
            decl.append("/")
    return ", ".join(decl), "".join(", " + c for c in call), defaults


def _make_wrapper(slot: DeviceSlot, name: str, bound: MethodType, kind: str) -> Callable[..., Any]:
    func = bound.__func__
    parts = _signature_parts(func)
    params, call, defaults = parts if parts is not None else ("*args, **kwargs", ", *args, **kwargs", [])
    gate, command, refusable = _gate(name, kind)
    source = _TEMPLATE.format(
        name=name, params=params, call=call, gate=gate, command=command, refusable=refusable
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<labd wrapper {slot.device_type}.{name}>", "exec"), namespace)
    wrapper: Callable[..., Any] = namespace["__ld_make"](slot, func, bound.__self__, defaults)
    wrapper.__doc__ = func.__doc__
    wrapper.__qualname__ = getattr(func, "__qualname__", name)
    wrapper.__module__ = getattr(func, "__module__", __name__)
    wrapper.__wrapped__ = bound  # type: ignore[attr-defined]
    wrapper.__labd_kind__ = kind  # type: ignore[attr-defined]
    return wrapper


def rewrap_device(slot: DeviceSlot) -> None:
    """Regenerate the wrappers (after ``call_timeout`` changed: it selects the acquire path)."""
    for name, bound in slot.originals.items():
        if name not in UNLOCKED_METHODS:
            setattr(slot.instance, name, _make_wrapper(slot, name, bound, slot.kinds[name]))


def wrap_device(slot: DeviceSlot) -> None:
    """Install locking wrappers for every public method of ``slot.instance`` and ``_ld_lock``."""
    instance = slot.instance
    cls = type(instance)
    for name, bound in public_methods(instance).items():
        kind = method_kind(cls, name)
        slot.kinds[name] = kind
        slot.originals[name] = bound
        if name in UNLOCKED_METHODS:
            continue
        try:
            setattr(instance, name, _make_wrapper(slot, name, bound, kind))
        except AttributeError:
            raise InvalidArgumentError(
                f"Device type {slot.device_type!r}: class {cls.__name__} uses __slots__ without "
                f"'__dict__', so labd cannot install the locking wrapper for {name}(). Add "
                "'__dict__' to its __slots__ or remove __slots__."
            ) from None
    try:
        instance._ld_lock = slot.lock.rlock  # type: ignore[attr-defined]
    except AttributeError:  # __slots__ without _ld_lock: the daemon still serialises calls
        pass
