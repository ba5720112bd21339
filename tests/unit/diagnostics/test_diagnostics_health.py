"""The health numbers and snapshots devices report are cleaned, never trusted."""

from __future__ import annotations

import math

from custos.diagnostics.schemas import HEALTH_FIELDS, clean_health
from custos.diagnostics.service import _bounded, clean_snapshot, snapshot_health


def test_clean_health_drops_odd_values() -> None:
    raw = {
        "mem_total": 8 * 1024**3,
        "mem_available": -5,
        "storage_total": 2**70,
        "storage_free": "lots",
        "battery_pct": 250,
        "uptime_s": math.inf,
        "load1": True,
    }
    assert clean_health(raw) == {
        "mem_total": 8 * 1024**3,
        "mem_available": None,
        "storage_total": None,
        "storage_free": None,
        "battery_pct": None,
        "uptime_s": None,
        "load1": None,
    }
    ok = clean_health({"battery_pct": 55.55, "load1": 0.5, "uptime_s": 12.7, "mem_total": 1.0})
    assert ok["battery_pct"] == 55.5 or ok["battery_pct"] == 55.6
    assert (ok["load1"], ok["uptime_s"], ok["mem_total"]) == (0.5, 12, 1)
    assert set(clean_health({})) == set(HEALTH_FIELDS)


def test_clean_snapshot_keeps_known_fields_of_the_right_type() -> None:
    hostile = {
        "memory": {"total": "16G", "available": 1024, "extra": "x"},
        "disks": [{"mount": "/", "total": 100, "free": 40, "system": "yes"}, "junk"] * 40,
        "processes": [{"pid": 1, "name": "init", "rss": 9, "cmdline": "--password=x"}] * 50,
        "load": [0.5, "high", 1.0, 2.0, 3.0],
        "battery": {"percent": 77, "plugged": "maybe"},
        "secrets": {"token": "abc"},
        "uptime_s": float("nan"),
    }
    snap = clean_snapshot(hostile)
    assert "secrets" not in snap
    assert snap["memory"] == {"total": None, "available": 1024, "used": None, "percent": None}
    assert len(snap["disks"]) == 32 and snap["disks"][0]["system"] is False
    assert len(snap["processes"]) == 10 and "cmdline" not in snap["processes"][0]
    assert snap["load"] == [0.5, None, 1.0]
    assert snap["battery"] == {"percent": 77, "plugged": None, "secs_left": None}
    assert snap["uptime_s"] is None
    health = snapshot_health(snap)
    # no disk claims to be the system one: the mount "/" is
    assert (health["storage_total"], health["storage_free"]) == (100, 40)
    assert health["battery_pct"] == 77 and health["load1"] == 0.5


def test_bounded_data_is_replaced_by_a_note() -> None:
    small = {"a": "x\x00y"}
    assert _bounded(small, 1024) == {"a": "x\ufffdy"}
    big = {"a": "x" * 5000}
    out = _bounded(big, 1024)
    assert list(out) == ["note"] and "5009 bytes" in out["note"]


def test_snapshots_of_the_wrong_shape_give_empty_parts() -> None:
    for odd in ({"disks": 5, "processes": "abc", "memory": []}, {"disks": {"/": 1}}):
        snap = clean_snapshot(odd)
        assert snap["disks"] == [] and snap["processes"] == [] and snap["memory"] is None
        assert set(snapshot_health(odd).values()) == {None}
