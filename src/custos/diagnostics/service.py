"""Use cases for diagnostics: store reports (bounded per device), list and show them.

Reports arrive three ways, all inside another feature's transaction: the result of a
`diagnose` run from an agent (a psutil snapshot), the result of the same run on an OMA DM
device (DiagMon node values), and DiagMon Generic Alerts an OMA DM device sends by itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from custos.commands.schemas import RunResult
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.models import Device
from custos.devices.scope import Scope
from custos.devices.service import resolve_device
from custos.diagnostics.models import DiagnosticsReport
from custos.diagnostics.schemas import (
    HEALTH_FIELDS,
    NewReport,
    ReportOut,
    ReportSummary,
    clean_health,
)
from custos.errors import NotFound
from custos.settings import Settings
from custos.validation import scrub

DIAGNOSE_KIND = "diagnose"


def _bounded(data: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """The data as stored: JSON-safe, and replaced by a note when larger than the limit."""
    clean = scrub(data)
    size = len(json.dumps(clean, default=str))
    if size > max_bytes:
        return {"note": f"report data of {size} bytes dropped (the limit is {max_bytes})"}
    return clean if isinstance(clean, dict) else {"value": clean}


async def add_reports(
    s: AsyncSession, reports: Sequence[NewReport], *, keep: int, max_bytes: int
) -> list[int]:
    """Store reports in the caller's transaction; each device keeps only its newest `keep`."""
    now = utcnow()
    rows = []
    for rep in reports:
        health = clean_health(rep.health)
        row = DiagnosticsReport(
            device_id=rep.device_id,
            source=rep.source,
            kind=rep.kind[:20],
            run_id=rep.run_id,
            received_at=now,
            data=_bounded(rep.data, max_bytes),
            **health,
        )
        s.add(row)
        rows.append(row)
    if not rows:
        return []
    await s.flush()
    for device_id in dict.fromkeys(r.device_id for r in rows):
        # the id of the newest report that falls out of the window, if there is one
        cutoff = await s.scalar(
            select(DiagnosticsReport.id)
            .where(DiagnosticsReport.device_id == device_id)
            .order_by(DiagnosticsReport.id.desc())
            .limit(1)
            .offset(keep)
        )
        if cutoff is not None:
            await s.execute(
                delete(DiagnosticsReport)
                .where(DiagnosticsReport.device_id == device_id, DiagnosticsReport.id <= cutoff)
                .execution_options(synchronize_session=False)
            )
    return [r.id for r in rows]


MAX_DISKS = 32
MAX_PROCESSES = 10
MAX_TEXT = 300


def _num(value: Any) -> int | float | None:
    """A finite number, or None (booleans and strings are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value if abs(value) <= 2**62 else None


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _numbers(value: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    return {k: _num(value.get(k)) for k in keys}


def clean_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """An agent's snapshot with only the known fields, each of its expected type.

    The console and CLI render these without further checks, so a device cannot make them
    fail with odd values, and the size of what is kept is bounded by the shape itself.
    """
    disks: list[dict[str, Any]] = []
    for d in _list(snapshot.get("disks")):
        if isinstance(d, dict) and len(disks) < MAX_DISKS:
            disks.append(
                {
                    "mount": _text(d.get("mount")) or "?",
                    "fstype": _text(d.get("fstype")) or "",
                    **{k: _num(d.get(k)) for k in ("total", "used", "free", "percent")},
                    "system": d.get("system") is True,
                }
            )
    processes: list[dict[str, Any]] = []
    for p in _list(snapshot.get("processes")):
        if isinstance(p, dict) and len(processes) < MAX_PROCESSES:
            processes.append(
                {
                    "pid": _num(p.get("pid")),
                    "name": _text(p.get("name")) or "",
                    "rss": _num(p.get("rss")),
                }
            )
    load = snapshot.get("load")
    battery = snapshot.get("battery")
    return {
        "collected_at": _text(snapshot.get("collected_at")),
        "memory": _numbers(snapshot.get("memory"), ("total", "available", "used", "percent")),
        "swap": _numbers(snapshot.get("swap"), ("total", "used", "free", "percent")),
        "disks": disks,
        "load": [_num(x) for x in load[:3]] if isinstance(load, list) else None,
        "cpu": _numbers(snapshot.get("cpu"), ("count", "percent")),
        "uptime_s": _num(snapshot.get("uptime_s")),
        "boot_time": _text(snapshot.get("boot_time")),
        "battery": (
            {
                "percent": _num(battery.get("percent")),
                "plugged": battery.get("plugged")
                if isinstance(battery.get("plugged"), bool)
                else None,
                "secs_left": _num(battery.get("secs_left")),
            }
            if isinstance(battery, dict)
            else None
        ),
        "process_count": _num(snapshot.get("process_count")),
        "processes": processes,
    }


def snapshot_health(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The health numbers of an agent's snapshot (see custos.agent.diagnose); odd shapes
    give None for what cannot be read, never an error."""

    def part(name: str) -> dict[str, Any]:
        value = snapshot.get(name)
        return value if isinstance(value, dict) else {}

    memory, battery = part("memory"), part("battery")
    disks = [d for d in _list(snapshot.get("disks")) if isinstance(d, dict)]
    system = next((d for d in disks if d.get("system") is True), None)
    if system is None:
        system = next((d for d in disks if d.get("mount") == "/"), None)
    if system is None and disks:
        system = max(disks, key=lambda d: _num(d.get("total")) or 0)
    load = snapshot.get("load")
    return {
        "mem_total": memory.get("total"),
        "mem_available": memory.get("available"),
        "storage_total": (system or {}).get("total"),
        "storage_free": (system or {}).get("free"),
        "battery_pct": battery.get("percent"),
        "uptime_s": snapshot.get("uptime_s"),
        "load1": load[0] if isinstance(load, list) and load else None,
    }


