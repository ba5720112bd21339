"""B8 (reports issue): report queries over 100,000 devices x 200 installed applications.

    .venv/bin/python bench/b8_reports.py [--devices 100000] [--apps 200] [--runs 30] [--record]
    .venv/bin/python bench/run.py b8 --devices 10000        # the same, through run.py

A fresh PostgreSQL database (`custos_b8`, dropped and re-made each run) is migrated to the
newest schema and seeded with COPY (asyncpg, binary): devices with facts and a full
inventory JSON each, 20 groups, and `installed_software` with the same software
(constraints and indexes dropped for the load and rebuilt after, then VACUUM ANALYZE).
The software mix is skewed like a real fleet: ~120 packages on nearly every device, the rest
drawn from a long tail of 4,000, a few versions each.

Measured, in this process (the service call, as the API route makes it) and over HTTP
through a real `custos server` process (plain HTTP, one request at a time, so the round trip
is the server's time plus a local socket): the device page with a filter, "who has X" for
a common and a rare package, top-20 software; p50/p95 over `--runs` runs, the cases
interleaved so that no case runs on a cache warmed only for it. Baselines in the same run:
a `SELECT 1` round trip, and a bare `SELECT count(*) FROM installed_software`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx

from common import (
    PG_DEFAULT,
    RESULTS,
    Server,
    fmt_table,
    free_port,
    machine,
    pg_exec,
    pg_server_version,
    record,
)

DB_NAME = "custos_b8"
PASSWORD = "bench-b8-password"
GROUPS = 20
CATALOG = 4000
BASE = 120  # packages nearly every device has
COMMON = "libc6"  # package 0: on ~99 % of devices
RARE = "pkg-rare"  # on one device in 2,000 (50 at 100,000)
OSES = [("Ubuntu", "24.04", 40), ("Debian", "12", 20), ("Windows", "11", 30), ("macOS", "15", 10)]
MODELS = [
    ("LENOVO", "ThinkPad T14 Gen 4"),
    ("LENOVO", "ThinkPad X1 Carbon Gen 11"),
    ("Dell Inc.", "Latitude 5440"),
    ("Dell Inc.", "OptiPlex 7010"),
    ("HP", "EliteBook 840 G10"),
    ("HP", "ProDesk 400 G9"),
    ("Apple Inc.", "MacBookPro18,3"),
    ("Raspberry Pi Foundation", "Raspberry Pi 5 Model B"),
    ("Intel Corporation", "NUC13ANHi5"),
]
SITES = ["berlin", "paris", "oslo", "lisbon", "vienna", "madrid", "prague", "dublin"]

TARGETS_MS = {"device page": 100.0, "who has": 100.0, "top-20": 300.0}


# --------------------------------------------------------------------------- the fleet


def catalog(rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """(source, name, versions) for every package; index 0 is the most common."""
    out = [("dpkg", COMMON, ["2.39-0ubuntu8.4", "2.36-9+deb12u9", "2.39-0ubuntu8.3"])]
    for i in range(1, CATALOG):
        source = "pip" if i % 7 == 0 else ("winreg" if i % 11 == 0 else "dpkg")
        name = f"pkg-base-{i:04d}" if i < BASE else f"pkg-tail-{i:04d}"
        versions = [f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}"]
        versions += [f"{versions[0]}-{k}" for k in range(1, rng.randint(1, 5))]
        out.append((source, name, versions))
    return out


def device_software(
    rng: random.Random, cat: list[tuple[str, str, list[str]]], apps: int, index: int
) -> list[tuple[str, str, str]]:
    """`apps` packages: the base set (97 % each) topped up from a Zipf-like tail."""
    chosen: set[int] = {0} if rng.random() < 0.99 else set()
    chosen.update(i for i in range(1, BASE) if rng.random() < 0.97)
    tail = CATALOG - BASE
    while len(chosen) < apps:
        # 1/x-like popularity over the tail, without numpy
        chosen.add(BASE + min(tail - 1, int(tail ** rng.random()) - 1))
    out = []
    for i in sorted(chosen)[:apps]:
        source, name, versions = cat[i]
        # the first version is the common one
        v = versions[0] if rng.random() < 0.7 else rng.choice(versions)
        out.append((source, name, v))
    if index % 2000 == 7:
        out[-1] = ("dpkg", RARE, "0.9.1")
    return out


async def seed(dsn: str, devices: int, apps: int, seed_value: int = 8) -> dict[str, float]:
    """Fill the migrated database; returns how long each step took (s)."""
    import asyncpg

    rng = random.Random(seed_value)  # benchmark data, not security
    cat = catalog(rng)
    now = datetime.now(UTC)
    times: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        # constraints and secondary indexes off for the load, rebuilt in bulk after
        await conn.execute(
            "ALTER TABLE installed_software "
            "DROP CONSTRAINT fk_installed_software_device_id_devices, "
            "DROP CONSTRAINT pk_installed_software"
        )
        await conn.execute(
            "DROP INDEX ix_installed_software_name_version, ix_installed_software_source_name"
        )
        await conn.copy_records_to_table(
            "groups",
            records=[(g + 1, f"site-{g:02d}", "", now) for g in range(GROUPS)],
            columns=["id", "name", "description", "created_at"],
        )
        t0 = time.monotonic()
        dev_cols = [
            "id", "name", "status", "public_key", "cert_serial", "cert_pem", "cert_not_after",
            "facts", "enrolled_at", "agent_version", "inventory", "inventory_version",
            "last_seen", "inventory_updated_at", "retired_at",
        ]  # fmt: skip
        chunk = 5000
        for start in range(0, devices, chunk):
            dev_rows, sw_rows, dg_rows = [], [], []
            for i in range(start, min(devices, start + chunk)):
                device_id = f"{i:08x}{rng.getrandbits(96):024x}"
                os_name, os_version, _w = rng.choices(OSES, weights=[o[2] for o in OSES])[0]
                maker, model = rng.choice(MODELS)
                site = SITES[i % len(SITES)]
                name = f"{site}-{rng.choice(('lt', 'ws', 'kiosk'))}-{i:06d}"
                facts = {
                    "os.name": os_name,
                    "os.version": os_version,
                    "os.hostname": name,
                    "hw.manufacturer": maker,
                    "hw.model": model,
                    "hw.serial": f"SN{i:08d}",
                }
                software = device_software(rng, cat, apps, i)
                inventory = {**facts, **{f"sw.{s}.{n}": v for s, n, v in software}}
                enrolled = now - timedelta(days=rng.uniform(0, 3 * 365))
                seen = (
                    None if rng.random() < 0.02 else now - timedelta(hours=rng.expovariate(1 / 48))
                )
                retired = rng.random() < 0.01
                dev_rows.append(
                    (
                        device_id, name, "retired" if retired else "active", b"k" * 32,
                        f"{i:016x}", "", now + timedelta(days=365), json.dumps(facts),
                        enrolled, "1.0.0", json.dumps(inventory), 1, seen, enrolled,
                        now if retired else None,
                    )
                )  # fmt: skip
                sw_rows.extend((device_id, s, n, v) for s, n, v in software)
                dg_rows.append((device_id, 1 + i % GROUPS))
            await conn.copy_records_to_table("devices", records=dev_rows, columns=dev_cols)
            await conn.copy_records_to_table(
                "installed_software",
                records=sw_rows,
                columns=["device_id", "source", "name", "version"],
            )
            await conn.copy_records_to_table(
                "device_groups", records=dg_rows, columns=["device_id", "group_id"]
            )
            done = min(devices, start + chunk)
            if done % 20_000 == 0 or done == devices:
                print(f"  seeded {done:,} devices ({time.monotonic() - t0:.0f} s)", flush=True)
        times["copy"] = time.monotonic() - t0
        t0 = time.monotonic()
        await conn.execute(
            "ALTER TABLE installed_software ADD CONSTRAINT pk_installed_software "
            "PRIMARY KEY (device_id, source, name)"
        )
        await conn.execute(
            "CREATE INDEX ix_installed_software_name_version "
            "ON installed_software (name, version, source, device_id)"
        )
        await conn.execute(
            "CREATE INDEX ix_installed_software_source_name ON installed_software (source, name)"
        )
        await conn.execute(
            "ALTER TABLE installed_software ADD CONSTRAINT fk_installed_software_device_id_devices "
            "FOREIGN KEY (device_id) REFERENCES devices (id) ON DELETE CASCADE"
        )
        times["indexes"] = time.monotonic() - t0
        t0 = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        times["vacuum analyze"] = time.monotonic() - t0
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        times["database GiB"] = size / 2**30
    finally:
        await conn.close()
    return times


# --------------------------------------------------------------------------- timing


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


async def measure(
    cases: dict[str, Callable[[], Awaitable[Any]]], runs: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Milliseconds per call for each case, the cases interleaved run by run."""
    out: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(warmup + runs):
        for name, fn in cases.items():
            t = time.perf_counter()
            await fn()
            ms = (time.perf_counter() - t) * 1000
            if i >= warmup:
                out[name].append(ms)
    return out


