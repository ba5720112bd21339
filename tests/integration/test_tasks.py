"""Scheduled tasks through the API and the device protocol — SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from custos.tasks.models import TaskRun


def _result(task_id: str, seq: int, **kw):
    base = {
        "task_id": task_id,
        "seq": seq,
        "revision": 1,
        "state": "succeeded",
        "scheduled_at": "2026-03-02T03:00:00+00:00",
        "started_at": "2026-03-02T02:58:00.500000+00:00",
        "finished_at": "2026-03-02T02:58:01+00:00",
        "clock_offset_s": 120.0,
        "exit_code": 0,
        "stdout": f"run {seq}\n",
    }
    return {**base, **kw}


async def _commands(dev) -> list[dict]:
    """The next commands handed to the device (on PostgreSQL the work index hears of new
    runs through NOTIFY, a moment after the commit)."""
    for _ in range(100):
        resp = await dev.checkin({})
        if resp["commands"]:
            await dev.checkin({"acks": [c["run_id"] for c in resp["commands"]]})
            return resp["commands"]  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError("no command reached the device")


async def _schedule_payload(dev) -> dict:
    """The schedule command the device receives (acknowledged)."""
    cmds = await _commands(dev)
    assert [c["kind"] for c in cmds] == ["schedule"], cmds
    return cmds[0]["payload"]  # type: ignore[no-any-return]


async def test_task_delivered_as_schedule_command_and_results_recorded(api):
    dev = await api.new_device("box")
    r = await api.post(
        "/api/v1/tasks",
        json={
            "name": "nightly-cleanup",
            "target": "box",
            "kind": "exec",
            "argv": ["sh", "-c", "echo clean"],
            "cron": "0 3 * * *",
            "window": "mon-fri 01:00-05:00 Europe/Paris",
            "misfire_grace_s": 1800,
        },
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert task["revision"] == 1 and task["enabled"] and task["devices"] == 1
    assert task["window"] == {
        "days": [0, 1, 2, 3, 4],
        "start": "01:00",
        "end": "05:00",
        "timezone": "Europe/Paris",
    }
    assert len(task["next_runs"]) == 5
    assert all(datetime.fromisoformat(t).weekday() < 5 for t in task["next_runs"])
    assert "cron 0 3 * * *" in task["describe"]

    payload = await _schedule_payload(dev)
    assert payload["task_id"] == task["id"] and payload["revision"] == 1
    assert payload["action"] == {"argv": ["sh", "-c", "echo clean"]}
    assert payload["schedule"] == {"cron": "0 3 * * *", "timezone": "UTC"}
    assert payload["misfire_grace_s"] == 1800 and payload["enabled"] is True

    results = [_result(task["id"], 1), _result(task["id"], 2, state="failed", exit_code=3)]
    resp = await dev.checkin({"task_results": results})
    assert resp["accepted_task_results"] == [
        {"task_id": task["id"], "seq": 1},
        {"task_id": task["id"], "seq": 2},
    ]
    runs = (await api.get(f"/api/v1/tasks/{task['name']}/runs")).json()
    assert [(x["seq"], x["state"], x["exit_code"]) for x in runs] == [
        (2, "failed", 3),
        (1, "succeeded", 0),
    ]
    first = runs[1]
    # the agent's clock and the server-corrected time (agent time + offset) are both shown
    assert first["agent_started_at"].startswith("2026-03-02T02:58:00.5")
    assert first["started_at"].startswith("2026-03-02T03:00:00.5")
    assert first["clock_offset_s"] == 120.0 and first["delay_s"] == 0.5
    assert first["stdout"] == "run 1\n" and first["device_name"] == "box"

    detail = (await api.get(f"/api/v1/tasks/{task['id']}")).json()
    (target,) = detail["targets"]
    assert (target["device_name"], target["runs"], target["last_seq"]) == ("box", 2, 2)
    assert target["last_state"] == "failed" and target["missing_seqs"] == 0


async def test_resent_and_duplicate_results_change_nothing(api):
    dev = await api.new_device("dup")
    task = (
        await api.post(
            "/api/v1/tasks",
            json={"name": "t", "target": "dup", "kind": "exec", "argv": ["true"], "every_s": 60},
        )
    ).json()
    tid = task["id"]
    await dev.checkin({"task_results": [_result(tid, 1), _result(tid, 3, state="missed")]})
    # re-sent after a lost answer, with other content, and a duplicate inside one batch
    again = [_result(tid, 1, stdout="changed"), _result(tid, 2), _result(tid, 2, stdout="x")]
    resp = await dev.checkin({"task_results": again})
    assert [x["seq"] for x in resp["accepted_task_results"]] == [1, 2, 2]
    runs = (await api.get(f"/api/v1/tasks/{tid}/runs", params={"device": "dup"})).json()
    assert [(x["seq"], x["stdout"]) for x in runs] == [
        (3, "run 3\n"),
        (2, "run 2\n"),
        (1, "run 1\n"),
    ]
    async with api.services.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(TaskRun)) == 3


async def test_results_for_foreign_or_unknown_tasks_are_dropped(api):
    a = await api.new_device("a")
    await api.new_device("b")
    task = (
        await api.post(
            "/api/v1/tasks",
            json={"name": "only-b", "target": "b", "kind": "exec", "argv": ["true"], "every_s": 5},
        )
    ).json()
    resp = await a.checkin(
        {"task_results": [_result(task["id"], 1), _result("f" * 32, 1, state="missed")]}
    )
    # accepted, so a's outbox drains, but nothing is stored
    assert len(resp["accepted_task_results"]) == 2
    assert (await api.get(f"/api/v1/tasks/{task['id']}/runs")).json() == []


async def test_odd_reported_values_are_cleaned_not_refused(api):
    dev = await api.new_device("odd")
    tid = (
        await api.post(
            "/api/v1/tasks",
            json={"name": "odd", "target": "odd", "kind": "exec", "argv": ["x"], "every_s": 9},
        )
    ).json()["id"]
    odd = _result(
        tid,
        1,
        stdout="a\x00b" + "y" * 100_000,
        clock_offset_s=1e300,
        started_at="not a time",
        exit_code=2**70,
        duration_s="NaN",
    )
    resp = await dev.checkin({"task_results": [odd]})
    assert resp["accepted_task_results"] == [{"task_id": tid, "seq": 1}]
    (run,) = (await api.get(f"/api/v1/tasks/{tid}/runs")).json()
    assert run["stdout"].startswith("a\ufffdb") and len(run["stdout"]) == 65_536
    assert run["clock_offset_s"] is None and run["started_at"] is None
    assert run["exit_code"] is None and run["duration_s"] is None


async def test_bad_task_requests_are_4xx_and_write_nothing(api):
    await api.new_device("solo")
    base = {"name": "x", "target": "solo", "kind": "exec", "argv": ["true"], "every_s": 60}
    cases = [
        ({**base, "cron": "0 3 * * *"}, 422),  # both cron and every_s
        ({k: v for k, v in base.items() if k != "every_s"}, 422),  # neither
        ({**base, "every_s": None, "cron": "61 * * * *"}, 422),
        ({**base, "every_s": None, "cron": "0 3 * * * *"}, 422),  # six fields
        ({**base, "timezone": "Mars/Olympus"}, 422),
        ({**base, "window": "someday 01:00-02:00"}, 422),
        ({**base, "window": {"days": [7], "start": "01:00", "end": "02:00"}}, 422),
        ({**base, "window": "daily 01:00-02:00 Nowhere/City"}, 422),
        ({**base, "every_s": 0}, 422),
        ({**base, "kind": "script"}, 422),
        ({**base, "name": "../etc"}, 422),
        ({**base, "argv": ["a\x00b"]}, 422),
        ({**base, "target": "nobody"}, 404),
        ({**base, "every_s": None, "cron": "0 3 * * *", "window": "daily 04:00-05:00"}, 422),
    ]
    for body, status in cases:
        r = await api.post("/api/v1/tasks", json=body)
        assert r.status_code == status, (body, r.text)
        assert "detail" in r.json()
    assert (await api.get("/api/v1/tasks")).json() == []
    assert (await api.post("/api/v1/tasks", json=base)).status_code == 201
    dup = await api.post("/api/v1/tasks", json=base)
    assert dup.status_code == 409 and "exists" in dup.json()["detail"]
    assert (await api.get("/api/v1/tasks/nope")).status_code == 404
    assert (await api.get("/api/v1/tasks/x/runs", params={"limit": 5000})).status_code == 422


async def test_disable_enable_and_delete_reach_the_device(api):
    dev = await api.new_device("d1")
    await api.post(
        "/api/v1/tasks",
        json={"name": "t1", "target": "d1", "kind": "exec", "argv": ["true"], "every_s": 30},
    )
    first = await _schedule_payload(dev)
    off = (await api.post("/api/v1/tasks/t1/disable")).json()
    assert off["enabled"] is False and off["revision"] == 2 and off["next_runs"] == []
    # disabling twice is not a change
    assert (await api.post("/api/v1/tasks/t1/disable")).json()["revision"] == 2
    second = await _schedule_payload(dev)
    assert second["revision"] == 2 and second["enabled"] is False
    assert second["anchor"] == first["anchor"]
    on = (await api.post("/api/v1/tasks/t1/enable")).json()
    assert on["revision"] == 3 and on["enabled"]
    assert (await _schedule_payload(dev))["revision"] == 3

    await dev.checkin({"task_results": [_result(on["id"], 1)]})
    r = await api.http.delete("/api/v1/tasks/t1", headers=api.auth)
    assert r.status_code == 204
    (gone,) = await _commands(dev)
    assert gone["kind"] == "unschedule"
    assert gone["payload"] == {"task_id": on["id"], "revision": 4}
    assert (await api.get("/api/v1/tasks")).json() == []
    async with api.services.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(TaskRun)) == 0
    # a result that was still in the outbox is accepted and dropped
    late = await dev.checkin({"task_results": [_result(on["id"], 2)]})
    assert late["accepted_task_results"] == [{"task_id": on["id"], "seq": 2}]


async def test_group_target_list_and_runs_filter(api):
    a = await api.new_device("ga")
    b = await api.new_device("gb")
    await api.post("/api/v1/groups", json={"name": "lab"})
    await api.post("/api/v1/groups/lab/devices", json={"devices": ["ga", "gb"]})
    r = await api.post(
        "/api/v1/tasks",
        json={
            "name": "lab-job",
            "target": "group:lab",
            "kind": "script",
            "interpreter": "sh",
            "script": "echo hi",
            "every_s": 3600,
        },
    )
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    listed = (await api.get("/api/v1/tasks")).json()
    assert [(t["name"], t["devices"], t["kind"]) for t in listed] == [("lab-job", 2, "script")]
    for dev in (a, b):
        assert (await _schedule_payload(dev))["action"]["script"] == "echo hi"
    await a.checkin({"task_results": [_result(tid, 1), _result(tid, 2)]})
    await b.checkin({"task_results": [_result(tid, 1)]})
    only_b = (await api.get(f"/api/v1/tasks/{tid}/runs", params={"device": "gb"})).json()
    assert [(x["device_name"], x["seq"]) for x in only_b] == [("gb", 1)]
    page = (await api.get(f"/api/v1/tasks/{tid}/runs", params={"limit": 2})).json()
    assert [x["seq"] for x in page] == [2, 1]
    detail = (await api.get(f"/api/v1/tasks/{tid}")).json()
    assert {t["device_name"]: t["runs"] for t in detail["targets"]} == {"ga": 2, "gb": 1}
    # a gap in the sequence is shown
    await b.checkin({"task_results": [_result(tid, 3)]})
    detail = (await api.get(f"/api/v1/tasks/{tid}")).json()
    assert {t["device_name"]: t["missing_seqs"] for t in detail["targets"]} == {"ga": 0, "gb": 1}


async def test_next_runs_follow_the_cron_zone(api):
    await api.new_device("z")
    r = await api.post(
        "/api/v1/tasks",
        json={
            "name": "tokyo",
            "target": "z",
            "kind": "exec",
            "argv": ["true"],
            "cron": "30 2 * * *",
            "timezone": "Asia/Tokyo",
        },
    )
    nxt = [datetime.fromisoformat(t) for t in r.json()["next_runs"]]
    assert all(t.astimezone(UTC).time().strftime("%H:%M") == "17:30" for t in nxt)
    assert nxt[1] - nxt[0] == timedelta(days=1)
