"""labd.config: TOML and Python lab configs, and the one-line error for each mistake."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import labd
from labd.config import ConfigError, LabConfig, apply_config, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

DRIVERS = """
class Laser:
    def __init__(self, device_id, port="GPIB0::1", fail_connect=False):
        self.device_id = device_id
        self.port = port
        self.fail_connect = fail_connect
        self.connected = False
        self.wl = 1550.0

    def connect(self):
        if self.fail_connect:
            raise OSError("no instrument at " + self.port)
        self.connected = True

    def disconnect(self):
        self.connected = False

    def set_wavelength(self, nm):
        self.wl = nm

    def get_wavelength(self):
        return self.wl


class Typed:
    def __init__(self, device_id, type="CW", connect_mode="auto"):
        self.device_id = device_id
        self.kind = type
        self.connect_mode = connect_mode


class Sweep:
    def __init__(self, task_id, laser_id, **kwargs):
        self.task_id = task_id
        self.device_ids = [laser_id]
        self.laser_id = laser_id

    def run(self, context):
        return {"wl": context.daemon.get_device(self.laser_id).get_wavelength()}


class NotATask:
    pass


NUMBER = 3
"""

_counter = itertools.count()


@pytest.fixture(autouse=True)
def _restore_import_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """load_config adds the config's folder to sys.path and imports modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("cfgmod_", "_labd_config_")):
            del sys.modules[name]


@pytest.fixture
def drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of device and task classes, importable by the name returned."""
    name = f"cfgmod_{next(_counter)}"
    folder = tmp_path / "drivers"
    folder.mkdir()
    (folder / f"{name}.py").write_text(DRIVERS)
    monkeypatch.syspath_prepend(str(folder))
    return name


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a config file (dedented) into tmp_path and return its path."""

    def _write(text: str, name: str = "lab.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return _write


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def _assert_one_line(error: ConfigError, path: Path, *fragments: str) -> None:
    text = str(error)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# ---------------------------------------------------------------------- happy paths
def test_toml_registers_adds_and_connects(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path]
) -> None:
    path = write(f'''
        connect = true
        [tasks]
        Sweep = "{drivers}:Sweep"
        [devices.laser1]
        type = "{drivers}:Laser"
        port = "GPIB0::7"
        [devices.laser2]
        type = "{drivers}.Laser"
        connect = false
    ''')
    config = load_config(path)
    assert isinstance(config, LabConfig)
    assert [d.device_id for d in config.devices] == ["laser1", "laser2"]
    assert config.devices[0].params == {"port": "GPIB0::7"}

    apply_config(daemon, config)

    assert daemon.device_types == ["Laser"]
    assert daemon.task_types == ["Sweep"]
    assert daemon.get_device("laser1").port == "GPIB0::7"
    assert daemon.device_info("laser1")["state"] == "connected"
    assert daemon.device_info("laser2")["state"] != "connected"
    result = daemon.execute_task("s1", "Sweep", laser_id="laser1").wait(timeout=10)
    assert result == {"wl": 1550.0}


def test_toml_type_by_registered_name_and_params_table(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path]
) -> None:
    path = write(f'''
        [device_types]
        Typed = "{drivers}:Typed"
        [devices.t1]
        type = "Typed"
        connect_mode = "manual"
        params = {{ type = "pulsed" }}
    ''')
    apply_config(daemon, load_config(path))
    device = daemon.get_device("t1")
    assert (device.kind, device.connect_mode) == ("pulsed", "manual")


def test_toml_module_next_to_config_is_importable(
    daemon: labd.LabDaemon, tmp_path: Path, write: Callable[..., Path]
) -> None:
    package = tmp_path / f"cfgmod_pkg{next(_counter)}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "drivers.py").write_text(DRIVERS)
    path = write(f'''
        [devices.laser1]
        type = "{package.name}.drivers:Laser"
    ''')
    assert str(tmp_path) not in sys.path  # found only because the config sits beside it
    apply_config(daemon, load_config(path))
    assert daemon.device_ids() == ["laser1"]


def test_same_class_already_registered_is_kept(
    daemon: labd.LabDaemon, write: Callable[..., Path]
) -> None:
    import labd.sim

    labd.sim.demo_lab(daemon)
    path = write("""
        [tasks]
        WavelengthSweep = "labd.sim:WavelengthSweep"
        [devices.laser2]
        type = "labd.sim:SimLaser"
    """)
    apply_config(daemon, load_config(path))
    assert "laser2" in daemon.device_ids()


