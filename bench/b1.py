"""B1: empty check-ins per second and server CPU per check-in, 100,000 devices on PostgreSQL,
1 and 2 server processes, against a bare Starlette hello-world served the same way.

Load generator: wrk (a separate process) replaying pre-signed empty check-ins, one per device,
round-robin (bench/checkin.lua); the hello-world gets byte-identical requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkin import EMPTY_CHECKIN, check_one, write_requests
from common import (
    BENCH,
    Server,
    fmt_table,
    free_port,
    machine_busy_seconds,
    postgres_cpu_seconds,
)
from custos.sim.fleet import SimFleet
from deploy import Deployment

LUA = BENCH / "checkin.lua"
TARGET_RATIO = 0.5
SIGNATURE_WINDOW_S = 300


def run_wrk(url: str, data: Path, args: argparse.Namespace, seconds: int) -> dict[str, Any]:
    """One wrk run; the WRKJSON summary from bench/checkin.lua, plus wrk's own CPU time."""
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s"]
    cmd += [
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA),
        url,
        "--",
        str(data),
        str(args.threads),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            res: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
            res["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (
                after.ru_stime - before.ru_stime
            )
            return res
    raise RuntimeError(f"no WRKJSON line in wrk's output:\n{out.stdout}\n{out.stderr}")


@dataclass
class Result:
    """One measured phase."""

    server: str
    workers: int
    transport: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    db_cpu_s: float
    wrk_cpu_s: float
    other_cpu_s: float
    non200: int
    non200_by_status: dict[str, int] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.requests if self.requests else float("nan")

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.non200 == 0 and not any(self.socket_errors.values())


def measure(
    srv: Server, fleet: SimFleet, data: Path, args: argparse.Namespace, workers: int, tr: str
) -> Result:
    """Start the server, sign, warm up, measure one wrk phase, stop it."""
    print(f"  {srv.name} [{tr}]: starting", flush=True)
    srv.start()
    try:
        devices = [d for d in fleet.devices if d.enrolled]
        if srv.name.startswith("custos"):
            # one Ed25519-signed request per device opens its session; the check-ins that
            # wrk replays are then HMAC-signed with the session key, as an agent's are
            t0 = time.monotonic()
            asyncio.run(fleet.open_sessions(devices, srv.url))
            print(f"  {srv.name} [{tr}]: {len(devices)} sessions in {time.monotonic() - t0:.1f}s")
            asyncio.run(check_one(fleet, devices[0], srv.url))
        signed = time.monotonic()
        asyncio.run(write_requests(data, fleet, devices))
        if time.monotonic() - signed + args.warmup + args.duration > SIGNATURE_WINDOW_S - 30:
            raise RuntimeError("signing took too long: the requests would expire mid-run")
        print(f"  {srv.name} [{tr}]: warm-up {args.warmup}s", flush=True)
        run_wrk(srv.url, data, args, args.warmup)
        print(f"  {srv.name} [{tr}]: measuring {args.duration}s", flush=True)
        busy0, cpu0, db0 = machine_busy_seconds(), srv.cpu_seconds(), postgres_cpu_seconds()
        res = run_wrk(srv.url, data, args, args.duration)
        cpu1, db1, busy1 = srv.cpu_seconds(), postgres_cpu_seconds(), machine_busy_seconds()
        alive = srv.running
    finally:
        srv.stop()
    if not alive:
        raise RuntimeError(f"{srv.name} died during the load phase:\n{srv.tail()}")
    lat = res["latency_us"]
    r = Result(
        server="custos" if srv.name.startswith("custos") else "hello-world",
        workers=workers,
        transport=tr,
        requests=int(res["requests"]),
        seconds=res["duration_us"] / 1e6,
        p50_ms=lat["p50"] / 1000,
        p99_ms=lat["p99"] / 1000,
        cpu_s=cpu1 - cpu0,
        db_cpu_s=db1 - db0,
        wrk_cpu_s=res["wrk_cpu_s"],
        other_cpu_s=max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - res["wrk_cpu_s"] - (db1 - db0)),
        non200=max(int(res["non200"]), int(res["errors"]["status"])),
        non200_by_status={k: int(v) for k, v in res["non200_by_status"].items()},
        socket_errors={k: int(v) for k, v in res["errors"].items() if k != "status"},
    )
    print(
        f"    {r.rps:,.0f} req/s  p99 {r.p99_ms:.2f} ms  CPU {r.cpu_ms:.3f} ms/req  "
        f"non-200 {r.non200}",
        flush=True,
    )
    return r


