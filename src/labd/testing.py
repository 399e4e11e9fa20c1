"""Test helpers for code built on labd: a real server on a free port, and small fake devices.

Runtime code never imports this module; tests do::

    from labd.testing import FakeDevice, running_server

    def test_remote_call():
        with running_server() as srv:
            srv.daemon.register_plugins(devices={"Fake": FakeDevice})
            srv.daemon.add_device("dev1", "Fake")
            answer = httpx.post(f"{srv.url}/devices/dev1/call", json={"method": "get_value"})
            assert answer.json()["result"] == 0.0

The fakes are plain device classes (no base class), like a lab's own drivers, and expose
``threading.Event`` handshakes so tests synchronise on events instead of sleeping.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from labd.daemon import LabDaemon
from labd.server import LabDaemonServer

__all__ = [
    "BlockingDevice",
    "FakeDevice",
    "FakeStreamer",
    "LabdProcess",
    "RunningServer",
    "gated_task",
    "running_server",
]


@dataclass(frozen=True)
class RunningServer:
    """What :func:`running_server` yields."""

    url: str
    daemon: LabDaemon
    server: LabDaemonServer


@contextmanager
def running_server(
    daemon: LabDaemon | None = None, *, demo: bool = False, **server_kw: Any,
) -> Iterator[RunningServer]:
    """Serve ``daemon`` (a new one if None) on 127.0.0.1 and a free port for the block.

    ``demo=True`` adds the simulated lab (``labd.sim.demo_lab``); ``server_kw`` go to
    :class:`LabDaemonServer` (``request_timeout``, ``max_body_bytes``, ...). On exit the
    server stops, and the daemon shuts down if this function created it.
    """
    own = daemon is None
    daemon = LabDaemon() if daemon is None else daemon
    try:
        if demo:
            from labd.sim import demo_lab

            demo_lab(daemon)
        server = LabDaemonServer(daemon, "127.0.0.1", 0, **server_kw)
        server.start()
        try:
            yield RunningServer(server.url, daemon, server)
        finally:
            server.stop()
    finally:
        if own:
            daemon.shutdown()


class FakeDevice:
    """A device that records every call in :attr:`calls` as ``(method, args, kwargs)``.

    ``get_value`` is a query, ``set_value`` a command (it refuses non-numbers with TypeError
    before changing anything), ``fail`` raises ``RuntimeError``, ``get_object`` returns an
    object that is not JSON-able.
    """

    def __init__(self, device_id: str, value: float = 0.0, fail_connect: bool = False) -> None:
        self.device_id = device_id
        self.value = value
        self.fail_connect = fail_connect
        self.connected = False
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))

    def connect(self) -> None:
        """Connect (raises ``ConnectionError`` if made with ``fail_connect=True``)."""
        self._record("connect")
        if self.fail_connect:
            raise ConnectionError(f"{self.device_id}: simulated connection failure")
        self.connected = True

    def disconnect(self) -> None:
        """Disconnect."""
        self._record("disconnect")
        self.connected = False

    def get_value(self) -> float:
        """The current value (a query)."""
        self._record("get_value")
        return self.value

    def set_value(self, value: float) -> None:
        """Set the value (a command); non-numbers raise ``TypeError`` and change nothing."""
        self._record("set_value", value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"value must be a number, got {type(value).__name__}")
        self.value = float(value)

    def echo(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Return the arguments it was given."""
        self._record("echo", *args, **kwargs)
        return {"args": list(args), "kwargs": kwargs}

    def fail(self, message: str = "simulated instrument failure") -> None:
        """Raise ``RuntimeError(message)``, like a driver whose instrument failed."""
        self._record("fail", message)
        raise RuntimeError(message)

    def get_object(self) -> object:
        """Return an object that cannot be sent as JSON (and has a private attribute)."""
        self._record("get_object")
        return _Opaque()


class _Opaque:
    def __init__(self) -> None:
        self._secret = "must never be sent"


class BlockingDevice:
    """A device whose ``block()`` waits until the test sets :attr:`release`.

    :attr:`entered` is set when a call is inside ``block()``, so a test knows the device is
    busy without sleeping. ``max_block`` bounds the wait, so a failing test cannot hang.
    """

    def __init__(self, device_id: str, max_block: float = 30.0) -> None:
        self.device_id = device_id
        self.max_block = max_block
        self.entered = threading.Event()
        self.release = threading.Event()

    def block(self) -> str:
        """Wait for :attr:`release`; returns ``"released"`` (or ``"gave up"`` after max_block)."""
        self.entered.set()
        return "released" if self.release.wait(self.max_block) else "gave up"

    def get_status(self) -> str:
        """A query that does not wait."""
        return "ok"