def test_python_setup_file(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path]
) -> None:
    path = write(
        f"""
        import {drivers} as d

        def setup(daemon):
            daemon.register_plugins(devices={{"Laser": d.Laser}})
            daemon.add_device("laser9", "Laser", port="COM3")
    """,
        "lab_setup.py",
    )
    config = load_config(path)
    assert config.setup is not None
    apply_config(daemon, config)
    assert daemon.get_device("laser9").port == "COM3"


@pytest.mark.parametrize("name", ["lab.toml", "lab_setup.py"])
def test_examples_load_and_apply(daemon: labd.LabDaemon, name: str) -> None:
    apply_config(daemon, load_config(EXAMPLES / name))
    assert {"laser1", "pm1"} <= set(daemon.device_ids())
    assert daemon.device_info("pm1")["state"] == "connected"
    assert "WavelengthSweep" in daemon.task_types


# ---------------------------------------------------------------------- load errors
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    _assert_one_line(_error(path), path, "no such file", ".toml", "setup(daemon)")


def test_unsupported_extension(write: Callable[..., Path]) -> None:
    path = write("a: 1", "lab.yaml")
    _assert_one_line(_error(path), path, "unsupported config file type '.yaml'", ".toml", ".py")


def test_invalid_toml(write: Callable[..., Path]) -> None:
    path = write("[devices.laser1\ntype = 1")
    _assert_one_line(_error(path), path, "invalid TOML", "line 1")


def test_unknown_top_level_key(write: Callable[..., Path]) -> None:
    path = write("[device]\n")
    error = _error(path)
    _assert_one_line(
        error, path, "device: unknown top-level key", "connect, connect_timeout, device_types"
    )
    assert error.key == "device"


def test_device_without_type(write: Callable[..., Path]) -> None:
    path = write('[devices.laser1]\nport = "x"\n')
    _assert_one_line(_error(path), path, "devices.laser1.type: missing", "mypkg.drivers:Laser")


def test_device_entry_not_a_table(write: Callable[..., Path]) -> None:
    path = write('[devices]\nlaser1 = "mypkg:Laser"\n')
    _assert_one_line(_error(path), path, "devices.laser1: must be a table")


def test_bad_device_id(write: Callable[..., Path]) -> None:
    path = write('[devices."laser 1"]\ntype = "x:Y"\n')
    _assert_one_line(_error(path), path, "devices.laser 1: invalid device id", "letters, digits")


def test_connect_must_be_bool(write: Callable[..., Path]) -> None:
    path = write('connect = "yes"\n')
    _assert_one_line(_error(path), path, "connect: must be true or false", "'yes'")


def test_module_not_found_names_module_and_key(write: Callable[..., Path]) -> None:
    path = write('[devices.laser1]\ntype = "nosuchpkg_xyz.drivers:Laser"\n')
    error = _error(path)
    _assert_one_line(
        error,
        path,
        "devices.laser1.type: cannot import module 'nosuchpkg_xyz.drivers'",
        "no module named 'nosuchpkg_xyz'",
        "next to lab.toml",
    )
    assert error.key == "devices.laser1.type"


def test_missing_class_lists_what_the_module_defines(
    drivers: str, write: Callable[..., Path]
) -> None:
    path = write(f'[tasks]\nSweep = "{drivers}:Sweeep"\n')
    _assert_one_line(
        _error(path),
        path,
        f"tasks.Sweep: module {drivers!r} has no attribute 'Sweeep'",
        "'Laser'",
        "'Sweep'",
    )


def test_module_that_fails_to_import(tmp_path: Path, write: Callable[..., Path]) -> None:
    name = f"cfgmod_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text("x = 1\nraise RuntimeError('driver DLL missing')\n")
    path = write(f'[devices.a]\ntype = "{name}:Laser"\n')
    _assert_one_line(
        _error(path),
        path,
        f"importing module {name!r} failed",
        "RuntimeError: driver DLL missing",
        f"{name}.py:2",
    )


def test_task_class_without_run(drivers: str, write: Callable[..., Path]) -> None:
    path = write(f'[tasks]\nBad = "{drivers}:NotATask"\n')
    _assert_one_line(_error(path), path, "tasks.Bad:", "has no run(self, context) method")


