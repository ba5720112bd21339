"""Diagnostics end to end on SQLite and PostgreSQL: agents answer `diagnose` through the real
device protocol, OMA DM devices through DiagMon (tests/omadm_client.py), and DiagMon Generic
Alerts are stored without a run."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from custos.agent import diagnose
from custos.diagnostics.models import DiagnosticsReport
from custos.omadm import diagmon
from omadm_client import DmClient, account_client

URL = "http://test/omadm"
START = "./DiagMon/Custos/Operations/Start"
KEEP = 3
MAX_BYTES = 2048
TRAP = f"{diagmon.ALERT_TYPE_PREFIX}:TrapNotification"


def _admin_password(api: Any) -> str:
    """The admin's password from the app's settings."""
    return str(api.services.settings.admin_password.get_secret_value())


@pytest.fixture
def settings(settings: Any) -> Any:
    """The usual test settings with a short history, a small data limit and a procedure."""
    return settings.model_copy(
        update={
            "diagnostics_keep": KEEP,
            "diagnostics_max_bytes": MAX_BYTES,
            "omadm_diagmon_start": START,
        }
    )


async def _reports(api: Any, device: str, **params: Any) -> list[dict[str, Any]]:
    r = await api.get(f"/api/v1/devices/{device}/diagnostics", params=params)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def _report(api: Any, device: str, report_id: int) -> dict[str, Any]:
    r = await api.get(f"/api/v1/devices/{device}/diagnostics/{report_id}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def _diagnose_once(api: Any, dev: Any, name: str, snap: dict[str, Any]) -> str:
    """Queue diagnose, take it with a check-in, report `snap` for it; the run id."""
    cmd = await api.command(name, kind="diagnose")
    run_id = str(cmd["runs"][0]["id"])
    got = await dev.checkin({})
    assert [(c["run_id"], c["kind"]) for c in got["commands"]] == [(run_id, "diagnose")]
    result = {"run_id": run_id, "state": "succeeded", "result": {"snapshot": snap}}
    resp = await dev.checkin({"acks": [run_id], "results": [result]})
    assert resp["accepted_results"] == [run_id]
    return run_id


def _small(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot without its lists, to stay under the test's data limit."""
    return {**snap, "disks": snap["disks"][:1], "processes": snap["processes"][:2]}


async def test_agent_diagnose_becomes_a_report_once(api: Any) -> None:
    dev = await api.new_device("box")
    snap = _small(await asyncio.to_thread(diagnose.snapshot))
    run_id = await _diagnose_once(api, dev, "box", snap)
    # the same result again (the agent missed the answer) adds nothing
    dup = {"run_id": run_id, "state": "succeeded", "result": {"snapshot": snap}}
    assert (await dev.checkin({"results": [dup]}))["accepted_results"] == [run_id]
    reps = await _reports(api, "box")
    assert len(reps) == 1
    rep = reps[0]
    assert (rep["source"], rep["kind"], rep["run_id"]) == ("agent", "snapshot", run_id)
    assert rep["mem_total"] == snap["memory"]["total"]
    assert rep["mem_available"] == snap["memory"]["available"]
    assert rep["storage_total"] == snap["disks"][0]["total"]
    assert rep["uptime_s"] == snap["uptime_s"] and rep["load1"] == snap["load"][0]
    assert "data" not in rep  # a list leaves the data out
    full = await _report(api, dev.device_id, rep["id"])
    assert full["data"]["processes"] == snap["processes"]
    assert full["data"]["memory"]["total"] == snap["memory"]["total"]
    # the run itself closed as usual
    r = await api.get("/api/v1/commands?limit=1")
    assert r.json()[0]["counts"] == {"succeeded": 1}


