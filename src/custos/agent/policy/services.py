"""`service` rules: a systemd unit or a plain process that must be running."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from custos.agent.policy.base import (
    COMPLIANT,
    ERROR,
    NONCOMPLIANT,
    REPAIRED,
    UNSUPPORTED,
    Context,
    Outcome,
    cut,
    process_failure,
)

_UNIT = re.compile(r"^[A-Za-z0-9_@.:\\-]{1,200}$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
START_WAIT_S = 3.0


class ProcessSupervisor:
    """Processes the process provider started: reaped when they die, never started twice."""

    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def alive(self, name: str) -> subprocess.Popen[bytes] | None:
        """The child started for this service if it still runs (a dead one is reaped)."""
        child = self.children.get(name)
        if child is not None and child.poll() is not None:
            self.children.pop(name, None)
            return None
        return child

    def reap(self) -> None:
        """Collect the exit status of children that ended (no zombies left behind)."""
        for name in list(self.children):
            self.alive(name)


def running_cmdlines(proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command line joined by spaces) of every process this agent can see."""
    me = os.getpid()
    out: list[tuple[int, str]] = []
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:  # zombies and kernel threads have none
            out.append(
                (int(entry.name), raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace"))
            )
    return out


def find_process(match: str) -> int | None:
    """The pid of a process whose command line contains `match`."""
    for pid, cmdline in running_cmdlines():
        if match in cmdline:
            return pid
    return None


async def evaluate(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Check that a service runs; start it when it does not."""
    provider = str(rule.get("provider", "systemd"))
    if provider == "systemd":
        return await _systemd(rule, ctx)
    if provider == "process":
        return await _process(rule, ctx)
    return Outcome(UNSUPPORTED, f"unknown service provider {provider!r}")


def _waiting_for_package(rule: dict[str, Any], ctx: Context) -> Outcome | None:
    """A service whose package is not installed yet: the software rule repairs first."""
    package = rule.get("package")
    if not package:
        return None
    sw = ctx.outcomes.get(f"software_required:{package}")
    if sw is None or sw.status in (COMPLIANT, REPAIRED):
        return None
    return Outcome(NONCOMPLIANT, f"not running; its package {package} is not installed yet "
                                 f"({sw.status}: {sw.detail})")  # fmt: skip


async def _systemd(rule: dict[str, Any], ctx: Context) -> Outcome:
    name = str(rule.get("name", ""))
    if not ctx.sandbox.is_system:
        return Outcome(UNSUPPORTED, "systemd services are not managed under a sandbox root")
    if ctx.platform != "linux":
        return Outcome(UNSUPPORTED, "systemd exists only on Linux")
    if not _UNIT.match(name) or name.startswith("-"):
        return Outcome(ERROR, f"not a unit name: {name!r}")
    res = await ctx.run(["systemctl", "is-active", name])
    if res.error:
        return Outcome(UNSUPPORTED, f"systemctl is not available: {res.error}")
    state = res.stdout.strip() or "unknown"
    if res.exit_code == 0 and state == "active":
        return Outcome(COMPLIANT)
    why = f"{name} was {state}"
    waiting = _waiting_for_package(rule, ctx)
    if waiting is not None:
        return Outcome(NONCOMPLIANT, f"{why}; {waiting.detail}")
    res = await ctx.run(["systemctl", "restart", name])
    if res.error or res.exit_code != 0:
        return Outcome.drifted(why, Outcome(ERROR, f"restart failed: {process_failure(res)}"))
    check = await ctx.run(["systemctl", "is-active", name])
    if check.stdout.strip() != "active":
        return Outcome.drifted(
            why, Outcome(ERROR, f"still {check.stdout.strip() or 'down'} after a restart")
        )
    return Outcome.drifted(why, "restarted")


async def _process(rule: dict[str, Any], ctx: Context) -> Outcome:
    name = str(rule.get("name", ""))
    match = str(rule.get("match") or name)
    if not match:
        return Outcome(ERROR, "a process service needs a name or a match")
    if not await asyncio.to_thread(Path("/proc").is_dir):
        return Outcome(UNSUPPORTED, "process services need /proc (Linux)")
    supervisor: ProcessSupervisor = ctx.extra.setdefault("supervisor", ProcessSupervisor())
    supervisor.reap()
    pid = await asyncio.to_thread(find_process, match)
    if pid is not None:
        return Outcome(COMPLIANT, f"pid {pid}")
    why = f"no process matching {match!r}"
    waiting = _waiting_for_package(rule, ctx)
    if waiting is not None:
        return Outcome(NONCOMPLIANT, f"{why}; {waiting.detail}")
    child = supervisor.alive(name)
    if child is not None:
        # started earlier and still alive, only not matching: starting another would pile up
        return Outcome(NONCOMPLIANT, f"{why}; the process started as pid {child.pid} runs "
                                     "but does not match")  # fmt: skip
    start = rule.get("start")
    if not isinstance(start, list) or not start:
        return Outcome.drifted(why, Outcome(ERROR, "no start command in the rule"))
    argv = [str(a) for a in start]
    log_path = ctx.state_dir / "policy" / f"{_SAFE_NAME.sub('_', name)[:100] or 'service'}.log"
    try:
        child = await asyncio.to_thread(_spawn, argv, log_path)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot start {argv[0]!r}: {exc}"))
    supervisor.children[name] = child
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            supervisor.children.pop(name, None)
            tail = _tail(log_path)
            return Outcome.drifted(why, Outcome(ERROR, cut(
                f"started {argv[0]!r} but it exited with code {child.returncode}"
                + (f": {tail}" if tail else ""))))  # fmt: skip
        found = await asyncio.to_thread(find_process, match)
        if found is not None:
            return Outcome.drifted(why, f"started (pid {found})")
        await asyncio.sleep(0.1)
    return Outcome.drifted(why, f"started (pid {child.pid})")


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a service process detached: its own session, no stdin, output to its log."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with log_path.open("ab") as log:
        return subprocess.Popen(  # argv from the admin's profile, never a shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=str(log_path.parent),
        )


def _tail(path: Path, size: int = 400) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""