def test_import_path_to_a_non_class(drivers: str, write: Callable[..., Path]) -> None:
    path = write(f'[devices.a]\ntype = "{drivers}:NUMBER"\n')
    _assert_one_line(_error(path), path, "devices.a.type:", "is a int, not a class")


def test_malformed_import_path(write: Callable[..., Path]) -> None:
    path = write('[tasks]\nX = "my-pkg:Thing"\n')
    _assert_one_line(_error(path), path, "tasks.X: 'my-pkg:Thing' is not an import path")


def test_param_given_twice(drivers: str, write: Callable[..., Path]) -> None:
    path = write(f'[devices.a]\ntype = "{drivers}:Laser"\nport = "a"\nparams = {{ port = "b" }}\n')
    _assert_one_line(_error(path), path, "devices.a.params.port: is also given directly")


def test_python_file_without_setup(write: Callable[..., Path]) -> None:
    path = write("x = 1\n", "lab_setup.py")
    _assert_one_line(_error(path), path, "setup: the file defines no setup", "def setup(daemon):")


def test_python_file_with_syntax_error(write: Callable[..., Path]) -> None:
    path = write("def setup(daemon)\n    pass\n", "lab_setup.py")
    _assert_one_line(_error(path), path, "line 1: syntax error")


def test_python_file_that_raises(write: Callable[..., Path]) -> None:
    path = write("import os\nVALUE = 1 / 0\n", "lab_setup.py")
    _assert_one_line(
        _error(path), path, "running the file failed", "ZeroDivisionError", f"{path}:2"
    )


# ---------------------------------------------------------------------- apply errors
def test_unknown_type_name(daemon: labd.LabDaemon, write: Callable[..., Path]) -> None:
    path = write('[devices.a]\ntype = "Lasr"\n')
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        apply_config(daemon, config)
    _assert_one_line(
        info.value, path, "devices.a.type: unknown device type 'Lasr'", "registered types: (none)"
    )
    assert daemon.device_ids() == []


def test_bad_constructor_params_roll_back(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path]
) -> None:
    path = write(f'''
        [devices.ok]
        type = "{drivers}:Laser"
        [devices.bad]
        type = "{drivers}:Laser"
        colour = "red"
    ''')
    with pytest.raises(ConfigError) as info:
        apply_config(daemon, load_config(path))
    _assert_one_line(info.value, path, "devices.bad: adding the device failed", "colour")
    assert daemon.device_ids() == []  # "ok" was added, then removed again


def test_connect_failure_rolls_back(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path]
) -> None:
    path = write(f'''
        connect = true
        [devices.ok]
        type = "{drivers}:Laser"
        [devices.broken]
        type = "{drivers}:Laser"
        port = "GPIB0::9"
        fail_connect = true
    ''')
    with pytest.raises(ConfigError) as info:
        apply_config(daemon, load_config(path))
    _assert_one_line(
        info.value,
        path,
        "devices.broken.connect: connecting failed",
        "no instrument at GPIB0::9",
        "connect = false",
    )
    assert daemon.device_ids() == []


HANGING_DRIVER = """
import threading

GATE = threading.Event()


class Hangs:
    def __init__(self, device_id):
        self.device_id = device_id

    def connect(self):
        GATE.wait(30)  # "forever": the test opens the gate when it is done
"""


@pytest.mark.parametrize("value", ['"10"', "0", "-1", "true", "nan"])
def test_connect_timeout_must_be_a_positive_number(write: Callable[..., Path], value: str) -> None:
    path = write(f"connect_timeout = {value}\n")
    _assert_one_line(_error(path), path, "connect_timeout: must be a positive number of seconds")


def test_connect_timeout_is_read_and_inf_means_no_limit(write: Callable[..., Path]) -> None:
    assert load_config(write("connect_timeout = 2\n")).connect_timeout == 2.0
    assert load_config(write("connect_timeout = inf\n")).connect_timeout == float("inf")
    assert load_config(write("connect = true\n")).connect_timeout is None  # default: 10 s


