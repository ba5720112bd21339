"""The console in headless chromium against a real server and a real agent process."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

# every visible form control must have a label (or an aria-label); the list of offenders
UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea')]
  .filter(el => el.type !== 'hidden' && !(el.labels && el.labels.length)
                && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
  .map(el => el.outerHTML)"""


def sign_in(page: Any, console: Any, username: str = "admin", password: str = "") -> None:
    """Sign in through the form with the keyboard only, and land on the dashboard."""
    page.goto(console.url + "/console/login")
    expect(page.locator("#username")).to_be_focused()  # autofocus: typing can start at once
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(password or console.admin_password)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/console/$"))
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()


def assert_labelled(page: Any) -> None:
    """No unlabelled form control on the current page."""
    assert page.evaluate(UNLABELLED) == []


def test_login_with_the_keyboard(page: Any, console_server: Any) -> None:
    page.goto(console_server.url + "/console/devices")
    # no session: the login page, which returns to the page asked for afterwards
    page.wait_for_url(re.compile(r".*/console/login\?next=.*devices"))
    assert_labelled(page)
    expect(page.locator("#username")).to_be_focused()
    page.keyboard.type("admin")
    page.keyboard.press("Tab")
    expect(page.locator("#password")).to_be_focused()
    page.keyboard.type("not-the-password")
    page.keyboard.press("Enter")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("wrong username or password")
    expect(page.locator("#username")).to_have_value("admin")
    page.locator("#password").fill(console_server.admin_password)
    page.locator("#password").press("Enter")
    page.wait_for_url(re.compile(r".*/console/devices$"))
    expect(page.get_by_role("heading", name="Devices")).to_be_visible()
    # the skip link is the first thing Tab reaches, and it is visible when focused
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to main content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    assert page.js_errors == []


def test_find_a_device_and_run_a_command(page: Any, console_server: Any) -> None:
    sign_in(page, console_server)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Devices").click()
    assert_labelled(page)
    search = page.get_by_label("Search devices")
    search.fill("browser-dev")  # htmx swaps the results in as one types
    results = page.locator("#device-results")
    link = results.get_by_role("link", name="browser-dev-1")
    expect(link).to_be_visible()
    search.fill("no-such-device-anywhere")
    expect(results).to_contain_text("No device matches")
    assert "q=no-such-device-anywhere" in page.url  # the search is in the address bar
    search.fill("browser-dev-1")
    results.get_by_role("link", name="browser-dev-1").click()
    expect(page.get_by_role("heading", name=re.compile("browser-dev-1"))).to_be_visible()
    expect(page.get_by_role("heading", name="Operating system")).to_be_visible()
    assert_labelled(page)
    page.get_by_label("Run a command on this device").fill("echo hello-from-the-console")
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_url(re.compile(r".*/console/commands/[0-9a-f]{32}$"))
    # the agent checks in every second; the runs fragment polls until the output is there
    output = page.locator("pre.output").first
    expect(output).to_contain_text("hello-from-the-console", timeout=45_000)
    expect(page.locator("#runs")).to_contain_text("All runs have finished")
    expect(page.locator("#runs .badge").first).to_have_text("succeeded")
    assert page.js_errors == []


