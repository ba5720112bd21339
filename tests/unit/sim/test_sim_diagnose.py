"""Simulated devices answer `diagnose` with a snapshot of the agent's shape."""

from __future__ import annotations

from custos.diagnostics.service import clean_snapshot, snapshot_health
from custos.sim.fleet import SimDevice, simulate


def test_simulated_snapshot_has_the_agents_shape_and_plausible_numbers() -> None:
    dev = SimDevice(7, seed=1)
    dev.device_id = "a" * 32
    result = simulate(dev, "diagnose", {})
    assert result["state"] == "succeeded" and result["result"]["simulated"] is True
    snap = result["result"]["snapshot"]
    # nothing is lost or retyped when the server cleans it: same shape as a real agent's
    assert clean_snapshot(snap) == snap
    health = snapshot_health(clean_snapshot(snap))
    assert health["mem_total"] == int(dev.inventory()["hw.memory.total_bytes"])
    assert 0 < health["mem_available"] < health["mem_total"]
    assert health["storage_total"] > health["storage_free"] > 0
    assert health["uptime_s"] >= 60 and 0 < health["load1"] < 2
    rss = [p["rss"] for p in snap["processes"]]
    assert rss == sorted(rss, reverse=True)
    # steady for one device (the same disks and processes on the next call)
    again = simulate(dev, "diagnose", {})["result"]["snapshot"]
    assert again["disks"] == snap["disks"] and again["processes"] == snap["processes"]
