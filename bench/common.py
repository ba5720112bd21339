"""Pieces every benchmark shares: server processes, CPU and memory counters, PostgreSQL,
the machine description, tables and RESULTS.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx
import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432"


def raise_fd_limit() -> int:
    """Soft open-file limit up to the hard one (server processes we spawn inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


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
        # none of the caller's own CUSTOS_* settings leak in (a CA passphrase may)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CUSTOS_") or k == "CUSTOS_CA_PASSPHRASE"
        }
        env.update(self.env)
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

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children (all workers)."""
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        total = 0
        for q in [p, *p.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += q.memory_info().rss
        return total

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

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


# --- PostgreSQL ---


async def pg_exec(base: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(base + "/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_available(base: str) -> str | None:
    """None if we can reach PostgreSQL at `base`, else why not."""
    try:
        asyncio.run(pg_exec(base, "SELECT 1"))
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


# --- report ---


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = []
    for pkg in (
        "uvicorn",
        "uvloop",
        "httptools",
        "websockets",
        "starlette",
        "fastapi",
        "sqlalchemy",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{pkg} {metadata.version(pkg)}")
    wrk_version = "not installed"
    with contextlib.suppress(OSError, IndexError):
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0].split(" [")[0]
    mem = psutil.virtual_memory().total / 2**30
    return {
        "cpus": f"{os.cpu_count()} (nproc {len(os.sched_getaffinity(0))})",
        "cpu model": model,
        "memory": f"{mem:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": ", ".join(versions),
        "wrk": wrk_version,
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
