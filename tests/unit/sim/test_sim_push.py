"""The simulated fleet's push connections, against the app served by a real uvicorn on TCP."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rich.console import Console

from custos.cli.demo_cmd import _StatusLine
from custos.sim.fleet import SimDevice, SimFleet, raise_fd_limit
from served import Served, eventually


@pytest.fixture
async def served(api: Any) -> AsyncIterator[Served]:
    srv = Served(api.app)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _fleet(api: Any, served: Served, count: int, group: str, **kw: Any) -> SimFleet:
    r = await api.post("/api/v1/groups", json={"name": group})
    assert r.status_code == 201, r.text
    tok = await api.enroll_token(uses=None, group=group)
    fleet = SimFleet(
        served.url, tok["token"], count=count, ca_fingerprint=tok["ca_fingerprint"], **kw
    )
    assert await fleet.enroll_all() == count
    return fleet


async def _run(fleet: SimFleet) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(fleet.run(stop))


async def test_a_wake_makes_the_device_check_in_at_once(api: Any, served: Served) -> None:
    seen: list[tuple[str, list[str], float]] = []

    def observe(dev: SimDevice, payload: dict[str, Any], resp: dict[str, Any], took: float) -> None:
        seen.append((dev.device_id, list(payload["acks"]), took))

    # an hour between scheduled check-ins: anything quicker than that came through push
    fleet = await _fleet(api, served, 5, "pushed", interval=3600, push=True, observer=observe)
    stop, runner = await _run(fleet)
    try:
        await eventually(lambda: fleet.stats().push_connected == 5)
        # after connecting, each device checks in once to catch up (and sends its inventory)
        await eventually(lambda: {d for d, _, _ in seen} == {d.device_id for d in fleet.devices})
        before = fleet.stats()
        assert before.push_connects == 5 and before.wakes >= 5 and before.commands_done == 0

        target = fleet.devices[2]
        sent = time.monotonic()
        cmd = await api.command(target.device_id, kind="ping")
        await eventually(lambda: fleet.stats().commands_done == 1, timeout=5)
        assert time.monotonic() - sent < 5  # nowhere near the hour

        async def acked_and_done() -> bool:
            c = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
            return bool(c["counts"].get("succeeded") == 1)

        await eventually(acked_and_done, timeout=5)
        acks = [a for d, acked, _ in seen if d == target.device_id for a in acked]
        assert acks == [cmd["runs"][0]["id"]]
        # only the target was woken and ran anything; nobody else acknowledged a thing
        assert all(not acked for d, acked, _ in seen if d != target.device_id)
        after = fleet.stats()
        assert after.wakes == before.wakes + 1
        assert after.errors == 0 and after.push_connected == 5 and after.refused == 0
        assert all(took > 0 for _, _, took in seen)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
        await fleet.aclose()
    assert fleet.stats().push_connected == 0  # every socket closed on the way out


async def test_devices_reconnect_after_a_server_restart(api: Any, served: Served) -> None:
    fleet = await _fleet(api, served, 4, "storm", interval=3600, push=True)
    stop, runner = await _run(fleet)
    try:
        await eventually(lambda: fleet.stats().push_connected == 4)
        # the catch-up check-ins of the first connections are done before the restart
        await eventually(lambda: fleet.stats().checkins >= 4)
        checkins = fleet.stats().checkins
        await served.stop()
        await eventually(lambda: fleet.stats().push_connected == 0, timeout=10)
        await served.start()
        await eventually(lambda: fleet.stats().push_connected == 4, timeout=20)
        s = fleet.stats()
        assert s.push_connects == 8
        # a reconnect is followed by a catch-up check-in, as the agent does
        await eventually(lambda: fleet.stats().checkins >= checkins + 4, timeout=10)
        assert fleet.stats().errors == 0
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
        await fleet.aclose()


async def test_without_push_nothing_is_held_and_the_status_line_says_less(
    api: Any, served: Served
) -> None:
    fleet = await _fleet(api, served, 3, "polling", interval=0.2, push=False)
    stop, runner = await _run(fleet)
    console = Console(record=True, width=300)
    try:
        await eventually(lambda: fleet.stats().checkins >= 6)
        s = fleet.stats()
        assert s.push_connected == 0 and s.push_connects == 0 and s.wakes == 0
        assert "push-connected" not in _StatusLine(console, fleet, "t").text()
        assert "push-connected 0" in s.summary()
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15)
        await fleet.aclose()

    pushed = SimFleet(served.url, "", count=1, push=True)
    assert "push-connected" in _StatusLine(console, pushed, "t").text()


async def test_push_alone_holds_connections_and_counts_wakes(api: Any, served: Served) -> None:
    """hold_push without the check-in loop: what the memory benchmark measures."""
    fleet = await _fleet(api, served, 3, "held", push=True)
    stop = asyncio.Event()
    holder = asyncio.create_task(fleet.hold_push(stop))
    try:
        await eventually(lambda: fleet.stats().push_connected == 3)
        wakes = fleet.stats().wakes
        assert wakes == 3  # the catch-up wake after each connect
        await api.command("group:held", kind="ping")
        # the work comes down the sockets and runs; with no check-in loop its results wait
        await eventually(lambda: fleet.stats().commands_done == 3, timeout=5)
        await eventually(lambda: fleet.stats().wakes == wakes + 3, timeout=5)
        assert fleet.stats().checkins == 0
    finally:
        stop.set()
        await asyncio.wait_for(holder, 15)
        await fleet.aclose()


def test_raise_fd_limit_goes_up_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_fd_limit(min(300, hard)) == min(300, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(300, hard)
        assert raise_fd_limit(100) == min(300, hard)  # never lowered
        assert raise_fd_limit() == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