async def test_history_is_bounded_and_newest_first(api: Any) -> None:
    dev = await api.new_device("box")
    other = await api.new_device("other")
    snap = _small(await asyncio.to_thread(diagnose.snapshot))
    runs = []
    for i in range(KEEP + 2):
        runs.append(await _diagnose_once(api, dev, "box", {**snap, "uptime_s": 1000 + i}))
    await _diagnose_once(api, other, "other", snap)
    reps = await _reports(api, "box")
    assert [r["run_id"] for r in reps] == runs[::-1][:KEEP]
    assert [r["uptime_s"] for r in reps] == [1004, 1003, 1002]
    assert [r["run_id"] for r in await _reports(api, "box", limit=1)] == [runs[-1]]
    async with api.services.db.read() as s:
        per_device = dict(
            (
                await s.execute(
                    select(DiagnosticsReport.device_id, func.count()).group_by(
                        DiagnosticsReport.device_id
                    )
                )
            ).all()
        )
    # pruned in the database, and only the reporting device's history
    assert per_device == {dev.device_id: KEEP, other.device_id: 1}


async def test_oversized_and_odd_snapshots_are_cut_not_refused(api: Any) -> None:
    dev = await api.new_device("box")
    snap = await asyncio.to_thread(diagnose.snapshot)
    # larger than diagnostics_max_bytes: the numbers are kept, the data replaced by a note
    big = {**snap, "processes": [{"pid": i, "name": "p" * 250, "rss": i} for i in range(10)]}
    await _diagnose_once(api, dev, "box", big)
    rep = (await _reports(api, "box"))[0]
    assert rep["mem_total"] == snap["memory"]["total"]
    full = await _report(api, "box", rep["id"])
    assert list(full["data"]) == ["note"] and "dropped" in full["data"]["note"]
    # larger than a run result may be: the result is dropped, the run still closes
    huge = {"memory": {"total": 1}, "junk": "x" * 70_000}
    await _diagnose_once(api, dev, "box", huge)
    assert len(await _reports(api, "box")) == 1
    # values of the wrong type or range are dropped one by one
    odd = {
        "memory": {"total": "lots", "available": -1},
        "disks": [{"mount": 7, "total": 2**70}],
        "battery": {"percent": 400},
        "load": "high",
        "processes": ["nope", {"pid": "1", "name": {"x": 1}, "rss": None}],
    }
    await _diagnose_once(api, dev, "box", odd)
    rep = (await _reports(api, "box"))[0]
    assert all(rep[k] is None for k in ("mem_total", "mem_available", "battery_pct", "load1"))
    full = await _report(api, "box", rep["id"])
    assert full["data"]["processes"] == [{"pid": None, "name": "", "rss": None}]
    assert full["data"]["disks"][0]["mount"] == "?"


async def test_results_of_other_kinds_and_foreign_runs_make_no_report(api: Any) -> None:
    a = await api.new_device("a")
    b = await api.new_device("b")
    cmd = await api.command("a", kind="diagnose")
    run_id = cmd["runs"][0]["id"]
    snap = {"memory": {"total": 1024}}
    # b claims a's diagnose run: accepted (its outbox empties) but not stored anywhere
    await b.checkin(
        {"results": [{"run_id": run_id, "state": "succeeded", "result": {"snapshot": snap}}]}
    )
    ping = await api.command("a", kind="ping")
    await a.checkin({})
    res = {"run_id": ping["runs"][0]["id"], "state": "succeeded", "result": {"snapshot": snap}}
    await a.checkin({"results": [res]})
    assert await _reports(api, "a") == [] and await _reports(api, "b") == []


async def test_bad_requests_get_clear_4xx(api: Any) -> None:
    dev = await api.new_device("box")
    other = await api.new_device("other")
    await _diagnose_once(api, other, "other", {"memory": {"total": 1}})
    other_rep = (await _reports(api, "other"))[0]["id"]
    r = await api.get("/api/v1/devices/nosuch/diagnostics")
    assert r.status_code == 404 and "nosuch" in r.text
    r = await api.get("/api/v1/devices/nosuch/diagnostics/1")
    assert r.status_code == 404
    # another device's report is not found through this one
    r = await api.get(f"/api/v1/devices/{dev.device_id}/diagnostics/{other_rep}")
    assert r.status_code == 404 and "no diagnostics report" in r.text
    for path in (
        "/api/v1/devices/box/diagnostics/0",
        "/api/v1/devices/box/diagnostics/99999999999999999999",
        "/api/v1/devices/box/diagnostics/abc",
    ):
        assert (await api.get(path)).status_code == 422, path
    for limit in ("0", "501", "x"):
        r = await api.get("/api/v1/devices/box/diagnostics", params={"limit": limit})
        assert r.status_code == 422
    r = await api.get("/api/v1/devices/" + "x" * 300 + "/diagnostics")
    assert r.status_code == 422
    r = await httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app)).get(
        "http://test/api/v1/devices/box/diagnostics"
    )
    assert r.status_code == 401


