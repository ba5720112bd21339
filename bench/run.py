"""Benchmark: an empty device check-in against a bare Starlette hello-world served the same way.

    .venv/bin/python bench/run.py                    # plain HTTP and HTTPS, SQLite and PostgreSQL
    .venv/bin/python bench/run.py --insecure-http    # plain HTTP only
    .venv/bin/python bench/run.py --record           # and add the run to bench/RESULTS.md

Both servers run under uvicorn with uvloop and httptools in one process; wrk replays
pre-signed check-ins (one per enrolled device, round-robin) against each. For each server
the table gives requests/s, p50/p99 latency, the server process's CPU time per request
(from its CPU counters before and after the measured phase) and how many responses were
not 200; then the ratio Custos / hello-world. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkin import BenchDevice, check_one, enrol_devices, write_requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LUA = BENCH / "checkin.lua"
RESULTS = BENCH / "RESULTS.md"
TARGET_RATIO = 0.5
NOISE_CORES = 0.25  # CPU used by other processes during a phase above which we warn
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432"


# --- servers ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process under test."""

    name: str
    argv: list[str]
    url: str
    health: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start it and wait until the health URL answers 200."""
        env = {**os.environ, **self.env}
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                self.argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(self.url + self.health, verify=False, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f}s:\n{self.tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process and any children it has."""
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        total = 0.0
        for q in [p, *p.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = q.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, lines: int = 30) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, since boot)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def postgres_cpu_seconds() -> float:
    """CPU time of every local postgres process (the database's share of a PG check-in)."""
    total = 0.0
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("postgres", "postmaster"):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


# --- PostgreSQL database for the run ----------------------------------------------------


