"""Lab config files: which device and task classes to load, and which devices to add.

``labd serve lab.toml`` (or ``lab_setup.py``) starts a daemon from a file instead of a script.
Two kinds of file:

* **TOML**, naming classes by import path (``module:Class`` or ``module.Class``)::

      connect = true                       # optional: connect every device after adding it
      connect_timeout = 10                 # optional: seconds a connect() may take (default 10)
      allowed_hosts = ["labpc.example.org"]  # optional: server settings (SERVER_KEYS), given
      lease_max_ttl = 600                  #   to LabDaemonServer by ``labd serve``

      [tasks]
      Sweep = "mylab.tasks:Sweep"

      [device_types]                       # optional: classes clients may add at run time
      Laser = "mylab.drivers:Laser"

      [devices.laser1]
      type = "mylab.drivers:Laser"         # an import path, or a registered type name
      port = "GPIB0::1"                    # every other key is a constructor parameter
      connect = false                      # optional per-device override

      [devices.laser2]
      type = "Laser"
      params = { type = "CW" }             # parameters whose names clash with type/connect/params

* **Python**, a file with a ``setup(daemon)`` function that registers and adds what it likes
  (it connects devices itself, so it passes ``timeout=`` to ``daemon.connect_device``).

A ``connect()`` that does not return within ``connect_timeout`` seconds (``inf``: no limit)
leaves its device ``faulted`` with the reason, and the rest of the lab is served: one hung
instrument never keeps ``labd serve`` from starting.

A ``[lab]`` table joins the lab of several PCs (``engine = "redis://..."``, ``node = "pc1"``,
timings; see docs/multi-host.md); ``labd serve`` reads it, its options and ``LABD_ENGINE``
winning.

The server settings (:data:`SERVER_KEYS`: the Host names to answer besides localhost and the
machine's addresses, and the limits on leases, SSE clients and calls in flight) are read into
:attr:`LabConfig.server_options`; ``labd serve`` passes them to the server, its own options
winning (``--allow-host`` names are added to the file's).

Module paths are also looked up next to the config file, so a ``mylab/`` package beside
``lab.toml`` works without installing it. Every problem is a :class:`ConfigError` whose
one-line message names the file, the key and what is valid.

Example::

    config = load_config("lab.toml")
    daemon = labd.LabDaemon()
    apply_config(daemon, config)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
import tomllib
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labd.errors import (
    DeviceTimeoutError,
    InvalidArgumentError,
    LabDaemonException,
    describe_choices,
)

if TYPE_CHECKING:
    from labd.daemon import LabDaemon

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "SERVER_KEYS",
    "ConfigError",
    "DeviceConfig",
    "LabConfig",
    "apply_config",
    "load_config",
]

#: Server settings a TOML config may give, each with what it must be (LabDaemonServer's
#: keyword arguments of the same names check the ranges again).
SERVER_KEYS: dict[str, str] = {
    "allowed_hosts": "hosts",  # Host names answered besides localhost and the bind address
    "max_request_timeout": "seconds",  # largest ?timeout= a request may ask for
    "lease_default_ttl": "seconds",  # an HTTP lease without ttl lasts this long
    "lease_max_ttl": "seconds",  # the longest an HTTP lease (or renewal) may ask for
    "stream_max_clients": "count",  # SSE clients per stream
    "stream_max_clients_total": "count",  # SSE clients over all streams
    "stream_max_maxsize": "count",  # largest ?maxsize= an SSE client may ask for
    "device_max_in_flight": "count",  # calls running or waiting per device
    "device_workers": "count",  # threads running device code, over all devices
    "server_workers": "count",  # threads running other blocking work (task info, history)
}
#: Top-level keys a TOML config may use.
TOP_LEVEL_KEYS = ("connect", "connect_timeout", "device_types", "devices", "lab", "tasks",
                  *SERVER_KEYS)
#: Seconds a device's connect() may take when neither the config nor the caller says.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Keys of a ``[devices.<id>]`` table that are not constructor parameters.
RESERVED_DEVICE_KEYS = ("connect", "params", "type")
# Same rule as the daemon's ids; checked here so the message can name the config key.
_ID = re.compile(r"^[A-Za-z0-9_\-.:]{1,128}$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")


class ConfigError(LabDaemonException, ValueError):
    """A config file is missing, malformed, or names something that cannot be loaded.

    ``str(error)`` is one line: ``<file>: <key>: <what is wrong and what is valid>``.
    """

    def __init__(self, path: Path | str, key: str | None, problem: str) -> None:
        self.path = Path(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[devices.<id>]`` entry: add ``type_name`` as ``device_id`` with ``params``."""

    device_id: str
    type_name: str
    params: Mapping[str, Any]
    connect: bool


