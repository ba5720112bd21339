"""The console's policy pages over HTTP (no browser): profiles, compliance, lost, lock, wipe."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from custos.console import queries

Api = Any
CSRF_INPUT = re.compile(r'name="csrf" value="([^"]+)"')

PROFILE = """\
name: baseline
description: every laptop
software:
  required: [{name: acme-av, min_version: "2.1"}]
  forbidden: [{name: telnet}]
"""


async def console_login(http: httpx.AsyncClient, username: str, password: str) -> None:
    """Sign in through the login form (its double-submit token included)."""
    page = await http.get("/console/login")
    token = CSRF_INPUT.search(page.text)
    assert token, "no CSRF field on the login form"
    r = await http.post(
        "/console/login",
        data={"username": username, "password": password, "csrf": token.group(1)},
    )
    assert r.status_code == 303, r.text[:2000]


def page_csrf(text: str) -> str:
    """The session's CSRF token as a page carries it (body hx-headers)."""
    m = re.search(r"hx-headers='([^']+)'", text)
    assert m, "no hx-headers on <body>"
    return str(html.unescape(m.group(1)).split('"X-CSRF-Token": "')[1].split('"')[0])


@asynccontextmanager
async def signed_in(api: Api, username: str, password: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client on the app, signed in to the console as `username`."""
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await console_login(http, username, password)
        yield http


@pytest.fixture
async def console(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """The admin, signed in to the console."""
    password = api.services.settings.admin_password.get_secret_value()
    async with signed_in(api, "admin", password) as http:
        yield http


async def audit_entries(api: Api, actor: str) -> list[tuple[str, str, str]]:
    """(action, target, result) of the actor's audit entries, oldest first."""
    r = await api.get("/api/v1/audit", params={"actor": actor, "limit": 500})
    assert r.status_code == 200, r.text
    return [(e["action"], e["target"], e["result"]) for e in reversed(r.json()["entries"])]


async def new_user(api: Api, username: str, password: str, roles: list[str]) -> None:
    r = await api.post(
        "/api/v1/users", json={"username": username, "password": password, "roles": roles}
    )
    assert r.status_code == 201, r.text


async def group_with(api: Api, name: str, device_id: str) -> None:
    assert (await api.post("/api/v1/groups", json={"name": name})).status_code == 201
    r = await api.post(f"/api/v1/groups/{name}/devices", json={"devices": [device_id]})
    assert r.status_code == 200, r.text


async def test_profiles_assignments_and_compliance_pages(
    api: Api, console: httpx.AsyncClient
) -> None:
    dev = await api.new_device("laptop-1")
    await group_with(api, "laptops", dev.device_id)
    page = await console.get("/console/policies")
    assert page.status_code == 200, page.text
    assert 'href="/console/policies" aria-current="page"' in page.text
    assert 'href="/console/compliance"' in page.text
    assert "No policies yet." in page.text and 'for="p-doc"' in page.text
    csrf = page_csrf(page.text)

    # no CSRF token: refused before anything is parsed
    r = await console.post("/console/policies", data={"document": PROFILE})
    assert r.status_code == 403
    # the service's reason comes back inline, with the text still in the form
    bad = "name: Bad Name!\nfiles: []\n"
    r = await console.post("/console/policies", data={"document": bad, "csrf": csrf})
    assert r.status_code == 422, r.text
    assert "invalid profile" in r.text and 'id="page-error"' in r.text
    assert "Bad Name!\nfiles: []" in r.text and 'aria-invalid="true"' in r.text
    r = await console.post("/console/policies", data={"document": "  ", "csrf": csrf})
    assert r.status_code == 422 and "paste a profile" in r.text
    r = await console.post("/console/policies", data={"document": "a\x00b", "csrf": csrf})
    assert r.status_code == 422 and "text/html" in r.headers["content-type"]
    assert not await api.services.policies.list_policies()

    r = await console.post("/console/policies", data={"document": PROFILE, "csrf": csrf})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console/policies/baseline?done=policy_added"
    shown = await console.get(r.headers["location"])
    assert "The policy was added." in shown.text and "every laptop" in shown.text
    assert "Not assigned" in shown.text
    # the same text again changes nothing; a file upload makes version 2
    r = await console.post("/console/policies", data={"document": PROFILE, "csrf": csrf})
    assert r.headers["location"].endswith("done=policy_same")
    v2 = PROFILE.replace("every laptop", "all laptops")
    r = await console.post(
        "/console/policies",
        data={"csrf": csrf, "document": ""},
        files={"file": ("baseline.yaml", v2.encode(), "application/yaml")},
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"].endswith("done=policy_version")
    r = await console.post(
        "/console/policies",
        data={"csrf": csrf},
        files={"file": ("bin.yaml", b"\xff\xfe\x00", "application/octet-stream")},
    )
    assert r.status_code == 422 and "not UTF-8" in r.text

    detail = await console.get("/console/policies/baseline")
    assert detail.status_code == 200
    assert "all laptops" in detail.text and "version 2" in detail.text
    assert 'href="/console/policies/baseline?version=1"' in detail.text
    source = detail.text.split('id="policy-source">')[1].split("</pre>")[0]
    assert "description: all laptops" in source
    old = await console.get("/console/policies/baseline", params={"version": 1})
    assert "description: every laptop" in old.text.split('id="policy-source">')[1]
    assert "not the current version" in old.text
    assert (await console.get("/console/policies/baseline?version=9")).status_code == 404
    assert (await console.get("/console/policies/nothing")).status_code == 404

    # assignments: errors inline, then a group, all devices, and removal
    url = "/console/policies/baseline/assignments"
    r = await console.post(url, data={"kind": "group", "target": "nope", "csrf": csrf})
    assert r.status_code == 404 and "no group named" in r.text and 'id="assign-form"' in r.text
    r = await console.post(url, data={"kind": "group", "target": "", "csrf": csrf})
    assert r.status_code == 422 and "names its group" in r.text
    r = await console.post(url, data={"kind": "group", "target": "laptops", "priority": "x",
                                      "csrf": csrf})  # fmt: skip
    assert r.status_code == 422 and "priority" in r.text
    r = await console.post(
        url, data={"kind": "group", "target": "laptops", "priority": "5", "csrf": csrf}
    )
    assert r.status_code == 303 and r.headers["location"].endswith("done=assigned")
    r = await console.post(url, data={"kind": "all", "target": "ignored", "csrf": csrf})
    assert r.status_code == 303
    pol = await api.services.policies.show("baseline")
    assert {(a.kind, a.target, a.priority) for a in pol.assignments} == {
        ("group", "laptops", 5),
        ("all", "", 0),
    }
    r = await console.post(f"{url}/remove", data={"kind": "all", "target": "", "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=unassigned")
    r = await console.post(f"{url}/remove", data={"kind": "all", "target": "", "csrf": csrf})
    assert r.status_code == 404 and "is not assigned" in r.text
    shown = await console.get("/console/policies/baseline")
    assert "group laptops" in shown.text and "all devices</th>" not in shown.text

    # the server judges the inventory rules: acme-av is missing -> non-compliant
    await api.services.policies.judge_inventory()
    listing = await console.get("/console/policies")
    row = listing.text.split('href="/console/policies/baseline"')[1].split("</tr>")[0]
    assert "1 non-compliant" in row and 'class="mini-bar"' in row
    report = await console.get(
        "/console/compliance", params={"status": "noncompliant", "policy": "baseline"}
    )
    assert report.status_code == 200
    assert f'href="/console/devices/{dev.device_id}">laptop-1<' in report.text
    assert "software_required:acme-av" in report.text
    assert '<option value="baseline" selected>' in report.text
    none = await console.get("/console/compliance", params={"status": "compliant"})
    assert "laptop-1" not in none.text and "No device under a policy matches" in none.text
    other = await console.get("/console/compliance", params={"policy": "other"})
    assert "laptop-1" not in other.text
    everything = await console.get("/console/compliance", params={"status": "all"})
    assert "laptop-1" in everything.text
    bad = await console.get("/console/compliance", params={"status": "lost"})
    assert bad.status_code == 422 and "text/html" in bad.headers["content-type"]
    assert (
        'href="/console/compliance?policy=baseline&amp;status=noncompliant"'
        in (await console.get("/console/policies/baseline")).text
    )

    # the device page: overall status, per-rule table with its source, history
    page = await console.get(f"/console/devices/{dev.device_id}")
    section = page.text.split('id="compliance"')[1].split("</section>")[0]
    assert 'class="badge badge-failed">noncompliant<' in section
    assert "acme-av is not installed" in section and "<td>server</td>" in section
    assert 'href="/console/policies/baseline"' in section
    assert 'id="compliance-events"' in section

    # the dashboard's compliance chart
    dash = await console.get("/console/")
    assert "Policy compliance" in dash.text and "Non-compliant: 1 devices" in dash.text
    counts = await queries.compliance_summary(api.services.db, None)
    assert (counts.compliant, counts.noncompliant, counts.pending) == (0, 1, 0)

    r = await console.post("/console/policies/baseline/delete", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=policy_removed")
    assert not await api.services.policies.list_policies()
    r = await console.post("/console/policies/baseline/delete", data={"csrf": csrf})
    assert r.status_code == 404

    entries = await audit_entries(api, "admin")
    for expected in (
        ("policy.add", "", "ok"),
        ("policy.add", "", "failed"),
        ("policy.add", "", "denied"),
        ("policy.assign", "policy:baseline", "ok"),
        ("policy.assign", "policy:baseline", "failed"),
        ("policy.unassign", "policy:baseline", "ok"),
        ("policy.delete", "policy:baseline", "ok"),
    ):
        assert expected in entries, expected


async def test_lost_lock_and_wipe_from_the_device_page(
    api: Api, console: httpx.AsyncClient
) -> None:
    dev = await api.new_device("lost-1")
    svc = api.services.policies
    page = await console.get(f"/console/devices/{dev.device_id}")
    assert page.status_code == 200
    for marker in ('id="lost-form"', 'id="lock-form"', 'id="wipe-form"', 'id="lost-confirm"'):
        assert marker in page.text, marker
    assert "Found</button>" not in page.text
    csrf = page_csrf(page.text)
    lost_url = f"/console/devices/{dev.device_id}/lost"
    form = {"lock": "1", "wipe": "selective", "message": "call 555", "csrf": csrf}

    # a wipe needs the device's name typed: the server refuses a wrong one, inline
    r = await console.post(lost_url, data={**form, "confirm": "lost-2"})
    assert r.status_code == 422, r.text
    assert "confirmed with the device&#39;s name" in r.text and 'role="alert"' in r.text
    assert '<option value="selective" selected>' in r.text and 'value="call 555"' in r.text
    assert (await svc.device_compliance(dev.device_id)).lost is None
    r = await console.post(lost_url, data={**form, "auto_wipe_days": "soon", "confirm": "x"})
    assert r.status_code == 422 and "whole number of days" in r.text
    r = await console.post(lost_url, data={**form, "wipe": "shred", "confirm": "lost-1"})
    assert r.status_code == 422 and "wipe:" in r.text

    r = await console.post(lost_url, data={**form, "auto_wipe_days": "30", "confirm": "lost-1"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/console/devices/{dev.device_id}?done=lost"
    lost = (await svc.device_compliance(dev.device_id)).lost
    assert lost is not None and lost["state"] == "lost" and lost["auto_wipe_days"] == 30
    assert not await svc.wipes(limit=10, offset=0)  # auto-wipe: nothing sent yet
    shown = await console.get(r.headers["location"])
    assert "The device is marked lost" in shown.text
    assert 'class="badge badge-failed">lost<' in shown.text and "Found</button>" in shown.text

    found_url = f"/console/devices/{dev.device_id}/found"
    r = await console.post(found_url, data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=found")
    r = await console.post(found_url, data={"csrf": csrf})
    assert r.status_code == 409 and "is not marked lost" in r.text

    r = await console.post(
        f"/console/devices/{dev.device_id}/lock", data={"message": "stop", "csrf": csrf}
    )
    assert r.status_code == 303 and r.headers["location"].endswith("done=locked")
    kinds = [c.kind for c in await api.services.commands.list_commands(limit=20, offset=0)]
    # the lost order's lock was still queued when the device was found: cancelled, no unlock
    assert kinds == ["lock", "lock"]

    wipe_url = f"/console/devices/{dev.device_id}/wipe"
    r = await console.post(wipe_url, data={"mode": "selective", "dry_run": "1", "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=wipe_dry_run")
    r = await console.post(wipe_url, data={"mode": "selective", "confirm": "", "csrf": csrf})
    assert r.status_code == 422 and "confirmed with the device" in r.text
    r = await console.post(wipe_url, data={"mode": "nuke", "confirm": "lost-1", "csrf": csrf})
    assert r.status_code == 422 and 'id="page-error"' in r.text
    r = await console.post(wipe_url, data={"mode": "full", "confirm": "lost-1", "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=wipe")
    orders = await svc.wipes(limit=10, offset=0)
    assert [(o.mode, o.dry_run) for o in orders] == [("full", False), ("selective", True)]

    # a retired device refuses every action with the reason, never a 500
    await api.services.devices.retire(dev.device_id)
    r = await console.post(f"/console/devices/{dev.device_id}/lock", data={"csrf": csrf})
    assert r.status_code == 409 and "is retired" in r.text
    retired = await console.get(f"/console/devices/{dev.device_id}")
    assert 'id="lost-form"' not in retired.text

    entries = await audit_entries(api, "admin")
    target = f"device:{dev.device_id}"
    for expected in (
        ("device.lost", target, "failed"),
        ("device.lost", target, "ok"),
        ("device.found", target, "ok"),
        ("device.found", target, "failed"),
        ("device.lock", target, "ok"),
        ("device.wipe", target, "ok"),
        ("device.wipe", target, "failed"),
    ):
        assert expected in entries, expected


async def test_roles_without_the_permissions(api: Api) -> None:
    dev = await api.new_device("hd-dev")
    r = await api.post("/api/v1/policies", json={"document": PROFILE})
    assert r.status_code == 201, r.text
    await new_user(api, "help", "helpdesk-pw-1", ["helpdesk"])
    async with signed_in(api, "help", "helpdesk-pw-1") as http:
        # helpdesk: sees policies, may lock, may neither manage policies nor wipe
        listing = await http.get("/console/policies")
        assert listing.status_code == 200 and "baseline" in listing.text
        assert 'id="policy-form"' not in listing.text
        detail = await http.get("/console/policies/baseline")
        assert detail.status_code == 200
        assert 'id="assign-form"' not in detail.text and "Delete policy" not in detail.text
        csrf = page_csrf(detail.text)
        for url, body in {
            "/console/policies": {"document": PROFILE},
            "/console/policies/baseline/assignments": {"kind": "all"},
            "/console/policies/baseline/assignments/remove": {"kind": "all"},
            "/console/policies/baseline/delete": {},
            f"/console/devices/{dev.device_id}/wipe": {"dry_run": "1"},
        }.items():
            r = await http.post(url, data={**body, "csrf": csrf})
            assert r.status_code == 403, (url, r.status_code)
        page = await http.get(f"/console/devices/{dev.device_id}")
        assert 'id="lost-form"' in page.text and 'id="lock-form"' in page.text
        assert 'id="wipe-form"' not in page.text and 'id="lost-wipe"' not in page.text
        lost_url = f"/console/devices/{dev.device_id}/lost"
        r = await http.post(lost_url, data={"wipe": "selective", "confirm": "hd-dev",
                                            "csrf": csrf})  # fmt: skip
        assert r.status_code == 403 and "devices.wipe" in r.text
        r = await http.post(lost_url, data={"auto_wipe_days": "3", "csrf": csrf})
        assert r.status_code == 403
        r = await http.post(lost_url, data={"lock": "1", "csrf": csrf})
        assert r.status_code == 303, r.text
    assert not await api.services.policies.wipes(limit=10, offset=0)
    assert (await api.services.policies.show("baseline")).assignments == []

    # a role with devices.view only: no Policies page, no lost/lock/wipe controls
    await api.services.accounts.create_role("viewer", ["devices.view"], "looks")
    await new_user(api, "vic", "viewer-pw-1", ["viewer"])
    async with signed_in(api, "vic", "viewer-pw-1") as http:
        dash = await http.get("/console/")
        assert 'href="/console/policies"' not in dash.text
        assert 'href="/console/compliance"' in dash.text
        assert (await http.get("/console/policies")).status_code == 403
        assert (await http.get("/console/policies/baseline")).status_code == 403
        comp = await http.get("/console/compliance")
        assert comp.status_code == 200 and '<input id="c-policy"' in comp.text
        page = await http.get(f"/console/devices/{dev.device_id}")
        assert page.status_code == 200 and 'id="compliance"' in page.text
        assert 'id="lost-actions"' not in page.text
        csrf = page_csrf(page.text)
        for action in ("lost", "found", "lock", "wipe"):
            r = await http.post(f"/console/devices/{dev.device_id}/{action}", data={"csrf": csrf})
            assert r.status_code == 403, action
    denied = {(a, res) for a, _t, res in await audit_entries(api, "vic")}
    assert ("device.wipe", "denied") in denied and ("device.lost", "denied") in denied
