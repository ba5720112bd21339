"""`setting` rules: a sysctl, an ini option, a JSON value, a Windows registry value."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
import unicodedata
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
    why = f"{key} differed"  # never the values: a setting may hold a secret
    try:
        # /proc/sys files cannot be replaced, only written in place (never through a link)
        _write_in_place(base, (want + "\n").encode())
        now = " ".join(read_limited(base).decode(errors="replace").split())
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    if now != want:
        return Outcome.drifted(why, Outcome(ERROR, "the kernel kept a different value"))
    return Outcome.drifted(why, "set")


def _write_in_place(path: Path, data: bytes) -> None:
    """Overwrite an existing regular file's content (not through a link, not a FIFO)."""
    flags = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.write(fd, data)
    finally:
        os.close(fd)


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


# str.splitlines() breaks lines at these: a name or value holding one could never be found
# again in the file, and each evaluation would add another copy
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _unusable(text: str) -> bool:
    """Whether text holds a line break or another control character."""
    return any(ch in _LINE_BREAKS or unicodedata.category(ch) == "Cc" for ch in text)


def _ini_rule(rule: dict[str, Any]) -> tuple[str, str, str] | str:
    """(section, option, value) the provider can find again in the file, or why not."""
    section, option = str(rule.get("section", "")), str(rule.get("option", ""))
    want = _text(rule.get("value", ""))
    if not section or not option:
        return "an ini setting needs a section and an option"
    if _unusable(section) or _unusable(option) or _unusable(want):
        return "unusable value: line breaks and control characters cannot be kept in an ini file"
    # the reader strips white space around names and values: other forms never match again
    if section != section.strip() or "]" in section or "[" in section:
        return "unusable value: the section name"
    if option != option.strip() or option[0] in "#;[" or any(c in option for c in "=:"):
        return "unusable value: the option name"
    if want != want.strip():
        return "unusable value: an ini value must not start or end with white space"
    return section, option, want


def _split(text: str) -> tuple[list[str], str]:
    """The file's lines split on \\n only (a CR stays on its line) and its line ending."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file ended with a line break
    crlf = bool(lines) and all(line.endswith("\r") for line in lines)
    return lines, "\r" if crlf else ""


def _ini(rule: dict[str, Any], ctx: Context) -> Outcome:
    path = ctx.sandbox.resolve(str(rule.get("path", "")))
    parsed = _ini_rule(rule)
    if isinstance(parsed, str):
        return Outcome(ERROR, parsed)
    section, option, want = parsed
    try:
        text = read_limited(path).decode()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        return Outcome(ERROR, f"cannot read {rule.get('path')}: {exc}")
    lines, cr = _split(text)
    head, end, found = _ini_find(lines, section, option)
    # details never carry the values: a setting may hold a secret
    if found is not None:
        m = _OPTION.match(lines[found])
        assert m is not None
        if m.group(4) == want:
            return Outcome(COMPLIANT)
        why = f"[{section}] {option} differed"
        keep = "\r" if lines[found].endswith("\r") else ""
        lines[found] = f"{m.group(1)}{m.group(2)}{m.group(3)}{want}{keep}"
    elif head >= 0:
        why = f"[{section}] {option} was missing"
        at = end
        while at > head + 1 and not lines[at - 1].strip():
            at -= 1  # before the blank lines that separate it from the next section
        lines.insert(at, f"{option} = {want}{cr}")
    else:
        why = f"[{section}] {option} was missing" if text else f"{rule.get('path')} was missing"
        if lines and lines[-1].strip():
            lines.append(cr)
        lines += [f"[{section}]{cr}", f"{option} = {want}{cr}"]
    try:
        st = path.lstat() if text else None
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        atomic_write(path, ("\n".join(lines) + "\n").encode(), mode)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    return Outcome.drifted(why, "set")


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
    # never the values in details: a setting may hold a secret
    why = f"{rule.get('pointer')} {'was missing' if missing else 'differed'}"
    try:
        doc = _set(doc, parts, want)
    except ValueError as exc:
        return Outcome.drifted(why, Outcome(ERROR, str(exc)))
    try:
        st = path.lstat() if os.path.lexists(path) else None
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        atomic_write(path, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode(), mode)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    return Outcome.drifted(why, "set")


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
        why = f"{name} differed"  # never the values: a setting may hold a secret
    except FileNotFoundError:
        why = f"{name} was missing"
    except OSError as exc:
        return Outcome(ERROR, f"cannot read the registry: {exc}")
    try:
        with winreg.CreateKeyEx(hive, sub, 0, winreg.KEY_WRITE) as k:
            winreg.SetValueEx(k, name, 0, kind, want)
    except OSError as exc:
        return Outcome.drifted(why, Outcome(ERROR, f"cannot write: {exc}"))
    return Outcome.drifted(why, "set")


def ini_value(path: Path, section: str, option: str) -> str | None:
    """An option's value as this provider reads it (for tests and diagnostics)."""
    lines, _cr = _split(path.read_bytes().decode())
    _head, _end, found = _ini_find(lines, section, option)
    if found is None:
        return None
    m = _OPTION.match(lines[found])
    return m.group(4) if m else None