# ------------------------------------------------------------------------------ OMA DM


async def _enroll(api: Any, **body: Any) -> dict[str, Any]:
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": "IMEI:490154203237518", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _dm(api: Any, created: dict[str, Any]) -> DmClient:
    dm = account_client(api.http, created, URL)
    dm.tree.update(
        {
            "./DiagMon/Memory/RAM/Total": "3981312",
            "./DiagMon/Memory/RAM/Avail": "1048576",
            "./DiagMon/Memory/Storage/Avail": "8 GB",
            "./DiagMon/Battery/Level": "64",
            "./DevDetail/Ext/Microsoft/TotalStorage": "65536",
        }
    )
    return dm


async def _run(api: Any, command_id: str) -> dict[str, Any]:
    r = await api.get(f"/api/v1/commands/{command_id}")
    assert r.status_code == 200, r.text
    return r.json()["runs"][0]  # type: ignore[no-any-return]


async def test_omadm_diagnose_is_a_diagmon_run(api: Any) -> None:
    created = await _enroll(api, name="phone")
    dm = _dm(api, created)
    cmd = await api.command("phone", kind="diagnose")
    await dm.session()
    # every configured node was asked for, then the procedure started (answered at once)
    asked = [c.items[0].target for _, reply in dm.log for c in reply.commands if c.name == "Get"]
    assert set(api.services.settings.omadm_diagmon_nodes) <= set(asked)
    assert dm.executed == [START]
    run = await _run(api, cmd["id"])
    # absent nodes (404) do not fail the run
    assert run["state"] == "succeeded", run
    reps = await _reports(api, "phone")
    assert len(reps) == 1
    rep = reps[0]
    assert (rep["source"], rep["kind"], rep["run_id"]) == ("omadm", "diagmon-result", run["id"])
    assert rep["mem_total"] == 3981312 * 1024 and rep["mem_available"] == 1048576 * 1024
    # the DiagMon node wins over the DevDetail fallback for storage_free; total only has one
    assert rep["storage_free"] == 8 * 1024**3 and rep["storage_total"] == 65536 * 1024**2
    assert rep["battery_pct"] == 64 and rep["uptime_s"] is None
    full = await _report(api, "phone", rep["id"])
    assert full["data"]["nodes"]["./DiagMon/Battery/Level"] == "64"
    assert "./DiagMon/Uptime" in full["data"]["missing"]
    assert full["data"]["procedure"] == {"target": START, "status": 200}


async def test_omadm_diagnose_accepted_procedure_ends_with_operation_complete(api: Any) -> None:
    created = await _enroll(api, name="phone")
    dm = _dm(api, created)
    dm.async_nodes.add(START)
    dm.alert_type = f"{diagmon.ALERT_TYPE_PREFIX}:OperationComplete"
    cmd = await api.command("phone", kind="diagnose")
    await dm.session()
    run = await _run(api, cmd["id"])
    assert run["state"] == "acked"  # waiting for the procedure's Generic Alert
    assert await _reports(api, "phone") == []
    dm.session_id = "2"
    await dm.session()
    run = await _run(api, cmd["id"])
    assert run["state"] == "succeeded", run
    reps = await _reports(api, "phone")
    # the alert itself and the finished run's node values
    assert sorted((r["kind"], r["run_id"]) for r in reps) == [
        ("diagmon-result", run["id"]),
        ("diagmon-result", run["id"]),
    ]
    by_source = {bool((await _report(api, "phone", r["id"]))["data"].get("alert")): r for r in reps}
    alert = await _report(api, "phone", by_source[True]["id"])
    assert alert["data"]["alert"] == "OperationComplete" and alert["data"]["data"] == "1200"
    result = await _report(api, "phone", by_source[False]["id"])
    assert result["data"]["procedure"]["result_code"] == 1200
    assert result["mem_total"] == 3981312 * 1024


