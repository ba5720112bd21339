"""Custos benchmarks B1-B5 (issue 3 §5), B8 (reports), B9 (OMA DM); see bench/README.md.

    .venv/bin/python bench/run.py                    # all of them, full scale (make bench)
    .venv/bin/python bench/run.py b3 --devices 1000  # one, at a smaller scale
    .venv/bin/python bench/run.py b1 --record        # and add the run to bench/RESULTS.md

Every benchmark runs its baseline in the same run, the load generator in its own process,
and prints a table that names the load generator. They share one reusable deployment
(bench/deploy.py): PostgreSQL database `custos_bench` and an enrolled fleet in var/bench.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b1
import b8_reports
import fleetbench
import omadm
from common import PG_DEFAULT, RESULTS, machine, pg_available, pg_server_version, raise_fd_limit
from deploy import Deployment, default_root, ensure

# full-scale defaults, per issue 3 §5
DEFAULT_DEVICES = {
    "b1": 100_000, "b2": 1_000, "b3": 10_000, "b4": 10_000, "b5": 10_000, "b8": 100_000, "b9": 200,
}  # fmt: skip
ORDER = ["b1", "b2", "b3", "b4", "b5", "b8", "b9"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Custos benchmarks B1-B5 (see bench/README.md).")
    ap.add_argument("bench", nargs="*", choices=[*ORDER, "all"], default=["all"])
    ap.add_argument("--devices", type=int, help="devices (default per benchmark: B1 100k, …)")
    ap.add_argument("--enrol", choices=["bulk", "api"], default="bulk", help="how to enrol")
    ap.add_argument("--pg", default=os.environ.get("CUSTOS_BENCH_PG", PG_DEFAULT))
    ap.add_argument("--state-dir", type=Path, default=None, help="default var/bench")
    ap.add_argument("--transport", choices=["http", "https", "both"], default="https")
    ap.add_argument(
        "--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
        help="server processes: B1 runs each, B2/B3/B5 the first [1,2]",
    )  # fmt: skip
    ap.add_argument("--duration", type=int, default=15, help="B1/B2/B9 measured seconds [15]")
    ap.add_argument("--warmup", type=int, default=5, help="B1 warm-up seconds [5]")
    ap.add_argument("--threads", type=int, default=2, help="B1 wrk threads [2]")
    ap.add_argument("--connections", type=int, default=64, help="B1 wrk connections [64]")
    ap.add_argument("--concurrency", type=int, default=64, help="B2/B3/B5/B9 requests in flight")
    ap.add_argument("--httpx", action="store_true", help="B9: load generators on httpx")
    ap.add_argument("--keep", action="store_true", help="B8/B9: keep their database")
    ap.add_argument("--commands", type=int, default=0, help="B2 commands per device [auto]")
    ap.add_argument("--connect", type=int, default=256, help="B4/B5 handshakes in flight")
    ap.add_argument("--record", nargs="?", const=str(RESULTS), default=None, metavar="FILE")
    args = ap.parse_args(argv)
    args.python = sys.executable
    if "all" in args.bench:
        args.bench = ORDER
    if args.warmup + args.duration > 200:
        ap.error("warm-up + duration must stay well under the 300 s signature window")
    if args.transport == "both" and args.bench != ["b1"]:
        ap.error("--transport both is for b1 only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "b1" in args.bench and shutil.which("wrk") is None:
        print("bench: B1 needs wrk (Debian/Ubuntu: sudo apt-get install -y wrk)", file=sys.stderr)
        return 1
    why = pg_available(args.pg)
    if why is not None:
        print(f"bench: cannot reach PostgreSQL at {args.pg}: {why}", file=sys.stderr)
        return 1
    limit = raise_fd_limit()  # the servers we start inherit it (10k sockets each)
    dep = Deployment(args.state_dir or default_root(), args.pg)
    started = datetime.now(UTC)
    info = machine()
    info["postgresql"] = pg_server_version(args.pg) + " (same machine)"
    info["open files limit"] = str(limit)
    reports, all_ok = [], True
    for name in args.bench:
        n = args.devices or DEFAULT_DEVICES[name]
        sub = argparse.Namespace(**{**vars(args), "devices": n})
        print(f"== {name.upper()} ({n:,} devices)", flush=True)
        if name == "b8":  # reports: its own database, seeded in bulk (no enrolled fleet)
            md, ok = b8_reports.run(sub)
        elif name == "b9":  # OMA DM: its own fresh database and fleet (var/bench/b9)
            md, ok = omadm.run(sub)
        elif name == "b1":
            md, ok = b1.run(sub, dep, ensure(dep, n, args.enrol))
        else:
            ensure(dep, n, args.enrol)
            md, ok = fleetbench.BENCHES[name](sub, dep)
        reports.append(md)
        all_ok = all_ok and ok
        print(flush=True)
    if args.record:
        command = ".venv/bin/python bench/run.py" + "".join(f" {a}" for a in sys.argv[1:])
        md = [f"## {started:%Y-%m-%d %H:%M} UTC", "", f"Command: `{command}`", ""]
        md += [f"- {k}: {v}" for k, v in info.items()]
        md += ["", *reports]
        from common import record

        record(Path(args.record), "\n".join(md))
        print(f"recorded in {args.record}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