@dataclass(frozen=True)
class LabConfig:
    """A loaded config file: classes to register, devices to add, or a ``setup`` function.

    Built by :func:`load_config` (which imports every class, so import errors surface before
    a daemon exists) and applied by :func:`apply_config`.
    """

    path: Path
    device_types: Mapping[str, Any] = field(default_factory=dict)
    task_types: Mapping[str, Any] = field(default_factory=dict)
    devices: tuple[DeviceConfig, ...] = ()
    setup: Callable[[Any], object] | None = None
    #: The file's ``connect_timeout`` in seconds (None: not given; ``inf`` in the file: no limit).
    connect_timeout: float | None = None
    #: The file's server settings (:data:`SERVER_KEYS` it gives), as LabDaemonServer keywords.
    server_options: Mapping[str, Any] = field(default_factory=dict)
    #: The file's ``[lab]`` table (engine, node, timings; checked by labd.lab.lab_settings).
    lab: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- loading
def load_config(path: str | Path) -> LabConfig:
    """Read a ``.toml`` or ``.py`` lab config and import the classes it names.

    Raises :class:`ConfigError` with a one-line message for every problem.

    Example::

        config = load_config("examples/lab.toml")
        print([d.device_id for d in config.devices])
    """
    file = Path(path)
    if not file.is_file():
        problem = "is a directory, not a config file" if file.is_dir() else "no such file"
        raise ConfigError(
            file, None, f"{problem}; pass a .toml config or a .py file with setup(daemon)"
        )
    suffix = file.suffix.lower()
    if suffix == ".toml":
        return _load_toml(file)
    if suffix == ".py":
        return _load_python(file)
    raise ConfigError(
        file,
        None,
        f"unsupported config file type {file.suffix or '(no extension)'!r}; "
        "use a .toml file or a .py file that defines setup(daemon)",
    )


def _load_toml(file: Path) -> LabConfig:
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, None, f"invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, None, f"cannot read the file: {exc}") from None
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            file,
            unknown[0],
            f"unknown top-level key; valid keys: {', '.join(TOP_LEVEL_KEYS)}",
        )
    default_connect = _bool(file, "connect", data.get("connect", False))
    connect_timeout = _connect_timeout(file, data.get("connect_timeout"))
    _add_import_root(file)
    tasks = _class_table(file, "tasks", data.get("tasks", {}), task=True)
    device_types = _class_table(file, "device_types", data.get("device_types", {}), task=False)
    devices, more_types = _device_tables(file, data.get("devices", {}), default_connect)
    for name, cls in more_types.items():
        _add_type(file, device_types, name, cls)
    return LabConfig(path=file, device_types=device_types, task_types=tasks, devices=devices,
                     connect_timeout=connect_timeout, server_options=_server_options(file, data),
                     lab=_table(file, "lab", data.get("lab", {})))


