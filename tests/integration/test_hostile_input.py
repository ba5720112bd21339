"""What the review found: reported data the databases cannot store, starvation, upload loops."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from custos import protocol
from custos.db.base import utcnow


async def test_odd_results_are_stored_cleaned_not_refused(api):
    dev = await api.new_device("odd")
    cmd = await api.command("odd", kind="exec", argv=["cat", "/bin/true"])
    run_id = cmd["runs"][0]["id"]
    await dev.checkin({})
    odd = {
        "run_id": run_id,
        "state": "failed",
        "exit_code": 3221225477,  # a Windows access violation: larger than int32
        "stdout": "a\x00b",
        "stderr": "é\x00",
        "error": "bad\x00",
        "started_at": "2026-01-01T00:00:00",  # no zone
        "finished_at": "0001-01-01T00:00:00+05:00",  # out of range
        "result": {"k\x00": "v\x00", "n": float("nan"), "big": 2**70},
    }
    resp = await dev.checkin({"results": [odd]})
    assert resp["accepted_results"] == [run_id]
    run = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()["runs"][0]
    assert run["stdout"] == "a\ufffdb" and run["stderr"] == "é\ufffd"
    assert run["error"] == "bad\ufffd" and run["exit_code"] == 3221225477
    assert run["started_at"] is None and run["finished_at"] is not None
    assert run["result"] == {"k\ufffd": "v\ufffd", "n": None, "big": str(2**70)}


async def test_nul_in_inventory_and_facts_is_replaced(api):
    dev = await api.new_device("nul-inv", facts={"os.name": "Lin\x00ux"})
    r = await dev.checkin({"inventory": {"base": 0, "full": True, "set": {"sw.x\x00": "1\x00"}}})
    assert r["inventory_version"] == 1
    shown = (await api.get(f"/api/v1/devices/{dev.device_id}")).json()
    assert shown["inventory"] == {"sw.x\ufffd": "1\ufffd"}


async def test_hostile_admin_input_is_4xx(api):
    bad = [
        await api.get("/api/v1/devices", params={"q": "a\x00"}),
        await api.get("/api/v1/devices/a%00b"),
        await api.post("/api/v1/enrollment-tokens", json={"note": "x\x00"}),
        await api.post("/api/v1/enrollment-tokens/99999999999/revoke"),
        await api.post("/api/v1/commands", json={"target": "x", "kind": "exec", "argv": ["a\x00"]}),
        await api.post(
            "/api/v1/commands",
            json={"target": "x", "kind": "ping", "not_before": "0001-01-01T00:00:00+05:00"},
        ),
        await api.http.post("/api/v1/auth/login", json={"username": "ad\x00min", "password": "x"}),
    ]
    for r in bad:
        assert r.status_code == 422, (r.request.url, r.text)
        assert set(r.json()) == {"error", "detail"}


async def test_future_runs_do_not_starve_due_ones(api):
    api.services.checkin.max_commands = 3
    dev = await api.new_device("busy")
    later = (utcnow() + timedelta(hours=1)).isoformat()
    for _ in range(5):
        await api.command("busy", kind="ping", not_before=later)
    # nothing due: the check-in stays on the read-only path
    assert (await dev.checkin({}))["commands"] == []
    due = await api.command("busy", kind="ping")
    got = (await dev.checkin({}))["commands"]
    assert [c["run_id"] for c in got] == [due["runs"][0]["id"]]


async def test_upload_hash_mismatch_restarts_and_empty_chunks_refused(api):
    from custos.agent.client import RequestRejected

    dev = await api.new_device("up")
    cmd = await api.command("up", kind="collect_file", path="/var/log/x.log")
    run_id = cmd["runs"][0]["id"]
    await dev.checkin({})
    base = f"{protocol.DEVICE_API}/uploads/{run_id}"
    data = b"hello world"
    meta = {
        "size": len(data),
        "sha256": hashlib.sha256(b"other bytes").hexdigest(),
        "source_path": "/var/log/x.log",
    }
    import json

    up = await dev.request("POST", base, body=json.dumps(meta).encode())
    assert up["received"] == 0
    for chunk, code in ((b"", "empty_chunk"), (data, "hash_mismatch")):
        with pytest.raises(RequestRejected) as exc:
            await dev.request(
                "PUT",
                base,
                body=chunk,
                params={"offset": "0"},
                content_type="application/octet-stream",
            )
        assert exc.value.code == code
    # the reset was committed: announcing again starts from zero (no endless offset loop)
    again = await dev.request("POST", base, body=json.dumps(meta).encode())
    assert again["received"] == 0 and not again["complete"]
    # an empty file must carry the hash of nothing
    meta0 = {"size": 0, "sha256": "0" * 64, "source_path": "/e"}
    cmd0 = await api.command("up", kind="collect_file", path="/e")
    await dev.checkin({})
    with pytest.raises(RequestRejected) as exc:
        await dev.request(
            "POST",
            f"{protocol.DEVICE_API}/uploads/{cmd0['runs'][0]['id']}",
            body=json.dumps(meta0).encode(),
        )
    assert exc.value.code == "hash_mismatch"


async def test_agent_with_an_oversized_inventory_still_reports_results(api):
    from custos.agent.client import RequestRejected
    from custos.agent.runtime import AgentRuntime

    dev = await api.new_device("huge-inv")
    huge = {f"sw.dpkg.p{i}": "v" * 4000 for i in range(1500)}  # ~6 MB: over the body limit
    rt = AgentRuntime(dev.state, dev.identity, client=dev, collect=lambda: huge)
    cmd = await api.command("huge-inv", kind="ping")
    with pytest.raises(RequestRejected) as exc:
        await rt.checkin()
    assert exc.value.status == 413
    await rt.checkin()  # without the inventory now: gets the ping
    assert await rt.run_due() == 1
    await rt.checkin()
    run = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()["runs"][0]
    assert run["state"] == "succeeded" and run["result"]["pong"] is True