def tables(results: list[Result], markdown: bool) -> str:
    """The measurements, then Custos ÷ hello-world for the same transport and processes."""
    header = ["server", "processes", "transport", "req/s", "p50 ms", "p99 ms"]
    header += ["server CPU ms/req", "PG CPU ms/req", "wrk cores", "other cores", "non-200"]
    rows = []
    for r in results:
        bad = str(r.non200) + "".join(f" {k}={v}" for k, v in r.socket_errors.items() if v)
        rows.append(
            [
                r.server,
                str(r.workers),
                r.transport,
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.cpu_ms:.3f}",
                f"{1000 * r.db_cpu_s / max(r.requests, 1):.3f}",
                f"{r.wrk_cpu_s / r.seconds:.2f}" if r.seconds else "-",
                f"{r.other_cpu_s / r.seconds:.2f}" if r.seconds else "-",
                bad,
            ]
        )
    out = [fmt_table(header, rows, markdown), ""]
    ratio_rows = []
    for r in results:
        base = next(
            (
                h
                for h in results
                if h.server == "hello-world"
                and (h.workers, h.transport) == (r.workers, r.transport)
            ),
            None,
        )
        if r.server != "custos" or base is None or not base.rps:
            continue
        ratio = r.rps / base.rps
        verdict = ("meets" if ratio >= TARGET_RATIO else "misses") if r.valid else "invalid"
        ratio_rows.append(
            [
                str(r.workers),
                r.transport,
                f"{ratio:.1%}",
                f"{r.cpu_ms / base.cpu_ms:.1f}x" if base.cpu_s else "-",
                f"{verdict} (target >= {TARGET_RATIO:.0%})",
            ]
        )
    out.append(
        fmt_table(
            ["processes", "transport", "custos/hello req/s", "CPU/req ratio", "target"],
            ratio_rows,
            markdown,
        )
    )
    return "\n".join(out)


def run(args: argparse.Namespace, dep: Deployment, info: dict[str, Any]) -> tuple[str, bool]:
    """Every phase; (markdown report, all valid)."""
    fleet = SimFleet("http://unused", "", count=args.devices)
    fleet.load(dep.fleet_file)
    transports = ["http", "https"] if args.transport == "both" else [args.transport]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="custos-b1-") as tmp:
        data = Path(tmp) / "requests.txt"
        for tr in transports:
            for workers in args.workers:
                srv = dep.server(transport=tr, workers=workers)
                results.append(measure(srv, fleet, data, args, workers, tr))
                argv = [str(Path(args.python)), str(BENCH / "hello.py"), "--workers", str(workers)]
                port = free_port()
                argv += ["--port", str(port)]
                if tr == "http":
                    argv.append("--insecure-http")
                else:
                    tls = dep.data_dir / "tls"
                    argv += [
                        "--certfile",
                        str(tls / "server.pem"),
                        "--keyfile",
                        str(tls / "server.key"),
                    ]
                scheme = "http" if tr == "http" else "https"
                hello = Server(
                    "hello-world", argv, f"{scheme}://127.0.0.1:{port}", "/", dep.root / "hello.log"
                )
                results.append(measure(hello, fleet, data, args, workers, tr))
    settings = (
        f"{args.devices:,} devices enrolled on PostgreSQL, wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s (after {args.warmup}s warm-up), empty check-in "
        f"`{EMPTY_CHECKIN.decode()}`; load generator: wrk with bench/checkin.lua (own process)"
    )
    print()
    print(f"B1 empty check-ins vs hello-world — {settings}")
    print(tables(results, markdown=False))
    md = f"### B1 empty check-ins\n\n{settings}\n\n{tables(results, markdown=True)}\n"
    return md, all(r.valid for r in results)