class FakeStreamer:
    """A streaming device whose items are pushed by the test with :meth:`push`."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.stream_params: dict[str, Any] = {}
        self._callback: Callable[[Any], object] | None = None

    def start_streaming(self, callback: Callable[[Any], object], **params: Any) -> None:
        """Remember the daemon's callback; :meth:`push` feeds it."""
        self.stream_params = params
        self._callback = callback
        self.stopped.clear()
        self.started.set()

    def stop_streaming(self, timeout: float | None = None) -> None:
        """Forget the callback."""
        self._callback = None
        self.started.clear()
        self.stopped.set()

    def is_streaming(self) -> bool:
        """True between start_streaming and stop_streaming."""
        return self._callback is not None

    def push(self, payload: Any) -> bool:
        """Publish one item now, from the caller's thread; False if not streaming."""
        callback = self._callback
        if callback is None:
            return False
        callback(payload)
        return True


def gated_task(
    release: threading.Event, started: threading.Event | None = None, max_wait: float = 30.0,
) -> type:
    """A task class whose ``run`` waits for ``release`` (or cancel) and then completes.

    Parameters of the class: ``device_ids`` (devices to claim) and ``result`` (returned as
    ``{"status": "completed", "result": result}``). ``started`` is set when ``run`` begins.

    Example::

        release = threading.Event()
        daemon.register_plugins(tasks={"Hold": gated_task(release)})
        handle = daemon.execute_task(None, "Hold", device_ids=["laser1"])
        release.set(); handle.wait(timeout=5)
    """

    class GatedTask:
        def __init__(self, task_id: str, device_ids: list[str] | None = None,
                     result: Any = None) -> None:
            self.task_id = task_id
            self.device_ids = list(device_ids or [])
            self.result = result

        def run(self, context: Any) -> dict[str, Any]:
            if started is not None:
                started.set()
            waited = 0.0
            while not release.wait(0.05):  # wake up now and then to notice a cancel
                waited += 0.05
                if context.cancel_event.is_set():
                    return {"status": "cancelled", "result": self.result}
                if waited >= max_wait:
                    return {"status": "failed", "error": f"not released within {max_wait} s"}
            return {"status": "completed", "result": self.result}

    return GatedTask


class LabdProcess:
    """``labd ARGS...`` as a child process, its output read line by line on a thread.

    For tests of ``labd serve`` and other commands as a user runs them. Use it as a context
    manager (the process is killed on exit if still running). ``env`` updates the child's
    environment; a key mapped to None is removed.

    Example::

        with LabdProcess("serve", "--demo", "--port", "0") as proc:
            url = proc.wait_for("labd serving").split(" at ")[-1].strip()
            ...
            assert proc.stop(signal.SIGINT) == 0
    """

    def __init__(
        self, *args: str, env: Mapping[str, str | None] | None = None, timeout: float = 30.0
    ) -> None:
        child_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value
        self.timeout = timeout
        self.process = subprocess.Popen(
            [sys.executable, "-m", "labd.cli", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name="labd-process-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in iter(self.process.stdout.readline, ""):
            self._lines.put(line)

    def wait_for(self, text: str) -> str:
        """The first new line containing ``text``; AssertionError (with the output) on timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"labd printed no line with {text!r} in {self.timeout} s; "
                    f"output: {''.join(self._seen)!r}"
                ) from None
            self._seen.append(line)
            if text in line:
                return line

    def output(self) -> str:
        """Everything printed so far."""
        while not self._lines.empty():
            self._seen.append(self._lines.get_nowait())
        return "".join(self._seen)

    def stop(self, sig: int) -> int:
        """Send ``sig``, wait for the exit (bounded), close, and return the exit code."""
        self.process.send_signal(sig)
        code = self.process.wait(timeout=self.timeout)
        self.close()
        return code

    def close(self) -> None:
        """Kill the process if it still runs and stop reading. Idempotent."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=self.timeout)
        self._reader.join(timeout=self.timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> LabdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