def rows_for(
    times: dict[str, list[float]], where: str, base_ms: float, targets: dict[str, str]
) -> list[list[str]]:
    rows = []
    for name, ms in times.items():
        target = targets.get(name, "")
        verdict = ""
        if target:
            limit = TARGETS_MS[target]
            verdict = f"< {limit:g} ms: " + ("meets" if pct(ms, 0.95) < limit else "misses")
        rows.append(
            [
                where,
                name,
                str(len(ms)),
                f"{statistics.median(ms):.1f}",
                f"{pct(ms, 0.95):.1f}",
                f"{statistics.median(ms) / base_ms:.0f}x",
                verdict,
            ]
        )
    return rows


async def in_process(dsn_sa: str, runs: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Time the service calls in this process."""
    from sqlalchemy import text

    from custos.db.engine import Database
    from custos.reports.service import ReportService

    db = Database(dsn_sa, pool_size=4)
    svc = ReportService(db)
    extra: dict[str, Any] = {}
    try:
        t = time.monotonic()
        await svc.refresh_summary(force=True)
        extra["summary refresh s"] = time.monotonic() - t
        one_group = frozenset({1})
        page = await svc.devices_page(None, os="Ubuntu", limit=50)
        extra["ubuntu devices (total shown)"] = (
            f"{page.total:,} (estimate: {page.total_is_estimate})"
        )
        common = await svc.who_has(None, COMMON, limit=50)
        rare = await svc.who_has(None, RARE, limit=50)
        extra["who has common / rare"] = f"{common.total:,} / {rare.total:,} devices"
        baseline = {
            "SELECT 1 (baseline)": lambda: db.scalar(text("SELECT 1"), {}),
        }
        base = await measure(baseline, runs)
        counts = await measure(
            {
                "count(*) installed_software (baseline)": lambda: db.scalar(
                    text("SELECT count(*) FROM installed_software"), {}
                )
            },
            runs,
            warmup=1,
        )
        cases = {
            "device page: os=Ubuntu, by name": lambda: svc.devices_page(
                None, os="Ubuntu", limit=50
            ),
            "device page: q=berlin, by last_seen desc": lambda: svc.devices_page(
                None, q="berlin", sort="last_seen", order="desc", limit=50
            ),
            "device page: model filter, scoped to 1 group": lambda: svc.devices_page(
                one_group, model="Latitude 5440", limit=50
            ),
            "device page: no filter, offset 50,000": lambda: svc.devices_page(
                None, limit=50, offset=50_000
            ),
            f"who has {COMMON} (common)": lambda: svc.who_has(None, COMMON, limit=50),
            f"who has {RARE} (rare)": lambda: svc.who_has(None, RARE, limit=50),
            f"who has {COMMON}, scoped to 1 group": lambda: svc.who_has(one_group, COMMON),
            f"versions of {COMMON}": lambda: svc.versions(None, COMMON),
            "top-20 software (summary)": lambda: svc.top_software(None, limit=20),
            "top-20 software, scoped to 1 group (live)": lambda: svc.top_software(
                one_group, limit=20
            ),
        }
        timed = await measure(cases, runs)
        live = await measure(
            {
                "top-20 software, whole fleet live (5 runs)": lambda: svc.top_software(
                    None, live=True
                )
            },
            5,
            warmup=1,
        )
        base_ms = statistics.median(base["SELECT 1 (baseline)"])
        targets = {
            "device page: os=Ubuntu, by name": "device page",
            "device page: q=berlin, by last_seen desc": "device page",
            f"who has {COMMON} (common)": "who has",
            f"who has {RARE} (rare)": "who has",
            "top-20 software (summary)": "top-20",
        }
        rows = rows_for({**base, **counts, **timed, **live}, "service", base_ms, targets)
        extra["select1_ms"] = base_ms
        return rows, extra
    finally:
        await db.dispose()


async def over_http(url: str, runs: int, base_ms: float) -> list[list[str]]:
    """Time the same reports through the real server over HTTP."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        r = await http.post("/api/v1/auth/login", json={"username": "admin", "password": PASSWORD})
        r.raise_for_status()
        http.headers["authorization"] = f"Bearer {r.json()['token']}"

        def get(path: str, **params: Any) -> Callable[[], Awaitable[Any]]:
            async def call() -> None:
                resp = await http.get(path, params=params)
                resp.raise_for_status()

            return call

        cases = {
            "GET /healthz (baseline)": get("/healthz"),
            "device page: os=Ubuntu, by name": get("/api/v1/reports/devices", os="Ubuntu"),
            f"who has {COMMON} (common)": get("/api/v1/reports/software/who-has", name=COMMON),
            f"who has {RARE} (rare)": get("/api/v1/reports/software/who-has", name=RARE),
            "top-20 software (summary)": get("/api/v1/reports/software/top"),
        }
        timed = await measure(cases, runs)
    targets = {
        k: t
        for k, t in zip(
            list(cases)[1:], ["device page", "who has", "who has", "top-20"], strict=True
        )
    }
    return rows_for(timed, "HTTP", base_ms, targets)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> tuple[str, bool]:
    """Seed, measure, print; the Markdown for RESULTS.md and whether every target was met."""
    from custos.db.migrate import upgrade

    for key, default in (("apps", 200), ("runs", 30), ("no_http", False), ("keep", False)):
        if getattr(args, key, None) is None:
            setattr(args, key, default)  # run.py passes only its own options
    base = args.pg.rstrip("/")
    dsn = f"{base}/{DB_NAME}"
    dsn_sa = dsn.replace("postgresql://", "postgresql+asyncpg://")
    asyncio.run(pg_exec(base, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    asyncio.run(pg_exec(base, f'CREATE DATABASE "{DB_NAME}"'))
    t = time.monotonic()
    upgrade(dsn_sa)
    print(f"B8: migrated in {time.monotonic() - t:.1f} s; seeding {args.devices:,} devices x "
          f"{args.apps} apps", flush=True)  # fmt: skip
    seeded = asyncio.run(seed(dsn, args.devices, args.apps))
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in seeded.items()), flush=True)
    rows, extra = asyncio.run(in_process(dsn_sa, args.runs))
    print(fmt_table(HEADER, rows, markdown=False), flush=True)
    if not args.no_http:
        custos = Path(sys.executable).parent / "custos"
        with tempfile.TemporaryDirectory(prefix="custos-b8-") as d:
            port = free_port()
            srv = Server(
                name="custos x1",
                argv=[str(custos), "server", "--data-dir", d, "--port", str(port),
                      "--insecure-http", "--db", dsn_sa],
                url=f"http://127.0.0.1:{port}",
                health="/healthz",
                log=Path(d) / "server.log",
                env={"CUSTOS_ADMIN_PASSWORD": PASSWORD},
            )  # fmt: skip
            srv.start()
            try:
                rows += asyncio.run(over_http(srv.url, args.runs, extra["select1_ms"]))
            finally:
                srv.stop()
    ok = all("misses" not in r[-1] for r in rows)
    title = (
        f"B8 reports: {args.devices:,} devices x {args.apps} installed apps on PostgreSQL "
        f"{pg_server_version(base)} (same machine); {args.runs} runs per case, interleaved; "
        f"seed: COPY {seeded['copy']:.0f} s, indexes {seeded['indexes']:.0f} s, VACUUM "
        f"ANALYZE {seeded['vacuum analyze']:.0f} s, database {seeded['database GiB']:.1f} GiB; "
        f"summary refresh {extra['summary refresh s']:.1f} s; Ubuntu devices "
        f"{extra['ubuntu devices (total shown)']}; who has common/rare "
        f"{extra['who has common / rare']}; ratio = p50 / p50 of SELECT 1"
    )
    print(title)
    print(fmt_table(HEADER, rows, markdown=False))
    if not args.keep:
        asyncio.run(pg_exec(base, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    md = f"{title}\n\n{fmt_table(HEADER, rows, markdown=True)}\n"
    return md, ok


HEADER = ["where", "case", "runs", "p50 ms", "p95 ms", "ratio", "target (p95)"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--apps", type=int, default=200, help="installed applications per device")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per case (>= 30)")
    ap.add_argument("--pg", default=os.environ.get("CUSTOS_BENCH_PG", PG_DEFAULT))
    ap.add_argument("--no-http", action="store_true", help="service timings only")
    ap.add_argument("--keep", action="store_true", help=f"keep the {DB_NAME} database")
    ap.add_argument("--record", nargs="?", const=str(RESULTS), default=None, metavar="FILE")
    args = ap.parse_args()
    if args.apps > CATALOG - BASE:
        ap.error(f"--apps at most {CATALOG - BASE}")
    md, ok = run(args)
    if args.record:
        info = machine()
        record(
            Path(args.record),
            f"## B8 {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"Command: `.venv/bin/python bench/b8_reports.py --devices {args.devices} --apps "
            f"{args.apps} --runs {args.runs}`\n\n"
            f"- machine: {info['cpus']} cpus, {info['cpu model']}, {info['memory']}\n\n{md}",
        )
        print(f"recorded in {args.record}")
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
