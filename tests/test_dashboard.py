"""The dashboard in a real browser: Playwright drives Chromium against a real ``labd serve --demo``.

``labd serve --demo`` runs as a child process on 127.0.0.1 and a free port, exactly as a user
starts it (one without tokens, one with a tokens file); Playwright drives Debian's
``/usr/bin/chromium`` (never a downloaded browser). Every page is opened through
:class:`GuardedPage`, which records console errors, page errors and every request to a host
other than 127.0.0.1 (aborted, so a page that needs one also breaks visibly); each test ends by
asserting both lists are empty. Waits are Playwright's ``expect`` with bounded timeouts. Each
page's screenshot is saved under ``docs/screenshots/`` (the README shows two of them).
"""


from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest

from labd.testing import LabdProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
SERVE_START_TIMEOUT_S = 30.0
#: Bounded waits of the browser tests (Playwright's expect timeouts), in milliseconds.
WAIT_MS = 15_000
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def require_browser() -> None:
    """Skip (with the reason) where Chromium or the built assets are missing."""
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("the dashboard tests need Debian's chromium at /usr/bin/chromium "
                    "(.ci/run installs it)")
    vendor = Path(__file__).resolve().parent.parent / "src/labd/web/static/vendor/htmx.min.js"
    if not vendor.is_file():
        pytest.fail("the dashboard's assets are not built: run `make assets` "
                    "(python tools/build_assets.py); make test does this first")


@contextmanager
def labd_serve(*args: str) -> Iterator[str]:
    """``labd serve --demo ARGS`` on 127.0.0.1 and a free port; yields its URL."""
    with LabdProcess("serve", "--demo", "--port", "0", *args, timeout=SERVE_START_TIMEOUT_S,
                     env={"LABD_URL": None, "LABD_TOKEN": None}) as proc:
        url = proc.wait_for("labd serving").split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:"), url
        try:
            yield url
        finally:
            code = proc.stop(signal.SIGINT)
            assert code == 0, proc.output()


@dataclass
class GuardedPage:
    """A Playwright page whose console errors and foreign requests are recorded."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    expected_statuses: set[int] = field(default_factory=set)

    def expect_refusal(self, status: int) -> None:
        """The test provokes an error answer on purpose: the browser's log line for it is fine."""
        self.expected_statuses.add(status)

    def goto(self, path: str) -> Any:
        return self.page.goto(self.url + path, wait_until="load")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / name), full_page=True)

    def assert_clean(self) -> None:
        assert self.foreign == [], f"requests left 127.0.0.1: {self.foreign}"
        errors = [e for e in self.errors
                  if not any(f"status of {code} " in e for code in self.expected_statuses)]
        assert errors == [], f"console errors: {errors}"


