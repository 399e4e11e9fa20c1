"""Serve one implementation's HTTP server with the benchmark's fake devices, in this process.

Why: the server benchmark drives each server from another process, so the client's work
never shares a GIL with the server it measures. ``bench/server.py`` starts this script
under the implementation's own venv (labd: the project's .venv; LabDaemon 1.0.1:
bench/.venv-labdaemon; ``fastapi``: a bare FastAPI app with the same call route, for
reference), reads one JSON line ``{"port", "versions"}`` from its stdout once the server
answers ``GET /health``, and closes its stdin to stop it.

Example::

    python bench/server_host.py --impl labd --scenario call
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from server_devices import DEVICE_TYPES, SCENARIO_DEVICES

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STACK = ("fastapi", "starlette", "uvicorn", "sse-starlette", "pydantic", "httptools", "uvloop")

Stop = Callable[[], None]


def versions(impl: str) -> dict[str, str]:
    """Installed versions of the implementation and the web stack it runs on."""
    found = {}
    for dist in (*([] if impl == "fastapi" else [impl]), *STACK):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found


def free_port() -> int:
    """A port that was free a moment ago (LabDaemon's server cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_healthy(port: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``GET /health`` until it answers 200; raise RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
            last = f"status {response.status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"server on {HOST}:{port} not healthy after {timeout:g} s ({last})")


def add_devices(daemon: Any, scenario: str) -> None:
    daemon.register_plugins(devices=DEVICE_TYPES, tasks={})  # LabDaemon requires both
    for device_id, device_type, params in SCENARIO_DEVICES[scenario]:
        daemon.add_device(device_id, device_type, **params)
        daemon.connect_device(device_id)


def serve_labd(scenario: str) -> tuple[int, Stop]:
    ld = importlib.import_module("labd")
    server_module = importlib.import_module("labd.server")
    daemon = ld.LabDaemon()
    add_devices(daemon, scenario)
    # The 8-client scenarios call one device from 8 connections at once. labd's default cap
    # of 4 calls in flight per device (issue 8: a hung instrument must not take every thread)
    # would answer the other 4 with 503; LabDaemon has no cap, so both get room for all 8.
    server = server_module.LabDaemonServer(daemon, host=HOST, port=0, device_max_in_flight=16)
    server.start()

    def stop() -> None:
        server.stop(timeout=3.0)
        daemon.shutdown()

    return int(server.port), stop


def serve_labdaemon(scenario: str) -> tuple[int, Stop]:
    importlib.import_module("loguru").logger.remove()  # it logs every request at INFO
    ld = importlib.import_module("labdaemon")
    server_module = importlib.import_module("labdaemon.server")
    daemon = ld.LabDaemon()
    add_devices(daemon, scenario)
    port = free_port()
    server = server_module.LabDaemonServer(daemon, host=HOST, port=port)
    server.start()

    def stop() -> None:
        server.stop(timeout=3.0)
        daemon.shutdown()

    return port, stop


def bare_app(scenario: str) -> Any:
    """FastAPI with LabDaemon's call route shape and nothing else: the framework's floor."""
    fastapi = importlib.import_module("fastapi")
    devices = {
        device_id: DEVICE_TYPES[device_type](device_id, **params)
        for device_id, device_type, params in SCENARIO_DEVICES[scenario]
    }
    app = fastapi.FastAPI()

    async def call(device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        method = getattr(devices[device_id], body["method"])
        return {"result": method(*body.get("args", []), **body.get("kwargs", {})), "success": True}

    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    app.add_api_route("/devices/{device_id}/call", call, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def serve_fastapi(scenario: str) -> tuple[int, Stop]:
    uvicorn = importlib.import_module("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = int(sock.getsockname()[1])
    # The same uvicorn settings labd's server uses, so only the app differs.
    config = uvicorn.Config(
        bare_app(scenario),
        host=HOST,
        port=port,
        log_level="warning",
        log_config=None,
        access_log=False,
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def stop() -> None:
        server.should_exit = True
        thread.join(3.0)

    return port, stop


SERVE: dict[str, Callable[[str], tuple[int, Stop]]] = {
    "labd": serve_labd,
    "labdaemon": serve_labdaemon,
    "fastapi": serve_fastapi,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--impl", required=True, choices=sorted(SERVE))
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIO_DEVICES))
    args = parser.parse_args()
    port, stop = SERVE[args.impl](args.scenario)
    wait_healthy(port)
    print(json.dumps({"port": port, "versions": versions(args.impl)}), flush=True)
    sys.stdin.read()  # the benchmark closes our stdin when it is done (or dies)
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
