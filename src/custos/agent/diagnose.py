"""The `diagnose` command: a health snapshot of this machine (memory, disks, load, processes).

Processes are listed by pid, name and resident memory only: command lines and environments
can hold passwords and tokens, and they never leave the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psutil

from custos.agent.inventory import _SKIP_FSTYPES

log = logging.getLogger(__name__)

MAX_DISKS = 24
TOP_PROCESSES = 10
MAX_NAME = 100
CPU_SAMPLE_S = 0.2


def _disks() -> list[dict[str, Any]]:
    """Usage of the real file systems (pseudo, network and loop mounts left out)."""
    system_drive = os.environ.get("SYSTEMDRIVE", "C:").upper() + "\\"
    out: list[dict[str, Any]] = []
    try:
        partitions = sorted(psutil.disk_partitions(all=False), key=lambda p: p.mountpoint)
    except OSError as exc:
        log.debug("diagnose: disk_partitions failed: %s", exc)
        return out
    for part in partitions:
        fstype = part.fstype.lower()
        if fstype in _SKIP_FSTYPES or part.device.startswith("/dev/loop"):
            continue
        if fstype == "overlay" and part.mountpoint != "/":
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue  # an empty card reader, a mount that went away
        system = (
            part.mountpoint.upper() == system_drive
            if sys.platform == "win32"
            else part.mountpoint == "/"
        )
        out.append(
            {
                "mount": part.mountpoint[:4096],
                "fstype": part.fstype[:50],
                "total": usage.total,
                "used": usage.used,
                "free": usage.free,
                "percent": usage.percent,
                "system": system,
            }
        )
        if len(out) >= MAX_DISKS:
            break
    return out


def _top_processes() -> tuple[list[dict[str, Any]], int]:
    """The processes holding the most resident memory, and how many processes there are."""
    procs: list[tuple[int, int, str]] = []
    for p in psutil.process_iter(["pid", "name", "memory_info"]):
        info = p.info
        mem = info.get("memory_info")
        if mem is None:
            continue  # a process we may not look at
        procs.append((int(mem.rss), int(info["pid"]), str(info.get("name") or "")[:MAX_NAME]))
    procs.sort(reverse=True)
    top = [{"pid": pid, "name": name, "rss": rss} for rss, pid, name in procs[:TOP_PROCESSES]]
    return top, len(procs)


def _battery() -> dict[str, Any] | None:
    sensors_battery = getattr(psutil, "sensors_battery", None)
    if sensors_battery is None:
        return None
    try:
        b = sensors_battery()
    except (OSError, RuntimeError):
        return None
    if b is None:
        return None
    secs = b.secsleft if isinstance(b.secsleft, int) and b.secsleft >= 0 else None
    return {"percent": round(float(b.percent), 1), "plugged": b.power_plugged, "secs_left": secs}


def snapshot() -> dict[str, Any]:
    """The health of this machine now (blocking: call it in a thread)."""
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    load: list[float] | None = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in psutil.getloadavg()]
    boot = psutil.boot_time()
    processes, count = _top_processes()
    return {
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "memory": {
            "total": vm.total,
            "available": vm.available,
            "used": vm.used,
            "percent": vm.percent,
        },
        "swap": {
            "total": swap.total,
            "used": swap.used,
            "free": swap.free,
            "percent": swap.percent,
        },
        "disks": _disks(),
        "load": load,
        "cpu": {
            "count": psutil.cpu_count(logical=True),
            "percent": psutil.cpu_percent(interval=CPU_SAMPLE_S),
        },
        "uptime_s": max(0, int(time.time() - boot)),
        "boot_time": datetime.fromtimestamp(round(boot), tz=UTC).isoformat(),
        "battery": _battery(),
        "process_count": count,
        "processes": processes,
    }