def _server_options(file: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SERVER_KEYS` the file gives, each checked for its kind."""
    options: dict[str, Any] = {}
    for key, kind in SERVER_KEYS.items():
        if key not in data:
            continue
        value = data[key]
        if kind == "hosts":
            options[key] = _host_names(file, key, value)
        elif kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 < value < math.inf):
                raise ConfigError(
                    file, key, f"must be a positive, finite number of seconds, got {value!r}")
            options[key] = float(value)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(file, key, f"must be a positive whole number, got {value!r}")
        else:
            options[key] = value
    return options


def _host_names(file: Path, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            file, key, f'must be a list of host names like ["labpc.example.org"], got {value!r}')
    for name in value:
        if not isinstance(name, str) or not name.strip() or "/" in name or " " in name.strip():
            raise ConfigError(
                file, key,
                f'{name!r} is not a host name; give names alone, like ["labpc.example.org"] '
                '(no scheme or path; "*" allows any host)')
    return tuple(name.strip() for name in value)


def _connect_timeout(file: Path, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            file, "connect_timeout",
            f"must be a positive number of seconds (or inf for no limit), got {value!r}",
        )
    return float(value)


def _bool(file: Path, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(file, key, f"must be true or false, got {value!r}")
    return value


def _table(file: Path, key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(
            file,
            key,
            f"must be a table ([{key}] with name = value lines), got {type(value).__name__}",
        )
    return value


def _class_table(file: Path, key: str, value: object, *, task: bool) -> dict[str, Any]:
    """``{name: "module:Class"}`` -> ``{name: class}``, each class imported and checked."""
    classes: dict[str, Any] = {}
    for name, target in _table(file, key, value).items():
        entry = f"{key}.{name}"
        if not isinstance(target, str):
            raise ConfigError(
                file,
                entry,
                f'must be an import path string like "mypkg.module:Class", got {target!r}',
            )
        cls = import_object(file, entry, target)
        if task:
            _check_task_class(file, entry, target, cls)
        else:
            _check_callable(file, entry, target, cls)
        classes[name] = cls
    return classes


def _device_tables(
    file: Path, value: object, default_connect: bool
) -> tuple[tuple[DeviceConfig, ...], dict[str, Any]]:
    """Parse ``[devices.*]``; also return the classes named by import path, by class name."""
    devices: list[DeviceConfig] = []
    classes: dict[str, Any] = {}
    for device_id, entry in _table(file, "devices", value).items():
        key = f"devices.{device_id}"
        if not _ID.match(device_id):
            raise ConfigError(
                file, key, "invalid device id; use 1 to 128 letters, digits or _ - . :"
            )
        table = _table(file, key, entry)
        type_value = table.get("type")
        if not isinstance(type_value, str) or not type_value:
            raise ConfigError(
                file,
                f"{key}.type",
                'missing or not a string; give an import path like "mypkg.drivers:Laser" '
                "or the name of a registered device type",
            )
        type_name = type_value
        if _is_import_path(type_value):
            cls = import_object(file, f"{key}.type", type_value)
            _check_callable(file, f"{key}.type", type_value, cls)
            type_name = getattr(cls, "__name__", type_value)
            _add_type(file, classes, type_name, cls)
        connect = _bool(file, f"{key}.connect", table.get("connect", default_connect))
        params = _device_params(file, key, table)
        devices.append(DeviceConfig(device_id, type_name, params, connect))
    return tuple(devices), classes


def _device_params(file: Path, key: str, table: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in table.items() if k not in RESERVED_DEVICE_KEYS}
    extra = _table(file, f"{key}.params", table.get("params", {}))
    clash = sorted(set(params) & set(extra))
    if clash:
        raise ConfigError(
            file, f"{key}.params.{clash[0]}", f"is also given directly in [{key}]; give it once"
        )
    params.update(extra)
    return params


def _is_import_path(value: str) -> bool:
    return ":" in value or "." in value


def _add_type(file: Path, types_by_name: dict[str, Any], name: str, cls: Any) -> None:
    known = types_by_name.get(name)
    if known is not None and known is not cls:
        raise ConfigError(
            file,
            f"device_types.{name}",
            f"two different classes are both called {name!r} ({_qualname(known)} and "
            f"{_qualname(cls)}); register one under another name in [device_types] and use that name",
        )
    types_by_name[name] = cls


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', obj)!s}"


def _check_callable(file: Path, key: str, target: str, cls: Any) -> None:
    if not callable(cls):
        raise ConfigError(file, key, f"{target!r} is a {type(cls).__name__}, not a class")


def _check_task_class(file: Path, key: str, target: str, cls: Any) -> None:
    _check_callable(file, key, target, cls)
    if inspect.isclass(cls) and not callable(getattr(cls, "run", None)):
        raise ConfigError(
            file, key, f"{target!r} has no run(self, context) method; a task class needs one"
        )


# ---------------------------------------------------------------------- importing
def import_object(file: Path, key: str, target: str) -> Any:
    """Import ``module:Attr`` (or ``module.Attr``); a :class:`ConfigError` names what failed.

    ``module:Outer.Inner`` reaches nested attributes. Used for every class a config names.
    """
    if not _IMPORT_PATH.match(target):
        raise ConfigError(
            file, key, f'{target!r} is not an import path; write "package.module:ClassName"'
        )
    if ":" in target:
        module_name, attr_path = target.split(":", 1)
    else:
        module_name, _, attr_path = target.rpartition(".")
    module = _import_module(file, key, module_name)
    obj: Any = module
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(
                file,
                key,
                f"module {module_name!r} has no attribute {attr_path!r}; it defines "
                f"{describe_choices(_public_classes(module))}",
            ) from None
    return obj


def _import_module(file: Path, key: str, module_name: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError(
                file,
                key,
                f"cannot import module {module_name!r}: no module named {exc.name!r}; check the "
                f"spelling, install the package, or put it next to {file.name}",
            ) from None
        # The module exists but itself imports something missing.
        raise ConfigError(file, key, f"importing module {module_name!r} failed: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            file, key, f"importing module {module_name!r} failed: {_one_line(exc)}{_where(exc)}"
        ) from None


def _public_classes(module: types.ModuleType) -> list[str]:
    """Public classes defined in ``module`` or its package (not ones it imported, like Any)."""
    classes = {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and not name.startswith("_")
    }
    own = [
        name
        for name, value in classes.items()
        if str(getattr(value, "__module__", "")).startswith(module.__name__)
    ]
    return own or list(classes)


def _add_import_root(file: Path) -> None:
    """Make modules next to the config file importable.

    The folder stays on ``sys.path`` afterwards: drivers often import siblings lazily.
    """
    folder = str(file.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()


def _load_python(file: Path) -> LabConfig:
    module_name = "_labd_config_" + re.sub(r"\W", "_", file.stem)
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(file, None, "cannot load this file as a Python module")
    module = importlib.util.module_from_spec(spec)
    _add_import_root(file)
    # Registered like any import: dataclasses and pickle look classes up in sys.modules.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(file, f"line {exc.lineno}", f"syntax error: {exc.msg}") from None
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(
            file, None, f"running the file failed: {_one_line(exc)}{_where(exc, file)}"
        ) from None
    setup = getattr(module, "setup", None)
    if not callable(setup):
        found = (
            "defines no setup"
            if setup is None
            else f"has setup = {type(setup).__name__}, not a function"
        )
        raise ConfigError(
            file,
            "setup",
            f"the file {found}; a Python config needs `def setup(daemon):` that registers "
            "plugins and adds devices",
        )
    return LabConfig(path=file, setup=setup)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException, file: Path | None = None) -> str:
    """`` (at path:line)`` of the innermost frame (in ``file`` if given), for a one-line error."""
    frames = list(traceback.extract_tb(exc.__traceback__))
    if file is not None:
        resolved = str(file.resolve())
        frames = [f for f in frames if str(Path(f.filename).resolve()) == resolved] or frames
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno})"


# ---------------------------------------------------------------------- applying
def apply_config(
    daemon: LabDaemon, config: LabConfig, *, connect_timeout: float | None = None
) -> None:
    """Register the config's classes on ``daemon``, then add (and connect) its devices.

    For a Python config, call its ``setup(daemon)``. Types already registered under the same
    name with the same class are kept; a different class under a taken name is an error. If
    a device fails to add or connect, the devices this call added are removed again, except
    that a ``connect()`` still running after ``connect_timeout`` seconds (this argument, else
    the file's, else :data:`DEFAULT_CONNECT_TIMEOUT`; ``inf``: no limit) only leaves its
    device ``faulted`` with the reason: the rest of the lab still works.

    Example::

        daemon = labd.LabDaemon()
        apply_config(daemon, load_config("lab.toml"))
    """
    if config.setup is not None:
        _run_setup(daemon, config)
        return
    _register(daemon, config)
    timeout = _effective_connect_timeout(connect_timeout, config.connect_timeout)
    added: list[str] = []
    try:
        for device in config.devices:
            _add_device(daemon, config.path, device)
            added.append(device.device_id)
        for device in config.devices:
            if device.connect:
                _connect_device(daemon, config.path, device.device_id, timeout)
    except BaseException:
        _remove_devices(daemon, added)
        raise


def _run_setup(daemon: LabDaemon, config: LabConfig) -> None:
    assert config.setup is not None
    try:
        config.setup(daemon)
    except Exception as exc:
        raise ConfigError(
            config.path, "setup", f"setup(daemon) raised {_one_line(exc)}{_where(exc, config.path)}"
        ) from exc


def _register(daemon: LabDaemon, config: LabConfig) -> None:
    devices = _new_plugins(
        config.path, "device_types", config.device_types, daemon.device_types, daemon.device_class
    )
    tasks = _new_plugins(
        config.path, "tasks", config.task_types, daemon.task_types, daemon.task_class
    )
    try:
        daemon.register_plugins(devices=devices, tasks=tasks)
    except Exception as exc:
        raise ConfigError(
            config.path, None, f"registering classes failed: {_one_line(exc)}"
        ) from exc


def _new_plugins(
    file: Path, key: str, wanted: Mapping[str, Any], known: list[str], lookup: Callable[[str], Any]
) -> dict[str, Any]:
    """The entries of ``wanted`` not yet registered; a name taken by another class is an error."""
    new: dict[str, Any] = {}
    for name, cls in wanted.items():
        if name in known:
            if lookup(name) is not cls:
                raise ConfigError(
                    file,
                    f"{key}.{name}",
                    f"the name {name!r} is already registered for {_qualname(lookup(name))}; "
                    "pick another name",
                )
            continue
        new[name] = cls
    return new


def _add_device(daemon: LabDaemon, file: Path, device: DeviceConfig) -> None:
    key = f"devices.{device.device_id}"
    if device.type_name not in daemon.device_types:
        raise ConfigError(
            file,
            f"{key}.type",
            f"unknown device type {device.type_name!r}; registered types: "
            f'{describe_choices(daemon.device_types)}; or give an import path like "mypkg.drivers:Laser"',
        )
    try:
        daemon.add_device(device.device_id, device.type_name, **dict(device.params))
    except Exception as exc:
        raise ConfigError(file, key, f"adding the device failed: {_one_line(exc)}") from exc


def _effective_connect_timeout(given: float | None, from_file: float | None) -> float | None:
    """Seconds for each connect(), or None for no limit (``inf``)."""
    timeout = given if given is not None else from_file
    if timeout is None:
        return DEFAULT_CONNECT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InvalidArgumentError(
            f"connect_timeout must be a positive number of seconds (or inf), got {timeout!r}"
        )
    return None if math.isinf(timeout) else float(timeout)


def _connect_device(
    daemon: LabDaemon, file: Path, device_id: str, timeout: float | None
) -> None:
    try:
        daemon.connect_device(device_id, timeout=timeout)
    except DeviceTimeoutError:
        # The device is now faulted with the reason (its last error); serve the rest.
        return
    except Exception as exc:
        raise ConfigError(
            file,
            f"devices.{device_id}.connect",
            f"connecting failed: {_one_line(exc)}; fix the instrument or set connect = false",
        ) from exc


def _remove_devices(daemon: LabDaemon, device_ids: list[str]) -> None:
    for device_id in reversed(device_ids):
        try:
            daemon.remove_device(device_id)
        except Exception:  # best effort: the original error is the one to report
            continue
