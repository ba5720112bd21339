"""B9 (issue 7 §6): DevInfo-only OMA DM sessions per second, session state on PostgreSQL,
against the native agent's empty check-in on the same server.

    .venv/bin/python bench/run.py b9 [--devices 200] [--concurrency 64] [--duration 15]

A fresh PostgreSQL database (`custos_b9`, dropped and re-made each run, with its own state
directory var/bench/b9) gets N enrolled agents (bench/deploy.py, as B1-B5) and one
`custos server` process (https) with CUSTOS_OMADM_INVENTORY_INTERVAL_S at its maximum, so
a device's DevDetail is read in its first session only. Then, one load generator process at
a time against that server:

- baseline: the native empty check-in, N agents, C in flight (bench/loadgen.py checkin,
  B2's baseline, unchanged);
- OMA DM: bench/omadm_loadgen.py registers N devices through the admin API, runs one whole
  session per device (warm-up: DevInfo, then the DevDetail Gets), then loops sessions with
  C in flight: each one message each way, package 1 (Alert 1201 + Replace of ./DevInfo,
  md5 Cred on the previous NextNonce) → Status 212, no management commands, session over.

Server and PostgreSQL CPU are read (psutil) at the start and end of each measured phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from common import BENCH, fmt_table, machine_busy_seconds, pg_exec, postgres_cpu_seconds
from deploy import Deployment, default_root, ensure
from fleetbench import LoadGen, _children_cpu, _ms

DB_NAME = "custos_b9"
DM_LOADGEN = BENCH / "omadm_loadgen.py"
INVENTORY_INTERVAL_S = 30 * 86400  # the setting's maximum: DevDetail only in the warm-up


class DmLoadGen(LoadGen):
    """bench/omadm_loadgen.py and its JSON events (LoadGen's reader and waits)."""

    def __init__(self, dep: Deployment, url: str, devices: int, *extra: str) -> None:
        argv = [sys.executable, str(DM_LOADGEN), "--url", url, "--ca-file", str(dep.ca_file)]
        argv += ["--password", dep.state()["password"], "--devices", str(devices), *extra]
        self.cpu0 = _children_cpu()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.last: dict[str, Any] = {}


async def _session_rows(dep: Deployment) -> int:
    import asyncpg

    conn = await asyncpg.connect(f"{dep.pg_base}/{dep.db_name}", timeout=5)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM omadm_sessions"))
    finally:
        await conn.close()


def _measure(srv: Any, lg: LoadGen, timeout: float) -> dict[str, Any]:
    """The result, and server/PostgreSQL/machine CPU over the measured phase."""
    lg.wait_for(lambda e: e["event"] == "measuring", 1800, "the measured phase")
    t0, busy0 = time.monotonic(), machine_busy_seconds()
    cpu0, pg0 = srv.cpu_seconds(), postgres_cpu_seconds()
    res = lg.wait_for(lambda e: e["event"] == "result", timeout, "the result")
    busy1 = machine_busy_seconds()
    cpu1, pg1, t1 = srv.cpu_seconds(), postgres_cpu_seconds(), time.monotonic()
    lg.proc.wait(30)
    ops = res.get("sessions", res.get("checkins", 0))
    wall = max(t1 - t0, 1e-9)
    return {
        **res,
        "ops": ops,
        "rate": ops / res["seconds"],
        "server_ms": 1000 * (cpu1 - cpu0) / max(ops, 1),
        "pg_ms": 1000 * (pg1 - pg0) / max(ops, 1),
        "server_pct": 100 * (cpu1 - cpu0) / wall,
        "busy_pct": 100 * (busy1 - busy0) / wall / (os.cpu_count() or 1),
        "loadgen_cpu_s": _children_cpu() - lg.cpu0,
    }


def _row(label: str, unit: str, r: dict[str, Any], ratio: str, target: str) -> list[str]:
    return [
        label,
        f"{r['rate']:,.0f} {unit}",
        _ms(r["p50_ms"]),
        _ms(r["p99_ms"]),
        f"{r['server_ms']:.3f}",
        f"{r['pg_ms']:.3f}",
        f"{r['server_pct']:.0f} %",
        f"{r['busy_pct']:.0f} %",
        f"{r['loadgen_cpu_s']:.1f}",
        str(r["errors"]),
        ratio,
        target,
    ]


def run(args: argparse.Namespace) -> tuple[str, bool]:
    """Fresh database, baseline, DM sessions; the Markdown for RESULTS.md and whether clean."""
    n, c, d = args.devices, args.concurrency, args.duration
    client = ["--httpx"] if getattr(args, "httpx", False) else []
    root = (args.state_dir or default_root()) / "b9"
    dep = Deployment(root, args.pg, db_name=DB_NAME)
    asyncio.run(pg_exec(args.pg, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    shutil.rmtree(root, ignore_errors=True)
    ensure(dep, n, args.enrol)
    srv = dep.server(
        transport=args.transport,
        workers=args.workers[0],
        env={"CUSTOS_OMADM_INVENTORY_INTERVAL_S": str(INVENTORY_INTERVAL_S)},
    )
    rows: list[list[str]] = []
    ok = True
    notes: list[str] = []
    srv.start()
    try:
        print(f"  B9 native empty check-ins (baseline): {n} agents, {c} in flight", flush=True)
        lg = LoadGen(
            dep, srv.url, "checkin", n,
            "--duration", str(d), "--commands", "0", "--concurrency", str(c), *client,
        )  # fmt: skip
        base = _measure(srv, lg, d + 600)
        ok = ok and base["errors"] == 0
        rows.append(_row("native empty check-ins (baseline)", "check-ins/s", base, "1", "-"))
        print(f"    {rows[-1]}", flush=True)

        print(f"  B9 OMA DM DevInfo-only sessions: {n} DM devices, {c} in flight", flush=True)
        lg = DmLoadGen(dep, srv.url, n, "--duration", str(d), "--concurrency", str(c), *client)
        reg = lg.wait_for(lambda e: e["event"] == "registered", 1800, "the registrations")
        warm = lg.wait_for(lambda e: e["event"] == "warmed", 1800, "the warm-up")
        res = _measure(srv, lg, d + 600)
        ok = ok and res["errors"] == 0
        ratio = f"{res['rate'] / base['rate']:.3f}" if base["rate"] else "-"
        rows.append(_row("OMA DM DevInfo-only sessions", "sessions/s", res, ratio, "no target"))
        print(f"    {rows[-1]}", flush=True)
        if res["errors"]:
            notes.append(f"last DM error: {res['last_error']}")
        notes.append(
            f"registration of {reg['devices']} DM devices through the admin API "
            f"{reg['seconds']:.1f} s; warm-up (whole first sessions, "
            f"{warm['messages_per_session']:.1f} messages each) {warm['seconds']:.1f} s; "
            f"package 1 is {res['request_bytes']} bytes; DM load generator CPU in the "
            f"measured phase {res['loadgen_measured_cpu_s']:.1f} s; omadm_sessions rows at "
            f"the end {asyncio.run(_session_rows(dep)):,}"
        )
    finally:
        srv.stop()
        if not getattr(args, "keep", False):
            asyncio.run(pg_exec(args.pg, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    header = ["phase", "rate", "p50 ms", "p99 ms", "server CPU ms/op", "PostgreSQL CPU ms/op"]
    header += ["server CPU (100 % = 1 core)", f"machine busy ({os.cpu_count()} CPUs)"]
    header += ["load-gen CPU s (whole run)", "errors", "ratio to check-ins", "target"]
    kind = "httpx" if client else "bare keep-alive HTTP/1.1 connections (bench/rawhttp.py)"
    settings = (
        f"{n:,} agents and {n:,} OMA DM devices (md5 both ways) on PostgreSQL (fresh database "
        f"{DB_NAME}), {c} requests in flight, {d:.0f}s each, {args.workers[0]} server "
        f"process(es), {args.transport}; a DM session = one message each way (package 1: "
        "Alert 1201 + Replace of 5 ./DevInfo nodes, md5 Cred → Status 212 + NextNonce, no "
        "management commands), a new SessionID each time; omadm_inventory_interval_s = 30 d, "
        "DevDetail read in the warm-up only; load generators, each in its own process, over "
        f"{kind}: bench/loadgen.py checkin (baseline) and bench/omadm_loadgen.py; "
        "CPU per op = psutil CPU time over the measured phase ÷ ops; machine busy = all "
        "processes (a busy machine with a server below 100 % = another job was competing)"
    )
    text = fmt_table(header, rows, False)
    print(f"\nB9 OMA DM sessions — {settings}\n{text}")
    for note in notes:
        print(f"  {note}")
    md = f"### B9 OMA DM DevInfo-only sessions\n\n{settings}\n\n{fmt_table(header, rows, True)}\n"
    if notes:
        md += "\n" + "\n".join(f"- {x}" for x in notes) + "\n"
    return md, ok
