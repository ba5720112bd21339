"""The simulated fleet: real enrolment and signed check-ins against the in-process app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from custos.agent.identity import EnrollError
from custos.sim.fleet import NO_FILE_SYSTEM, FleetError, SimDevice, SimFleet, simulate


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


async def _fleet(api, count: int, *, group: str | None = None, **kw) -> SimFleet:
    if group:
        r = await api.post("/api/v1/groups", json={"name": group})
        assert r.status_code == 201, r.text
    tok = await api.enroll_token(uses=None, group=group)
    return SimFleet(
        "http://test",
        tok["token"],
        count=count,
        ca_fingerprint=tok["ca_fingerprint"],
        transport=httpx.ASGITransport(app=api.app),
        **kw,
    )


async def test_fleet_enrols_reports_inventory_runs_commands_and_is_refused(api):
    fleet = await _fleet(api, 20, group="simgrp", seed=7, interval=0.3)
    assert await fleet.enroll_all() == 20
    assert fleet.stats().enrolled == 20
    stop = asyncio.Event()
    runner = asyncio.create_task(fleet.run(stop))
    try:
        r = await api.get("/api/v1/devices", params={"group": "simgrp"})
        listed = {d["name"]: d for d in r.json()}
        by_name = {d.hostname: d for d in fleet.devices}
        assert set(listed) == set(by_name) and len(listed) == 20
        assert all(d["agent_version"].endswith("+sim") for d in listed.values())
        assert {listed[n]["id"] for n in listed} == {d.device_id for d in fleet.devices}

        async def all_have_inventory() -> bool:
            for dev in fleet.devices:
                detail = (await api.get(f"/api/v1/devices/{dev.device_id}")).json()
                if detail["inventory_version"] < 1:
                    return False
            return True

        await eventually(all_have_inventory)
        for dev in fleet.devices[:5]:
            detail = (await api.get(f"/api/v1/devices/{dev.device_id}")).json()
            inv = detail["inventory"]
            assert inv["os.hostname"] == dev.hostname == detail["name"]
            assert any(k.startswith("sw.") for k in inv)
            assert detail["facts"]["hw.model"] == inv["hw.model"]

        r = await api.post(
            "/api/v1/commands",
            json={"target": "group:simgrp", "kind": "exec", "argv": ["uname", "-a"]},
        )
        assert r.status_code == 201, r.text
        cmd_id = r.json()["id"]

        async def all_done() -> bool:
            c = (await api.get(f"/api/v1/commands/{cmd_id}")).json()
            return c["counts"].get("succeeded", 0) == 20

        await eventually(all_done)
        runs = (await api.get(f"/api/v1/commands/{cmd_id}")).json()["runs"]
        assert len(runs) == 20
        for run in runs:
            assert run["state"] == "succeeded" and run["exit_code"] == 0
            assert run["device_name"] in run["stdout"]
            assert run["started_at"] and run["finished_at"]
        assert fleet.stats().commands_done == 20

        victim = fleet.devices[3]
        r = await api.post(f"/api/v1/devices/{victim.device_id}/retire")
        assert r.status_code == 200, r.text

        async def refused() -> bool:
            return fleet.stats().refused == 1

        await eventually(refused)
        assert victim.refused
        s = fleet.stats()
        assert s.active == 19 and s.errors == 0 and s.checkins >= 40
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await fleet.aclose()


async def test_other_command_kinds_over_the_wire(api):
    fleet = await _fleet(api, 2, group="kinds", interval=0.2)
    await fleet.enroll_all()
    stop = asyncio.Event()
    runner = asyncio.create_task(fleet.run(stop))
    try:
        bodies = [
            {"kind": "ping"},
            {"kind": "collect_file", "path": "/etc/hostname"},
            {"kind": "script", "interpreter": "sh", "script": "echo hi\n", "args": ["a"]},
            {"kind": "settings", "checkin_interval": 5},
        ]
        ids = []
        for body in bodies:
            r = await api.post("/api/v1/commands", json={"target": "group:kinds", **body})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

        async def finished() -> bool:
            for cid in ids:
                c = (await api.get(f"/api/v1/commands/{cid}")).json()
                if any(run["state"] in ("queued", "sent", "acked") for run in c["runs"]):
                    return False
            return True

        await eventually(finished)
        details = [(await api.get(f"/api/v1/commands/{cid}")).json() for cid in ids]
        ping, collect, script, settings = (d["runs"] for d in details)
        assert all(r["state"] == "succeeded" and r["result"]["pong"] is True for r in ping)
        assert all(r["state"] == "failed" and r["error"] == NO_FILE_SYSTEM for r in collect)
        assert all(r["state"] == "succeeded" and "sh script" in r["stdout"] for r in script)
        assert all(r["state"] == "succeeded" for r in settings)
        assert all(d.interval_override == 5 for d in fleet.devices)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await fleet.aclose()


async def test_inventory_deltas_and_resync_keep_the_server_in_step(api):
    fleet = await _fleet(api, 1, inventory_change_rate=1.0)
    await fleet.enroll_all()
    dev = fleet.devices[0]

    async def server_inventory() -> dict[str, str]:
        return (await api.get(f"/api/v1/devices/{dev.device_id}")).json()["inventory"]

    assert await fleet.checkin_once(dev) is not None  # full inventory
    assert dev.inventory_version == 1
    assert await server_inventory() == dev.inventory()
    for _ in range(3):  # one small change each time
        await fleet.checkin_once(dev)
    assert dev.inventory_version == 4
    assert await server_inventory() == dev.inventory()
    history = (await api.get(f"/api/v1/devices/{dev.device_id}/history")).json()
    assert {h["version"] for h in history} >= {2, 3, 4}

    # a base the server does not have: it asks for everything, and gets it at once
    dev.inventory_version = 99
    await fleet.checkin_once(dev)
    assert dev.inventory_version > 4
    assert await server_inventory() == dev.inventory()
    assert fleet.stats().errors == 0
    await fleet.aclose()


async def test_identities_are_saved_and_reused(api, tmp_path: Path):
    fleet = await _fleet(api, 3, group="keep", seed=3)
    assert await fleet.enroll_all() == 3
    path = tmp_path / "fleet.json"
    fleet.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    names = [d.hostname for d in fleet.devices]
    await fleet.aclose()

    again = SimFleet(
        "http://test",
        fleet.token,
        count=4,
        ca_fingerprint=fleet.ca_fingerprint,
        seed=3,
        transport=httpx.ASGITransport(app=api.app),
    )
    assert again.load(path) == 3
    assert again.stats().enrolled == 3
    assert await again.enroll_all() == 1
    assert [d.hostname for d in again.devices[:3]] == names
    for dev in again.devices:
        assert await again.checkin_once(dev) is not None
    r = await api.get("/api/v1/devices", params={"group": "keep"})
    assert len(r.json()) == 4
    again.save(path)

    smaller = SimFleet("http://test", fleet.token, count=2, transport=again.transport)
    assert smaller.load(path) == 4
    assert await smaller.enroll_all() == 0
    smaller.save(path)  # the identities beyond count are kept for a later, larger run
    assert SimFleet("http://test", "", count=1).load(path) == 4
    await again.aclose()
    await smaller.aclose()


async def test_wrong_fingerprint_and_bad_token_are_refused(api):
    tok = await api.enroll_token(uses=None)
    transport = httpx.ASGITransport(app=api.app)
    fleet = SimFleet(
        "http://test", tok["token"], count=2, ca_fingerprint="ab" * 32, transport=transport
    )
    with pytest.raises(EnrollError, match="fingerprint mismatch"):
        await fleet.enroll_all()
    bad = SimFleet("http://test", "cet_nope", count=3, transport=transport)
    with pytest.raises(FleetError, match="refused enrolment"):
        await bad.enroll_all()
    assert bad.stats().enrolled == 0
    await bad.aclose()


async def test_stop_before_anything_is_due_returns_quickly(api):
    fleet = await _fleet(api, 5, interval=60)
    await fleet.enroll_all()
    stop = asyncio.Event()
    runner = asyncio.create_task(fleet.run(stop))
    await asyncio.sleep(0.2)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(runner, 5)
    assert time.monotonic() - started < 1.0
    await fleet.aclose()


# --- simulated execution, without a server ---


def _device() -> SimDevice:
    dev = SimDevice(4, seed=11)
    dev.device_id = "d" * 32
    dev.inventory()
    return dev


def _exec(dev: SimDevice, *argv: str) -> str:
    res = simulate(dev, "exec", {"argv": list(argv)})
    assert res["state"] == "succeeded" and res["exit_code"] == 0
    return str(res["stdout"])


def test_well_known_commands_have_realistic_output():
    dev = _device()
    inv = dev.inventory()
    assert _exec(dev, "hostname") == dev.hostname + "\n"
    uname = _exec(dev, "/usr/bin/uname", "-a")
    assert dev.hostname in uname
    assert inv["os.kernel"] in uname or "MINGW" in uname
    assert " up " in _exec(dev, "uptime")
    df = _exec(dev, "df", "-h").splitlines()
    assert df[0].startswith("Filesystem") and len(df) >= 2
    assert _exec(dev, "echo", "hello", "world") == "hello world\n"
    assert _exec(dev, "ls", "-l").startswith("simulated: would run ['ls', '-l']")


def test_every_kind_has_an_outcome():
    dev = _device()
    assert simulate(dev, "ping", {})["result"]["pong"] is True
    script = simulate(dev, "script", {"interpreter": "python", "script": "print(1)"})
    assert script["state"] == "succeeded" and "python script" in script["stdout"]
    assert simulate(dev, "settings", {"checkin_interval": 30})["result"] == {"checkin_interval": 30}
    assert dev.interval_override == 30
    assert simulate(dev, "reboot", {})["state"] == "succeeded"
    assert "os.boot_time" in dev.pending_set  # the reboot shows in the next inventory delta
    collect = simulate(dev, "collect_file", {"path": "/etc/passwd"})
    assert collect == {"state": "failed", "error": NO_FILE_SYSTEM}
    assert simulate(dev, "format_disk", {})["state"] == "rejected"
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert simulate(dev, "ping", {}, past)["state"] == "expired"


def test_same_seed_same_devices():
    a, b = SimDevice(9, seed=5), SimDevice(9, seed=5)
    ia, ib = a.inventory(), b.inventory()
    ia.pop("os.boot_time"), ib.pop("os.boot_time")
    assert ia == ib and a.hostname == b.hostname
    assert SimDevice(10, seed=5).inventory()["hw.serial"] != a.inventory()["hw.serial"]
