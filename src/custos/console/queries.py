"""Read-only aggregates the console shows and no service offers yet (dashboard, device runs,
an OMA DM device's account).

Each function is one or two SQL statements whatever the fleet size: counts are grouped in
the database, never computed over loaded rows. They belong in the owning services (devices,
commands) once those grow the same reads; the console then calls those instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select

from custos.commands.models import Command, CommandRun
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.models import Device
from custos.devices.scope import in_scope
from custos.policies.models import DevicePolicy

UNKNOWN = "(unknown)"


@dataclass(frozen=True)
class FleetSummary:
    """Device counts for the dashboard."""

    total: int
    active: int
    retired: int
    online: int
    never_seen: int
    seen_1h: int
    seen_24h: int
    seen_7d: int
    by_os: list[tuple[str, int]]
    enrolled_by_day: list[tuple[date, int]]
    enrolled_before: int


def _scoped(stmt: Any, scope: Collection[int] | None) -> Any:
    return stmt if scope is None else stmt.where(in_scope(Device.id, frozenset(scope)))


async def fleet_summary(
    db: Database,
    *,
    fact: Callable[[str], Any],
    online_within_s: float,
    scope: Collection[int] | None,
    days: int = 30,
) -> FleetSummary:
    """Counts by status, by last contact and by OS, and enrolments per day (four queries).

    `fact` is the reports service's fact expression, so the OS grouping is written as the
    expression index is.
    """
    now = utcnow()
    since = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    active = Device.status == "active"

    def seen_within(seconds: float) -> Any:
        return func.sum(
            case((active & (Device.last_seen >= now - timedelta(seconds=seconds)), 1), else_=0)
        )

    os_name = fact("os.name")
    day = func.date(Device.enrolled_at)
    async with db.read() as s:
        counts = (
            await s.execute(
                _scoped(
                    select(
                        func.count(),
                        func.sum(case((active, 1), else_=0)),
                        seen_within(online_within_s),
                        func.sum(case((active & Device.last_seen.is_(None), 1), else_=0)),
                        seen_within(3600),
                        seen_within(86400),
                        seen_within(7 * 86400),
                        func.sum(case((Device.enrolled_at < since, 1), else_=0)),
                    ),
                    scope,
                )
            )
        ).one()
        by_os = (
            await s.execute(
                _scoped(select(os_name, func.count()).where(active), scope)
                .group_by(os_name)
                .order_by(func.count().desc())
                .limit(50)
            )
        ).all()
        per_day = (
            await s.execute(
                _scoped(select(day, func.count()).where(Device.enrolled_at >= since), scope)
                .group_by(day)
                .order_by(day)
            )
        ).all()
    total, n_active, online, never, h1, h24, d7, before = (int(v or 0) for v in counts)
    return FleetSummary(
        total=total,
        active=n_active,
        retired=total - n_active,
        online=online,
        never_seen=never,
        seen_1h=h1,
        seen_24h=h24,
        seen_7d=d7,
        by_os=[(str(k or UNKNOWN), int(n)) for k, n in by_os],
        enrolled_by_day=[(_as_date(d), int(n)) for d, n in per_day],
        enrolled_before=before,
    )


def _as_date(v: Any) -> date:
    # SQLite's date() answers text, PostgreSQL's a date
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    return date.fromisoformat(str(v))


def cumulative_by_day(summary: FleetSummary, days: int = 30) -> tuple[list[str], list[int]]:
    """Labels (e.g. 'Mar 3') and the number of devices enrolled by the end of each day."""
    today = utcnow().date()
    per = dict(summary.enrolled_by_day)
    labels, values = [], []
    running = summary.enrolled_before
    for i in range(days - 1, -1, -1):
        d = today - timedelta(days=i)
        running += per.get(d, 0)
        labels.append(d.strftime("%b %-d"))
        values.append(running)
    return labels, values


@dataclass(frozen=True)
class DeviceRun:
    """One command run on one device, as the device page lists it."""

    run_id: str
    command_id: str
    kind: str
    payload: dict[str, Any]
    created_by: str
    created_at: datetime
    state: str
    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None
    finished_at: datetime | None
    # the structured result (an OMA DM run's per-node statuses and values)
    result: dict[str, Any] = field(default_factory=dict)


async def device_runs(
    db: Database, device_id: str, *, limit: int = 20, kind: str | None = None
) -> list[DeviceRun]:
    """The newest command runs on one device with their output, of one kind if given (one
    query)."""
    stmt = (
        select(CommandRun, Command)
        .join(Command, Command.id == CommandRun.command_id)
        .where(CommandRun.device_id == device_id)
    )
    if kind is not None:
        stmt = stmt.where(Command.kind == kind)
    async with db.read() as s:
        rows = (
            await s.execute(stmt.order_by(CommandRun.created_at.desc(), CommandRun.id).limit(limit))
        ).all()
    return [
        DeviceRun(
            run_id=r.id,
            command_id=c.id,
            kind=c.kind,
            payload=c.payload,
            created_by=c.created_by,
            created_at=r.created_at,
            state=r.state,
            exit_code=r.exit_code,
            stdout=r.stdout,
            stderr=r.stderr,
            error=r.error,
            finished_at=r.finished_at,
            result=r.result if isinstance(r.result, dict) else {},
        )
        for r, c in rows
    ]


@dataclass(frozen=True)
class ComplianceSummary:
    """Active devices by policy compliance (devices without a policy are not counted)."""

    compliant: int
    noncompliant: int
    pending: int


async def compliance_summary(db: Database, scope: Collection[int] | None) -> ComplianceSummary:
    """How many active devices are compliant, non-compliant and pending (one grouped query).

    The policy service's compliance report loads every device's row and bundle; the
    dashboard only needs the three counts, so they are grouped in the database.
    """
    async with db.read() as s:
        rows = (
            await s.execute(
                _scoped(
                    select(DevicePolicy.status, func.count())
                    .join(Device, Device.id == DevicePolicy.device_id)
                    .where(Device.status == "active", DevicePolicy.status != "none"),
                    scope,
                ).group_by(DevicePolicy.status)
            )
        ).all()
    counts = {str(k): int(n) for k, n in rows}
    return ComplianceSummary(
        compliant=counts.get("compliant", 0),
        noncompliant=counts.get("noncompliant", 0),
        pending=counts.get("pending", 0),
    )