async def test_diagmon_alerts_without_a_run_are_stored(api: Any) -> None:
    created = await _enroll(api, name="phone")
    dm = _dm(api, created)
    dm.generic_alerts = [
        (None, "./DiagMon/Memory/RAM/Avail", TRAP, "2048"),
        # a correlator that names no run of this device is kept in the data only
        (
            "f" * 32,
            "./DiagMon/Log",
            f"{diagmon.ALERT_TYPE_PREFIX}:CollectedSimpleDataReport",
            "a=1",
        ),
        (None, "./LAWMO/State", "urn:oma:at:lawmo:1.0:OperationComplete", "1200"),
    ]
    replies = await dm.session()
    # every alert got its Status 200
    statuses = [c for c in replies[0].commands if c.name == "Status" and c.cmd == "Alert"]
    assert {c.data for c in statuses} == {"200"}
    reps = await _reports(api, "phone")
    assert sorted(r["kind"] for r in reps) == ["diagmon-data", "diagmon-trap"]
    assert all(r["run_id"] is None for r in reps)
    trap = next(r for r in reps if r["kind"] == "diagmon-trap")
    assert trap["mem_available"] == 2048 * 1024
    data = next(r for r in reps if r["kind"] == "diagmon-data")
    full = await _report(api, "phone", data["id"])
    assert full["data"]["correlator"] == "f" * 32 and full["data"]["data"] == "a=1"


async def test_console_device_page_shows_the_latest_report(api: Any) -> None:
    dev = await api.new_device("box")
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        page = await http.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        r = await http.post(
            "/console/login",
            data={"username": "admin", "password": _admin_password(api), "csrf": token.group(1)},
        )
        assert r.status_code == 303
        r = await http.get(f"/console/devices/{dev.device_id}")
        assert r.status_code == 200 and "No diagnostics yet" in r.text
        assert 'value="diagnose"' in r.text
        snap = _small(await asyncio.to_thread(diagnose.snapshot))
        snap["processes"] = [{"pid": 4242, "name": "<script>x</script>", "rss": 1}]
        await _diagnose_once(api, dev, "box", snap)
        r = await http.get(f"/console/devices/{dev.device_id}")
        assert r.status_code == 200
        assert 'id="diagnostics"' in r.text and "No diagnostics yet" not in r.text
        assert "4242" in r.text and "&lt;script&gt;x&lt;/script&gt;" in r.text
        assert "<script>x</script>" not in r.text


async def test_reports_follow_the_device_view_permission_and_scope(api: Any) -> None:
    inside = await api.new_device("berlin-1")
    outside = await api.new_device("paris-1")
    for name, dev in (("berlin", inside), ("paris", outside)):
        assert (await api.post("/api/v1/groups", json={"name": name})).status_code == 201
        r = await api.post(f"/api/v1/groups/{name}/devices", json={"devices": [dev.device_id]})
        assert r.status_code == 200, r.text
    await _diagnose_once(api, inside, "berlin-1", {"memory": {"total": 1}})
    await _diagnose_once(api, outside, "paris-1", {"memory": {"total": 2}})
    paris_report = (await _reports(api, "paris-1"))[0]["id"]
    password = "scoped-user-pw-123"
    r = await api.post(
        "/api/v1/users",
        json={"username": "hd", "password": password, "roles": ["helpdesk"], "groups": ["berlin"]},
    )
    assert r.status_code == 201, r.text
    r = await api.http.post("/api/v1/auth/login", json={"username": "hd", "password": password})
    hd = {"authorization": f"Bearer {r.json()['token']}"}
    r = await api.http.get("/api/v1/devices/berlin-1/diagnostics", headers=hd)
    assert r.status_code == 200 and [x["mem_total"] for x in r.json()] == [1]
    for path in (
        "/api/v1/devices/paris-1/diagnostics",
        f"/api/v1/devices/paris-1/diagnostics/{paris_report}",
        f"/api/v1/devices/berlin-1/diagnostics/{paris_report}",
    ):
        r = await api.http.get(path, headers=hd)
        assert r.status_code == 404, path  # not even its existence is shown
