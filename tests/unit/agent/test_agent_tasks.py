"""The agent's local task scheduler: runs from its own state with no server, on fake clocks."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

import pytest

from custos.agent import tasks as agent_tasks
from custos.agent.state import AgentState
from custos.agent.tasks import TaskScheduler, TaskStore

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday
TID = "a" * 32


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.t = start.timestamp()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def definition(revision: int = 1, **kw) -> dict:
    d = {
        "task_id": TID,
        "name": "cleanup",
        "revision": revision,
        "revision_at": T0.isoformat(),
        "anchor": T0.isoformat(),
        "enabled": True,
        "kind": "exec",
        "action": {"argv": [sys.executable, "-c", "print('cleaned')"]},
        "timeout_s": 30,
        "schedule": {"every_s": 60},
        "window": None,
        "misfire_grace_s": 300,
    }
    return {**d, **kw}


def make(tmp_path, clock: Clock, offset: float = 0.0) -> tuple[AgentState, TaskScheduler]:
    st = AgentState(tmp_path)
    sched = TaskScheduler(
        TaskStore(st._db), clock_offset=lambda: offset, work_dir=tmp_path / "tmp", wall_clock=clock
    )
    return st, sched


async def drain(sched: TaskScheduler) -> float:
    delay = sched.tick()
    await asyncio.gather(*list(sched._running.values()))
    return delay


def test_revisions_only_move_forward(tmp_path):
    _st, sched = make(tmp_path, Clock(T0))
    store = sched.store
    assert store.apply(definition(2))
    assert not store.apply(definition(1, enabled=False))  # an older revision arrives late
    assert store.get(TID).enabled and store.get(TID).revision == 2
    assert store.apply(definition(3, enabled=False)) and not store.get(TID).enabled
    assert store.remove(TID, 4) and store.get(TID) is None
    assert not store.apply(definition(3))  # the deletion wins over a stale schedule
    assert store.counts() == {"tasks": 0, "task_outbox": 0}


def test_bad_schedule_is_rejected_not_stored(tmp_path):
    _st, sched = make(tmp_path, Clock(T0))
    res = sched.handle("schedule", definition(schedule={"cron": "99 * * * *"}))
    assert res["state"] == "rejected" and "schedule" in res["error"]
    assert sched.store.tasks() == []


async def test_runs_on_time_with_sequence_and_times(tmp_path):
    clock = Clock(T0 + timedelta(seconds=30))
    _st, sched = make(tmp_path, clock)
    assert sched.handle("schedule", definition())["result"]["applied"]
    assert await drain(sched) == pytest.approx(30)  # nothing due until 00:01
    clock.advance(31)
    await drain(sched)
    clock.advance(60)
    await drain(sched)
    out = sched.store.outbox()
    assert [(r["seq"], r["state"]) for r in out] == [(1, "succeeded"), (2, "succeeded")]
    assert out[0]["stdout"] == "cleaned\n" and out[0]["exit_code"] == 0
    assert out[0]["scheduled_at"] == (T0 + timedelta(minutes=1)).isoformat()
    assert out[1]["scheduled_at"] == (T0 + timedelta(minutes=2)).isoformat()
    assert out[0]["started_at"] == datetime.fromtimestamp(T0.timestamp() + 61, UTC).isoformat()
    assert out[0]["clock_offset_s"] == 0 and out[0]["revision"] == 1
    sched.store.sent([{"task_id": TID, "seq": 1}])
    assert [r["seq"] for r in sched.store.outbox()] == [2]


async def test_agent_off_within_grace_runs_newest_and_reports_missed(tmp_path):
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    sched.handle("schedule", definition())
    clock.advance(10 * 60 + 5)  # asleep for ten minutes; grace is five
    await drain(sched)
    missed, ran = sched.store.outbox()
    assert (missed["seq"], missed["state"], missed["missed_count"]) == (1, "missed", 9)
    assert missed["first_missed_at"] == (T0 + timedelta(minutes=1)).isoformat()
    assert missed["scheduled_at"] == (T0 + timedelta(minutes=9)).isoformat()
    assert "newest" in missed["error"]
    assert (ran["seq"], ran["state"]) == (2, "succeeded")
    assert ran["scheduled_at"] == (T0 + timedelta(minutes=10)).isoformat()


async def test_agent_off_past_grace_reports_missed_only(tmp_path):
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    sched.handle("schedule", definition(schedule={"cron": "0 3 * * *"}, misfire_grace_s=600))
    clock.advance(5 * 3600)  # woke at 05:00: two hours late
    await drain(sched)
    (missed,) = sched.store.outbox()
    assert (missed["state"], missed["missed_count"]) == ("missed", 1)
    assert missed["scheduled_at"] == (T0 + timedelta(hours=3)).isoformat()
    assert "misfire grace" in missed["error"]
    clock.advance(22 * 3600)  # on time the next night
    await drain(sched)
    assert [(r["seq"], r["state"]) for r in sched.store.outbox()] == [
        (1, "missed"),
        (2, "succeeded"),
    ]


async def test_schedule_follows_the_server_clock(tmp_path):
    # this device's clock is two minutes slow; the job runs at the server's 03:00
    clock = Clock(T0 - timedelta(minutes=2))
    _st, sched = make(tmp_path, clock, offset=120.0)
    sched.handle("schedule", definition(schedule={"cron": "0 3 * * *"}))
    clock.advance(3 * 3600 - 1)  # server 02:59:59
    await drain(sched)
    assert sched.store.outbox() == []
    clock.advance(2)  # server 03:00:01, device 02:58:01
    await drain(sched)
    (ran,) = sched.store.outbox()
    assert ran["scheduled_at"] == (T0 + timedelta(hours=3)).isoformat()
    assert ran["started_at"].startswith("2026-03-02T02:58:01")
    assert ran["clock_offset_s"] == 120.0


async def test_maintenance_window_gates_occurrences(tmp_path):
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    window = {"days": [0], "start": "00:02", "end": "00:04", "timezone": "UTC"}
    sched.handle("schedule", definition(window=window))
    for _ in range(6):
        clock.advance(60)
        await drain(sched)
    runs = sched.store.outbox()
    # every 60 s, but only 00:02 and 00:03 fall in the window; outside it nothing is reported
    assert [r["scheduled_at"][11:16] for r in runs] == ["00:02", "00:03"]
    assert all(r["state"] == "succeeded" for r in runs)


async def test_disabled_task_does_not_run_and_reenabling_skips_the_pause(tmp_path):
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    sched.handle("schedule", definition(enabled=False))
    clock.advance(600)
    await drain(sched)
    assert sched.store.outbox() == []
    back = (T0 + timedelta(seconds=600)).isoformat()
    sched.handle("schedule", definition(2, revision_at=back))
    clock.advance(61)
    await drain(sched)
    assert [(r["state"], r["revision"]) for r in sched.store.outbox()] == [("succeeded", 2)]


async def test_interrupted_by_restart_is_reported_not_rerun(tmp_path):
    clock = Clock(T0)
    st, sched = make(tmp_path, clock)
    sched.handle(
        "schedule",
        definition(action={"argv": [sys.executable, "-c", "import time; time.sleep(30)"]}),
    )
    clock.advance(61)
    sched.tick()
    running = list(sched._running.values())
    assert running
    for t in running:  # the agent stops mid-run
        t.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    st.close()
    st2, again = make(tmp_path, clock)
    again.recover()
    (res,) = again.store.outbox()
    assert (res["seq"], res["state"]) == (1, "interrupted")
    await drain(again)  # the same occurrence is not run again
    assert len(again.store.outbox()) == 1
    st2.close()


async def test_full_outbox_counts_missed_instead_of_growing(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_tasks, "MAX_UNSENT_PER_TASK", 2)
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    sched.handle("schedule", definition(action={"argv": ["true"]}))
    for _ in range(5):
        clock.advance(60)
        await drain(sched)
    assert [r["seq"] for r in sched.store.outbox()] == [1, 2]
    sched.store.sent([{"task_id": TID, "seq": 1}, {"task_id": TID, "seq": 2}])
    clock.advance(60)
    await drain(sched)
    missed, ran = sched.store.outbox()
    assert (missed["seq"], missed["state"], missed["missed_count"]) == (3, "missed", 3)
    assert "waiting for the server" in missed["error"]
    assert (ran["seq"], ran["state"]) == (4, "succeeded")


async def test_script_task_and_failure(tmp_path):
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    sched.handle(
        "schedule",
        definition(
            kind="script",
            action={"interpreter": "sh", "script": "echo $1; exit 4", "args": ["hey"]},
        ),
    )
    clock.advance(60)
    await drain(sched)
    (res,) = sched.store.outbox()
    assert (res["state"], res["exit_code"], res["stdout"]) == ("failed", 4, "hey\n")
    assert list((tmp_path / "tmp").iterdir()) == []  # the script file is gone


async def test_long_sleep_on_a_fast_schedule_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("custos.scheduling.SCAN_LIMIT", 100)
    clock = Clock(T0)
    _st, sched = make(tmp_path, clock)
    sched.handle("schedule", definition(schedule={"every_s": 1}, action={"argv": ["true"]}))
    clock.advance(250.5)
    delays = [await drain(sched) for _ in range(4)]
    assert delays[:2] == [0.0, 0.0]
    missed, ran = sched.store.outbox()
    assert (missed["state"], missed["missed_count"]) == ("missed", 249)
    assert ran["scheduled_at"] == (T0 + timedelta(seconds=250)).isoformat()
