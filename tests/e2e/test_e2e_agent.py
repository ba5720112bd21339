"""A real server and real agents: enrolment, inventory, every command kind, retirement."""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime, timedelta

import pytest
from e2e_harness import CHECKIN, E2E, signed_headers, wait_for

pytestmark = pytest.mark.e2e


def _iso_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def test_enrol_check_in_inventory_and_expiry(e2e: E2E) -> None:
    admin = e2e.admin
    agent = e2e.agent("inv-1")

    listed = admin.get("/api/v1/devices").json()
    assert [d["id"] for d in listed] == [agent.device_id]
    assert listed[0]["name"] == "inv-1"
    assert listed[0]["status"] == "active"

    res = agent.run_once()
    assert res.returncode == 0, res.stderr

    # last-seen is written in batches: give the flush a few seconds
    def seen() -> dict | None:
        devs = admin.get("/api/v1/devices").json()
        return devs[0] if devs and devs[0]["last_seen"] else None

    dev = wait_for("last_seen to be set", seen, timeout=10)
    assert dev["agent_version"]

    detail = admin.device(agent.device_id)
    inv = detail["inventory"]
    assert detail["inventory_version"] == 1
    for prefix in ("os.", "hw.cpu.", "sw.dpkg."):
        assert any(k.startswith(prefix) for k in inv), f"no {prefix}* key in {sorted(inv)[:40]}"
    assert inv["os.name"]
    assert int(inv["hw.cpu.cores"]) >= 1
    # the same device by name
    assert admin.device("inv-1")["id"] == agent.device_id

    status = agent.status()
    assert status["device_id"] == agent.device_id
    assert status["inventory_version"] == "1"
    assert status["last_checkin"]
    assert status["outbox"] == 0
    assert status["checkin_interval"] == "1"

    # a command that expires before the agent next checks in never runs
    r = admin.post(
        "/api/v1/commands",
        json={"target": agent.device_id, "kind": "ping", "expires_at": _iso_in(-60)},
    )
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"error", "detail"}
    expiring = admin.command(target=agent.device_id, kind="ping", expires_at=_iso_in(1.5))
    live = admin.command(target=agent.device_id, kind="ping")

    # the first snapshot is the starting point, not history
    hist_url = f"/api/v1/devices/{agent.device_id}/history"
    assert admin.get(hist_url).json() == []

    # a change sent with the device's own key (the real machine can't be changed from here)
    # becomes version 2 with one history row per changed key
    key = agent.device_key()
    delta = {"base": 1, "set": {"e2e.marker": "one"}, "remove": ["os.arch"]}
    body = json.dumps({"inventory": delta}).encode()
    r = admin.http.post(CHECKIN, content=body, headers=signed_headers(key, agent.device_id, body))
    assert r.status_code == 200, r.text
    assert r.json()["inventory_version"] == 2
    assert r.json()["inventory_resync"] is False
    changes = {h["key"]: h for h in admin.get(hist_url).json()}
    assert set(changes) == {"e2e.marker", "os.arch"}
    assert all(h["version"] == 2 for h in changes.values())
    assert (changes["e2e.marker"]["old"], changes["e2e.marker"]["new"]) == (None, "one")
    assert (changes["os.arch"]["old"], changes["os.arch"]["new"]) == (inv["os.arch"], None)
    assert [h["key"] for h in admin.get(hist_url + "?key=e2e.").json()] == ["e2e.marker"]
    detail = admin.device(agent.device_id)
    assert detail["inventory_version"] == 2
    assert detail["inventory"]["e2e.marker"] == "one"
    assert "os.arch" not in detail["inventory"]
    # a delta on a stale base is not applied: the agent is told to send everything again
    r = admin.http.post(CHECKIN, content=body, headers=signed_headers(key, agent.device_id, body))
    assert r.status_code == 200, r.text
    assert r.json()["inventory_resync"] is True
    assert admin.device(agent.device_id)["inventory_version"] == 2

    deadline = datetime.fromisoformat(expiring["expires_at"]).timestamp() + 0.2
    time.sleep(max(0.0, deadline - time.time()))
    res = agent.run_once()
    assert res.returncode == 0, res.stderr
    assert admin.wait_run(expiring["id"], timeout=5)["state"] == "expired"
    pong = admin.wait_run(live["id"], timeout=5)
    assert pong["state"] == "succeeded", pong
    assert pong["result"]["pong"] is True
    # the machine did not change, so the agent sent no inventory: nothing new on the server
    assert admin.device(agent.device_id)["inventory_version"] == 2
    assert {h["version"] for h in admin.get(hist_url).json()} == {2}


