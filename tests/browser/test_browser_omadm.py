"""The console's OMA DM pages in headless chromium against a real server.

The device is our test DM client (tests/omadm_client.py), bootstrapped with what the
registration page showed, talking SyncML over the server's HTTPS.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from test_browser_policies import unexpected_errors
from test_console import assert_labelled, sign_in

from omadm_client import DmClient

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

DEV_ID = "IMEI:490154203237518"
NAME = "browser-phone-1"


def dm_session(url: str, account: dict[str, str]) -> None:
    """One whole DM session of the test client, run in a thread of its own (Playwright's
    sync API keeps an event loop running in the test's thread)."""
    failure: list[BaseException] = []

    async def session() -> None:
        async with httpx.AsyncClient(verify=False, timeout=30) as http:
            dm = DmClient(http=http, url=url, **account)
            replies = await dm.session()
            assert DmClient.header_status(replies[0]).data == "212"
            assert dm.server_auth_ok is True

    def run() -> None:
        try:
            asyncio.run(session())
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the DM session did not end"
    if failure:
        raise failure[0]


def test_register_a_device_and_read_a_node(page: Any, console_server: Any, tmp_path: Path) -> None:
    sign_in(page, console_server)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="OMA DM").click()
    expect(page.get_by_role("heading", name="OMA DM devices")).to_be_visible()
    expect(page.get_by_text("No OMA DM device yet.")).to_be_visible()
    assert_labelled(page)

    # a DevId of blanks is refused by the server, with its reason, the form kept
    form = page.locator("#omadm-register")
    form.get_by_label(re.compile("^DevId")).fill("   ")
    form.get_by_label(re.compile("^Name")).fill(NAME)
    form.get_by_role("button", name="Register device").click()
    expect(page.get_by_role("alert")).to_contain_text("enter the device's DevId")
    form = page.locator("#omadm-register")
    expect(form.get_by_label(re.compile("^Name"))).to_have_value(NAME)
    form.get_by_label(re.compile("^DevId")).fill(DEV_ID)
    form.get_by_label("Authentication").select_option("md5")
    form.get_by_role("button", name="Register device").click()

    # the credentials page, shown once
    expect(page.get_by_role("heading", name=f"{NAME} is registered")).to_be_visible()
    expect(page.locator("#shown-once")).to_contain_text("Shown once")
    page.wait_for_url(re.compile(r".*/console/omadm$"))  # a reload shows the list
    assert_labelled(page)
    server_url = page.get_by_label("Server URL").input_value()
    assert server_url == console_server.url + "/omadm"
    account = {
        "dev_id": page.get_by_label("DevId").input_value(),
        "client_name": page.get_by_label("Client name").input_value(),
        "client_password": page.get_by_label("Client password").input_value(),
        "server_id": page.get_by_label("Server id").input_value(),
        "server_password": page.get_by_label("Server password").input_value(),
        "client_nonce": page.get_by_label("Client nonce").input_value(),
        "server_nonce": page.get_by_label("Server nonce").input_value(),
        "auth": "md5",
    }
    assert account["dev_id"] == DEV_ID and len(account["client_password"]) >= 16
    with page.expect_download() as info:
        page.get_by_role("link", name=re.compile("Download key and certificates")).click()
    download = info.value
    assert download.suggested_filename == "IMEI_490154203237518.pem"
    saved = tmp_path / "bundle.pem"
    download.save_as(str(saved))
    bundle = saved.read_text()
    assert "BEGIN PRIVATE KEY" in bundle and bundle.count("BEGIN CERTIFICATE") == 2

    # the device page: queue a Get of a node
    page.get_by_role("link", name="Open the device").click()
    expect(page.get_by_role("heading", name="OMA DM nodes")).to_be_visible()
    assert_labelled(page)
    section = page.locator("#omadm")
    expect(section).to_contain_text(DEV_ID)
    expect(page.get_by_label("Run a command on this device")).to_have_count(0)
    section.get_by_label("Operation").select_option("Get")
    section.get_by_label("Node URI").fill("DevInfo/Man")
    section.get_by_role("button", name="Queue operation").click()
    expect(page.get_by_role("alert")).to_contain_text("starts with ./")
    section = page.locator("#omadm")
    expect(section.get_by_label("Node URI")).to_have_value("DevInfo/Man")
    section.get_by_label("Node URI").fill("./DevInfo/Man")
    section.get_by_role("button", name="Queue operation").click()
    queued = page.locator("#omadm-queued")
    expect(queued).to_contain_text("Get ./DevInfo/Man was queued")
    expect(queued).to_contain_text("not notified: no notification hook")
    run = page.locator("#omadm .omadm-run").first
    expect(run).to_contain_text("./DevInfo/Man")
    expect(run).to_contain_text("waiting")

    # the answer names the device page as its address: a reload does not queue it again
    page.wait_for_url(re.compile(r".*/console/devices/[0-9a-f]{32}$"))

    # the device holds its session; the value read shows on the page
    dm_session(server_url, account)
    page.reload()
    expect(page.locator("#omadm .omadm-run")).to_have_count(1)
    run = page.locator("#omadm .omadm-run").first
    expect(run.locator(".badge").first).to_have_text("succeeded")
    row = run.locator("tbody tr", has_text="./DevInfo/Man")
    expect(row).to_contain_text("200")
    expect(row).to_contain_text("Acme")
    expect(page.locator("#omadm")).to_contain_text("Last session")
    page.get_by_role("button", name="Send package #0 now").click()
    expect(page.locator("#omadm-notified")).to_contain_text("no notification hook")

    # the OMA DM list and the device list show it beside the agent
    page.get_by_role("navigation", name="Main").get_by_role("link", name="OMA DM").click()
    listed = page.locator("#omadm-list tbody tr", has_text=NAME)
    expect(listed).to_contain_text(DEV_ID)
    expect(listed).to_contain_text("md5")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Devices").click()
    row = page.locator("#device-results tbody tr", has_text=NAME)
    expect(row).to_contain_text("OMA DM")
    expect(page.locator("#device-results tbody tr", has_text="browser-dev-1")).not_to_contain_text(
        "OMA DM"
    )
    assert unexpected_errors(page) == []
