"""OMA DiagMon (Diagnostics and Monitoring 1.0) mapped onto Custos diagnostics.

A `diagnose` command on an OMA DM device becomes a DiagMon run: a Get of each node in
`omadm_diagmon_nodes` (a node the device lacks answers 404, which is fine), then, when
`omadm_diagmon_start` names one, an Exec of a DiagMon procedure's Operations/Start. The
node values become a diagnostics report (source `omadm`); the values of nodes mapped to a
health field (memory, storage, battery, uptime, load) fill its normalised numbers.

A DiagMon client also reports by itself in Generic Alerts (1226) whose Meta Type starts
with `urn:oma:at:diagmon:1.0`: OperationComplete (a procedure ended), TrapNotification and
TrapInactiveNotification (a monitored condition fired or stopped), CollectedSimpleDataReport
(collected data). Each is stored as a report, whether or not it answers one of our runs.

The node layout of DiagMon functions differs between devices, so the nodes are a setting;
the defaults read a memory/storage/battery function layout under ./DiagMon and fall back on
the Windows-style DevDetail and DeviceStatus nodes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from custos.diagnostics.schemas import HEALTH_FIELDS, NewReport
from custos.omadm import message as m

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from custos.settings import Settings

ALERT_TYPE_PREFIX = "urn:oma:at:diagmon:1.0"
ALERT_KINDS = {
    "OperationComplete": "diagmon-result",
    "TrapNotification": "diagmon-trap",
    "TrapInactiveNotification": "diagmon-trap",
    "CollectedSimpleDataReport": "diagmon-data",
}
GENERIC_ALERT = "1226"

# node URI -> health field[:unit of its value]; "" records a value without a field
DEFAULT_NODES: dict[str, str] = {
    "./DiagMon/Memory/RAM/Total": "mem_total:KB",
    "./DiagMon/Memory/RAM/Avail": "mem_available:KB",
    "./DiagMon/Memory/Storage/Total": "storage_total:KB",
    "./DiagMon/Memory/Storage/Avail": "storage_free:KB",
    "./DiagMon/Battery/Level": "battery_pct:%",
    "./DiagMon/Uptime": "uptime_s:s",
    "./DevDetail/Ext/Microsoft/TotalRAM": "mem_total:MB",
    "./DevDetail/Ext/Microsoft/TotalStorage": "storage_total:MB",
    "./Vendor/MSFT/DeviceStatus/Battery/EstimatedChargeRemaining": "battery_pct:%",
}
# what a value counts in, as a factor to bytes or seconds
UNITS: dict[str, float] = {
    "": 1,
    "B": 1,
    "KB": 1024,
    "MB": 1024**2,
    "GB": 1024**3,
    "%": 1,
    "s": 1,
    "ms": 0.001,
    "min": 60,
}
# how devices write those units in a value (lower case)
_SPELLINGS = {
    "b": "B",
    "bytes": "B",
    "kb": "KB",
    "kib": "KB",
    "mb": "MB",
    "mib": "MB",
    "gb": "GB",
    "gib": "GB",
    "%": "%",
    "s": "s",
    "sec": "s",
    "ms": "ms",
    "min": "min",
}
# a node the device does not have (or will not show) is not a failure of the run
ABSENT = [404, 405, 406, 425]
MAX_NODE_URI = 200
MAX_VALUE = 4096  # characters kept of one node's value
MAX_ALERT_DATA = 16 * 1024  # characters kept of one alert item's data
MAX_ALERTS = 20  # DiagMon alert items stored from one message
_URI = re.compile(r"^\./[A-Za-z0-9_.\-/]{1,200}$")
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z%]*)\s*$")


def check_nodes(nodes: dict[str, str]) -> dict[str, str]:
    """The `omadm_diagmon_nodes` setting, checked: URIs under ./, known fields and units."""
    for uri, spec in nodes.items():
        if not _URI.match(uri) or "//" in uri or uri.endswith("/"):
            raise ValueError(f"{uri!r} is not a node URI like ./DiagMon/Memory/RAM/Avail")
        name, _, unit = spec.partition(":")
        if name and name not in HEALTH_FIELDS:
            raise ValueError(f"{uri}: {name!r} is not one of {', '.join(HEALTH_FIELDS)}")
        if unit not in UNITS:
            raise ValueError(f"{uri}: unit {unit!r} is not one of {', '.join(u for u in UNITS)}")
    return nodes


def diagnose_ops(settings: Settings) -> list[dict[str, Any]]:
    """The DM commands of a `diagnose` run: a Get per node, then the procedure's Start."""
    ops: list[dict[str, Any]] = [
        {"verb": "Get", "target": uri, "ok": ABSENT} for uri in settings.omadm_diagmon_nodes
    ]
    if settings.omadm_diagmon_start:
        ops.append({"verb": "Exec", "target": settings.omadm_diagmon_start})
    return ops


