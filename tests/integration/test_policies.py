"""Policies through the admin API and the device protocol — SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from custos.agent.client import RequestRejected
from custos.db.base import utcnow
from custos.devices.models import Device
from custos.policies.models import DevicePolicy, LostDevice

BASELINE = """
name: baseline
description: every laptop
interval: 1m
files:
  - {path: /etc/motd, content: "Managed by Custos\\n", mode: "0644"}
services:
  - {name: av, provider: process, match: av-daemon, start: [/opt/av/bin/av], category: antivirus}
software:
  forbidden: [{name: telnet}]
managed_data: [/var/lib/acme]
managed_accounts: [kiosk]
actions:
  - {after: 0s, do: notify}
  - {after: 0s, do: quarantine, group: quarantine}
  - {after: 0s, do: hold}
"""

STRICT = """
name: strict
files:
  - {path: /etc/motd, content: "Strict\\n", mode: "0600"}
"""


async def _commands(dev: Any, kind: str | None = None) -> list[dict[str, Any]]:
    """The next commands handed to the device, acknowledged (kind: wait for one of it)."""
    for _ in range(200):
        resp = await dev.checkin({})
        cmds = resp["commands"]
        if cmds:
            await dev.checkin({"acks": [c["run_id"] for c in cmds]})
            if kind is None or any(c["kind"] == kind for c in cmds):
                return cmds  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind or ''} command reached the device")


async def _report(dev: Any, **body: Any) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    return await dev.request("POST", "/api/device/v1/policy/report", body=raw)  # type: ignore[no-any-return]


async def _add(api: Any, text: str) -> dict[str, Any]:
    r = await api.post("/api/v1/policies", json={"document": text})
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


async def test_policy_versions_assignment_bundle_and_report(api):
    dev = await api.new_device("laptop-1")
    other = await api.new_device("server-1")
    assert (await api.post("/api/v1/groups", json={"name": "laptops"})).status_code == 201
    r = await api.post("/api/v1/groups/laptops/devices", json={"devices": ["laptop-1"]})
    assert r.status_code == 200, r.text

    created = await _add(api, BASELINE)
    assert created["created"] and created["version"] == 1 and created["rules"] == 3
    again = await _add(api, BASELINE)
    assert not again["created"] and not again["changed"] and again["version"] == 1
    changed = await _add(api, BASELINE.replace("every laptop", "all laptops"))
    assert changed["changed"] and changed["version"] == 2
    assert [v["version"] for v in changed["versions"]] == [2, 1]
    old = (await api.get("/api/v1/policies/baseline", params={"version": 1})).json()
    assert old["document"]["description"] == "every laptop"

    r = await api.post(
        "/api/v1/policies/baseline/assignments", json={"kind": "group", "target": "laptops"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["devices_updated"] == 1

    cmds = await _commands(dev, "policy")
    bundle = next(c for c in cmds if c["kind"] == "policy")["payload"]
    assert [p["name"] for p in bundle["profiles"]] == ["baseline"]
    ids = [r["id"] for r in bundle["rules"]]
    assert ids == sorted(["file:/etc/motd", "service:av", "software_forbidden:telnet"])
    assert bundle["interval_s"] == 60 and bundle["managed_data"] == ["/var/lib/acme"]
    # a device outside the group gets nothing
    assert (await other.checkin({}))["commands"] == []

    # the server judges the inventory rule itself: telnet absent -> compliant
    await api.services.policies.judge_inventory()
    comp = (await api.get("/api/v1/devices/laptop-1/compliance")).json()
    assert comp["status"] == "pending"
    by_rule = {r["rule_id"]: r for r in comp["rules"]}
    assert by_rule["software_forbidden:telnet"]["status"] == "compliant"
    assert by_rule["software_forbidden:telnet"]["source"] == "server"

    # the agent reports the rest: the file drifted and was repaired, the service is down
    out = await _report(
        dev,
        seq=1,
        bundle_sha=bundle["bundle_sha"],
        rules=[
            {"id": "file:/etc/motd", "status": "repaired", "detail": "rewritten"},
            {"id": "service:av", "status": "noncompliant", "detail": "not running"},
            {"id": "software_forbidden:telnet", "status": "compliant"},
        ],
        events=[
            {"rule_id": "file:/etc/motd", "kind": "drift", "detail": "content differed"},
            {"rule_id": "file:/etc/motd", "kind": "repaired", "detail": "rewritten"},
        ],
    )
    assert out == {"accepted": 1}
    # the same report again (an answer lost on the way) changes nothing
    assert await _report(dev, seq=1, bundle_sha=bundle["bundle_sha"], rules=[]) == {"accepted": 1}
    comp = (await api.get("/api/v1/devices/laptop-1/compliance")).json()
    assert comp["status"] == "noncompliant"
    kinds = [(e["rule_id"], e["kind"]) for e in comp["events"]]
    assert ("file:/etc/motd", "drift") in kinds and ("file:/etc/motd", "repaired") in kinds
    assert ("*", "noncompliant") in kinds

    report = (await api.get("/api/v1/compliance", params={"status": "noncompliant"})).json()
    assert [r["device"] for r in report] == ["laptop-1"]
    assert report[0]["failing"] == ["service:av"]

    # actions with no grace: quarantine group, hold, notify
    assert await api.services.policies.act() == 3
    comp = (await api.get("/api/v1/devices/laptop-1/compliance")).json()
    assert comp["held"] and comp["quarantine_group"] == "quarantine"
    groups = {g["name"]: g["devices"] for g in (await api.get("/api/v1/groups")).json()}
    assert groups["quarantine"] == 1
    assert await api.services.policies.act() == 0  # each action once

    # compliant again: out of quarantine, no longer held
    await _report(
        dev,
        seq=2,
        bundle_sha=bundle["bundle_sha"],
        rules=[{"id": "service:av", "status": "repaired", "detail": "restarted"}],
    )
    comp = (await api.get("/api/v1/devices/laptop-1/compliance")).json()
    assert comp["status"] == "compliant" and not comp["held"] and comp["quarantine_group"] is None
    groups = {g["name"]: g["devices"] for g in (await api.get("/api/v1/groups")).json()}
    assert groups["quarantine"] == 0
    hist = (
        await api.get("/api/v1/devices/laptop-1/compliance/history", params={"rule": "service:av"})
    ).json()
    assert [h["kind"] for h in hist] == ["repaired", "noncompliant"]

    listed = {p["name"]: p for p in (await api.get("/api/v1/policies")).json()}
    assert listed["baseline"]["devices"] == {"compliant": 1, "noncompliant": 0, "pending": 0}


async def test_precedence_label_beats_group_and_priority_beats_both(api):
    dev = await api.new_device("kiosk-1")
    await api.post("/api/v1/groups", json={"name": "kiosks"})
    await api.post("/api/v1/groups/kiosks/devices", json={"devices": ["kiosk-1"]})
    await _add(api, BASELINE)
    await _add(api, STRICT)
    await api.post("/api/v1/policies/baseline/assignments", json={"kind": "all"})
    await api.post(
        "/api/v1/policies/strict/assignments", json={"kind": "group", "target": "kiosks"}
    )
    cmds = await _commands(dev, "policy")
    bundles = [c["payload"] for c in cmds if c["kind"] == "policy"]
    motd = next(r for r in bundles[-1]["rules"] if r["id"] == "file:/etc/motd")
    assert motd["policy"] == "strict" and motd["content"] == "Strict\n"  # group beats all

    r = await api.post(
        "/api/v1/policies/baseline/assignments", json={"kind": "all", "priority": 10}
    )
    assert r.json()["devices_updated"] == 1
    cmds = await _commands(dev, "policy")
    bundle = [c["payload"] for c in cmds if c["kind"] == "policy"][-1]
    motd = next(r for r in bundle["rules"] if r["id"] == "file:/etc/motd")
    assert motd["policy"] == "baseline"  # a higher priority beats the more specific group

    # removing the policy sends a bundle without its rules
    assert (await api.http.delete("/api/v1/policies/baseline", headers=api.auth)).status_code == 204
    cmds = await _commands(dev, "policy")
    bundle = [c["payload"] for c in cmds if c["kind"] == "policy"][-1]
    assert [p["name"] for p in bundle["profiles"]] == ["strict"]


async def test_bad_profiles_and_reports_are_refused_with_reasons(api):
    dev = await api.new_device("d1")
    for text, needle in [
        ("name: Bad Name", "name"),
        ("name: a\nfiles: [{path: etc/motd}]", "absolute"),
        ("name: a\nservices: [{name: s, provider: process}]", "start command"),
        ("name: a\nunknown: 1", "unknown"),
        ("[1, 2", "YAML"),
        ("name: a\nsoftware: {required: [{name: x}], forbidden: [{name: x}]}", "both"),
        ("name: a\nactions: [{after: 1h, do: quarantine}]", "group"),
    ]:
        r = await api.post("/api/v1/policies", json={"document": text})
        assert r.status_code == 422, (text, r.text)
        assert r.json()["error"] == "invalid_profile", r.text
        if needle != "YAML":
            assert needle in r.json()["detail"] or needle == "unknown", r.json()
    assert (await api.get("/api/v1/policies")).json() == []
    r = await api.post("/api/v1/policies/nope/assignments", json={"kind": "all"})
    assert r.status_code == 404
    await _add(api, STRICT)
    r = await api.post("/api/v1/policies/strict/assignments", json={"kind": "group"})
    assert r.status_code == 422
    r = await api.post(
        "/api/v1/policies/strict/assignments", json={"kind": "group", "target": "nope"}
    )
    assert r.status_code == 404
    # reports: bad status, too many rules, a seq of 0
    for body in (
        {"seq": 1, "bundle_sha": "", "rules": [{"id": "x", "status": "weird"}]},
        {"seq": 0, "bundle_sha": ""},
        {"seq": 1, "bundle_sha": "", "rules": [{"id": "x", "status": "compliant"}] * 10_002},
    ):
        try:
            await _report(dev, **body)
        except RequestRejected as exc:
            assert exc.status == 422
        else:
            raise AssertionError(f"accepted a report of {len(body.get('rules', []))} rules")


async def test_lost_device_wipe_confirmed_then_refused(api):
    dev = await api.new_device("phone-1")
    # wiping needs confirmation with the device's name
    r = await api.post("/api/v1/devices/phone-1/lost", json={"wipe": "selective"})
    assert r.status_code == 422 and r.json()["error"] == "confirmation_required"
    r = await api.post(
        "/api/v1/devices/phone-1/lost",
        json={"wipe": "selective", "confirm": "phone-1", "message": "call 555"},
    )
    assert r.status_code == 200, r.text
    lost = r.json()
    assert lost["state"] == "lost" and lost["wipe_order"]["state"] == "sent"
    cmds = await _commands(dev, "wipe")
    kinds = sorted(c["kind"] for c in cmds)
    assert kinds == ["lock", "wipe"]
    lock = next(c for c in cmds if c["kind"] == "lock")
    assert lock["payload"]["message"] == "call 555"
    wipe = next(c for c in cmds if c["kind"] == "wipe")
    assert wipe["payload"]["mode"] == "selective" and wipe["payload"]["dry_run"] is False
    now = utcnow().isoformat()
    await dev.checkin(
        {
            "results": [
                {
                    "run_id": wipe["run_id"],
                    "state": "succeeded",
                    "exit_code": 0,
                    "started_at": now,
                    "finished_at": now,
                    "result": {"removed": ["/var/lib/acme"], "dry_run": False},
                }
            ]
        }
    )
    assert await api.services.policies.tick_lost() >= 1
    wipes = (await api.get("/api/v1/wipes")).json()
    assert wipes[0]["state"] == "confirmed" and wipes[0]["result"]["removed"] == ["/var/lib/acme"]
    dev_out = (await api.get("/api/v1/devices/phone-1")).json()
    assert dev_out["status"] == "retired"

    async def refused() -> bool:
        try:
            await dev.checkin({})
        except Exception as exc:
            return "retired" in str(exc) or "refused" in type(exc).__name__.lower()
        return False

    for _ in range(100):
        if await refused():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a wiped device was still served")


async def test_auto_wipe_after_silence_and_found_cancels(api):
    dev = await api.new_device("tablet-1")
    r = await api.post(
        "/api/v1/devices/tablet-1/lost",
        json={"lock": False, "auto_wipe_days": 3, "confirm": "tablet-1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["wipe_order"] is None
    await api.services.policies.tick_lost()
    assert (await api.get("/api/v1/wipes")).json() == []  # not silent long enough
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(Device)
            .where(Device.name == "tablet-1")
            .values(last_seen=utcnow() - timedelta(days=4))
        )
    await api.services.policies.tick_lost()
    wipes = (await api.get("/api/v1/wipes")).json()
    assert len(wipes) == 1 and wipes[0]["reason"].startswith("lost and silent")
    # found before it reconnects: the undelivered wipe is cancelled
    r = await api.post("/api/v1/devices/tablet-1/found")
    assert r.status_code == 200, r.text
    wipes = (await api.get("/api/v1/wipes")).json()
    assert wipes[0]["state"] == "cancelled"
    assert (await dev.checkin({}))["commands"] == []
    async with api.services.db.read() as s:
        lost = await s.scalar(select(LostDevice))
        assert lost is not None and lost.state == "found"


async def test_wipe_needs_the_wipe_permission(api):
    await api.new_device("pc-1")
    r = await api.post("/api/v1/users", json={"username": "helper", "password": "pw-helper-123"})
    assert r.status_code == 201, r.text
    r = await api.post("/api/v1/users/helper/grants", json={"role": "helpdesk"})
    assert r.status_code in (200, 201), r.text
    r = await api.http.post(
        "/api/v1/auth/login", json={"username": "helper", "password": "pw-helper-123"}
    )
    h = {"authorization": f"Bearer {r.json()['token']}"}
    r = await api.http.post("/api/v1/devices/pc-1/wipe", json={"confirm": "pc-1"}, headers=h)
    assert r.status_code == 403 and "devices.wipe" in r.json()["detail"]
    r = await api.http.post(
        "/api/v1/devices/pc-1/lost", json={"wipe": "full", "confirm": "pc-1"}, headers=h
    )
    assert r.status_code == 403
    # helpdesk may mark lost and lock
    r = await api.http.post("/api/v1/devices/pc-1/lost", json={"lock": True}, headers=h)
    assert r.status_code == 200, r.text
    r = await api.http.post("/api/v1/policies", json={"document": STRICT}, headers=h)
    assert r.status_code == 403
    async with api.services.db.read() as s:
        assert (await s.scalar(select(DevicePolicy))) is None


async def test_a_held_device_is_skipped_by_deployments_until_it_complies(api, tmp_path):
    from test_software import cpkg, upload

    dev = await api.new_device("held-1")
    free = await api.new_device("free-1")
    await _add(
        api, "name: hold\nfiles: [{path: /etc/x, content: x}]\nactions: [{after: 0s, do: hold}]\n"
    )
    await api.post("/api/v1/policies/hold/assignments", json={"kind": "all"})
    bundles = {}
    for d in (dev, free):
        cmds = await _commands(d, "policy")
        bundles[d] = next(c for c in cmds if c["kind"] == "policy")["payload"]
    sha = bundles[dev]["bundle_sha"]
    await _report(
        dev, seq=1, bundle_sha=sha, rules=[{"id": "file:/etc/x", "status": "noncompliant"}]
    )
    await _report(free, seq=1, bundle_sha=sha, rules=[{"id": "file:/etc/x", "status": "compliant"}])
    assert await api.services.policies.act() == 1

    await upload(api, cpkg(tmp_path / "t.cpkg", "1.0", tmp_path / "t.bin", b"x" * 100))
    r = await api.post(
        "/api/v1/deployments",
        json={"package": "tool", "targets": {"devices": ["held-1", "free-1"]}},
    )
    assert r.status_code == 201, r.text
    dep = r.json()
    states = {d["hostname"]: d["state"] for d in dep["devices"]}
    assert states == {"held-1": "pending", "free-1": "queued"}, dep["devices"]

    # compliant again: the next tick sends it
    await _report(dev, seq=2, bundle_sha=sha, rules=[{"id": "file:/etc/x", "status": "repaired"}])
    await api.services.software.tick()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert {d["hostname"]: d["state"] for d in show["devices"]}["held-1"] == "queued"


async def test_policy_wipe_actions_need_the_wipe_permission_and_bundles_supersede(api):
    r = await api.post(
        "/api/v1/users", json={"username": "op", "password": "op-pass-123", "roles": ["operator"]}
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        "/api/v1/auth/login", json={"username": "op", "password": "op-pass-123"}
    )
    op = {"authorization": f"Bearer {r.json()['token']}"}
    wiping = STRICT + "actions: [{after: 0s, do: wipe, mode: full}]\n"
    r = await api.http.post("/api/v1/policies", json={"document": wiping}, headers=op)
    assert r.status_code == 403 and "devices.wipe" in r.json()["detail"]
    # an admin may write it; the operator still may not assign it anywhere
    await _add(api, wiping)
    r = await api.http.post("/api/v1/policies/strict/assignments", json={"kind": "all"}, headers=op)
    assert r.status_code == 403
    r = await api.http.post("/api/v1/policies", json={"document": BASELINE}, headers=op)
    assert r.status_code == 201, r.text

    # bundles: an undelivered one is cancelled by its successor; issued_at only grows
    dev = await api.new_device("offline-1")
    await api.post("/api/v1/policies/baseline/assignments", json={"kind": "all"})
    await api.post("/api/v1/policies/baseline/assignments", json={"kind": "all", "priority": 3})
    await _add(api, BASELINE.replace("Managed by Custos", "Managed by Custos!"))
    cmds = await _commands(dev, "policy")
    bundles = [c["payload"] for c in cmds if c["kind"] == "policy"]
    assert len(bundles) == 1, [b["bundle_sha"] for b in bundles]  # the older one was cancelled
    motd = next(r for r in bundles[0]["rules"] if r["id"] == "file:/etc/motd")
    assert motd["content"] == "Managed by Custos!\n"
    async with api.services.db.read() as s:
        dp = await s.get(DevicePolicy, dev.device_id)
        assert dp is not None and dp.policies == ["baseline"]
        first_issued = dp.sent_at
    await _add(api, BASELINE)
    cmds = await _commands(dev, "policy")
    later = [c["payload"] for c in cmds if c["kind"] == "policy"][-1]
    assert later["issued_at"] > bundles[0]["issued_at"]
    assert first_issued is not None


async def test_found_keeps_a_delivered_lock_and_undoes_it(api):
    dev = await api.new_device("phone-2")
    r = await api.post("/api/v1/devices/phone-2/lost", json={"lock": True})
    assert r.status_code == 200, r.text
    cmds = await _commands(dev, "lock")  # delivered (and acknowledged)
    r = await api.post("/api/v1/devices/phone-2/found")
    assert r.status_code == 200, r.text
    cmds = await _commands(dev, "unlock")
    assert [c["kind"] for c in cmds] == ["unlock"]
