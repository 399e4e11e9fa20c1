"""The device-call fast path (labd.server.hotpath): same answers as the routed call, same guards.

``CallDispatch`` answers ``POST /devices/{id}/call`` before FastAPI's router. These tests pin
that it takes exactly the requests the registered route would match, and that every guard
and error answer still applies to the calls it serves, on a real server.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from starlette.routing import Match, Route

import labd
from labd.server.hotpath import call_route_device_id
from labd.testing import FakeDevice, RunningServer, running_server

pytestmark = pytest.mark.server

_ROUTE = Route("/devices/{device_id}/call", endpoint=lambda request: None, methods=["POST"])


def _scope(method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}


@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
    path=st.one_of(
        st.builds(lambda middle: f"/devices/{middle}/call", st.text(max_size=12)),
        st.text(alphabet="/devices/call.x%", max_size=30),
    ),
)
@example(method="POST", path="/devices//call")
@example(method="POST", path="/devices/a/b/call")
@example(method="POST", path="/devices/call")
@example(method="POST", path="/devices/x/call/")
@example(method="POST", path="/devices/x/callx")
@example(method="GET", path="/devices/x/call")
def test_fast_match_takes_exactly_what_the_route_matches(method: str, path: str) -> None:
    scope = _scope(method, path)
    match, child = _ROUTE.matches(scope)
    expected = child["path_params"]["device_id"] if match is Match.FULL else None
    assert call_route_device_id(scope) == expected


def test_a_mounted_app_leaves_the_call_to_the_router() -> None:
    scope = {**_scope("POST", "/devices/x/call"), "root_path": "/lab"}
    assert call_route_device_id(scope) is None


@pytest.fixture
def served() -> Iterator[RunningServer]:
    daemon = labd.LabDaemon()
    daemon.register_plugins(devices={"Fake": FakeDevice})
    daemon.connect_device(daemon.add_device("dev1", "Fake"))
    try:
        with running_server(daemon, max_body_bytes=4096) as server:
            yield server
    finally:
        daemon.shutdown()


def _post(server: RunningServer, path: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, content=content, timeout=10.0,
                      headers={"Content-Type": "application/json", **headers})


def test_a_fast_call_answers_like_the_route(served: RunningServer) -> None:
    ok = _post(served, "/devices/dev1/call", b'{"method": "get_value"}')
    assert ok.status_code == 200
    assert ok.json() == {"result": ok.json()["result"], "success": True}
    unknown = _post(served, "/devices/nope/call", b'{"method": "get_value"}')
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "UnknownDeviceError"
    bad_id = _post(served, "/devices/bad%20id/call", b'{"method": "get_value"}')
    assert bad_id.status_code == 400
    assert bad_id.json()["error"]["context"]["errors"][0]["field"] == "path.device_id"
    malformed = _post(served, "/devices/dev1/call", b'{"method":')
    assert malformed.status_code == 400


def test_paths_the_route_does_not_match_still_get_the_routers_answers(
    served: RunningServer,
) -> None:
    assert _post(served, "/devices/dev1/extra/call", b'{"method": "get_value"}').status_code == 404
    wrong_method = httpx.get(served.url + "/devices/dev1/call", timeout=10.0)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "MethodNotAllowed"


def test_every_guard_still_applies_to_fast_calls(served: RunningServer) -> None:
    body = b'{"method": "set_value", "args": [1]}'
    plain = httpx.post(served.url + "/devices/dev1/call", content=body, timeout=10.0,
                       headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    rebound = _post(served, "/devices/dev1/call", body, Host="evil.example")
    assert rebound.status_code == 421
    cross = _post(served, "/devices/dev1/call", body, Origin="http://evil.example")
    assert cross.status_code == 403
    huge = _post(served, "/devices/dev1/call",
                 b'{"method": "set_value", "args": ["' + b"x" * 5000 + b'"]}')
    assert huge.status_code == 413
    # None of the refused calls reached the device.
    assert [call for call in served.daemon.device_slot("dev1").instance.calls
            if call[0] == "set_value"] == []
