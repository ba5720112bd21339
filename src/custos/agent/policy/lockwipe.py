"""The `lock`, `unlock` and `wipe` commands, and the erasure of the agent's secrets after a wipe."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from custos.agent import install as installer
from custos.agent.policy.base import (
    Sandbox,
    SandboxError,
    cut,
    is_root_user,
    process_failure,
    run,
)

if TYPE_CHECKING:
    from custos.agent.policy.base import Runner
    from custos.agent.software import SoftwareStore
    from custos.agent.state import AgentState

log = logging.getLogger("custos.agent.policy")

_ACCOUNT = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")
MAX_PATHS = 1000
UNINSTALL_TIMEOUT_S = 600.0
WIPE_MARK = "wiped"
PENDING_WIPE = "wipe_pending_run"


def default_lock_argv(platform: str = sys.platform) -> list[str]:
    """How this platform locks its sessions."""
    if platform == "win32":
        return ["rundll32.exe", "user32.dll,LockWorkStation"]
    if platform == "darwin":
        return ["pmset", "displaysleepnow"]
    return ["loginctl", "lock-sessions"]


def _argv_from_env(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    argv = json.loads(raw)
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"{name} must be a JSON list of strings")
    return argv


def _accounts(payload: dict[str, Any], fallback: list[str]) -> list[str]:
    raw = payload.get("accounts")
    names = raw if isinstance(raw, list) else fallback
    return [str(n) for n in names][:100]


async def _set_accounts(
    names: list[str], flag: str, sandbox: Sandbox, runner: Runner
) -> dict[str, str]:
    """`usermod -L/-U` each managed account; what happened to each."""
    out: dict[str, str] = {}
    for name in names:
        if not _ACCOUNT.match(name):
            out[name] = "skipped: not a valid account name"
        elif sys.platform != "linux":
            out[name] = "skipped: accounts are managed on Linux only"
        elif not sandbox.is_system:
            out[name] = "skipped: the agent runs under a sandbox root"
        elif not is_root_user():
            out[name] = "skipped: the agent does not run as root"
        else:
            res = await runner(["usermod", flag, name])
            ok = not res.error and res.exit_code == 0
            verb = "locked" if flag == "-L" else "unlocked"
            out[name] = verb if ok else f"failed: {process_failure(res)}"
    return out


async def lock(
    payload: dict[str, Any], *, sandbox: Sandbox, managed_accounts: list[str],
    runner: Runner = run,
) -> dict[str, Any]:  # fmt: skip
    """Lock the sessions and disable the managed accounts."""
    try:
        argv = _argv_from_env("CUSTOS_AGENT_LOCK_COMMAND") or default_lock_argv()
    except ValueError as exc:
        return {"state": "failed", "error": str(exc)}
    message = str(payload.get("message") or "")[:1000]
    if message:
        log.warning("lock requested: %s", message)
    res = await runner(argv)
    locked = not res.error and res.exit_code == 0
    accounts = await _set_accounts(_accounts(payload, managed_accounts), "-L", sandbox, runner)
    result: dict[str, Any] = {
        "result": {"locked": locked, "method": argv[0], "accounts": accounts},
    }
    if not locked:
        result["state"] = "failed"
        result["error"] = cut(f"the lock command failed: {process_failure(res)}")
    return result


async def unlock(
    payload: dict[str, Any], *, sandbox: Sandbox, managed_accounts: list[str],
    runner: Runner = run,
) -> dict[str, Any]:  # fmt: skip
    """Re-enable the managed accounts."""
    accounts = await _set_accounts(_accounts(payload, managed_accounts), "-U", sandbox, runner)
    return {"result": {"unlocked": True, "accounts": accounts}}


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree."""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


