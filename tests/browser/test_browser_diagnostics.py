"""The device page's Diagnostics section in headless chromium with a real agent process."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect
from test_console import assert_labelled, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_diagnose_now_from_the_device_page(page: Any, console_server: Any) -> None:
    sign_in(page, console_server)
    device_url = f"{console_server.url}/console/devices/{console_server.device_id}"
    page.goto(device_url)
    section = page.locator("#diagnostics")
    expect(section.get_by_role("heading", name=re.compile("Diagnostics"))).to_be_visible()
    assert_labelled(page)
    section.get_by_role("button", name="Diagnose now").click()
    page.wait_for_url(re.compile(r".*/console/commands/[0-9a-f]{32}$"))
    # the agent checks in every second; the runs fragment polls until the run is over
    expect(page.locator("#runs")).to_contain_text("All runs have finished", timeout=45_000)
    expect(page.locator("#runs .badge").first).to_have_text("succeeded")
    page.goto(device_url)
    section = page.locator("#diagnostics")
    expect(section).to_contain_text("agent snapshot")
    expect(section).to_contain_text("Memory available")
    expect(section).not_to_contain_text("No diagnostics yet")
    section.get_by_text(re.compile("Top processes by memory")).click()
    expect(section.locator("#diag-processes tbody tr").first).to_be_visible()
    assert page.js_errors == []
