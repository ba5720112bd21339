"""Offline scheduled tasks with real processes: the agent keeps running a task while the
server is down, and the results arrive, in order, once it is back."""

from __future__ import annotations

import itertools
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from e2e_harness import E2E, AgentProcess, wait_for

pytestmark = pytest.mark.e2e

EVERY_S = 2


def _task_outbox(agent: AgentProcess) -> list[int]:
    """Sequence numbers waiting in the agent's task outbox (read from its SQLite file)."""
    db = sqlite3.connect(agent.state_dir / "agent.db", timeout=10)
    try:
        return [r[0] for r in db.execute("SELECT seq FROM task_outbox ORDER BY id")]
    except sqlite3.OperationalError:  # the agent has not created its task tables yet
        return []
    finally:
        db.close()


def _runs(e2e: E2E, task_id: str) -> list[dict[str, Any]] | None:
    try:
        r = e2e.admin.get(f"/api/v1/tasks/{task_id}/runs", params={"limit": 1000})
    except httpx.TransportError:
        return None
    assert r.status_code == 200, r.text
    return sorted(r.json(), key=lambda x: x["seq"])


def _t(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


# The server is SIGKILLed while the test's own httpx client may hold a kept-alive socket; its
# ResourceWarning is that client's, not the server's or the agent's (see test_e2e_faults).
@pytest.mark.filterwarnings("ignore:unclosed:ResourceWarning")
def test_scheduled_task_runs_offline_and_results_arrive_in_order(e2e: E2E) -> None:
    admin = e2e.admin
    agent = e2e.agent("offline-tasks")
    agent.start()
    marks = e2e.scratch / "marks.txt"
    r = admin.post(
        "/api/v1/tasks",
        json={
            "name": "offline-tick",
            "target": agent.device_id,
            "kind": "exec",
            "argv": ["sh", "-c", 'date +%s >> "$0"; echo tick', str(marks)],
            "every_s": EVERY_S,
            "misfire_grace_s": 60,
        },
    )
    assert r.status_code == 201, r.text
    task = r.json()

    # online: the agent got the task and its first results reached the server
    wait_for("a first result on the server", lambda: len(_runs(e2e, task["id"]) or []) >= 1)

    e2e.server.kill()
    down_at = time.time()
    # offline: the task keeps running from the agent's local queue; results pile up

    def three_waiting() -> list[int] | None:
        held = _task_outbox(agent)
        return held if len(held) >= 3 else None

    waiting: list[int] = wait_for("three results in the agent's task outbox", three_waiting)
    assert waiting == sorted(waiting)
    time.sleep(0.5)
    up_at = time.time()
    e2e.server.start()

    def all_arrived() -> list[dict[str, Any]] | None:
        runs = _runs(e2e, task["id"])
        held = _task_outbox(agent)
        if runs is None or not runs or runs[-1]["seq"] < max(waiting) or held:
            return None
        return runs

    runs = wait_for("the offline results to arrive", all_arrived, timeout=60)
    assert agent.running  # the same agent process rode out the outage

    seqs = [x["seq"] for x in runs]
    assert seqs == list(range(1, len(runs) + 1)), seqs  # nothing lost, nothing doubled
    assert all(x["state"] == "succeeded" and x["stdout"] == "tick\n" for x in runs), runs
    # each occurrence ran exactly once: one mark per reported run (a run may be under way)
    assert len(marks.read_text().split()) in (len(runs), len(runs) + 1)

    offline = [x for x in runs if x["seq"] in waiting]
    assert len(offline) >= 3
    for x in offline:
        # run while the server was down, received after it came back
        assert down_at - 1 <= _t(x["started_at"]) <= up_at + 1, x
        assert _t(x["received_at"]) >= up_at, x
        # sane times: the agent's and the corrected clock agree (same machine), small delay
        assert abs(x["clock_offset_s"]) < 5, x
        assert abs(_t(x["started_at"]) - _t(x["agent_started_at"])) < 5, x
        assert 0 <= x["delay_s"] < 5, x
    # sent in order: arrival follows sequence, and occurrences follow the interval
    received = [_t(x["received_at"]) for x in runs]
    assert received == sorted(received)
    slots = [_t(x["scheduled_at"]) for x in runs]
    assert all(b > a and (b - a) % EVERY_S == 0 for a, b in itertools.pairwise(slots))

    detail = admin.get(f"/api/v1/tasks/{task['id']}").json()
    (target,) = detail["targets"]
    assert target["runs"] >= len(runs) and target["missing_seqs"] == 0
    assert target["clock_skew_s"] is not None

    # deleted on the server: the agent forgets it and stops running it
    assert admin.http.delete(f"/api/v1/tasks/{task['id']}", headers=admin.auth).status_code == 204

    def forgotten() -> bool:
        db = sqlite3.connect(agent.state_dir / "agent.db", timeout=10)
        try:
            return db.execute("SELECT deleted FROM tasks").fetchone() == (1,)
        finally:
            db.close()

    wait_for("the agent to forget the task", forgotten, timeout=20)
    count = len(marks.read_text().split())
    time.sleep(EVERY_S * 2 + 0.5)
    assert len(marks.read_text().split()) <= count + 1  # at most the run that was under way
    wait_for("the task outbox to drain", lambda: _task_outbox(agent) == [], timeout=20)
    assert datetime.now(UTC) > datetime.fromisoformat(runs[-1]["received_at"])
