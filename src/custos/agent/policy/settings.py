"""`setting` rules: a sysctl, an ini option, a JSON value, a Windows registry value."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

from custos.agent.policy.base import (
    COMPLIANT,
    ERROR,
    UNSUPPORTED,
    Context,
    Outcome,
    SandboxError,
    atomic_write,
    read_limited,
)

_SYSCTL_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,200}$")


async def evaluate(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Check one setting and write it when it differs."""
    provider = rule.get("provider")
    fn = {"sysctl": _sysctl, "ini": _ini, "json": _json, "registry": _registry}.get(str(provider))
    if fn is None:
        return Outcome(UNSUPPORTED, f"unknown setting provider {provider!r}")
    try:
        return await asyncio.to_thread(fn, rule, ctx)
    except SandboxError as exc:
        return Outcome(ERROR, str(exc))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# --- sysctl ---


def _sysctl(rule: dict[str, Any], ctx: Context) -> Outcome:
    key = str(rule.get("key", ""))
    if not _SYSCTL_KEY.match(key) or ".." in key:
        return Outcome(ERROR, f"not a sysctl key: {key!r}")
    if not ctx.sandbox.resolve("/proc/sys").is_dir():
        return Outcome(UNSUPPORTED, "this system has no /proc/sys")
    base = ctx.sandbox.resolve("/proc/sys/" + key.replace(".", "/"))
    want = " ".join(_text(rule.get("value", "")).split())
    try:
        have = " ".join(read_limited(base).decode(errors="replace").split())
    except FileNotFoundError:
        return Outcome(ERROR, f"no such sysctl key {key}")
    except OSError as exc:
        return Outcome(ERROR, f"cannot read {key}: {exc}")
    if have == want:
        return Outcome(COMPLIANT)
    why = f"{key} was {have!r}"
    try:
        # /proc/sys files cannot be replaced, only written in place
        with base.open("w") as fh:
            fh.write(want + "\n")
        now = " ".join(read_limited(base).decode(errors="replace").split())
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    if now != want:
        return Outcome.drifted(why, Outcome(ERROR, f"the kernel kept {now!r}"))
    return Outcome.drifted(why, f"set to {want!r}")


# --- ini ---

_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_OPTION = re.compile(r"^(\s*)([^=:#;\s][^=:]*?)(\s*[=:]\s*)(.*?)\s*$")


def _ini_find(lines: list[str], section: str, option: str) -> tuple[int, int, int | None]:
    """(section header index or -1, end of the section, option line index or None)."""
    head, end, found = -1, len(lines), None
    current = None
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            if head >= 0 and current == section:
                end = i
                break
            current = m.group(1).strip()
            if current == section:
                head = i
            continue
        if current == section and head >= 0 and not line.lstrip().startswith(("#", ";")):
            o = _OPTION.match(line)
            if o and o.group(2).strip().lower() == option.lower():
                found = i
    return head, end, found


def _ini(rule: dict[str, Any], ctx: Context) -> Outcome:
    path = ctx.sandbox.resolve(str(rule.get("path", "")))
    section, option = str(rule.get("section", "")), str(rule.get("option", ""))
    if not section or not option or "\n" in section + option or "]" in section:
        return Outcome(ERROR, "an ini setting needs a section and an option")
    want = _text(rule.get("value", ""))
    if "\n" in want or "\r" in want:
        return Outcome(ERROR, "an ini value must be one line")
    try:
        text = read_limited(path).decode()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        return Outcome(ERROR, f"cannot read {rule.get('path')}: {exc}")
    lines = text.splitlines()
    head, end, found = _ini_find(lines, section, option)
    if found is not None:
        m = _OPTION.match(lines[found])
        assert m is not None
        if m.group(4) == want:
            return Outcome(COMPLIANT)
        why = f"[{section}] {option} was {m.group(4)!r}"
        lines[found] = f"{m.group(1)}{m.group(2)}{m.group(3)}{want}"
    elif head >= 0:
        why = f"[{section}] {option} was not set"
        at = end
        while at > head + 1 and not lines[at - 1].strip():
            at -= 1  # before the blank lines that separate it from the next section
        lines.insert(at, f"{option} = {want}")
    else:
        why = f"[{section}] {option} was not set" if text else f"{rule.get('path')} was missing"
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"[{section}]", f"{option} = {want}"]
    try:
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        atomic_write(path, ("\n".join(lines) + "\n").encode(), mode)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    return Outcome.drifted(why, f"set to {want!r}")


# --- json ---


def _pointer(raw: str) -> list[str]:
    if raw == "":
        return []
    if not raw.startswith("/"):
        raise ValueError(f"{raw!r} is not a JSON pointer")
    return [p.replace("~1", "/").replace("~0", "~") for p in raw[1:].split("/")]