def test_commands_run_and_report(e2e: E2E) -> None:
    admin = e2e.admin
    agent = e2e.agent("cmd-1")
    agent.start()
    dev = agent.device_id

    blob = os.urandom(1_100_000)  # several 256 KiB upload chunks
    blob_path = e2e.scratch / "collect me.bin"
    blob_path.write_bytes(blob)
    missing = e2e.scratch / "no-such-file"

    ids = {
        "exec": admin.command(
            target=dev, kind="exec", argv=["sh", "-c", "echo out; echo err >&2; exit 7"]
        ),
        "sh": admin.command(
            target=dev,
            kind="script",
            interpreter="sh",
            script='echo "sh:$1:$2"\necho "n=$#"\n',
            args=["a b", "c"],
        ),
        "python": admin.command(
            target=dev,
            kind="script",
            interpreter="python",
            script="import sys\nprint('py:' + '|'.join(sys.argv[1:]))\nsys.exit(0)\n",
            args=["x", "y z"],
        ),
        "ping": admin.command(target=dev, kind="ping"),
        "reboot": admin.command(target=dev, kind="reboot"),
        "big": admin.command(
            target=dev,
            kind="script",
            interpreter="python",
            script="import sys\nsys.stdout.write('x' * (3 * 1024 * 1024))\n",
        ),
        "timeout": admin.command(target=dev, kind="exec", argv=["sleep", "30"], timeout_s=1),
        "missing_program": admin.command(target=dev, kind="exec", argv=["/nonexistent/prog"]),
        "collect": admin.command(target=dev, kind="collect_file", path=str(blob_path)),
        "collect_missing": admin.command(target=dev, kind="collect_file", path=str(missing)),
        "collect_small_limit": admin.command(
            target=dev, kind="collect_file", path=str(blob_path), max_bytes=1000
        ),
    }
    runs = {name: admin.wait_run(c["id"], timeout=60) for name, c in ids.items()}

    r = runs["exec"]
    assert (r["state"], r["exit_code"]) == ("failed", 7), r
    assert (r["stdout"], r["stderr"], r["truncated"]) == ("out\n", "err\n", False)
    assert r["started_at"] and r["finished_at"] and r["received_at"]

    r = runs["sh"]
    assert (r["state"], r["exit_code"]) == ("succeeded", 0), r
    assert r["stdout"] == "sh:a b:c\nn=2\n"

    r = runs["python"]
    assert (r["state"], r["exit_code"]) == ("succeeded", 0), r
    assert r["stdout"] == "py:x|y z\n"

    r = runs["ping"]
    assert r["state"] == "succeeded", r
    assert r["result"]["pong"] is True
    assert abs(r["result"]["agent_time"] - time.time()) < 120

    r = runs["reboot"]
    assert r["state"] == "succeeded", r
    assert r["result"]["argv"] == ["true"]  # CUSTOS_AGENT_REBOOT_COMMAND: never a real reboot

    r = runs["big"]
    assert (r["state"], r["truncated"]) == ("succeeded", True), {**r, "stdout": "…"}
    assert r["stdout"].startswith("x" * 1000)
    assert "output truncated" in r["stdout"][-300:]
    assert len(r["stdout"]) < 1024 * 1024 + 1000

    r = runs["timeout"]
    assert r["state"] == "failed", r
    assert r["result"]["timed_out"] is True
    assert "timed out" in r["error"]
    assert r["result"]["duration_s"] < 10

    r = runs["missing_program"]
    assert r["state"] == "failed", r
    assert r["exit_code"] is None
    assert "cannot start" in r["error"]

    r = runs["collect"]
    assert r["state"] == "succeeded", r
    digest = hashlib.sha256(blob).hexdigest()
    assert r["result"] == {"size": len(blob), "sha256": digest, "path": str(blob_path)}
    dl = admin.get(f"/api/v1/runs/{r['id']}/file")
    assert dl.status_code == 200, dl.text
    assert dl.content == blob
    assert dl.headers["x-custos-sha256"] == digest
    assert "collect%20me.bin" in dl.headers["content-disposition"]

    r = runs["collect_missing"]
    assert r["state"] == "failed", r
    assert str(missing) in r["error"]
    assert "No such file" in r["error"]
    assert admin.get(f"/api/v1/runs/{r['id']}/file").status_code == 404

    r = runs["collect_small_limit"]
    assert r["state"] == "failed", r
    assert "limit" in r["error"]

    # settings last: it slows the agent's check-ins down to the new interval
    settings = admin.command(target=dev, kind="settings", checkin_interval=7)
    r = admin.wait_run(settings["id"], timeout=20)
    assert r["state"] == "succeeded", r
    assert r["result"] == {"checkin_interval": 7}
    assert agent.status()["checkin_interval"] == "7"

    # every command went through once; the agent is still running and its outbox is empty
    assert agent.running
    wait_for("the outbox to drain", lambda: agent.peek()["outbox"] == 0)
    status = agent.status()
    assert status["outbox"] == 0
    assert status.get("queue_running", 0) == 0
    assert status.get("queue_received", 0) == 0
    assert status["queue_done"] == len(ids) + 1


def test_retired_device_is_refused(e2e: E2E) -> None:
    admin = e2e.admin
    once = e2e.agent("ret-once")
    assert once.run_once().returncode == 0
    running = e2e.agent("ret-running")
    running.start()
    wait_for("the running agent to check in", lambda: running.peek().get("last_checkin"))

    # work queued for the device is cancelled by the retirement
    later = admin.command(target=once.device_id, kind="ping", not_before=_iso_in(3600))

    r = admin.post(f"/api/v1/devices/{once.device_id}/retire")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "retired"
    assert r.json()["retired_at"]
    assert admin.run_of(later["id"])["state"] == "cancelled"  # type: ignore[index]

    res = once.run_once()
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert "retired" in res.stderr or "revoked" in res.stderr, res.stderr

    r = admin.post("/api/v1/commands", json={"target": once.device_id, "kind": "ping"})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "conflict"

    # a long-running agent stops by itself, with the same exit status
    r = admin.post(f"/api/v1/devices/{running.device_id}/retire")
    assert r.status_code == 200, r.text
    wait_for("the running agent to exit", lambda: not running.running, timeout=15)
    assert running.proc is not None and running.proc.returncode == 3
    assert "retired" in running.log_path.read_text()

    devs = admin.get("/api/v1/devices?status=retired").json()
    assert {d["id"] for d in devs} == {once.device_id, running.device_id}
