"""The console's policy pages in headless chromium against a real server and real agents."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect
from test_console import assert_labelled, sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

PROFILE = """\
name: browser-baseline
description: lab machines
software:
  forbidden: [{name: telnet-browser-test}]
"""
LOST_DEVICE = "lost-laptop-1"


def unexpected_errors(page: Any) -> list[str]:
    """The page's script and console errors, but for the refused forms the tests send on
    purpose (the browser logs their 422 answer as a failed load)."""
    return [e for e in page.js_errors if not re.search(r"status of 422\b", e)]


@pytest.fixture(scope="module")
def lab_device(console_server: Any) -> str:
    """A second enrolled device (its agent not running, so no lock or wipe is carried out)
    in a group of its own, kept apart from the running agent's device."""
    world = console_server.world
    agent = world.agent(LOST_DEVICE)
    r = world.admin.post("/api/v1/groups", json={"name": "lab"})
    assert r.status_code == 201, r.text
    r = world.admin.post("/api/v1/groups/lab/devices", json={"devices": [agent.device_id]})
    assert r.status_code == 200, r.text
    return str(agent.device_id)


def test_add_assign_and_read_a_policy(
    page: Any, console_server: Any, lab_device: str, tmp_path: Path
) -> None:
    sign_in(page, console_server)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Policies").click()
    expect(page.get_by_role("heading", name="Policies", exact=True)).to_be_visible()
    assert_labelled(page)
    # a broken profile: the server's reason is shown and the text stays in the form
    profile = page.get_by_label("Profile (YAML or JSON)")
    profile.fill("name: Not A Valid Name!\n")
    page.get_by_role("button", name="Add profile").click()
    expect(page.get_by_role("alert")).to_contain_text("invalid profile")
    expect(profile).to_have_value("name: Not A Valid Name!\n")
    profile.fill(PROFILE)
    page.get_by_role("button", name="Add profile").click()
    page.wait_for_url(re.compile(r".*/console/policies/browser-baseline\?done=policy_added$"))
    expect(page.get_by_role("heading", name=re.compile("browser-baseline"))).to_be_visible()
    expect(page.locator("#messages")).to_contain_text("The policy was added")
    expect(page.locator("#policy-source")).to_contain_text("description: lab machines")
    assert_labelled(page)

    # assign it to the lab group
    page.get_by_label("Assign to").select_option(label="a group")
    page.get_by_label(re.compile("Group or label name")).fill("lab")
    page.get_by_label(re.compile("Priority")).fill("3")
    page.get_by_role("button", name="Assign", exact=True).click()
    expect(page.locator("#messages")).to_contain_text("The policy was assigned")
    row = page.locator("#assignments tbody tr", has_text="group lab")
    expect(row).to_contain_text("3")

    # a new version from a file; the first one stays readable
    upload = tmp_path / "baseline.yaml"
    upload.write_text(PROFILE.replace("lab machines", "lab machines, v2"))
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Policies").click()
    page.get_by_label("Profile file").set_input_files(str(upload))
    page.get_by_role("button", name="Add profile").click()
    expect(page.locator("#messages")).to_contain_text("A new version of the policy was saved")
    expect(page.locator("#policy-source")).to_contain_text("lab machines, v2")
    page.get_by_role("link", name="Version 1").click()
    expect(page.locator("#policy-source")).to_contain_text("description: lab machines\n")
    expect(page.get_by_role("heading", name=re.compile("Source of version 1"))).to_be_visible()

    # the list shows it with its assignment; the device page names it
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Policies").click()
    listed = page.locator("#policy-list tbody tr", has_text="browser-baseline")
    expect(listed).to_contain_text("group lab")
    expect(listed).to_contain_text("2")
    page.goto(f"{console_server.url}/console/devices/{lab_device}")
    expect(page.locator("#compliance")).to_contain_text("browser-baseline")
    assert unexpected_errors(page) == []


def test_mark_a_device_lost_with_a_wipe(page: Any, console_server: Any, lab_device: str) -> None:
    sign_in(page, console_server)
    page.goto(f"{console_server.url}/console/devices/{lab_device}")
    expect(page.get_by_role("heading", name="Lost device, lock and wipe")).to_be_visible()
    assert_labelled(page)
    form = page.locator("#lost-form")
    expect(form.get_by_label("Lock the device at its next contact")).to_be_checked()
    form.get_by_label("Message shown on the device").fill("Please call the help desk")
    form.get_by_label("Wipe", exact=True).select_option("selective")
    form.get_by_label(re.compile("type the device's name")).fill("lost-laptop-2")
    form.get_by_role("button", name="Mark lost").click()
    # the wrong name is refused by the server, with its reason, and the form kept
    expect(page.get_by_role("alert")).to_contain_text("confirmed with the device's name")
    form = page.locator("#lost-form")
    expect(form.get_by_label("Wipe", exact=True)).to_have_value("selective")
    expect(form.get_by_label("Message shown on the device")).to_have_value(
        "Please call the help desk"
    )
    expect(page.get_by_role("button", name="Found")).to_have_count(0)
    form.get_by_label(re.compile("type the device's name")).fill(LOST_DEVICE)
    form.get_by_role("button", name="Mark lost").click()
    page.wait_for_url(re.compile(r".*\?done=lost$"))
    expect(page.locator("#messages")).to_contain_text("The device is marked lost")
    expect(page.locator("#compliance h2")).to_contain_text("lost")
    expect(page.locator("#compliance")).to_contain_text("wipe selective")
    expect(page.get_by_role("button", name="Found")).to_be_visible()
    # the lock and the wipe wait in the device's queue
    wipes = console_server.world.admin.get("/api/v1/wipes").json()
    assert [(w["device"], w["mode"], w["dry_run"]) for w in wipes] == [
        (LOST_DEVICE, "selective", False)
    ]
    page.get_by_role("button", name="Found").click()
    expect(page.locator("#messages")).to_contain_text("The device is marked found")
    wipes = console_server.world.admin.get("/api/v1/wipes").json()
    assert [w["state"] for w in wipes] == ["cancelled"]
    assert unexpected_errors(page) == []