async def wipe(
    payload: dict[str, Any],
    *,
    run_id: str,
    state: AgentState,
    sandbox: Sandbox,
    managed_data: list[str],
    software: SoftwareStore | None,
    runner: Runner = run,
) -> dict[str, Any]:
    """Selective or full wipe; a real one schedules the agent's secrets for erasure."""
    mode = str(payload.get("mode") or "selective")
    dry = bool(payload.get("dry_run", False))
    out: dict[str, Any] = {"mode": mode, "dry_run": dry, "removed": [], "missing": [],
                           "failed": [], "applications": []}  # fmt: skip
    if mode == "full":
        try:
            argv = _argv_from_env("CUSTOS_AGENT_WIPE_COMMAND")
        except ValueError as exc:
            return {"state": "failed", "error": str(exc), "result": out}
        if argv is None:
            return {"state": "failed", "error": "full wipe is not available on this device",
                    "result": out}  # fmt: skip
        if dry:
            out["command"] = argv
            return {"result": out}
        res = await runner(argv)
        if res.error or res.exit_code != 0:
            return {"state": "failed", "result": out,
                    "error": cut(f"the wipe command failed: {process_failure(res)}")}  # fmt: skip
        out["command"] = argv
        _schedule_erasure(state, run_id, payload)
        return {"state": "succeeded", "result": out}
    if mode != "selective":
        return {"state": "rejected", "error": f"unknown wipe mode {mode!r}"}
    raw = payload.get("paths")
    paths = [str(p) for p in (raw if isinstance(raw, list) else managed_data)][:MAX_PATHS]
    for raw_path in paths:
        try:
            target = sandbox.resolve(raw_path)
        except SandboxError as exc:
            out["failed"].append({"path": raw_path, "error": cut(str(exc))})
            continue
        refused = _protected(target, sandbox, state.dir)
        if refused:
            out["failed"].append({"path": raw_path, "error": refused})
            continue
        if not await asyncio.to_thread(os.path.lexists, target):
            out["missing"].append(raw_path)
            continue
        if dry:
            out["removed"].append(raw_path)
            continue
        try:
            await asyncio.to_thread(_remove, target)
        except OSError as exc:
            out["failed"].append({"path": raw_path, "error": cut(str(exc))})
            continue
        out["removed"].append(raw_path)
    if payload.get("applications", True) and software is not None:
        out["applications"] = await _uninstall_all(software, state.dir / "software", dry)
    failure = _failure(out)
    if failure:
        # a partial wipe is no success: the agent keeps its key so it can report and retry
        return {"state": "failed", "error": failure, "result": out}
    if not dry:
        _schedule_erasure(state, run_id, payload)
    return {"state": "succeeded", "result": out}


def _protected(target: Path, sandbox: Sandbox, state_dir: Path) -> str | None:
    """Why a wipe must not remove this path (None: it may)."""
    agent = Path(os.path.realpath(state_dir))
    if target == agent or agent in target.parents or target in agent.parents:
        return "refused: protects the agent"
    if target == sandbox.root or target.parent == sandbox.root:
        return "refused: the root and its top-level entries are never managed data"
    return None


def _failure(out: dict[str, Any]) -> str | None:
    """What a wipe failed to do, in a line (None: it did everything)."""
    paths = [str(f["path"]) for f in out["failed"]]
    apps = [str(a["name"]) for a in out["applications"] if a.get("state") == "failed"]
    parts = []
    if paths:
        parts.append(f"{len(paths)} path(s) not removed: {', '.join(paths)}")
    if apps:
        parts.append(f"{len(apps)} application(s) not uninstalled: {', '.join(apps)}")
    return cut("; ".join(parts)) if parts else None


async def _uninstall_all(software: SoftwareStore, work: Path, dry: bool) -> list[dict[str, Any]]:
    """Remove every package the agent installed itself."""
    done: list[dict[str, Any]] = []
    for name, version in sorted(software.all_installed().items()):
        entry: dict[str, Any] = {"name": name, "version": version}
        held = software.installed(name) or {}
        payload = software.install_payload(str(held.get("package_id", "")))
        if dry:
            entry["state"] = "would remove"
        elif payload is None:
            entry["state"] = "failed"
            entry["error"] = "the agent no longer knows how it installed it"
        else:
            kept = Path(held["artifact"]) if held.get("artifact") else None
            res = await installer.uninstall(
                payload["descriptor"],
                kept if kept is not None and kept.is_file() else None,
                work / f"wipe-{name}",
                timeout_s=UNINSTALL_TIMEOUT_S,
            )
            if res.ok:
                software.forget_installed(name)
                entry["state"] = "removed"
            else:
                entry["state"] = "failed"
                entry["error"] = cut(json.dumps(res.to_dict(), default=str))
        done.append(entry)
    return done


def _schedule_erasure(state: AgentState, run_id: str, payload: dict[str, Any]) -> None:
    if payload.get("secrets", True):
        state.set(**{PENDING_WIPE: run_id})


def wipe_succeeded(sent: dict[str, Any] | None) -> bool:
    """Whether a wipe result the server accepted is a real wipe that succeeded."""
    if not isinstance(sent, dict) or sent.get("state") != "succeeded":
        return False
    result = sent.get("result")
    return not (isinstance(result, dict) and result.get("dry_run"))


def erase_secrets(state: AgentState) -> None:
    """After the server took a wipe's result: drop the key and mark this state wiped."""
    for name in ("device.key",):
        path = state.dir / name
        try:
            size = path.stat().st_size
            with path.open("r+b") as fh:  # overwrite first: a plain unlink leaves the bytes
                fh.write(b"\0" * size)
                fh.flush()
                os.fsync(fh.fileno())
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("could not erase %s: %s", path, exc)
    state.set(**{WIPE_MARK: "1", PENDING_WIPE: ""})
    log.warning("this device was wiped: its key is erased")


def is_wiped(state: AgentState) -> bool:
    """Whether a wipe finished on this state directory."""
    return state.get(WIPE_MARK) == "1"
