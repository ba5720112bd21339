"""The in-process push hub, payload chunking, backend choice and the agent's reconnect timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from custos.agent.push import MAX_BACKOFF_S, backoff_delay, push_url
from custos.push.hub import (
    MAX_PAYLOAD,
    MemoryPush,
    PostgresNotifyPush,
    asyncpg_dsn,
    build_push,
    payloads,
)
from custos.settings import Settings

A, B = "a" * 32, "b" * 32


async def test_memory_push_wakes_only_the_nudged_devices_subscribers():
    hub = MemoryPush()
    await hub.start()
    a1, a2, b = hub.subscribe(A), hub.subscribe(A), hub.subscribe(B)
    assert hub.connected == 3

    hub.nudge([A])
    assert a1.event.is_set() and a2.event.is_set()
    assert not b.event.is_set()

    hub.unsubscribe(a1)
    hub.unsubscribe(a1)  # idempotent
    a1.event.clear()
    a2.event.clear()
    hub.nudge([A, "c" * 32])  # nobody listens for c: nothing happens
    assert a2.event.is_set()
    assert not a1.event.is_set()  # unsubscribed
    assert not b.event.is_set()

    hub.unsubscribe(a2)
    hub.unsubscribe(b)
    assert hub.connected == 0
    hub.nudge([A, B])  # no subscribers left: a no-op
    await hub.stop()


def test_payloads_stay_under_the_notify_limit_and_keep_every_id():
    ids = [f"{i:032x}" for i in range(1000)]
    chunks = list(payloads(ids))
    assert len(chunks) > 1
    assert all(len(c.encode()) < MAX_PAYLOAD < 8000 for c in chunks)
    assert [d for c in chunks for d in c.split(",")] == ids
    assert list(payloads([])) == []
    assert list(payloads([A])) == [A]


def test_backend_choice(tmp_path: Path):
    assert isinstance(build_push(Settings(data_dir=tmp_path)), MemoryPush)
    pg = "postgresql+asyncpg://u@db.example:5432/custos"
    hub = build_push(Settings(data_dir=tmp_path, db=pg))
    assert isinstance(hub, PostgresNotifyPush)
    assert hub.dsn == "postgresql://u@db.example:5432/custos"
    assert asyncpg_dsn(pg) == "postgresql://u@db.example:5432/custos"
    assert isinstance(
        build_push(Settings(data_dir=tmp_path, db=pg, push_backend="memory")), MemoryPush
    )
    with pytest.raises(ValueError, match="PostgreSQL"):
        build_push(Settings(data_dir=tmp_path, push_backend="postgres"))


def test_agent_push_url_and_backoff():
    assert push_url("https://mdm.example:8443/") == "wss://mdm.example:8443/api/device/v1/push"
    assert push_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/api/device/v1/push"
    with pytest.raises(ValueError):
        push_url("ftp://x")
    for failures, top in ((1, 1.0), (2, 2.0), (3, 4.0), (7, MAX_BACKOFF_S), (50, MAX_BACKOFF_S)):
        for _ in range(20):
            assert top / 2 <= backoff_delay(failures) <= top