def _summary(r: DiagnosticsReport) -> dict[str, Any]:
    return {
        "id": r.id,
        "device_id": r.device_id,
        "source": r.source,
        "kind": r.kind,
        "run_id": r.run_id,
        "received_at": r.received_at,
        **{f: getattr(r, f) for f in HEALTH_FIELDS},
    }


class DiagnosticsService:
    """Stores what `diagnose` runs bring back and shows a device's reports."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    @property
    def keep(self) -> int:
        """How many reports each device keeps."""
        return self.settings.diagnostics_keep

    @property
    def max_bytes(self) -> int:
        """The largest report data stored (JSON bytes)."""
        return self.settings.diagnostics_max_bytes

    # --- the commands service's result hook (inside the check-in's or session's transaction)

    @staticmethod
    def wants(res: RunResult) -> bool:
        """Whether a result may be a diagnose run's (decided before any query is made)."""
        return "snapshot" in res.result or "ops" in res.result

    async def on_results(self, s: AsyncSession, items: Sequence[tuple[str, RunResult]]) -> None:
        """Results that just closed `diagnose` runs: a report each."""
        from custos.omadm import diagmon

        omadm_devices = set(
            (
                await s.scalars(
                    select(Device.id).where(
                        Device.id.in_(sorted({d for d, _ in items})),
                        Device.agent_version.startswith("omadm"),
                    )
                )
            ).all()
        )
        reports: list[NewReport] = []
        for device_id, res in items:
            if device_id in omadm_devices:
                ops = res.result.get("ops")
                if isinstance(ops, list):
                    reports.append(
                        diagmon.report_from_ops(
                            device_id, res.run_id, ops, self.settings.omadm_diagmon_nodes
                        )
                    )
                continue
            snapshot = res.result.get("snapshot")
            if res.state == "succeeded" and isinstance(snapshot, dict):
                snapshot = clean_snapshot(snapshot)
                reports.append(
                    NewReport(
                        device_id=device_id,
                        source="agent",
                        kind="snapshot",
                        run_id=res.run_id,
                        data=snapshot,
                        health=snapshot_health(snapshot),
                    )
                )
        await add_reports(s, reports, keep=self.keep, max_bytes=self.max_bytes)

    # --- admin reads

    async def list_reports(
        self, ref: str, *, limit: int, scope: Scope = None
    ) -> list[ReportSummary]:
        """A device's reports, newest first (without their data)."""
        async with self.db.read() as s:
            device = await resolve_device(s, ref, scope)
            rows = (
                await s.scalars(
                    select(DiagnosticsReport)
                    .where(DiagnosticsReport.device_id == device.id)
                    .order_by(DiagnosticsReport.id.desc())
                    .limit(limit)
                )
            ).all()
        return [ReportSummary(**_summary(r)) for r in rows]

    async def get_report(self, ref: str, report_id: int, scope: Scope = None) -> ReportOut:
        """One report of a device, with its data."""
        async with self.db.read() as s:
            device = await resolve_device(s, ref, scope)
            row = await s.get(DiagnosticsReport, report_id)
        if row is None or row.device_id != device.id:
            raise NotFound(f"device {device.name} has no diagnostics report {report_id}")
        return ReportOut(**_summary(row), data=row.data)

    async def latest(self, device_id: str) -> ReportOut | None:
        """The newest report of a device the caller may see (the console's device page)."""
        async with self.db.read() as s:
            row = await s.scalar(
                select(DiagnosticsReport)
                .where(DiagnosticsReport.device_id == device_id)
                .order_by(DiagnosticsReport.id.desc())
                .limit(1)
            )
        return None if row is None else ReportOut(**_summary(row), data=row.data)
