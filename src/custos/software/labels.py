"""Labels: saved queries over device inventory, evaluated in Python so they mean the same on
SQLite and PostgreSQL. A query is a list of conditions that must all hold, e.g.
`os.name = Debian`, `hw.memory_mb >= 4096`, `software.firefox exists`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from custos.errors import Invalid
from custos.packaging.manifest import compare_versions

OPS = ("=", "!=", "~", ">=", "<=", ">", "<", "exists", "missing")
MAX_CONDITIONS = 20
KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")
_TEXT_RE = re.compile(r"^\s*([A-Za-z0-9_.:/-]+)\s*(!=|>=|<=|=|~|>|<|\s+exists|\s+missing)\s*(.*)$")


def parse_condition(text: str) -> dict[str, Any]:
    """'os.name = Debian' -> {"key": "os.name", "op": "=", "value": "Debian"}."""
    m = _TEXT_RE.match(text)
    if not m:
        raise Invalid(f"cannot read the condition {text!r} (KEY OP VALUE, OP one of {OPS})")
    key, op, value = m.group(1), m.group(2).strip(), m.group(3).strip()
    if op in ("exists", "missing"):
        if value:
            raise Invalid(f"{op!r} takes no value: {text!r}")
        return check_condition({"key": key, "op": op})
    return check_condition({"key": key, "op": op, "value": value})


def check_condition(cond: Any) -> dict[str, Any]:
    """Validate one condition dict (keys, operator, value length)."""
    if not isinstance(cond, Mapping) or set(cond) - {"key", "op", "value"}:
        raise Invalid("a condition is {key, op, value}")
    key, op = cond.get("key"), cond.get("op")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise Invalid(f"bad inventory key {key!r}")
    if op not in OPS:
        raise Invalid(f"unknown operator {op!r}; use one of {', '.join(OPS)}")
    out: dict[str, Any] = {"key": key, "op": op}
    if op not in ("exists", "missing"):
        value = cond.get("value")
        if not isinstance(value, str) or len(value) > 500 or "\x00" in value:
            raise Invalid(f"the value of {key} {op} must be text of at most 500 characters")
        if op == "~":
            try:
                re.compile(value)
            except re.error as exc:
                raise Invalid(f"bad regular expression {value!r}: {exc}") from None
        out["value"] = value
    return out


def check_query(conds: Any) -> list[dict[str, Any]]:
    """Validate a whole query (1..MAX_CONDITIONS conditions)."""
    if not isinstance(conds, list) or not 1 <= len(conds) <= MAX_CONDITIONS:
        raise Invalid(f"a label needs 1 to {MAX_CONDITIONS} conditions")
    return [check_condition(c) for c in conds]


def _value_of(key: str, inventory: Mapping[str, Any], facts: Mapping[str, Any]) -> str | None:
    # inventory first; enrolment facts until the first inventory arrives
    v = facts.get(key[6:]) if key.startswith("facts.") else inventory.get(key, facts.get(key))
    return None if v is None else str(v)


def _compare(a: str, b: str) -> int:
    try:
        fa, fb = float(a), float(b)
        return (fa > fb) - (fa < fb)
    except ValueError:
        return compare_versions(a, b)  # "12.4" vs "12.10" ordered as versions


def matches(
    query: list[dict[str, Any]], inventory: Mapping[str, Any], facts: Mapping[str, Any]
) -> bool:
    """Whether a device with this inventory and these facts is in the label."""
    for cond in query:
        have = _value_of(cond["key"], inventory, facts)
        op = cond["op"]
        if op == "exists":
            ok = have is not None
        elif op == "missing":
            ok = have is None
        elif have is None:
            ok = False
        elif op == "=":
            ok = have == cond["value"]
        elif op == "!=":
            ok = have != cond["value"]
        elif op == "~":
            ok = re.search(cond["value"], have) is not None
        else:
            c = _compare(have, cond["value"])
            ok = {">=": c >= 0, "<=": c <= 0, ">": c > 0, "<": c < 0}[op]
        if not ok:
            return False
    return True


def describe(query: list[dict[str, Any]]) -> str:
    """'os.name = Debian and hw.memory_mb >= 4096'."""
    return " and ".join(
        f"{c['key']} {c['op']}" + (f" {c['value']}" if "value" in c else "") for c in query
    )
