"""Command lifecycle, inventory deltas and history, last-seen batching — SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from custos.commands.models import Command, CommandRun
from custos.db.base import utcnow


async def test_command_delivered_until_acked_then_result_recorded(api):
    dev = await api.new_device("box")
    cmd = await api.command("box", kind="exec", argv=["echo", "hi"])
    run_id = cmd["runs"][0]["id"]
    first = await dev.checkin({})
    assert [c["run_id"] for c in first["commands"]] == [run_id]
    # not acknowledged (the response may have been lost): delivered again, same run id
    again = await dev.checkin({})
    assert [c["run_id"] for c in again["commands"]] == [run_id]
    # acknowledged: no more deliveries
    assert (await dev.checkin({"acks": [run_id]}))["commands"] == []
    result = {"run_id": run_id, "state": "succeeded", "exit_code": 0, "stdout": "hi\n"}
    resp = await dev.checkin({"results": [result]})
    assert resp["accepted_results"] == [run_id]
    # a duplicate result (the agent did not see the first answer) changes nothing
    dup = {**result, "stdout": "changed"}
    assert (await dev.checkin({"results": [dup]}))["accepted_results"] == [run_id]
    detail = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
    run = detail["runs"][0]
    assert (run["state"], run["stdout"], run["deliveries"]) == ("succeeded", "hi\n", 2)
    assert detail["counts"] == {"succeeded": 1}
    light = (await api.get(f"/api/v1/commands/{cmd['id']}", params={"output": "false"})).json()
    assert light["runs"][0]["stdout"] == "" and light["runs"][0]["state"] == "succeeded"


async def test_group_target_and_foreign_results_ignored(api):
    a = await api.new_device("a")
    b = await api.new_device("b")
    await api.post("/api/v1/groups", json={"name": "lab"})
    r = await api.post("/api/v1/groups/lab/devices", json={"devices": ["a", "b"]})
    assert r.json()["devices"] == 2
    cmd = await api.command("group:lab", kind="ping")
    assert len(cmd["runs"]) == 2
    run_of_a = next(x["id"] for x in cmd["runs"] if x["device_name"] == "a")
    # b reports a result for a's run: accepted (so b's outbox empties) but not stored
    await b.checkin({"results": [{"run_id": run_of_a, "state": "failed"}]})
    await a.checkin({})
    detail = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
    # both were handed their own run; b's claim about a's run was not stored
    assert {x["device_name"]: x["state"] for x in detail["runs"]} == {"a": "sent", "b": "sent"}


async def test_creating_a_large_command_answers_with_the_first_runs_and_all_counts(
    api, monkeypatch
):
    from custos.commands import service

    monkeypatch.setattr(service, "CREATE_RUNS_SHOWN", 2)
    for name in ("c", "a", "b"):
        await api.new_device(name)
    await api.post("/api/v1/groups", json={"name": "big"})
    await api.post("/api/v1/groups/big/devices", json={"devices": ["a", "b", "c"]})
    cmd = await api.command("group:big", kind="ping")
    # the answer lists the first runs by device name, and counts all of them
    assert [x["device_name"] for x in cmd["runs"]] == ["a", "b"]
    assert cmd["runs_total"] == 3 and cmd["counts"] == {"queued": 3}
    detail = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
    assert [x["device_name"] for x in detail["runs"]] == ["a", "b", "c"]
    assert detail["runs_total"] == 3


async def test_not_before_and_expiry(api):
    dev = await api.new_device("timed")
    later = (utcnow() + timedelta(hours=1)).isoformat()
    await api.command("timed", kind="ping", not_before=later)
    soon = (utcnow() + timedelta(seconds=1)).isoformat()
    cmd = await api.command("timed", kind="ping", expires_at=soon)
    await asyncio.sleep(1.2)
    assert (await dev.checkin({}))["commands"] == []
    detail = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
    assert detail["runs"][0]["state"] == "expired"
    past = (utcnow() - timedelta(seconds=5)).isoformat()
    r = await api.post(
        "/api/v1/commands", json={"target": "timed", "kind": "ping", "expires_at": past}
    )
    assert r.status_code == 422


async def test_bad_command_requests_write_nothing(api):
    await api.new_device("solo")
    cases = [
        ({"target": "nobody", "kind": "ping"}, 404),
        ({"target": "solo", "kind": "exec"}, 422),
        ({"target": "solo", "kind": "collect_file", "path": "/tmp/../etc/passwd"}, 422),
        ({"target": "solo", "kind": "collect_file", "path": "relative/file"}, 422),
        ({"target": "group:none", "kind": "ping"}, 404),
        ({"target": "solo", "kind": "format_disk"}, 422),
    ]
    for body, status in cases:
        r = await api.post("/api/v1/commands", json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) == {"error", "detail"}
    r = await api.http.post(
        "/api/v1/commands",
        content=b"{not json",
        headers={**api.auth, "content-type": "application/json"},
    )
    assert r.status_code == 422
    async with api.services.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(Command)) == 0
        assert await s.scalar(select(func.count()).select_from(CommandRun)) == 0


async def test_inventory_delta_history_and_resync(api):
    dev = await api.new_device("inv")
    full = {"base": 0, "full": True, "set": {"os.name": "Debian", "sw.dpkg.curl": "7.88"}}
    r = await dev.checkin({"inventory": full})
    assert r["inventory_version"] == 1 and not r["inventory_resync"]
    delta = {"base": 1, "set": {"sw.dpkg.curl": "8.0", "sw.dpkg.git": "2.39"}, "remove": []}
    assert (await dev.checkin({"inventory": delta}))["inventory_version"] == 2
    rm = {"base": 2, "set": {}, "remove": ["sw.dpkg.git"]}
    assert (await dev.checkin({"inventory": rm}))["inventory_version"] == 3
    # a delta against a version the server does not have: the agent is told to resend in full
    stale = {"base": 1, "set": {"x": "y"}, "remove": []}
    r = await dev.checkin({"inventory": stale})
    assert r["inventory_resync"] and r["inventory_version"] == 3
    shown = (await api.get(f"/api/v1/devices/{dev.device_id}")).json()
    assert shown["inventory"] == {"os.name": "Debian", "sw.dpkg.curl": "8.0"}
    hist = (await api.get(f"/api/v1/devices/{dev.device_id}/history", params={"key": "sw."})).json()
    assert [(h["version"], h["key"], h["old"], h["new"]) for h in hist] == [
        (3, "sw.dpkg.git", "2.39", None),
        (2, "sw.dpkg.git", None, "2.39"),
        (2, "sw.dpkg.curl", "7.88", "8.0"),
    ]  # the first snapshot is the baseline, not a change


async def test_oversized_inventory_refused_and_unchanged(api):
    dev = await api.new_device("big")
    await dev.checkin({"inventory": {"base": 0, "full": True, "set": {"a": "1"}}})
    from custos.agent.client import RequestRejected

    bad = {"base": 1, "set": {"a": "x" * 5000}, "remove": []}
    with pytest.raises(RequestRejected) as exc:
        await dev.checkin({"inventory": bad})
    assert exc.value.status == 422
    shown = (await api.get(f"/api/v1/devices/{dev.device_id}")).json()
    assert shown["inventory"] == {"a": "1"} and shown["inventory_version"] == 1


async def test_last_seen_is_batched(api):
    dev = await api.new_device("seen")
    assert (await api.get(f"/api/v1/devices/{dev.device_id}")).json()["last_seen"] is None
    await dev.checkin({})
    flushed = await api.services.checkin.flush_last_seen()
    assert flushed == 1
    assert (await api.get(f"/api/v1/devices/{dev.device_id}")).json()["last_seen"] is not None
    assert await api.services.checkin.flush_last_seen() == 0