def test_create_an_enrolment_token(page: Any, console_server: Any) -> None:
    sign_in(page, console_server)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("link", name="Enrolment").click()
    assert_labelled(page)
    page.get_by_label("Uses").fill("5")
    page.get_by_label("Expires after").select_option(label="1 day")
    page.get_by_label("Note").fill("lab bench <b>")
    page.get_by_role("button", name="Create token").click()
    command = page.get_by_label("Enrol command")
    expect(command).to_have_value(
        re.compile(
            r"^custos agent enroll https://127\.0\.0\.1:\d+ "
            r"--token cet_\S+ --ca-fingerprint [0-9a-f]{64}$"
        )
    )
    qr = page.get_by_role("img", name="QR code of the enrolment command")
    expect(qr).to_be_visible()
    box = qr.bounding_box()
    assert box is not None and box["width"] > 100
    page.locator("button[data-copy=enroll-command]").click()
    expect(page.locator("button[data-copy=enroll-command]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == command.input_value()
    row = page.locator("table.data tbody tr", has_text="lab bench <b>")
    expect(row).to_contain_text("0 / 5")
    expect(row).to_contain_text("active")
    assert page.js_errors == []


def test_dashboard_charts_render(page: Any, console_server: Any) -> None:
    sign_in(page, console_server)
    charts = page.locator("svg.chart-svg[role=img]")
    assert charts.count() >= 5
    os_chart = page.locator("figure", has_text="Devices by operating system")
    expect(os_chart.locator("svg circle").nth(1)).to_be_visible()  # a slice, not only the ring
    expect(os_chart.locator("desc")).to_contain_text("1 devices")
    model = page.locator("figure", has_text="Devices by model")
    bar = model.locator("svg rect").first
    expect(bar).to_be_visible()
    assert float(bar.get_attribute("width") or 0) > 10
    expect(page.locator(".stats")).to_contain_text("1 active devices")
    # the table behind each chart opens for people who cannot read it
    model.get_by_text("Data table").click()
    expect(model.locator("table")).to_be_visible()
    assert page.js_errors == []


def test_helpdesk_sees_no_admin_actions(page: Any, console_server: Any) -> None:
    username, password = console_server.helpdesk
    sign_in(page, console_server, username, password)
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Devices")).to_be_visible()
    for hidden in ("Enrolment", "Users", "Audit log"):
        expect(nav.get_by_role("link", name=hidden)).to_have_count(0)
    page.goto(f"{console_server.url}/console/devices/{console_server.device_id}")
    expect(page.get_by_role("button", name=re.compile("Retire"))).to_have_count(0)
    expect(page.get_by_label("Run a command on this device")).to_be_visible()
    # forcing the admin actions with a valid CSRF token is still refused
    csrf = page.locator("form input[name=csrf]").first.input_value()
    forced = page.request.post(
        f"{console_server.url}/console/tokens", form={"csrf": csrf, "uses": "1"}
    )
    assert forced.status == 403
    assert "devices.enroll" in forced.text()
    retire = page.request.post(
        f"{console_server.url}/console/devices/{console_server.device_id}/retire",
        form={"csrf": csrf},
    )
    assert retire.status == 403
    page.goto(console_server.url + "/console/users")
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    device = console_server.world.admin.device(console_server.device_id)
    assert device["status"] == "active"


def test_phone_shows_the_mobile_nav(phone_page: Any, console_server: Any) -> None:
    page = phone_page
    sign_in(page, console_server)
    toggle = page.get_by_role("button", name="Menu")
    expect(toggle).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    devices = page.get_by_role("navigation", name="Main").get_by_role("link", name="Devices")
    expect(devices).to_be_hidden()
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(devices).to_be_visible()
    page.keyboard.press("Escape")
    expect(devices).to_be_hidden()
    expect(toggle).to_be_focused()
    toggle.click()
    devices.click()
    expect(page.get_by_role("heading", name="Devices")).to_be_visible()
    # nothing wider than the screen: tables scroll inside their own box
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px screen"
    assert page.js_errors == []


def test_turn_on_two_factor_sign_in(page: Any, console_server: Any) -> None:
    import pyotp

    username, password = "totp-user", "totp-user-pw-1"
    r = console_server.world.admin.post(
        "/api/v1/users", json={"username": username, "password": password, "roles": ["auditor"]}
    )
    assert r.status_code == 201, r.text
    sign_in(page, console_server, username, password)
    page.get_by_role("link", name=re.compile("Your account")).click()
    expect(page.get_by_role("heading", name="Your account")).to_be_visible()
    assert_labelled(page)
    page.get_by_role("button", name="Set up two-factor sign-in").click()
    qr = page.get_by_role("img", name="QR code for your authenticator app")
    expect(qr).to_be_visible()
    assert_labelled(page)
    secret = page.get_by_label(re.compile("^Key")).input_value()
    page.get_by_label("Code from the app").fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Turn on two-factor sign-in").click()
    expect(page.locator("#messages")).to_contain_text("Two-factor sign-in is on")
    page.get_by_role("button", name="Sign out").click()
    # the password alone is not enough any more: the form asks for the code
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_label("Password").press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("authenticator app")
    expect(page.locator("#password")).to_be_focused()
    page.keyboard.type(password)
    page.get_by_label(re.compile("One-time code")).fill(pyotp.TOTP(secret).now())
    page.get_by_label(re.compile("One-time code")).press("Enter")
    page.wait_for_url(re.compile(r".*/console/$"))
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    page.get_by_role("link", name=re.compile("Your account")).click()
    expect(page.locator("#two-factor")).to_contain_text("Two-factor sign-in is on")
    assert page.js_errors == []


# every value the upload's progress bar takes, recorded as the page sets it
WATCH_PROGRESS = """() => {
  window.uploadValues = [];
  const bar = document.getElementById('upload-progress');
  new MutationObserver(() => window.uploadValues.push(bar.value))
    .observe(bar, {attributes: true, attributeFilter: ['value']});
}"""


def test_upload_a_package_with_a_progress_bar(
    page: Any, console_server: Any, tmp_path: Path
) -> None:
    # the integration tests' package builder: a .cpkg with a manifest and a payload
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from test_software import cpkg, payload

    path = cpkg(tmp_path / "tool-1.0.cpkg", "1.0", tmp_path / "tool.bin", payload(7))
    sign_in(page, console_server)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Software").click()
    expect(page.get_by_role("heading", name="Software", exact=True)).to_be_visible()
    expect(page.locator("#package-list")).to_contain_text("No packages yet")
    assert_labelled(page)
    page.get_by_label(re.compile("^Package file")).set_input_files(str(path))
    page.evaluate(WATCH_PROGRESS)
    page.get_by_role("button", name="Upload").click()
    status = page.locator("#upload-status")
    expect(status).to_contain_text("Upload finished", timeout=30_000)
    bar = page.get_by_label("Upload progress")
    expect(bar).to_be_visible()
    expect(bar).to_have_js_property("value", 100)
    values = page.evaluate("window.uploadValues")
    assert values and values[-1] == 100 and values == sorted(values), values
    expect(page.locator("#messages")).to_contain_text("Uploaded tool 1.0")
    # the list and the deploy form are refreshed in place, without a reload
    listed = page.locator("#package-list").get_by_role("link", name="tool", exact=True)
    expect(listed).to_be_visible()
    expect(page.get_by_label("Package", exact=True)).to_contain_text("tool 1.0")
    assert_labelled(page)
    # the page as the upload left it (the fixture keeps the last page, the package's own)
    shots = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(
        path=str(shots / "test_upload_a_package_with_a_progress_bar-list.png"), full_page=True
    )
    listed.click()
    expect(page.get_by_role("heading", name=re.compile("^tool"))).to_be_visible()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    integrity = page.get_by_role("region", name="Integrity")
    expect(integrity).to_contain_text(sha)
    expect(integrity).to_contain_text(re.compile(r"Signature\s*[A-Za-z0-9+/]{40,}={0,2}"))
    assert page.js_errors == []