def _allowed(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname == "127.0.0.1"


def guarded_page(browser: Any, url: str, viewport: dict[str, int] | None = None,
                 ) -> tuple[Any, GuardedPage]:
    """A new browser context and its guarded page (close the context when done)."""
    context = browser.new_context(viewport=viewport or DESKTOP)
    page = context.new_page()
    guard = GuardedPage(page, url)

    def route(handle: Any) -> None:
        if _allowed(handle.request.url):
            handle.continue_()
        else:
            guard.foreign.append(handle.request.url)
            handle.abort()

    context.route("**/*", route)
    page.on("console", lambda m: guard.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: guard.errors.append(f"page error: {e}"))
    page.set_default_timeout(WAIT_MS)
    return context, guard


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium through Playwright's sync API, closed at the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             env={**os.environ, "TZ": "UTC"})
        try:
            yield browser
        finally:
            browser.close()


pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

#: Every page, with the screenshot it leaves.
PAGES = [
    ("/ui/", "overview.png"),
    ("/ui/devices/laser1", "device-laser1.png"),
    ("/ui/devices/daq1", "device-daq1.png"),
    ("/ui/tasks", "tasks.png"),
    ("/ui/tasks/new/WavelengthSweep", "task-new.png"),
    ("/ui/runs", "runs.png"),
    ("/ui/server", "server.png"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_browser()
    with chromium() as instance:
        yield instance


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``labd serve --demo`` without tokens (history in a fresh SQLite file)."""
    db = tmp_path_factory.mktemp("dashboard") / "runs.db"
    with labd_serve("--db", str(db)) as url:
        yield url


@pytest.fixture
def ui(browser: Any, lab: str) -> Iterator[GuardedPage]:
    """A fresh desktop-sized page on the lab; fails the test on console errors or foreign hosts."""
    context, guard = guarded_page(browser, lab)
    try:
        yield guard
        guard.assert_clean()
    finally:
        context.close()


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=WAIT_MS)
    return playwright_expect(target)


def points(guard: GuardedPage, selector: str = "[data-plot]") -> int:
    return int(guard.page.locator(selector).first.get_attribute("data-points") or 0)


def wait_points_above(guard: GuardedPage, count: int, selector: str = "[data-plot]") -> int:
    """Wait (bounded, event-driven) until the plot's data-points exceeds ``count``."""
    guard.page.wait_for_function(
        "([sel, n]) => Number(document.querySelector(sel).dataset.points) > n",
        arg=[selector, count], timeout=WAIT_MS)
    return points(guard, selector)


# ---------------------------------------------------------------------- overview
def test_overview_lists_the_lab_and_follows_events(ui: GuardedPage) -> None:
    import httpx

    ui.goto("/ui/")
    page = ui.page
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    for device_id in ("laser1", "pm1", "daq1"):
        expect(page.get_by_role("link", name=device_id, exact=True)).to_be_visible()
    expect(page.locator('[data-device="laser1"]')).to_contain_text("connected")
    expect(page.get_by_test_id("health-status")).to_have_text("healthy")
    expect(page.get_by_test_id("user")).to_have_text("local user")
    # Live: a state change made by another client shows up without a reload.
    row = page.locator('[data-device="pm1"]')
    try:
        httpx.post(f"{ui.url}/devices/pm1/disconnect", timeout=10).raise_for_status()
        expect(row.locator("td").first).to_have_text("disconnected")
    finally:
        httpx.post(f"{ui.url}/devices/pm1/connect", timeout=10).raise_for_status()
    expect(row.locator("td").first).to_have_text("connected")


def test_browser_root_redirects_to_the_dashboard(ui: GuardedPage) -> None:
    ui.goto("/")
    expect(ui.page).to_have_url(ui.url + "/ui/")


# ---------------------------------------------------------------------- device page
def test_a_form_commands_the_laser_and_the_page_shows_the_new_value(ui: GuardedPage) -> None:
    ui.goto("/ui/devices/laser1")
    page = ui.page
    value = page.locator('output[data-query="get_wavelength"]')
    expect(value).to_have_text("1550")
    form = page.locator('form[data-call="set_wavelength"]')
    form.get_by_label("nm", exact=True).fill("1551.25")
    page.get_by_role("button", name="set_wavelength", exact=True).click()
    expect(form.locator("output")).to_contain_text("null")
    expect(value).to_have_text("1551.25")
    # A refused value shows the error record inline and changes nothing.
    ui.expect_refusal(502)
    form.get_by_label("nm", exact=True).fill("1700")
    page.get_by_role("button", name="set_wavelength", exact=True).click()
    expect(form.locator("output")).to_contain_text("out of range")
    expect(value).to_have_text("1551.25")
    # A boolean parameter is a checkbox labelled with its name.
    output_form = page.locator('form[data-call="set_output"]')
    output_form.get_by_label("on", exact=True).check()
    page.get_by_role("button", name="set_output", exact=True).click()
    expect(page.locator('output[data-query="is_output_on"]')).to_have_text("true")
    ui.screenshot("device-laser1.png")


def test_the_keyboard_alone_commands_the_laser(ui: GuardedPage) -> None:
    ui.goto("/ui/devices/laser1")
    page = ui.page
    expect(page.locator('output[data-query="get_wavelength"]')).not_to_have_text("…")
    target = page.locator('form[data-call="set_wavelength"]').get_by_label("nm", exact=True)
    for _ in range(80):  # bounded: Tab through the page until the nm input has the focus
        page.keyboard.press("Tab")
        if target.evaluate("node => node === document.activeElement"):
            break
    else:
        pytest.fail("Tab never reached the input labelled nm")
    page.keyboard.type("1549.5")
    page.keyboard.press("Enter")
    expect(page.locator('output[data-query="get_wavelength"]')).to_have_text("1549.5")


def test_take_control_holds_a_lease_until_released(ui: GuardedPage) -> None:
    import httpx

    ui.goto("/ui/devices/laser1")
    page = ui.page
    page.get_by_role("button", name="Take control").click()
    expect(page.get_by_role("button", name="Release control")).to_be_visible()
    expect(page.locator('[data-field="owner"]')).to_contain_text("lease")
    # Someone else (a script without the page's owner name) may not command it now.
    answer = httpx.post(f"{ui.url}/devices/laser1/call", timeout=10,
                        json={"method": "set_power", "args": [2.0]})
    assert answer.status_code == 409, answer.text
    # The page's own commands go through under its lease.
    form = page.locator('form[data-call="set_power"]')
    form.get_by_label("mw", exact=True).fill("2.5")
    page.get_by_role("button", name="set_power", exact=True).click()
    expect(page.locator('output[data-query="get_power"]')).to_have_text("2.5")
    page.get_by_role("button", name="Release control").click()
    expect(page.get_by_role("button", name="Take control")).to_be_visible()
    expect(page.locator('[data-field="owner"]')).to_have_text("nobody")


def test_the_page_renews_its_lease_while_open(ui: GuardedPage) -> None:
    import httpx

    ui.page.clock.install()  # the page's timers run when the test says so
    ui.goto("/ui/devices/laser1")
    ui.page.get_by_role("button", name="Take control").click()
    expect(ui.page.get_by_role("button", name="Release control")).to_be_visible()

    def active() -> dict[str, Any]:
        leases = httpx.get(f"{ui.url}/leases", timeout=10).json()["leases"]
        return next(entry for entry in leases if entry["status"] == "active")

    before = active()["expires_at"]
    with ui.page.expect_response(lambda r: r.url.endswith("/renew") and r.ok):
        ui.page.clock.run_for(11_000)  # past the 10 s renewal period
    assert active()["expires_at"] > before
    ui.page.get_by_role("button", name="Release control").click()
    expect(ui.page.get_by_role("button", name="Take control")).to_be_visible()


def test_leaving_the_page_releases_its_lease(ui: GuardedPage) -> None:
    import httpx

    ui.goto("/ui/devices/pm1")
    ui.page.get_by_role("button", name="Take control").click()
    expect(ui.page.get_by_role("button", name="Release control")).to_be_visible()
    assert [lease["device_ids"] for lease in httpx.get(f"{ui.url}/leases", timeout=10).json()["leases"]
            if lease["status"] == "active"] == [["pm1"]]
    ui.goto("/ui/")  # pagehide releases the lease (fetch keepalive)
    expect(ui.page.locator('[data-device="pm1"] td[data-label="Owner"]')).to_have_text("—")


def test_an_admin_breaks_someone_elses_lease(ui: GuardedPage) -> None:
    import httpx

    # Without tokens the browser user may do everything (an admin's rights), as docs/security.md says.
    lease = httpx.post(f"{ui.url}/leases", json={"device_ids": ["laser1"], "ttl": 60},
                       headers={"X-Labd-Owner": "alice"}, timeout=10).json()
    ui.goto("/ui/devices/laser1")
    page = ui.page
    expect(page.locator("#control-reason")).to_contain_text("owned by lease")
    expect(page.get_by_role("button", name="set_wavelength", exact=True)).to_be_disabled()
    expect(page.get_by_role("button", name="Take control")).to_be_disabled()
    page.get_by_role("button", name="Break lease").click()
    expect(page.get_by_role("button", name="set_wavelength", exact=True)).to_be_enabled()
    expect(page.locator('[data-field="owner"]')).to_have_text("nobody")
    ended = httpx.get(f"{ui.url}/leases", timeout=10).json()["leases"]
    assert lease["lease_id"] not in [entry["lease_id"] for entry in ended if entry["status"] == "active"]


def test_the_daq_plot_counts_the_points_it_receives(ui: GuardedPage) -> None:
    ui.goto("/ui/devices/daq1")
    page = ui.page
    plot = page.locator("[data-plot]")
    expect(plot).to_have_attribute("data-points", "0")
    page.get_by_role("button", name="Start stream").click()
    first = wait_points_above(ui, 0)
    second = wait_points_above(ui, first)
    assert second > first
    # Pausing freezes the drawing, not the count.
    page.get_by_role("button", name="Pause plot").click()
    wait_points_above(ui, second)
    page.get_by_role("button", name="Resume plot").click()
    page.get_by_label("Window").select_option("1")
    ui.screenshot("device-daq1.png")
    expect(page.get_by_role("button", name="Following the stream")).to_be_disabled()
    page.get_by_role("button", name="Stop stream").click()
    expect(page.locator('[data-field="streaming"]')).to_have_text("no")
    # The page stops following (an EventSource would reconnect, restarting the stream).
    expect(page.get_by_role("button", name="Start stream")).to_be_enabled()
    expect(page.locator('output[data-query="is_streaming"]')).to_have_text("false")


# ---------------------------------------------------------------------- tasks and runs
def test_a_sweep_launched_from_its_form_reaches_100_and_is_in_the_history(ui: GuardedPage) -> None:
    page = ui.page
    ui.goto("/ui/tasks")
    page.get_by_role("link", name="New WavelengthSweep run").click()
    expect(page).to_have_url(ui.url + "/ui/tasks/new/WavelengthSweep")
    values = {"laser_id": "laser1", "detector_id": "pm1", "start_wl": "1549",
              "stop_wl": "1551", "steps": "41", "dwell": "0.02", "task_id": "ui-sweep-1"}
    for name, value in values.items():
        page.get_by_label(name, exact=True).fill(value)
    ui.screenshot("task-new.png")
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page).to_have_url(ui.url + "/ui/runs/ui-sweep-1")
    expect(page.get_by_role("progressbar", name="Progress")).to_have_attribute(
        "aria-valuenow", "100", timeout=30_000)
    expect(page.locator('[data-field="status"]')).to_have_text("completed")
    expect(page.locator("[data-plot]")).to_have_attribute("data-points", "41")
    ui.screenshot("run.png")
    ui.goto("/ui/runs")
    row = page.locator('tr[data-run="ui-sweep-1"]')
    expect(row).to_contain_text("completed")
    ui.screenshot("runs.png")
    row.get_by_role("link", name="ui-sweep-1").click()
    expect(page.locator("[data-plot]")).to_have_attribute("data-points", "41")
    expect(page.get_by_role("link", name="Download HDF5")).to_be_visible()
    # Run again: the launch form with the same parameters.
    page.get_by_role("link", name="Run again").click()
    expect(page.get_by_label("steps", exact=True)).to_have_value("41")
    expect(page.get_by_label("laser_id", exact=True)).to_have_value("laser1")


def test_a_run_can_be_paused_resumed_and_cancelled(ui: GuardedPage) -> None:
    import httpx

    body = {"task_id": "ui-slow-1", "task_type": "WavelengthSweep", "params": {
        "laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549, "stop_wl": 1551,
        "steps": 3000, "dwell": 0.02}}  # a minute at least
    httpx.post(f"{ui.url}/tasks", json=body, timeout=10).raise_for_status()
    ui.goto("/ui/runs/ui-slow-1")
    page = ui.page
    status = page.locator('[data-field="status"]')
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(status).to_have_text("paused")
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(status).to_have_text("running")
    wait_points_above(ui, 0)
    # The overview lists it with its progress, and so does /ui/tasks.
    for path in ("/ui/", "/ui/tasks"):
        ui.goto(path)
        bar = page.get_by_role("progressbar", name="Progress of ui-slow-1")
        expect(bar).to_have_attribute("aria-valuenow", re.compile(r"\d+"))
        if path == "/ui/":
            ui.screenshot("overview.png")  # the README's: a run in progress, the history
    ui.goto("/ui/devices/laser1")  # a device the run owns: commands disabled, with the reason
    expect(page.locator("#control-reason")).to_contain_text("owned by task 'ui-slow-1'")
    expect(page.get_by_role("button", name="set_wavelength", exact=True)).to_be_disabled()
    ui.goto("/ui/runs/ui-slow-1")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(status).to_have_text("cancelled")


def test_the_history_filters_by_state_type_and_text(ui: GuardedPage) -> None:
    import httpx

    for n in range(3):
        body = {"task_id": f"filter-{n}", "task_type": "WavelengthSweep", "params": {
            "laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549, "stop_wl": 1551,
            "steps": 2}, "wait_for_devices": 10}
        httpx.post(f"{ui.url}/tasks", json=body, timeout=10).raise_for_status()
    page = ui.page
    ui.goto("/ui/runs?text=filter-1")
    expect(page.locator('tr[data-run="filter-1"]')).to_be_visible()
    expect(page.locator("tr[data-run]")).to_have_count(1)
    page.get_by_label("text", exact=True).fill("no-such-run")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No runs match.")).to_be_visible()
    ui.goto("/ui/runs?state=running&type=WavelengthSweep")
    expect(page.get_by_label("state", exact=True)).to_have_value("running")


# ---------------------------------------------------------------------- every page
def test_every_page_has_no_console_errors_and_stays_on_127_0_0_1(ui: GuardedPage) -> None:
    page = ui.page
    for path, _ in PAGES:
        ui.goto(path)
        expect(page.locator("main h1")).to_be_visible()
        _assert_named_controls(page, path)
        _assert_badges_readable(page)
    ui.screenshot("server.png")
    ui.goto("/ui/tasks")
    ui.screenshot("tasks.png")
    ui.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("labd")
    expect(page.locator(".opblock").first).to_be_visible()
    ui.screenshot("docs.png")


def _assert_named_controls(page: Any, path: str) -> None:
    """Every control has an accessible name (its label, text, aria-label or title)."""
    unnamed = page.evaluate("""() => [...document.querySelectorAll(
        'button, input, select, textarea, a[href]')].filter(node => {
          const label = node.getAttribute('aria-label') || (node.labels && node.labels.length
            ? node.labels[0].textContent : '') || node.textContent || node.title || '';
          return !label.trim() && node.type !== 'hidden';
        }).map(node => node.outerHTML.slice(0, 120))""")
    assert unnamed == [], f"{path}: controls without an accessible name: {unnamed}"


def _assert_badges_readable(page: Any) -> None:
    """Every badge's text differs in colour from its background (a badge once vanished)."""
    same = page.evaluate("""() => [...document.querySelectorAll('.badge')].filter(node => {
        const style = getComputedStyle(node);
        return style.color === style.backgroundColor;
      }).map(node => node.outerHTML.slice(0, 120))""")
    assert same == [], f"badges whose text is the colour of their background: {same}"


def test_phone_width_never_scrolls_sideways(browser: Any, lab: str) -> None:
    import httpx

    body = {"task_id": "phone-1", "task_type": "WavelengthSweep", "wait_for_devices": 10,
            "params": {"laser_id": "laser1", "detector_id": "pm1", "start_wl": 1549,
                       "stop_wl": 1551, "steps": 5}}
    httpx.post(f"{lab}/tasks", json=body, timeout=10).raise_for_status()
    context, ui = guarded_page(browser, lab, viewport=PHONE)
    try:
        for path, _ in [*PAGES, ("/ui/runs/phone-1", ""), ("/docs", "")]:
            ui.goto(path)
            ui.page.wait_for_load_state("load")
            overflow = ui.page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} scrolls sideways by {overflow} px at 390 px"
            if path == "/ui/":
                ui.screenshot("overview-phone.png")
        ui.assert_clean()
    finally:
        context.close()


# ---------------------------------------------------------------------- roles (tokens)
TOKENS = {"viewer": "viewer-token-0123456789", "operator": "operator-token-0123456789"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``labd serve --demo --tokens FILE`` with a viewer (vera) and an operator (otto)."""
    folder = tmp_path_factory.mktemp("dashboard-tokens")
    tokens = folder / "tokens.toml"
    tokens.write_text('[tokens]\n'
                      f'"{TOKENS["viewer"]}" = {{ user = "vera", role = "viewer" }}\n'
                      f'"{TOKENS["operator"]}" = {{ user = "otto", role = "operator" }}\n')
    tokens.chmod(0o600)
    with labd_serve("--no-db", "--tokens", str(tokens)) as url:
        yield url


def _sign_in(ui: GuardedPage, role: str) -> None:
    ui.goto("/ui/devices/laser1")
    expect(ui.page).to_have_url(ui.url + "/ui/login?next=%2Fui%2Fdevices%2Flaser1")
    ui.page.get_by_label("token", exact=True).fill(TOKENS[role])
    ui.page.get_by_role("button", name="Sign in").click()
    expect(ui.page).to_have_url(ui.url + "/ui/devices/laser1")


def test_a_viewer_sees_commands_disabled_and_an_operator_enabled(browser: Any, secured: str) -> None:
    for role, user in (("viewer", "vera"), ("operator", "otto")):
        context, ui = guarded_page(browser, secured)
        try:
            _sign_in(ui, role)
            page = ui.page
            expect(page.get_by_test_id("user")).to_have_text(user)
            expect(page.get_by_test_id("role")).to_have_text(role)
            _assert_badges_readable(page)
            button = page.get_by_role("button", name="set_wavelength", exact=True)
            value = page.locator('output[data-query="get_wavelength"]')
            expect(value).to_have_text("1550")  # queries work for both
            if role == "viewer":
                expect(button).to_be_disabled()
                expect(page.get_by_role("button", name="Take control")).to_be_disabled()
                expect(page.locator("#control-reason")).to_contain_text("operator role")
                ui.screenshot("device-viewer.png")
            else:
                expect(button).to_be_enabled()
                page.locator('form[data-call="set_wavelength"]').get_by_label("nm").fill("1552")
                button.click()
                expect(value).to_have_text("1552")
            cookie = next(c for c in context.cookies() if c["name"] == "labd_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            page.get_by_role("button", name="Sign out").click()
            expect(page).to_have_url(ui.url + "/ui/login")
            ui.assert_clean()
        finally:
            context.close()


def test_a_signed_in_viewer_follows_a_running_stream(browser: Any, secured: str) -> None:
    import httpx

    operator = {"Authorization": f"Bearer {TOKENS['operator']}"}
    context, ui = guarded_page(browser, secured)
    try:
        _sign_in(ui, "viewer")
        ui.goto("/ui/devices/daq1")
        page = ui.page
        expect(page.get_by_role("button", name="Start stream")).to_be_disabled()
        expect(page.get_by_text("Starting a stream needs the operator role")).to_be_visible()
        # An operator's client starts the stream; the viewer's page joins it with the cookie.
        with httpx.stream("GET", f"{secured}/stream/devices/daq1", headers=operator,
                          timeout=10) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
            assert next(lines).startswith(("id:", "event:", ":"))
            ui.goto("/ui/devices/daq1")
            wait_points_above(ui, 0)
            expect(page.get_by_role("button", name="Stop stream")).to_be_disabled()
        ui.assert_clean()
    finally:
        context.close()


def test_a_users_script_lease_survives_their_page(browser: Any, secured: str) -> None:
    import httpx

    operator = {"Authorization": f"Bearer {TOKENS['operator']}"}
    lease = httpx.post(f"{secured}/leases", json={"device_ids": ["pm1"], "ttl": 60},
                       headers=operator, timeout=10).json()
    context, ui = guarded_page(browser, secured)
    try:
        _sign_in(ui, "operator")
        ui.goto("/ui/devices/pm1")
        # The same user's lease: their page may command and release it, but does not adopt it.
        expect(ui.page.get_by_role("button", name="Release control")).to_be_visible()
        ui.goto("/ui/")
        expect(ui.page.locator('[data-device="pm1"] td[data-label="Owner"]')).to_contain_text(
            lease["lease_id"])
        active = httpx.get(f"{secured}/leases", headers=operator, timeout=10).json()["leases"]
        assert [entry["status"] for entry in active if entry["lease_id"] == lease["lease_id"]] == [
            "active"]
        ui.assert_clean()
    finally:
        context.close()
        httpx.delete(f"{secured}/leases/{lease['lease_id']}", headers=operator, timeout=10)


def test_the_login_page_says_when_a_token_is_wrong(browser: Any, secured: str) -> None:
    context, ui = guarded_page(browser, secured)
    try:
        ui.goto("/ui/login")
        ui.page.get_by_label("token", exact=True).fill("not-a-valid-token")
        ui.page.get_by_role("button", name="Sign in").click()
        expect(ui.page.locator("form output")).to_contain_text("not one this server accepts")
        ui.screenshot("login.png")
        ui.expect_refusal(401)
        ui.assert_clean()
    finally:
        context.close()


# ---------------------------------------------------------------------- every widget kind
class Shaper:
    """A device whose commands take every kind of input the forms generate."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.last: dict[str, Any] = {}

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def configure(self, mode: Literal["fast", "slow"], points: list[float], repeats: int,
                  label: str | None = None, enabled: bool = False) -> None:
        self.last = {"mode": mode, "points": points, "repeats": repeats, "label": label,
                     "enabled": enabled}

    def get_last(self) -> dict[str, Any]:
        return self.last


def test_choice_list_integer_and_optional_inputs_arrive_as_json(browser: Any) -> None:
    from labd.testing import running_server

    with running_server() as server:
        server.daemon.register_plugins(devices={"Shaper": Shaper})
        server.daemon.add_device("shaper1", "Shaper")
        server.daemon.connect_device("shaper1")
        context, ui = guarded_page(browser, server.url)
        try:
            ui.goto("/ui/devices/shaper1")
            form = ui.page.locator('form[data-call="configure"]')
            form.get_by_label("mode", exact=True).select_option("slow")
            form.get_by_label("points", exact=True).fill("1.5, 2, 3e-1")
            form.get_by_label("repeats", exact=True).fill("4")
            form.get_by_label("enabled", exact=True).check()
            ui.page.get_by_role("button", name="configure", exact=True).click()
            expect(ui.page.locator('output[data-query="get_last"]')).to_have_text(
                '{"mode":"slow","points":[1.5,2,0.3],"repeats":4,"label":null,"enabled":true}')
            # A fractional integer fails the input's own validation: nothing is sent.
            repeats = form.get_by_label("repeats", exact=True)
            repeats.fill("4.5")
            assert repeats.evaluate("node => node.validity.stepMismatch")
            # A list item that is no number is named inline before anything is sent.
            repeats.fill("5")
            form.get_by_label("points", exact=True).fill("1, abc")
            ui.page.get_by_role("button", name="configure", exact=True).click()
            expect(form.locator("output")).to_contain_text("not a number: abc")
            assert server.daemon.call_device("shaper1", "get_last")["repeats"] == 4
            # An optional text parameter left empty keeps its default; filled, it is sent.
            form.get_by_label("points", exact=True).fill("[7]")
            form.get_by_label("label", exact=True).fill("run A")
            ui.page.get_by_role("button", name="configure", exact=True).click()
            expect(ui.page.locator('output[data-query="get_last"]')).to_contain_text('"label":"run A"')
            ui.assert_clean()
        finally:
            context.close()


class TraceTask:
    """A run that emits whole traces (arrays) and returns them as columns."""

    def __init__(self, task_id: str, traces: int = 3, samples: int = 50) -> None:
        self.task_id, self.traces, self.samples = task_id, traces, samples

    def run(self, context: Any) -> dict[str, Any]:
        for n in range(self.traces):
            context.emit([float(n + i / self.samples) for i in range(self.samples)])
            context.progress(n + 1, self.traces)
        return {"index": list(range(self.samples)), "last": [float(i) for i in range(self.samples)]}


def test_a_run_that_emits_traces_is_plotted(browser: Any, tmp_path: Path) -> None:
    from labd import LabDaemon
    from labd.testing import running_server

    daemon = LabDaemon(store=tmp_path / "runs.db")  # emitted data is kept by the run store
    with daemon, running_server(daemon) as server:
        server.daemon.register_plugins(tasks={"TraceTask": TraceTask})
        server.daemon.execute_task("traces1", "TraceTask").wait(10.0)
        context, ui = guarded_page(browser, server.url)
        try:
            ui.goto("/ui/runs/traces1")
            expect(ui.page.locator("[data-plot]")).to_have_attribute("data-points", "150")
            expect(ui.page.locator("[data-plot] canvas")).to_have_count(1)
            expect(ui.page.get_by_role("progressbar", name="Progress")).to_have_attribute(
                "aria-valuenow", "100")
            ui.assert_clean()
        finally:
            context.close()


# ---------------------------------------------------------------------- a lab of several nodes
def test_the_lab_page_lists_every_node_and_the_overview_names_each_devices_node(
    browser: Any,
) -> None:
    """Two nodes joined through the in-process engine (the Redis one is tested in
    tests/test_lab_*.py): node a's dashboard lists both nodes with their health, version,
    heartbeat and devices, and its overview shows node b's device with its node."""
    from labd import LabDaemon
    from labd.lab import LabNode, LabTimings, LocalCoordinator
    from labd.testing import FakeDevice, running_server

    engine = LocalCoordinator()
    timings = LabTimings(directory_ttl=5.0, heartbeat=0.5)
    daemons = [LabDaemon(), LabDaemon()]
    nodes: list[LabNode] = []
    try:
        for daemon, device_id in zip(daemons, ("laser_a", "camera_b"), strict=True):
            daemon.register_plugins(devices={"Fake": FakeDevice})
            daemon.connect_device(daemon.add_device(device_id, "Fake"))
        with running_server(daemons[0]) as server:
            for daemon, name, url in ((daemons[0], "pc-a", server.url),
                                      (daemons[1], "pc-b", None)):
                node = LabNode(daemon, engine, name, timings=timings, workers=1, url=url,
                               own_coordinator=False)
                nodes.append(node)
                node.start()
            context, ui = guarded_page(browser, server.url)
            try:
                ui.goto("/ui/lab")
                page = ui.page
                expect(page.get_by_role("heading", name="Lab", exact=True)).to_be_visible()
                expect(page.get_by_test_id("this-node")).to_have_text("pc-a")
                row_a, row_b = page.locator("tr[data-node='pc-a']"), page.locator(
                    "tr[data-node='pc-b']")
                expect(row_a).to_contain_text("laser_a")
                expect(row_a).to_contain_text("healthy")
                expect(row_b).to_contain_text("camera_b")
                expect(row_b).to_contain_text("s ago")
                expect(row_b.get_by_role("cell").nth(1)).to_contain_text("0.1.0")
                ui.screenshot("lab.png")
                ui.goto("/ui/")
                remote = page.locator("tr[data-device='camera_b']")
                expect(remote).to_contain_text("pc-b")
                expect(page.locator("tr[data-device='laser_a']")).to_contain_text("pc-a")
                ui.assert_clean()
            finally:
                context.close()
    finally:
        for node in reversed(nodes):
            node.close()
        for daemon in daemons:
            daemon.shutdown()


def test_the_lab_page_of_a_server_on_its_own_says_how_to_join(ui: GuardedPage) -> None:
    ui.goto("/ui/lab")
    expect(ui.page.get_by_role("heading", name="Not part of a lab")).to_be_visible()
    expect(ui.page.get_by_role("link", name="Lab", exact=True)).to_have_attribute("aria-current", "page")
