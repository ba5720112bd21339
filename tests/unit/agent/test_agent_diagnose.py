"""The agent's health snapshot: its shape, its numbers, and what it never contains."""

from __future__ import annotations

import json
import os

import psutil

from custos.agent import diagnose
from custos.diagnostics.service import clean_snapshot, snapshot_health


def test_snapshot_shape_and_numbers_of_this_machine() -> None:
    snap = diagnose.snapshot()
    mem = snap["memory"]
    assert mem["total"] == psutil.virtual_memory().total
    assert 0 < mem["available"] <= mem["total"]
    assert set(snap["swap"]) == {"total", "used", "free", "percent"}
    assert snap["uptime_s"] > 0 and snap["boot_time"].endswith("+00:00")
    assert snap["load"] is not None and len(snap["load"]) == 3
    assert snap["cpu"]["count"] == psutil.cpu_count(logical=True)
    # the root file system is there and marked as the system disk
    root = [d for d in snap["disks"] if d["mount"] == "/"]
    assert len(root) == 1 and root[0]["system"] is True
    assert root[0]["total"] >= root[0]["free"] > 0
    assert not any(d["mount"].startswith(("/proc", "/sys")) for d in snap["disks"])
    # the top processes by resident memory, largest first, this one among the processes
    procs = snap["processes"]
    assert 0 < len(procs) <= diagnose.TOP_PROCESSES <= snap["process_count"]
    rss = [p["rss"] for p in procs]
    assert rss == sorted(rss, reverse=True)
    assert all(set(p) == {"pid", "name", "rss"} for p in procs)
    # it is plain JSON, small enough for a run result
    assert len(json.dumps(snap)) < 16_000
    # what the server reads from it
    health = snapshot_health(clean_snapshot(snap))
    assert health["mem_total"] == mem["total"]
    assert health["storage_total"] == root[0]["total"]
    assert health["uptime_s"] == snap["uptime_s"] and health["load1"] == snap["load"][0]


def test_snapshot_never_carries_command_lines_or_environments(monkeypatch) -> None:
    # a secret in this process's command line and environment stays on the device
    secret = "hunter2-" + os.urandom(4).hex()
    monkeypatch.setenv("CUSTOS_TEST_SECRET", secret)
    snap = diagnose.snapshot()
    text = json.dumps(snap)
    assert secret not in text
    assert "cmdline" not in text and "environ" not in text
