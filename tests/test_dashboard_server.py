"""The dashboard's server side without a browser: sign-in sessions, the cookie rules, redirects,
local-only assets, the form fields from JSON Schemas and the ring of log lines.

Real servers on 127.0.0.1 (``labd.testing.running_server``) and plain httpx requests, so each
rule is checked exactly as a browser (or a page of another site) would meet it.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from labd.server.auth import Token
from labd.server.sessions import COOKIE, SessionTable, session_cookie, session_id_from
from labd.testing import RunningServer, running_server
from labd.web.forms import fields_for
from labd.web.logbuffer import LogRing
from labd.web.views import plottable

pytestmark = pytest.mark.server

TIMEOUT = 10.0
OPERATOR = "operator-token-0123456789"
VIEWER = "viewer-token-0123456789"
UI = {"X-Labd-UI": "1"}


@pytest.fixture
def open_lab() -> Iterator[RunningServer]:
    with running_server(demo=True) as running:
        yield running


@pytest.fixture
def secured() -> Iterator[RunningServer]:
    tokens = {OPERATOR: Token("otto", "operator"), VIEWER: Token("vera", "viewer")}
    with running_server(demo=True, tokens=tokens) as running:
        yield running


@contextmanager
def _sign_in(server: RunningServer, token: str) -> Iterator[httpx.Client]:
    """A client holding the session cookie of ``token`` (and no bearer token)."""
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        answer = client.post("/ui/login", json={"token": token})
        assert answer.status_code == 200, answer.text
        yield client


# ---------------------------------------------------------------------- sign-in
def test_sign_in_sets_an_httponly_samesite_strict_cookie(secured: RunningServer) -> None:
    answer = httpx.post(f"{secured.url}/ui/login", json={"token": OPERATOR}, timeout=TIMEOUT)
    assert answer.json() == {"user": "otto", "role": "operator"}
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert OPERATOR not in cookie  # the cookie is a session id, never the token


def test_a_wrong_token_gets_no_session(secured: RunningServer) -> None:
    answer = httpx.post(f"{secured.url}/ui/login", json={"token": "wrong-token-123"}, timeout=TIMEOUT)
    assert answer.status_code == 401
    assert "set-cookie" not in answer.headers
    assert "not one this server accepts" in answer.json()["error"]["message"]


def test_pages_without_a_session_redirect_to_sign_in(secured: RunningServer) -> None:
    answer = httpx.get(f"{secured.url}/ui/devices/laser1", timeout=TIMEOUT)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login?next=%2Fui%2Fdevices%2Flaser1"
    # The sign-in page and the static files are open.
    assert httpx.get(f"{secured.url}/ui/login", timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{secured.url}/ui/static/labd.js", timeout=TIMEOUT).status_code == 200
    # The API still answers 401 to strangers.
    assert httpx.get(f"{secured.url}/devices", timeout=TIMEOUT).status_code == 401


def test_the_cookie_needs_the_ui_header_to_change_anything(secured: RunningServer) -> None:
    with _sign_in(secured, OPERATOR) as client:
        call = {"method": "set_wavelength", "args": [1551.0]}
        refused = client.post("/devices/laser1/call", json=call)
        assert refused.status_code == 403, refused.text
        assert "X-Labd-UI" in refused.json()["error"]["message"]
        assert secured.daemon.call_device("laser1", "get_wavelength") == 1550.0
        allowed = client.post("/devices/laser1/call", json=call, headers=UI)
        assert allowed.status_code == 200, allowed.text
        assert secured.daemon.call_device("laser1", "get_wavelength") == 1551.0
        # Reads of the API need the header too; pages and streams (no scripts) do not.
        assert client.get("/devices").status_code == 403
        assert client.get("/devices", headers=UI).status_code == 200
        assert client.get("/ui/devices/laser1").status_code == 200


def test_the_cookie_speaks_for_the_signed_in_user(secured: RunningServer) -> None:
    with _sign_in(secured, OPERATOR) as client:
        lease = client.post("/leases", json={"device_ids": ["pm1"], "ttl": 30}, headers=UI)
        assert lease.status_code == 201, lease.text
        assert lease.json()["owner"] == "otto"
        client.delete(f"/leases/{lease.json()['lease_id']}", headers=UI).raise_for_status()
        page = client.get("/ui/").text
        assert "otto" in page and "operator" in page and "Sign out" in page


def test_a_viewer_session_cannot_command(secured: RunningServer) -> None:
    with _sign_in(secured, VIEWER) as client:
        answer = client.post("/devices/laser1/call", headers=UI,
                             json={"method": "set_wavelength", "args": [1551.0]})
        assert answer.status_code == 403
        assert client.post("/devices/laser1/call", headers=UI,
                           json={"method": "get_wavelength"}).status_code == 200
        page = client.get("/ui/devices/laser1").text
        assert "Commands need the operator role; you are viewer." in page


def test_sign_out_ends_the_session(secured: RunningServer) -> None:
    with _sign_in(secured, OPERATOR) as client:
        assert client.get("/ui/").status_code == 200
        answer = client.post("/ui/logout", headers=UI)
        assert answer.json()["status"] == "signed_out"
        assert "Max-Age=0" in answer.headers["set-cookie"]
        client.cookies.clear()
        assert client.get("/ui/").status_code == 303


def test_a_session_id_from_a_request_is_not_trusted_blindly() -> None:
    table = SessionTable(ttl=60.0, max_sessions=2)
    first = table.create(Token("a", "viewer"))
    table.create(Token("b", "viewer"))
    table.create(Token("c", "viewer"))  # the least recently used (a's) session ends
    assert table.lookup(first) is None
    assert table.lookup("made-up") is None
    assert session_id_from(f"x=1; {COOKIE}=abc") == "abc"
    assert session_id_from("x=1") is None
    assert "Secure" in session_cookie("abc", secure=True)


def test_no_tokens_no_sign_in(open_lab: RunningServer) -> None:
    answer = httpx.post(f"{open_lab.url}/ui/login", json={"token": "whatever-123"}, timeout=TIMEOUT)
    assert answer.status_code == 404
    assert httpx.get(f"{open_lab.url}/ui/login", timeout=TIMEOUT).status_code == 303


# ---------------------------------------------------------------------- pages and assets
def test_a_browser_asking_for_root_goes_to_the_dashboard(open_lab: RunningServer) -> None:
    html = httpx.get(open_lab.url, headers={"Accept": "text/html,*/*"}, timeout=TIMEOUT)
    assert html.status_code == 307 and html.headers["location"] == "/ui/"
    assert httpx.get(open_lab.url, timeout=TIMEOUT).json()["name"] == "labd"


def test_with_tokens_a_browser_at_root_is_sent_to_sign_in(secured: RunningServer) -> None:
    for path in ("/", "/ui"):
        html = httpx.get(secured.url + path, headers={"Accept": "text/html"}, timeout=TIMEOUT)
        assert html.status_code == 303, path
        assert html.headers["location"] == "/ui/login?next=%2Fui%2F"


@pytest.mark.parametrize("path", ["/ui/", "/ui/devices/daq1", "/ui/tasks", "/ui/runs",
                                  "/ui/tasks/new/WavelengthSweep", "/ui/server", "/docs", "/redoc"])
def test_pages_load_nothing_from_another_host(open_lab: RunningServer, path: str) -> None:
    answer = httpx.get(f"{open_lab.url}{path}", timeout=TIMEOUT)
    assert answer.status_code == 200
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", answer.text), answer.text[:500]


def test_unknown_things_are_html_404_pages(open_lab: RunningServer) -> None:
    for path in ["/ui/devices/nope", "/ui/runs/nope", "/ui/tasks/new/Nope"]:
        answer = httpx.get(f"{open_lab.url}{path}", timeout=TIMEOUT)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("text/html")


def test_the_pages_are_not_part_of_the_api_description(open_lab: RunningServer) -> None:
    paths = httpx.get(f"{open_lab.url}/openapi.json", timeout=TIMEOUT).json()["paths"]
    assert not [p for p in paths if p.startswith("/ui") or p in ("/docs", "/redoc")]


def test_a_run_downloads_as_json_and_hdf5(open_lab: RunningServer) -> None:
    pytest.importorskip("h5py")
    handle = open_lab.daemon.execute_task("dl1", "WavelengthSweep", laser_id="laser1",
                                          detector_id="pm1", start_wl=1549.0, stop_wl=1551.0,
                                          steps=5)
    handle.wait(10.0)
    record = httpx.get(f"{open_lab.url}/ui/runs/dl1/download.json", timeout=TIMEOUT)
    assert record.headers["content-disposition"] == 'attachment; filename="dl1.json"'
    assert record.json()["task_id"] == "dl1"
    hdf5 = httpx.get(f"{open_lab.url}/ui/runs/dl1/download.h5", timeout=TIMEOUT)
    assert hdf5.content.startswith(b"\x89HDF")
    page = httpx.get(f"{open_lab.url}/ui/runs/dl1", timeout=TIMEOUT).text
    assert "Run again" in page and "/ui/tasks/new/WavelengthSweep?from=dl1" in page


def test_the_server_page_shows_recent_log_lines(open_lab: RunningServer) -> None:
    logging.getLogger("labd.server").warning("dashboard-log-probe %d", 42)
    page = httpx.get(f"{open_lab.url}/ui/server", timeout=TIMEOUT).text
    assert "dashboard-log-probe 42" in page


# ---------------------------------------------------------------------- parts
def test_form_fields_follow_the_json_schemas() -> None:
    params = [
        {"name": "nm", "required": True, "schema": {"type": "number"}, "kind": "positional_or_keyword"},
        {"name": "n", "required": False, "default": 3, "schema": {"type": "integer"}},
        {"name": "on", "required": False, "default": True, "schema": {"type": "boolean"}},
        {"name": "mode", "required": True, "schema": {"enum": ["fast", "slow"], "type": "string"}},
        {"name": "points", "required": True, "schema": {"type": "array", "items": {"type": "number"}}},
        {"name": "label", "required": False, "default": None,
         "schema": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        {"name": "anything", "required": True, "schema": {}},
        {"name": "kwargs", "required": False, "schema": {}, "kind": "var_keyword"},
    ]
    fields = {f.name: f for f in fields_for(params)}
    assert set(fields) == {"nm", "n", "on", "mode", "points", "label", "anything"}
    assert (fields["nm"].widget, fields["nm"].kind, fields["nm"].required) == ("number", "number", True)
    assert (fields["n"].kind, fields["n"].default) == ("integer", "3")
    assert fields["on"].widget == "checkbox" and fields["on"].checked
    assert fields["mode"].choices == [("fast", '"fast"'), ("slow", '"slow"')]
    assert (fields["points"].kind, fields["points"].item_kind) == ("list", "number")
    assert fields["label"].kind == "text" and not fields["label"].required
    assert fields["anything"].kind == "json"
    prefilled = {f.name: f for f in fields_for(params, {"nm": 1551.5, "points": [1, 2]})}
    assert prefilled["nm"].default == "1551.5" and prefilled["points"].default == "1, 2"


def test_the_log_ring_is_bounded() -> None:
    ring = LogRing(capacity=3)
    logger = logging.getLogger("labd.test_dashboard_ring")
    logger.addHandler(ring)
    try:
        for n in range(5):
            logger.warning("line %d", n)
    finally:
        logger.removeHandler(ring)
    assert [r["message"] for r in ring.recent()] == ["line 2", "line 3", "line 4"]


def test_a_result_is_plotted_from_its_rows() -> None:
    rows = [{"wavelength": 1549.0, "power": 1.0}]
    assert plottable({"status": "completed", "results": rows}) == rows
    assert plottable([1.0, 2.0]) == [1.0, 2.0]
    assert plottable({"status": "ok"}) == []
    assert plottable({"wl": [1.0, 2.0], "p": [3.0, 4.0], "note": "x"}) == [
        {"wl": 1.0, "p": 3.0}, {"wl": 2.0, "p": 4.0}]
    assert plottable({"wl": [1.0, 2.0], "p": [3.0]}) == [1.0, 2.0]  # unequal: the first list


@pytest.fixture
def recorded_lab(tmp_path: Path) -> Iterator[RunningServer]:
    """The demo lab with a run store (history beyond the 20 runs kept in memory)."""
    from labd import LabDaemon

    daemon = LabDaemon(store=tmp_path / "runs.db")  # a path: the daemon owns (and closes) it
    try:
        with running_server(daemon, demo=True) as running:
            yield running
    finally:
        daemon.shutdown()


def test_the_history_pages_newest_first(recorded_lab: RunningServer) -> None:
    open_lab = recorded_lab
    for n in range(30):
        open_lab.daemon.execute_task(f"page-{n:02d}", "WavelengthSweep", laser_id="laser1",
                                     detector_id="pm1", start_wl=1549.0, stop_wl=1551.0,
                                     steps=1).wait(10.0)
    first = httpx.get(f"{open_lab.url}/ui/runs?type=WavelengthSweep", timeout=TIMEOUT).text
    assert first.count('tr data-run="') == 25
    assert 'data-run="page-29"' in first and 'data-run="page-04"' not in first
    assert "offset=25" in first and 'rel="next"' in first and 'rel="prev"' not in first
    second = httpx.get(f"{open_lab.url}/ui/runs?type=WavelengthSweep&offset=25", timeout=TIMEOUT).text
    assert second.count('tr data-run="') == 5
    assert 'data-run="page-00"' in second and 'rel="prev"' in second and 'rel="next"' not in second
    text = httpx.get(f"{open_lab.url}/ui/runs?text=PAGE-1", timeout=TIMEOUT).text
    assert text.count('tr data-run="') == 10  # page-10 .. page-19, case-insensitive


def test_the_log_ring_never_hides_a_warning_from_stderr() -> None:
    # A fresh interpreter: pytest's own logging handlers would stand in for Python's default.
    script = (
        "import logging\n"
        "from labd.web.logbuffer import LogRing\n"
        "ring = LogRing(); ring.attach()\n"
        "logging.getLogger('labd.server').warning('still printed %d', 7)\n"
        "logging.getLogger('labd.server').info('below the level')\n"
        "print([r['message'] for r in ring.recent()])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stderr.strip() == "still printed 7"
    assert done.stdout.strip() == "['still printed 7']"
