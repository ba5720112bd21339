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


def test_huge_results_are_cut_to_fit_and_batched(tmp_path):
    import json

    from custos.agent.state import MAX_BATCH_BYTES, MAX_RESULT_BYTES, fit_result

    # NULs become 6-byte escapes: 1 MiB of them is 6 MiB of JSON
    big = {"run_id": "r1", "state": "succeeded", "stdout": "\x00" * (1 << 20), "stderr": "é" * 9}
    encoded = fit_result(big, MAX_RESULT_BYTES)
    assert len(encoded.encode()) <= MAX_RESULT_BYTES
    back = json.loads(encoded)
    assert back["truncated"] and back["stderr"] == "é" * 9 and "truncated" in back["stdout"]
    assert back["stdout"].count("\x00") > 200_000  # cut to what fits, not emptied
    small = {"run_id": "r2", "state": "succeeded", "stdout": "ok"}
    assert json.loads(fit_result(small, MAX_RESULT_BYTES)) == small

    st = AgentState(tmp_path)
    for i in range(4):
        st.enqueue([_cmd(f"r{i}")])
        st.claim(f"r{i}")
        st.finish(f"r{i}", {**big, "run_id": f"r{i}"})
    first = st.outbox()
    assert 1 <= len(first) < 4
    assert sum(len(json.dumps(r, ensure_ascii=False).encode()) for r in first) <= MAX_BATCH_BYTES
    assert [r["run_id"] for r in first] == [f"r{i}" for i in range(len(first))]
