"""Check-only rules: agent version, disk encryption, screen lock, password policy."""

from __future__ import annotations

import json
import re
from typing import Any

from custos import __version__
from custos.agent.policy.base import (
    COMPLIANT,
    ERROR,
    NONCOMPLIANT,
    UNSUPPORTED,
    Context,
    Outcome,
    SandboxError,
    process_failure,
    read_limited,
)
from custos.packaging.manifest import compare_versions


async def evaluate(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Check one of the rules that have no repair."""
    kind = rule["type"]
    if kind == "agent_version":
        return agent_version(rule)
    if kind == "disk_encryption":
        return await disk_encryption(rule, ctx)
    if kind == "screen_lock":
        return await screen_lock(rule, ctx)
    if kind == "password":
        return password(rule, ctx)
    return Outcome(UNSUPPORTED, f"unknown rule type {kind!r}")


def agent_version(rule: dict[str, Any], version: str = __version__) -> Outcome:
    """This agent is at least the version the rule asks for."""
    minimum = str(rule.get("min_version") or "")
    if not minimum or compare_versions(version, minimum, "pep440") >= 0:
        return Outcome(COMPLIANT, f"agent {version}")
    why = f"agent {version} is older than {minimum}"
    return Outcome(NONCOMPLIANT, why, [("drift", why)])


def root_is_encrypted(lsblk: dict[str, Any]) -> bool:
    """Whether `lsblk -J -o TYPE,MOUNTPOINT` shows `/` on (or under) a crypt device."""

    def mounts(node: dict[str, Any]) -> list[str]:
        out = [node.get("mountpoint"), *(node.get("mountpoints") or [])]
        return [m for m in out if m]

    def holds_root(node: dict[str, Any], inside_crypt: bool) -> bool:
        crypt = inside_crypt or node.get("type") == "crypt"
        if crypt and "/" in mounts(node):
            return True
        return any(holds_root(c, crypt) for c in node.get("children") or [])

    return any(holds_root(dev, False) for dev in lsblk.get("blockdevices") or [])


async def disk_encryption(rule: dict[str, Any], ctx: Context) -> Outcome:
    """The root filesystem sits on an encrypted (dm-crypt) device."""
    if not rule.get("required", True):
        return Outcome(COMPLIANT, "not required")
    if ctx.platform != "linux":
        return Outcome(UNSUPPORTED, "disk encryption is checked on Linux only")
    res = await ctx.run(["lsblk", "-J", "-o", "TYPE,MOUNTPOINT"])
    if res.error:
        return Outcome(UNSUPPORTED, f"lsblk is not available: {res.error}")
    if res.exit_code != 0:
        return Outcome(ERROR, f"lsblk failed: {process_failure(res)}")
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        return Outcome(ERROR, "lsblk printed something other than JSON")
    if root_is_encrypted(doc):
        return Outcome(COMPLIANT, "/ is on a crypt device")
    why = "/ is not on an encrypted device"
    return Outcome(NONCOMPLIANT, why, [("drift", why)])


async def screen_lock(rule: dict[str, Any], ctx: Context) -> Outcome:
    """The session locks after at most max_idle_s seconds idle (GNOME)."""
    limit = int(rule.get("max_idle_s") or 0)
    if ctx.platform != "linux":
        return Outcome(UNSUPPORTED, "the screen lock is checked on Linux (GNOME) only")
    res = await ctx.run(["gsettings", "get", "org.gnome.desktop.session", "idle-delay"])
    if res.error or res.exit_code != 0:
        return Outcome(UNSUPPORTED, "no GNOME settings on this system")
    m = re.search(r"(\d+)\s*$", res.stdout.strip())
    if m is None:
        return Outcome(ERROR, f"unexpected idle-delay {res.stdout.strip()[:100]!r}")
    idle = int(m.group(1))
    if 0 < idle <= limit or not limit:
        return Outcome(COMPLIANT, f"idle delay {idle} s")
    why = "the screen never locks" if idle == 0 else f"idle delay {idle} s exceeds {limit} s"
    return Outcome(NONCOMPLIANT, why, [("drift", why)])


def login_defs(text: str) -> dict[str, str]:
    """KEY value pairs of /etc/login.defs (comments dropped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            out[fields[0]] = fields[1]
    return out


def password(rule: dict[str, Any], ctx: Context) -> Outcome:
    """/etc/login.defs under the root asks for at least this password policy."""
    if ctx.platform != "linux":
        return Outcome(UNSUPPORTED, "the password policy is checked on Linux only")
    try:
        path = ctx.sandbox.resolve("/etc/login.defs")
        values = login_defs(read_limited(path).decode(errors="replace"))
    except FileNotFoundError:
        why = "no /etc/login.defs"
        return Outcome(NONCOMPLIANT, why, [("drift", why)])
    except (OSError, SandboxError) as exc:
        return Outcome(ERROR, f"cannot read /etc/login.defs: {exc}")
    problems: list[str] = []
    max_age = rule.get("max_age_days")
    if max_age is not None:
        have = values.get("PASS_MAX_DAYS")
        if have is None or not have.lstrip("-").isdigit():
            problems.append("PASS_MAX_DAYS is not set")
        elif int(have) < 0 or int(have) > int(max_age):
            problems.append(f"PASS_MAX_DAYS is {have} (at most {max_age})")
    min_len = rule.get("min_length")
    if min_len is not None and "PASS_MIN_LEN" in values:
        have = values["PASS_MIN_LEN"]
        if not have.isdigit() or int(have) < int(min_len):
            problems.append(f"PASS_MIN_LEN is {have} (at least {min_len})")
    if not problems:
        return Outcome(COMPLIANT)
    why = "; ".join(problems)
    return Outcome(NONCOMPLIANT, why, [("drift", why)])