async def _pg_exec(base: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(base + "/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_available(base: str) -> str | None:
    """None if we can reach PostgreSQL at `base`, else why not."""
    try:
        asyncio.run(_pg_exec(base, "SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def pg_server_version(base: str) -> str:
    """The PostgreSQL server version string."""
    import asyncpg

    async def get() -> str:
        conn = await asyncpg.connect(base + "/postgres", timeout=5)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        return asyncio.run(get())
    except Exception:
        return "?"


# --- load ------------------------------------------------------------------------------


def run_wrk(url: str, data: Path, args: argparse.Namespace, seconds: int) -> dict[str, Any]:
    """One wrk run; the WRKJSON summary from bench/checkin.lua, plus wrk's own CPU time."""
    cmd = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
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
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            res: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
            res["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (
                after.ru_stime - before.ru_stime
            )
            res["stdout"] = out.stdout
            return res
    raise RuntimeError(f"no WRKJSON line in wrk's output:\n{out.stdout}\n{out.stderr}")


@dataclass
class Result:
    """One measured phase."""

    server: str
    db: str
    transport: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    wrk_cpu_s: float
    non200: int
    non200_by_status: dict[str, int]
    socket_errors: dict[str, int]
    db_cpu_s: float | None = None
    other_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_req(self) -> float:
        return 1000 * self.cpu_s / self.requests if self.requests else float("nan")

    @property
    def cores(self) -> float:
        return self.cpu_s / self.seconds if self.seconds else 0.0

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.non200 == 0 and not any(self.socket_errors.values())

    @property
    def label(self) -> str:
        return self.server if self.server == "hello-world" else f"custos/{self.db}"


def measure(
    server: Server,
    devices: list[BenchDevice],
    data: Path,
    args: argparse.Namespace,
    *,
    db: str,
    transport: str,
    pg: bool,
) -> Result:
    """Start the server, warm it up, measure one load phase, stop it."""
    print(f"  {server.name} [{transport}]: starting", flush=True)
    server.start()
    try:
        if server.name != "hello-world":
            asyncio.run(check_one(server.url, devices[0]))
        # signed now: valid for signature_skew_s (300 s); warm-up + phase stay far below
        write_requests(data, devices)
        print(f"  {server.name} [{transport}]: warm-up {args.warmup}s", flush=True)
        warm = run_wrk(server.url, data, args, args.warmup)
        if warm["non200"] or warm["errors"]["status"]:
            print(f"    warning: warm-up saw non-200 responses: {warm['non200_by_status']}")
        print(f"  {server.name} [{transport}]: measuring {args.duration}s", flush=True)
        busy0, cpu0, db0 = machine_busy_seconds(), server.cpu_seconds(), postgres_cpu_seconds()
        res = run_wrk(server.url, data, args, args.duration)
        cpu1, db1, busy1 = server.cpu_seconds(), postgres_cpu_seconds(), machine_busy_seconds()
        alive = server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
    if not alive:
        raise RuntimeError(f"{server.name} died during the load phase:\n{server.tail()}")
    errors = {k: int(v) for k, v in res["errors"].items() if k != "status"}
    lat = res["latency_us"]
    r = Result(
        server=server.name,
        db=db,
        transport=transport,
        requests=int(res["requests"]),
        seconds=res["duration_us"] / 1e6,
        p50_ms=lat["p50"] / 1000,
        p99_ms=lat["p99"] / 1000,
        cpu_s=cpu1 - cpu0,
        wrk_cpu_s=res["wrk_cpu_s"],
        non200=max(int(res["non200"]), int(res["errors"]["status"])),
        non200_by_status={k: int(v) for k, v in res["non200_by_status"].items()},
        socket_errors=errors,
        db_cpu_s=(db1 - db0) if pg else None,
        # everything else the machine did meanwhile: other jobs would skew the numbers
        other_cpu_s=max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - res["wrk_cpu_s"] - (db1 - db0)),
    )
    print(
        f"    {r.rps:,.0f} req/s  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  "
        f"CPU {r.cpu_ms_per_req:.3f} ms/req  non-200 {r.non200}",
        flush=True,
    )
    return r


# --- setup -----------------------------------------------------------------------------


@dataclass
class Deployment:
    """One Custos data directory (and database) with enrolled devices."""

    db: str  # "sqlite" | "postgresql"
    data_dir: Path
    db_url: str | None
    devices: list[BenchDevice] = field(default_factory=list)

    def server(self, port: int, transport: str, password: str, args: argparse.Namespace) -> Server:
        custos = Path(sys.executable).parent / "custos"
        argv = [str(custos), "server", "--data-dir", str(self.data_dir), "--port", str(port)]
        if transport == "http":
            argv.append("--insecure-http")
        if self.db_url:
            argv += ["--db", self.db_url]
        env = {"CUSTOS_ADMIN_PASSWORD": password}
        scheme = "http" if transport == "http" else "https"
        return Server(
            name=f"custos/{self.db}",
            argv=argv,
            url=f"{scheme}://127.0.0.1:{port}",
            health="/healthz",
            log=self.data_dir / "server.log",
            env=env,
        )


def hello_server(port: int, transport: str, tls_dir: Path, log: Path) -> Server:
    """The bare Starlette hello-world (bench/hello.py) on `port`."""
    argv = [sys.executable, str(BENCH / "hello.py"), "--port", str(port)]
    if transport == "http":
        argv.append("--insecure-http")
    else:
        argv += [
            "--certfile",
            str(tls_dir / "server.pem"),
            "--keyfile",
            str(tls_dir / "server.key"),
        ]
    scheme = "http" if transport == "http" else "https"
    return Server("hello-world", argv, f"{scheme}://127.0.0.1:{port}", "/", log)


# --- report ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for pkg in ("uvicorn", "uvloop", "httptools", "starlette", "fastapi", "sqlalchemy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0].split(" [")[0] if wrk else "?"
    mem = psutil.virtual_memory().total / 2**30
    return {
        "cpus": f"{os.cpu_count()} (nproc {len(os.sched_getaffinity(0))})",
        "cpu model": model,
        "memory": f"{mem:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
        "load generator": wrk_version,
    }


def fmt_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    """An aligned text table, or a Markdown one."""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def tables(results: list[Result], markdown: bool) -> str:
    """The results table and the ratio table."""
    header = [
        "server",
        "transport",
        "req/s",
        "p50 ms",
        "p99 ms",
        "server CPU ms/req",
        "server CPU cores",
        "PG CPU ms/req",
        "wrk CPU cores",
        "other CPU cores",
        "non-200",
        "valid",
    ]
    rows = []
    for r in results:
        bad = r.non200 + sum(r.socket_errors.values())
        detail = str(r.non200)
        if r.non200_by_status:
            detail += " (" + ", ".join(f"{k}: {v}" for k, v in r.non200_by_status.items()) + ")"
        if any(r.socket_errors.values()):
            detail += " sock " + ",".join(f"{k}={v}" for k, v in r.socket_errors.items() if v)
        rows.append(
            [
                r.label,
                r.transport,
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.cpu_ms_per_req:.3f}",
                f"{r.cores:.2f}",
                "-" if r.db_cpu_s is None else f"{1000 * r.db_cpu_s / max(r.requests, 1):.3f}",
                f"{r.wrk_cpu_s / r.seconds:.2f}" if r.seconds else "-",
                f"{r.other_cpu_s / r.seconds:.2f}" if r.seconds else "-",
                detail,
                "yes" if r.valid and bad == 0 else "**NO**" if markdown else "NO",
            ]
        )
    out = [fmt_table(header, rows, markdown)]
    ratio_rows = []
    for r in results:
        if r.server == "hello-world":
            continue
        base = next(
            (h for h in results if h.server == "hello-world" and h.transport == r.transport), None
        )
        if base is None or not base.rps:
            continue
        ratio = r.rps / base.rps
        ok = r.valid and base.valid
        verdict = ("meets" if ratio >= TARGET_RATIO else "misses") if ok else "invalid (errors)"
        ratio_rows.append(
            [
                r.label,
                r.transport,
                f"{ratio:.1%}",
                f"{r.p50_ms / base.p50_ms:.2f}x" if base.p50_ms else "-",
                f"{r.p99_ms / base.p99_ms:.2f}x" if base.p99_ms else "-",
                f"{r.cpu_ms_per_req / base.cpu_ms_per_req:.2f}x" if base.cpu_s else "-",
                f"{verdict} (target >= {TARGET_RATIO:.0%})",
            ]
        )
    if ratio_rows:
        out.append("")
        out.append(
            fmt_table(
                [
                    "custos / hello-world",
                    "transport",
                    "req/s ratio",
                    "p50 ratio",
                    "p99 ratio",
                    "CPU/req ratio",
                    "throughput target",
                ],
                ratio_rows,
                markdown,
            )
        )
    return "\n".join(out)


def record(path: Path, text: str) -> None:
    """Insert this run at the top of the runs section of RESULTS.md (newest first)."""
    marker = "<!-- runs: newest first; bench/run.py --record inserts below this line -->"
    old = path.read_text() if path.exists() else ""
    if marker not in old:
        old = (
            "# Benchmark results\n\n"
            "Produced by `bench/run.py --record`; see bench/README.md for what is measured.\n\n"
            + marker
            + "\n"
            + old
        )
    head, _, tail = old.partition(marker)
    path.write_text(head + marker + "\n\n" + text.rstrip() + "\n" + tail)


# --- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Empty device check-in vs a bare Starlette hello-world (see bench/README.md)."
    )
    ap.add_argument(
        "--insecure-http", action="store_true", help="plain HTTP only (default: HTTP and HTTPS)"
    )
    ap.add_argument("--https-only", action="store_true", help="HTTPS only")
    ap.add_argument(
        "--db",
        choices=["all", "sqlite", "postgresql"],
        default="all",
        help="which database(s); 'all' skips PostgreSQL with a warning if it is unreachable",
    )
    ap.add_argument(
        "--pg",
        default=os.environ.get("CUSTOS_BENCH_PG", PG_DEFAULT),
        help=f"PostgreSQL server (a database is created and dropped) [{PG_DEFAULT}]",
    )
    ap.add_argument("--devices", type=int, default=1000, help="devices to enrol [1000]")
    ap.add_argument("--duration", type=int, default=15, help="measured seconds per server [15]")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up seconds per server [5]")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections [64]")
    ap.add_argument(
        "--record",
        nargs="?",
        const=str(RESULTS),
        default=None,
        metavar="FILE",
        help="add the run to FILE (default bench/RESULTS.md)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    args = ap.parse_args()
    if args.insecure_http and args.https_only:
        ap.error("--insecure-http and --https-only exclude each other")
    if args.warmup + args.duration > 200:
        ap.error("warm-up + duration must stay well under the 300 s signature window")
    return args


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print(
            "bench: wrk (the HTTP load generator) is not installed.\n"
            "  Debian/Ubuntu: sudo apt-get install -y wrk\n"
            "  macOS:         brew install wrk\n"
            "  other:         https://github.com/wg/wrk (make, then put wrk on PATH)",
            file=sys.stderr,
        )
        return 1
    transports = (
        ["http"] if args.insecure_http else ["https"] if args.https_only else ["http", "https"]
    )
    dbs = ["sqlite", "postgresql"] if args.db == "all" else [args.db]
    pg_note = ""
    if "postgresql" in dbs:
        why = pg_available(args.pg)
        if why is not None:
            if args.db == "postgresql":
                print(f"bench: cannot reach PostgreSQL at {args.pg}: {why}", file=sys.stderr)
                return 1
            pg_note = f"PostgreSQL skipped: cannot reach {args.pg} ({why})"
            print(f"bench: {pg_note}", file=sys.stderr)
            dbs.remove("postgresql")

    started = datetime.now(UTC)
    info = machine()
    if "postgresql" in dbs:
        info["postgresql"] = pg_server_version(args.pg) + " (same machine)"
    tmp = Path(tempfile.mkdtemp(prefix="custos-bench-"))
    password = secrets.token_urlsafe(16)
    pg_db = f"custos_bench_{os.getpid()}"
    results: list[Result] = []
    deployments: list[Deployment] = []
    try:
        for db in dbs:
            url = None
            if db == "postgresql":
                asyncio.run(_pg_exec(args.pg, f'CREATE DATABASE "{pg_db}"'))
                url = args.pg.replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + pg_db
            dep = Deployment(db, tmp / db, url)
            dep.data_dir.mkdir()
            srv = dep.server(free_port(), "http", password, args)
            print(f"setup {db}: enrolling {args.devices} devices", flush=True)
            t0 = time.monotonic()
            srv.start()
            try:
                dep.devices = asyncio.run(enrol_devices(srv.url, password, args.devices))
            finally:
                srv.stop()
            print(f"  enrolled in {time.monotonic() - t0:.1f}s", flush=True)
            deployments.append(dep)

        data = tmp / "requests.lua"
        for transport in transports:
            print(f"{transport}:", flush=True)
            for dep in deployments:
                srv = dep.server(free_port(), transport, password, args)
                results.append(
                    measure(
                        srv,
                        dep.devices,
                        data,
                        args,
                        db=dep.db,
                        transport=transport,
                        pg=dep.db == "postgresql",
                    )
                )
            # the hello-world serves the certificate Custos wrote for itself (HTTPS)
            hello = hello_server(
                free_port(), transport, deployments[0].data_dir / "tls", tmp / "hello.log"
            )
            results.append(
                measure(
                    hello, deployments[0].devices, data, args, db="-", transport=transport, pg=False
                )
            )
    finally:
        if any(d.db == "postgresql" for d in deployments) or "postgresql" in dbs:
            with contextlib.suppress(Exception):
                asyncio.run(_pg_exec(args.pg, f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    command = "make bench  # " if len(sys.argv) == 1 else ""
    command += ".venv/bin/python bench/run.py" + "".join(f" {a}" for a in sys.argv[1:])
    settings = (
        f"{args.devices} devices, wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s (after {args.warmup}s warm-up), empty check-in "
        '`{"results":[],"acks":[]}`'
    )
    invalid = [r for r in results if not r.valid]
    noisy = [r for r in results if r.seconds and r.other_cpu_s / r.seconds > NOISE_CORES]
    noise_note = (
        "Note: other processes used more than "
        f"{NOISE_CORES} cores during "
        + ", ".join(f"{r.label}/{r.transport} ({r.other_cpu_s / r.seconds:.2f})" for r in noisy)
        + "; those numbers are skewed, rerun on a quiet machine."
        if noisy
        else ""
    )
    print()
    print(f"Empty check-in vs hello-world — {settings}")
    print(tables(results, markdown=False))
    if invalid:
        print(
            "\nINVALID: some phases had non-200 responses or socket errors: "
            + ", ".join(f"{r.label}/{r.transport}" for r in invalid)
        )
    if noise_note:
        print(noise_note)
    if pg_note:
        print(pg_note)

    if args.record:
        md = [f"## {started:%Y-%m-%d %H:%M} UTC", "", f"Command: `{command}`", ""]
        md += [f"- {k}: {v}" for k, v in info.items()]
        md += [f"- load: {settings}", ""]
        md.append(tables(results, markdown=True))
        if invalid:
            md += [
                "",
                "**INVALID**: non-200 responses or socket errors in "
                + ", ".join(f"{r.label}/{r.transport}" for r in invalid),
            ]
        if noise_note:
            md += ["", noise_note]
        if pg_note:
            md += ["", pg_note]
        record(Path(args.record), "\n".join(md) + "\n")
        print(f"\nrecorded in {args.record}")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
