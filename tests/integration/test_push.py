"""Push nudges through the service layer, and across processes through PostgreSQL NOTIFY."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from custos.push.hub import MemoryPush, PostgresNotifyPush, asyncpg_dsn, build_push


async def _woken(sub: Any, timeout: float = 5.0) -> bool:
    try:
        await asyncio.wait_for(sub.event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def test_a_queued_command_wakes_its_device_only(api: Any) -> None:
    a = await api.new_device("push-a")
    b = await api.new_device("push-b")
    hub = api.services.push
    assert isinstance(hub, MemoryPush if api.services.settings.is_sqlite else PostgresNotifyPush)
    sub_a, sub_b = hub.subscribe(a.device_id), hub.subscribe(b.device_id)
    try:
        r = await api.post("/api/v1/commands", json={"target": b.device_id, "kind": "ping"})
        assert r.status_code == 201, r.text
        assert await _woken(sub_b)
        # the nudge went out after the commit: the woken device finds its work
        resp = await b.checkin({})
        assert [c["kind"] for c in resp["commands"]] == ["ping"]
        assert not await _woken(sub_a, timeout=0.5)

        # a refused command (no such device) nudges nobody
        sub_b.event.clear()
        r = await api.post("/api/v1/commands", json={"target": "nope", "kind": "ping"})
        assert r.status_code == 404, r.text
        assert not await _woken(sub_b, timeout=0.5)
    finally:
        hub.unsubscribe(sub_a)
        hub.unsubscribe(sub_b)
        for dev in (a, b):
            await dev.aclose()
            dev.state.close()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # LISTEN/NOTIFY is PostgreSQL's
async def test_notify_crosses_hubs_and_a_reconnect_wakes_everyone(settings: Any) -> None:
    dsn = asyncpg_dsn(settings.database_url)
    one, two = build_push(settings), build_push(settings)
    assert isinstance(one, PostgresNotifyPush) and isinstance(two, PostgresNotifyPush)
    await one.start()
    await two.start()
    try:
        dev, other = "d" * 32, "e" * 32
        sub, sub_other, sub_local = two.subscribe(dev), two.subscribe(other), one.subscribe(dev)
        one.nudge([dev])
        assert await _woken(sub)  # another process's subscriber
        assert await _woken(sub_local)  # and the sender's own
        assert not sub_other.event.is_set()

        # many devices at once: cut into several NOTIFY payloads, all delivered
        many = [f"{i:032x}" for i in range(600)]
        subs = [two.subscribe(d) for d in many]
        one.nudge(many)
        for s in subs:
            assert await _woken(s)

        # the listening connection dies: hub two reconnects and wakes all its subscribers
        for s in (sub, sub_other):
            s.event.clear()
        assert two._conn is not None
        pid = two._conn.get_server_pid()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        assert await _woken(sub_other, timeout=10)
        assert await _woken(sub)
        assert two.connects == 2
        # and it listens again
        sub.event.clear()
        one.nudge([dev])
        assert await _woken(sub)
    finally:
        await one.stop()
        await two.stop()
