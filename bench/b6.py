"""B6 (issue 4 §6): bytes on the wire for a 1 % change in a 50 MB package.

    .venv/bin/python bench/b6.py [--size-mb 50] [--record]

v1 is a tarball of real files from this machine (the virtualenv's site-packages, ~50 MB);
v2 is v1 with ~1 % of its bytes changed in scattered places, some edits replacing bytes and
some inserting them (shifting everything after, as a rebuilt release does). Measured in the
same run: the full file, `zstd -19 --long=27` of it, `zstd -19 --long=27 --patch-from=v1`
(the baseline), and the plans Custos makes (missing chunks, and the patch-from delta), all
through the real artifact store and transfer planner.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fmt_table, machine, record
from custos.software.store import LocalArtifactStore
from custos.software.transfer import TransferPlanner

SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def make_v1(out: Path, size: int) -> None:
    """A tarball of real files (sorted, so the run is repeatable) up to `size` bytes."""
    root = SITE / "site-packages"
    total = 0
    with tarfile.open(out, "w") as tf:
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.is_symlink() or "__pycache__" in p.parts:
                continue
            n = p.stat().st_size
            if total + n > size:
                continue
            tf.add(p, arcname=str(p.relative_to(root)))
            total += n + 512
            if total >= size * 0.98:
                break


def make_v2(v1: bytes, fraction: float, seed: int = 6) -> bytes:
    """~`fraction` of the bytes changed in 40 scattered places, as a new release does: most
    edits rewrite code in place (every 7th byte of a region changed), a quarter insert new
    lines (everything after them shifts)."""
    rng = random.Random(seed)
    out = bytearray(v1)
    edits = 40
    per = int(len(v1) * fraction / edits)
    for i in range(edits):
        at = rng.randrange(0, len(out) - per)
        if i % 4 == 0:
            novel = b"".join(
                f"# change {i}.{k}: {rng.getrandbits(48):012x}\n".encode() for k in range(per // 20)
            )
            out[at:at] = novel[:per]
        else:
            seg = bytearray(out[at : at + per])
            for k in range(0, per, 7):
                seg[k] = rng.randrange(32, 127)
            out[at : at + per] = seg
    return bytes(out)


def zstd_size(args: list[str]) -> tuple[int, float]:
    t = time.perf_counter()
    res = subprocess.run(["zstd", "-q", "-c", *args], capture_output=True, check=True)
    return len(res.stdout), time.perf_counter() - t


async def custos_plans(v1: Path, v2: Path, tmp: Path) -> dict[str, tuple[int, float]]:
    store = LocalArtifactStore(tmp / "store")
    t = time.perf_counter()
    r1 = await asyncio.to_thread(store.ingest, v1)
    r2 = await asyncio.to_thread(store.ingest, v2)
    ingest = time.perf_counter() - t
    planner = TransferPlanner(store)
    t = time.perf_counter()
    chunks = await asyncio.to_thread(planner._chunk_plan, r2.sha256, r1.sha256)
    t_chunks = time.perf_counter() - t
    t = time.perf_counter()
    delta = await planner._delta(r1.sha256, r2.sha256)
    t_delta = time.perf_counter() - t
    t = time.perf_counter()
    chosen = await planner.plan(r2.sha256, r1.sha256)  # delta cached: the planning cost only
    t_plan = time.perf_counter() - t
    full = await asyncio.to_thread(planner._chunk_plan, r2.sha256, None)
    shared = sum(1 for p in chunks.pieces if p.src == "b")
    return {
        "ingest": (0, ingest),
        "full": (full.wire_size, 0.0),
        "chunks": (chunks.wire_size, t_chunks),
        "delta": (delta.stat().st_size if delta else -1, t_delta),
        f"chosen ({chosen.kind})": (chosen.wire_size, t_plan),
        "shared": (shared, len(chunks.pieces)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--change", type=float, default=0.01, help="fraction of bytes changed")
    ap.add_argument("--record", nargs="?", const=str(RESULTS), default=None, metavar="FILE")
    args = ap.parse_args()
    if shutil.which("zstd") is None:
        print("bench: B6 needs the zstd CLI (Debian/Ubuntu: apt-get install -y zstd)")
        return 1
    with tempfile.TemporaryDirectory(prefix="custos-b6-") as d:
        tmp = Path(d)
        v1, v2 = tmp / "v1.tar", tmp / "v2.tar"
        make_v1(v1, int(args.size_mb * 1e6))
        v2.write_bytes(make_v2(v1.read_bytes(), args.change))
        n = v2.stat().st_size
        print(f"B6: v1 {v1.stat().st_size:,} B, v2 {n:,} B ({args.change:.0%} changed)")
        full_z, t_full = zstd_size(["-19", "--long=27", str(v2)])
        patch, t_patch = zstd_size(["-19", "--long=27", f"--patch-from={v1}", str(v2)])
        plans = asyncio.run(custos_plans(v1, v2, tmp))
    shared, pieces = plans.pop("shared")
    ingest = plans.pop("ingest")[1]
    rows = [
        ["full file", f"{n:,}", "100.00%", f"{n / patch:.2f}x", "-"],
        ["zstd -19 --long=27 (full)", f"{full_z:,}", f"{full_z / n:.2%}",
         f"{full_z / patch:.2f}x", f"{t_full:.1f}"],
        ["zstd -19 --long=27 --patch-from (baseline)", f"{patch:,}", f"{patch / n:.2%}",
         "1.00x", f"{t_patch:.1f}"],
    ]  # fmt: skip
    for label, (size, secs) in plans.items():
        rows.append(
            [f"custos {label}", f"{size:,}", f"{size / n:.2%}", f"{size / patch:.2f}x",
             f"{secs:.1f}"]
        )  # fmt: skip
    chosen = next(v for k, v in plans.items() if k.startswith("chosen"))[0]
    ok = chosen <= 1.1 * patch and chosen <= 0.02 * n
    header = ["what is sent", "bytes", "of full", "vs patch-from", "time s"]
    title = (
        f"B6 bytes on the wire for a {args.change:.0%} change in a {n / 1e6:.0f} MB package "
        f"(real files: a tarball of site-packages); chunks shared {shared}/{pieces}; "
        f"ingest of both versions {ingest:.1f} s; target <= 1.1x patch-from and <= 2% of full: "
        + ("meets" if ok else "misses")
    )
    print(title)
    print(fmt_table(header, rows, markdown=False))
    if args.record:
        info = machine()
        text = (
            f"## B6 {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"Command: `.venv/bin/python bench/b6.py --size-mb {args.size_mb:g}`\n\n"
            f"- machine: {info['cpus']} cpus, {info['cpu model']}, python {info['python']}\n\n"
            f"{title}\n\n{fmt_table(header, rows, markdown=True)}\n"
        )
        record(Path(args.record), text)
        print(f"recorded in {args.record}")
    return 0 if ok else 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