@pytest.mark.parametrize("where", ["file", "argument"])
def test_a_connect_past_connect_timeout_leaves_the_device_faulted_and_the_rest_connected(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path], tmp_path: Path, where: str
) -> None:
    hanging = f"cfgmod_hang_{next(_counter)}"  # next to lab.toml: the config finds it there
    (tmp_path / f"{hanging}.py").write_text(HANGING_DRIVER)
    path = write(("connect_timeout = 0.2\n" if where == "file" else "") + f'''
        connect = true
        [devices.stuck]
        type = "{hanging}:Hangs"
        [devices.ok]
        type = "{drivers}:Laser"
    ''')
    config = load_config(path)
    try:
        if where == "file":
            apply_config(daemon, config)
        else:
            apply_config(daemon, config, connect_timeout=0.2)
        stuck = daemon.device_info("stuck")
        assert stuck["state"] == "faulted"
        assert "connect() did not finish within 0.2 s" in stuck["last_error"]["message"]
        assert daemon.device_info("ok")["state"] == "connected"
    finally:
        sys.modules[hanging].GATE.set()


def test_server_settings_are_read_into_server_options(write: Callable[..., Path]) -> None:
    config = load_config(write("""
        allowed_hosts = ["labpc.example.org", "10.0.0.5"]
        lease_max_ttl = 600
        lease_default_ttl = 10.5
        stream_max_clients = 5
        device_max_in_flight = 2
    """))
    assert config.server_options == {
        "allowed_hosts": ("labpc.example.org", "10.0.0.5"), "lease_max_ttl": 600.0,
        "lease_default_ttl": 10.5, "stream_max_clients": 5, "device_max_in_flight": 2}
    assert load_config(write("connect = true\n")).server_options == {}


@pytest.mark.parametrize(("line", "key", "fragment"), [
    ('allowed_hosts = "labpc"', "allowed_hosts", "must be a list of host names"),
    ('allowed_hosts = ["http://labpc/"]', "allowed_hosts", "is not a host name"),
    ("allowed_hosts = [3]", "allowed_hosts", "is not a host name"),
    ("lease_max_ttl = 0", "lease_max_ttl", "must be a positive, finite number of seconds"),
    ("lease_max_ttl = inf", "lease_max_ttl", "must be a positive, finite number of seconds"),
    ('max_request_timeout = "1h"', "max_request_timeout", "must be a positive, finite number"),
    ("stream_max_clients = 0", "stream_max_clients", "must be a positive whole number"),
    ("device_max_in_flight = 2.5", "device_max_in_flight", "must be a positive whole number"),
    ("device_workers = true", "device_workers", "must be a positive whole number"),
])
def test_bad_server_settings_are_one_line_errors(
    write: Callable[..., Path], line: str, key: str, fragment: str,
) -> None:
    path = write(line + "\n")
    _assert_one_line(_error(path), path, f"{path}: {key}: ", fragment)


def test_an_unknown_top_level_key_lists_the_server_settings_too(write: Callable[..., Path]) -> None:
    path = write("allow_hosts = []\n")
    _assert_one_line(_error(path), path, "allow_hosts: unknown top-level key",
                     "allowed_hosts", "lease_max_ttl", "device_max_in_flight")


def test_name_taken_by_another_class(
    daemon: labd.LabDaemon, drivers: str, write: Callable[..., Path]
) -> None:
    class Other:
        def run(self, context: object) -> None:
            return None

    daemon.register_plugins(tasks={"Sweep": Other})
    path = write(f'[tasks]\nSweep = "{drivers}:Sweep"\n')
    with pytest.raises(ConfigError) as info:
        apply_config(daemon, load_config(path))
    _assert_one_line(info.value, path, "tasks.Sweep: the name 'Sweep' is already registered")


def test_setup_that_raises_names_file_and_line(
    daemon: labd.LabDaemon, write: Callable[..., Path]
) -> None:
    path = write(
        """
        def setup(daemon):
            daemon.add_device("x", "NoSuchType")
    """,
        "lab_setup.py",
    )
    with pytest.raises(ConfigError) as info:
        apply_config(daemon, load_config(path))
    _assert_one_line(
        info.value, path, "setup: setup(daemon) raised UnknownDeviceTypeError", f"{path}:3"
    )


def test_config_error_is_a_value_error() -> None:
    error = ConfigError("lab.toml", "devices.a", "broken")
    assert isinstance(error, ValueError)
    assert isinstance(error, labd.LabDaemonException)
    assert str(error) == "lab.toml: devices.a: broken"
