"""The agent's local state survives restarts and never hands out a command twice."""

from __future__ import annotations

import time

from custos.agent.state import AgentState


def _cmd(run_id: str, **kw):
    return {"run_id": run_id, "kind": "ping", "payload": {}, **kw}


def test_queue_dedups_and_claims_once(tmp_path):
    st = AgentState(tmp_path)
    st.enqueue([_cmd("r1"), _cmd("r2")])
    st.enqueue([_cmd("r1")])  # redelivered
    assert [c.run_id for c in st.runnable(time.time())] == ["r1", "r2"]
    assert st.claim("r1") and not st.claim("r1")
    st.finish("r1", {"run_id": "r1", "state": "succeeded"})
    st.enqueue([_cmd("r1")])  # delivered again after it ran: still not runnable
    assert [c.run_id for c in st.runnable(time.time())] == ["r2"]


def test_restart_keeps_outbox_and_reports_interrupted(tmp_path):
    st = AgentState(tmp_path)
    st.enqueue([_cmd("r1"), _cmd("r2")])
    st.claim("r1")
    st.finish("r1", {"run_id": "r1", "state": "succeeded"})
    st.claim("r2")  # the agent dies while r2 runs
    st.close()
    again = AgentState(tmp_path)
    assert [r["run_id"] for r in again.outbox()] == ["r1"]
    assert again.interrupted() == ["r2"]
    assert again.runnable(time.time()) == []
    again.sent(["r1"])
    assert again.outbox() == []


def test_deferred_commands_and_acks(tmp_path):
    st = AgentState(tmp_path)
    later = time.time() + 3600
    st.enqueue([_cmd("r1", not_before=later), _cmd("r2")])
    assert [c.run_id for c in st.runnable(time.time())] == ["r2"]
    assert st.next_due() == later
    assert sorted(st.unacked()) == ["r1", "r2"]
    st.mark_acked(["r1", "r2"])
    assert st.unacked() == []
    assert st.counts() == {"queue_received": 2, "outbox": 0}
