"""`file` rules: content, mode and owner of a file under the root, or its absence."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from custos.agent.policy.base import (
    COMPLIANT,
    ERROR,
    Context,
    Outcome,
    SandboxError,
    atomic_write,
    read_limited,
    set_mode_owner,
)


def desired_content(rule: dict[str, Any]) -> bytes | None:
    """The bytes the rule asks for (None: content is not managed)."""
    if rule.get("content_b64") is not None:
        try:
            return base64.b64decode(str(rule["content_b64"]), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"content_b64 is not base64: {exc}") from None
    if rule.get("content") is not None:
        return str(rule["content"]).encode()
    return None


def _ids(rule: dict[str, Any]) -> tuple[int, int]:
    """Numeric uid/gid the rule asks for (-1: not managed); KeyError for an unknown name."""
    uid = gid = -1
    owner, group = rule.get("owner"), rule.get("group")
    if owner not in (None, ""):
        import pwd

        uid = int(owner) if str(owner).isdigit() else pwd.getpwnam(str(owner)).pw_uid
    if group not in (None, ""):
        import grp

        gid = int(group) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
    return uid, gid


def _mode(rule: dict[str, Any]) -> int | None:
    raw = rule.get("mode")
    if raw in (None, ""):
        return None
    value = int(str(raw), 8)
    if not 0 <= value <= 0o7777:
        raise ValueError(f"mode {raw!r} is out of range")
    return value


async def evaluate(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Check one file rule and repair it."""
    return await asyncio.to_thread(_evaluate, rule, ctx)


def _evaluate(rule: dict[str, Any], ctx: Context) -> Outcome:
    try:
        path = ctx.sandbox.resolve(str(rule["path"]))
        content = desired_content(rule)
        mode = _mode(rule)
        uid, gid = _ids(rule) if os.name == "posix" else (-1, -1)
    except (SandboxError, ValueError) as exc:
        return Outcome(ERROR, str(exc))
    except KeyError as exc:
        return Outcome(ERROR, f"unknown user or group {exc}")
    if rule.get("ensure", "present") == "absent":
        return _absent(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return Outcome(ERROR, f"cannot inspect: {exc}")
    drift: list[str] = []
    rewrite = False
    if st is None:
        drift.append("missing")
        rewrite = True
    elif not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            return Outcome.drifted("is a directory", Outcome(ERROR, "not replaced"))
        drift.append("not a regular file")
        rewrite = True
    else:
        if content is not None:
            try:
                held = read_limited(path)
            except OSError as exc:
                return Outcome(ERROR, f"cannot read: {exc}")
            if hashlib.sha256(held).digest() != hashlib.sha256(content).digest():
                drift.append("content differed")
                rewrite = True
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            drift.append(f"mode was {stat.S_IMODE(st.st_mode):04o}")
        if uid != -1 and st.st_uid != uid:
            drift.append(f"owner was uid {st.st_uid}")
        if gid != -1 and st.st_gid != gid:
            drift.append(f"group was gid {st.st_gid}")
    if not drift:
        return Outcome(COMPLIANT)
    why = "; ".join(drift)
    ownership = (uid != -1 and (st is None or rewrite or st.st_uid != uid)) or (
        gid != -1 and (st is None or rewrite or st.st_gid != gid)
    )
    if ownership and not ctx.as_root:
        # rewriting would still leave the owner wrong: say so, but fix what can be fixed
        detail = "changing the owner needs root; the agent does not run as root"
        try:
            partial = _repair(path, st, content, mode, -1, -1, rewrite)
        except OSError as exc:
            partial = f"repair failed: {exc}"
        if partial:
            detail = f"{partial}, but {detail}"
        return Outcome.drifted(why, Outcome(ERROR, detail))
    try:
        done = _repair(path, st, content, mode, uid, gid, rewrite)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"repair failed: {exc}"))
    return Outcome.drifted(why, done or "fixed")


def _repair(
    path: Path,
    st: os.stat_result | None,
    content: bytes | None,
    mode: int | None,
    uid: int,
    gid: int,
    rewrite: bool,
) -> str:
    """Make the file right; what was done."""
    if rewrite:
        data = content if content is not None else b""
        keep_mode = mode
        if keep_mode is None:
            regular = st is not None and stat.S_ISREG(st.st_mode)
            keep_mode = stat.S_IMODE(st.st_mode) if regular and st is not None else 0o644
        atomic_write(path, data, keep_mode, uid, gid)
        return "rewritten"
    # on the open file, which must still be a regular file: a link swapped in since the
    # check is refused, never followed to what it points to
    if mode is not None or uid != -1 or gid != -1:
        set_mode_owner(path, mode, uid, gid)
    done = []
    if mode is not None:
        done.append("mode set")
    if uid != -1 or gid != -1:
        done.append("owner set")
    return ", ".join(done)


def _absent(path: Path) -> Outcome:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Outcome(COMPLIANT)
    except OSError as exc:
        return Outcome(ERROR, f"cannot inspect: {exc}")
    if stat.S_ISDIR(st.st_mode):
        return Outcome.drifted(
            "present (a directory)", Outcome(ERROR, "directories are not removed")
        )
    try:
        path.unlink()
    except OSError as exc:
        return Outcome.drifted("present", Outcome(ERROR, f"cannot remove: {exc}"))
    return Outcome.drifted("present", "removed")