def _same(a: Any, b: Any) -> bool:
    # JSON sameness: true is not 1, 1 is 1.0
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or (
        type(a) in (int, float) and type(b) in (int, float) and a == b
    )


def _json(rule: dict[str, Any], ctx: Context) -> Outcome:
    path = ctx.sandbox.resolve(str(rule.get("path", "")))
    try:
        parts = _pointer(str(rule.get("pointer", "")))
    except ValueError as exc:
        return Outcome(ERROR, str(exc))
    if not parts:
        return Outcome(ERROR, "the pointer must name a value inside the document")
    want = rule.get("value")
    try:
        doc: Any = json.loads(read_limited(path))
    except FileNotFoundError:
        doc = {}
    except (OSError, ValueError) as exc:
        return Outcome(ERROR, f"cannot read {rule.get('path')} as JSON: {exc}")
    node, missing = doc, False
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            missing = True
            break
    if not missing and _same(node, want):
        return Outcome(COMPLIANT)
    why = "was not set" if missing else f"was {json.dumps(node)[:200]}"
    why = f"{rule.get('pointer')} {why}"
    try:
        doc = _set(doc, parts, want)
    except ValueError as exc:
        return Outcome.drifted(why, Outcome(ERROR, str(exc)))
    try:
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        atomic_write(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode(), mode)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    return Outcome.drifted(why, f"set to {json.dumps(want)[:200]}")


def _set(doc: Any, parts: list[str], value: Any) -> Any:
    """The document with the value at the pointer, creating objects on the way."""
    if not isinstance(doc, dict | list):
        raise ValueError("the document is not an object")
    node = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"no element {part!r} in an array")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {part!r} inside a {type(node).__name__}")
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
    return doc


# --- registry ---

_HIVES = ("HKEY_LOCAL_MACHINE", "HKEY_CURRENT_USER", "HKEY_USERS", "HKEY_CLASSES_ROOT")
_SHORT = {"HKLM": "HKEY_LOCAL_MACHINE", "HKCU": "HKEY_CURRENT_USER", "HKU": "HKEY_USERS",
          "HKCR": "HKEY_CLASSES_ROOT"}  # fmt: skip


def _registry(rule: dict[str, Any], ctx: Context) -> Outcome:
    if ctx.platform != "win32" or sys.platform != "win32":
        return Outcome(UNSUPPORTED, "the registry exists only on Windows")
    return _registry_windows(rule)


def _registry_windows(rule: dict[str, Any]) -> Outcome:  # pragma: no cover - Windows only
    if sys.platform != "win32":
        return Outcome(UNSUPPORTED, "the registry exists only on Windows")
    import winreg

    hive_name, _, sub = str(rule.get("key", "")).partition("\\")
    hive_name = _SHORT.get(hive_name.upper(), hive_name.upper())
    if hive_name not in _HIVES or not sub:
        return Outcome(ERROR, f"not a registry key: {rule.get('key')!r}")
    hive = getattr(winreg, hive_name)
    name, want = str(rule.get("name", "")), rule.get("value")
    kinds = {"dword": winreg.REG_DWORD, "qword": winreg.REG_QWORD, "sz": winreg.REG_SZ,
             "expand_sz": winreg.REG_EXPAND_SZ}  # fmt: skip
    kind = kinds.get(str(rule.get("kind", "sz")))
    if kind is None:
        return Outcome(ERROR, f"unknown registry kind {rule.get('kind')!r}")
    want = int(want) if kind in (winreg.REG_DWORD, winreg.REG_QWORD) else str(want)
    try:
        with winreg.OpenKey(hive, sub, 0, winreg.KEY_READ) as k:
            have, have_kind = winreg.QueryValueEx(k, name)
        if have == want and have_kind == kind:
            return Outcome(COMPLIANT)
        why = f"{name} was {have!r}"
    except FileNotFoundError:
        why = f"{name} was not set"
    except OSError as exc:
        return Outcome(ERROR, f"cannot read the registry: {exc}")
    try:
        with winreg.CreateKeyEx(hive, sub, 0, winreg.KEY_WRITE) as k:
            winreg.SetValueEx(k, name, 0, kind, want)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    return Outcome.drifted(why, f"set to {want!r}")


def ini_value(path: Path, section: str, option: str) -> str | None:
    """An option's value as this provider reads it (for tests and diagnostics)."""
    lines = path.read_text().splitlines()
    _head, _end, found = _ini_find(lines, section, option)
    if found is None:
        return None
    m = _OPTION.match(lines[found])
    return m.group(4) if m else None