def parse_value(text: str, unit: str) -> float | None:
    """A node's value as a number in bytes, seconds or percent (None when it is not one).

    A unit written in the value itself (`512 MB`, `80%`) wins over the configured one.
    """
    match = _NUMBER.match(text) if len(text) <= 64 else None
    if match is None:
        return None
    number = float(match.group(1))
    written = match.group(2)
    if written:
        unit = _SPELLINGS.get(written.lower(), "?")
        if unit not in UNITS:
            return None
    return number * UNITS[unit]


def health_of(values: dict[str, str], nodes: dict[str, str]) -> dict[str, float]:
    """Health numbers from node values: for each field, the first configured node present."""
    health: dict[str, float] = {}
    for uri, spec in nodes.items():
        name, _, unit = spec.partition(":")
        if not name or name in health or uri not in values:
            continue
        number = parse_value(values[uri], unit)
        if number is None or (name == "battery_pct" and not 0 <= number <= 100):
            # e.g. Windows answers -1 while it cannot tell the charge
            continue
        health[name] = number
    return health


def report_from_ops(
    device_id: str, run_id: str, ops: Sequence[Any], nodes: dict[str, str]
) -> NewReport:
    """The report of a finished `diagnose` run from its ops (targets, statuses, values)."""
    values: dict[str, str] = {}
    missing: list[str] = []
    failed: dict[str, Any] = {}
    start: dict[str, Any] | None = None
    for op in ops:
        if not isinstance(op, dict):
            continue
        target = str(op.get("target", ""))[:MAX_NODE_URI]
        status = op.get("status")
        if op.get("verb") == "Exec":
            start = {"target": target, "status": status}
            for key in ("result_code", "alert_type", "error"):
                if key in op:
                    start[key] = op[key]
        elif op.get("verb") == "Get":
            if status == 200 and op.get("data") is not None:
                values[target] = str(op["data"])[:MAX_VALUE]
            elif status in ABSENT:
                missing.append(target)
            else:
                failed[target] = op.get("error") or status
    data: dict[str, Any] = {"nodes": values, "missing": missing}
    if failed:
        data["failed"] = failed
    if start is not None:
        data["procedure"] = start
    return NewReport(
        device_id=device_id,
        source="omadm",
        kind="diagmon-result",
        run_id=run_id,
        data=data,
        health=dict(health_of(values, nodes)),
    )


def _alert_type(cmd: m.Command, item: m.Item) -> str:
    meta = item.meta or cmd.meta
    return (meta.type or "").strip() if meta else ""


def alert_reports(
    device_id: str, commands: Sequence[m.Command], nodes: dict[str, str]
) -> list[NewReport]:
    """A report per DiagMon Generic Alert item of a message (run ids not yet checked)."""
    reports: list[NewReport] = []
    for cmd in commands:
        if cmd.name != "Alert" or cmd.error or (cmd.data or "").strip() != GENERIC_ALERT:
            continue
        for item in cmd.items:
            type_ = _alert_type(cmd, item)
            if not type_.startswith(ALERT_TYPE_PREFIX) or len(reports) >= MAX_ALERTS:
                continue
            name = type_[len(ALERT_TYPE_PREFIX) :].lstrip(":")
            source = (item.source or "")[:MAX_NODE_URI]
            text = item.data or ""
            meta = item.meta or cmd.meta
            data: dict[str, Any] = {
                "alert": name[:100] or "(unnamed)",
                "type": type_[:200],
                "source": source,
                "format": (meta.format if meta else None) or "",
                "data": text[:MAX_ALERT_DATA],
            }
            if len(text) > MAX_ALERT_DATA:
                data["truncated"] = True
            if item.more_data:
                data["incomplete"] = True  # a DiagMon report larger than one message
            if cmd.correlator:
                data["correlator"] = cmd.correlator[:64]
            values = {source: text} if source else {}
            reports.append(
                NewReport(
                    device_id=device_id,
                    source="omadm",
                    kind=ALERT_KINDS.get(name, "diagmon-alert"),
                    run_id=cmd.correlator,
                    data=data,
                    health=dict(health_of(values, nodes)),
                )
            )
    return reports


async def store_alerts(
    s: AsyncSession, device_id: str, commands: Sequence[m.Command], settings: Settings
) -> int:
    """Store the DiagMon Generic Alerts of one authenticated message; how many were stored.

    A correlator becomes the report's run id only when it names a run of this device.
    """
    reports = alert_reports(device_id, commands, settings.omadm_diagmon_nodes)
    if not reports:
        return 0
    from sqlalchemy import select

    from custos.commands.models import CommandRun
    from custos.diagnostics.service import add_reports

    named = {r.run_id for r in reports if r.run_id}
    known: set[str] = set()
    if named:
        known = set(
            (
                await s.scalars(
                    select(CommandRun.id).where(
                        CommandRun.id.in_(sorted(n for n in named if len(n) == 32)),
                        CommandRun.device_id == device_id,
                    )
                )
            ).all()
        )
    for r in reports:
        if r.run_id not in known:
            r.run_id = None
    await add_reports(
        s, reports, keep=settings.diagnostics_keep, max_bytes=settings.diagnostics_max_bytes
    )
    return len(reports)
