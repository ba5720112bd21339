"""Report use cases: software, stale devices, hardware, errors, the device list; CSV export.

Every report takes `scope`: the group ids whose devices the caller may see, or None for
every device. A device outside those groups never appears, in rows or in counts.
Retired devices are left out of every report except the device list (which filters on
status). Reads only: no report writes, except the software summary's refresh.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Select,
    bindparam,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from custos.commands.models import Command, CommandRun
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.models import Device, Group, device_groups
from custos.devices.scope import in_scope
from custos.errors import Invalid
from custos.reports.models import (
    MAX_NAME_LEN,
    MAX_SOURCE_LEN,
    MAX_VERSION_LEN,
    fleet_snapshots,
    installed_software,
    report_refreshes,
    software_summary,
)
from custos.reports.schemas import (
    CommandError,
    DeviceRow,
    FleetPoint,
    HardwareModel,
    InstallError,
    MissingSoftware,
    NotSeenDevice,
    Page,
    SoftwareCount,
    SoftwareHolder,
    TopSoftware,
    VersionCount,
)
from custos.software.models import Deployment, DeploymentDevice

# how long the dashboard's online/offline history is kept
SNAPSHOT_KEEP_DAYS = 400

Scope = frozenset[int] | None
Stmt = Select[*tuple[Any, ...]]  # a SELECT of any columns

# above this many matching devices the list's total is the planner's estimate (PostgreSQL)
EXACT_COUNT_LIMIT = 10_000
# up to this many holders, "who has" finds them by name and sorts them; above it, it walks
# the devices in name order (each one an index probe) until the page is full
FEW_HOLDERS = 2_000
# a CSV export streams at most this many rows (a whole fleet's software is 20 million)
MAX_EXPORT_ROWS = 1_000_000
SUMMARY = "software_summary"
SUMMARY_MAX_AGE_S = 300.0
SUMMARY_LOCK = 0x6375_7372  # "cusr": one process refreshes the summary at a time

COMMAND_ERROR_STATES = ("failed", "interrupted", "expired", "rejected")
DEVICE_SORTS = ("name", "last_seen", "enrolled_at", "os", "model", "status")

_SW_KEY = re.compile(r"^sw\.([^.]+)\.(.+)$", re.DOTALL)
sw = installed_software.c


# --------------------------------------------------------------- inventory → installed_software


def software_key(key: str) -> tuple[str, str] | None:
    """(source, name) of an indexable `sw.<source>.<name>` key, else None."""
    m = _SW_KEY.match(key)
    if m is None or len(m[1]) > MAX_SOURCE_LEN or len(m[2]) > MAX_NAME_LEN:
        return None
    return m[1], m[2]


def software_rows(device_id: str, inventory: Mapping[str, str]) -> list[dict[str, str]]:
    """installed_software rows for a whole inventory."""
    rows = []
    for key, version in inventory.items():
        sn = software_key(key)
        if sn is not None:
            rows.append(
                {"d": device_id, "s": sn[0], "n": sn[1], "v": str(version)[:MAX_VERSION_LEN]}
            )
    return rows


_DELETE_ONE = delete(installed_software).where(
    sw.device_id == bindparam("d"), sw.source == bindparam("s"), sw.name == bindparam("n")
)


async def sync_installed_software(
    s: AsyncSession,
    device_id: str,
    changes: Sequence[tuple[str, str | None, str | None]],
    *,
    full: Mapping[str, str] | None = None,
) -> None:
    """Keep installed_software equal to the device's `sw.*` keys, in the caller's transaction.

    `changes` is (key, old, new) per changed inventory key; `full` (a full inventory)
    replaces every row of the device. At most two set-based statements whatever the size.
    """
    conn = await s.connection()
    if full is not None:
        await conn.execute(delete(installed_software).where(sw.device_id == device_id))
        rows = software_rows(device_id, full)
        if rows:
            await conn.execute(_upsert(conn.dialect.name), rows)
        return
    gone, put = [], []
    for key, _old, new in changes:
        sn = software_key(key)
        if sn is None:
            continue
        if new is None:
            gone.append({"d": device_id, "s": sn[0], "n": sn[1]})
        else:
            put.append({"d": device_id, "s": sn[0], "n": sn[1], "v": new[:MAX_VERSION_LEN]})
    if gone:
        await conn.execute(_DELETE_ONE, gone)
    if put:
        # an upsert, not an insert: a row that is somehow already there must not fail a check-in
        await conn.execute(_upsert(conn.dialect.name), put)


def _upsert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(installed_software).values(
        device_id=bindparam("d"), source=bindparam("s"), name=bindparam("n"), version=bindparam("v")
    )
    return stmt.on_conflict_do_update(
        index_elements=["device_id", "source", "name"], set_={"version": stmt.excluded.version}
    )


# --------------------------------------------------------------- versions


_PRE_RELEASE = frozenset({"dev", "alpha", "beta", "pre", "preview", "rc"})
_VERSION_TOKEN = re.compile(r"~|\d+|[A-Za-z]+")


def version_key(version: str) -> tuple[int, tuple[tuple[int, int, str], ...]]:
    """A sort key that orders most real version strings the way people mean them.

    Epoch first (`1:2.0` > `3.0`, dpkg), then runs of digits compared as numbers and runs
    of letters as words; separators (`.-+_:`) only separate. A version that is a prefix of
    another is older (`1.0` < `1.0.1`, `1.0` < `1.0-2`), except before `~` or a pre-release
    word (dev, alpha, beta, pre, preview, rc): `1.0~rc1` < `1.0rc1` < `1.0`. Not handled:
    single-letter pre-releases (`1.0a1` sorts after `1.0`, as OpenSSL's `1.1.1w` must),
    and schemes that mean something else by the same characters.
    """
    epoch = 0
    m = re.match(r"^\s*(\d+):", version)
    if m:
        epoch, version = int(m[1]), version[m.end() :]
    parts: list[tuple[int, int, str]] = []
    for tok in _VERSION_TOKEN.findall(version):
        if tok == "~":
            parts.append((-2, 0, ""))
        elif tok.isdigit():
            parts.append((2, int(tok), ""))
        elif tok.lower() in _PRE_RELEASE:
            parts.append((-1, 0, tok.lower()))
        else:
            parts.append((1, 0, tok.lower()))
    parts.append((0, 0, ""))  # the end sorts after ~ and pre-releases, before anything else
    return epoch, tuple(parts)


# --------------------------------------------------------------- CSV


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """One cell: text that a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, list | tuple):
        value = ";".join(str(v) for v in value)
    text = str(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def csv_line(cells: Iterable[Any]) -> str:
    """One CSV record (RFC 4180 quoting, CRLF)."""
    buf = io.StringIO()
    csv.writer(buf).writerow([csv_cell(c) for c in cells])
    return buf.getvalue()


async def csv_from_models(rows: Iterable[Any], columns: Sequence[str]) -> AsyncIterator[str]:
    """CSV lines from pydantic rows (header first)."""
    yield csv_line(columns)
    for r in rows:
        yield csv_line(getattr(r, c) for c in columns)


# --------------------------------------------------------------- the service


class ReportService:
    """Canned reports over devices, software, commands and deployments."""

    def __init__(self, db: Database, *, summary_max_age_s: float = SUMMARY_MAX_AGE_S) -> None:
        self.db = db
        self.summary_max_age_s = summary_max_age_s

    # -- SQL pieces --------------------------------------------------------------------

    def fact(self, key: str) -> ColumnElement[str]:
        """A device fact, written exactly as the expression indexes of migration 0006 are."""
        if self.db.dialect == "postgresql":
            return literal_column(f"(devices.facts ->> '{key}')")
        return literal_column(f"json_extract(devices.facts, '$.\"{key}\"')")

    @staticmethod
    def _in_scope(device_id: Any, scope: Scope) -> ColumnElement[bool]:
        return in_scope(device_id, scope)

    @staticmethod
    def _active(device_id: Any) -> ColumnElement[bool]:
        # an anti-join against the few retired devices: no join with all of devices (wide rows)
        gone = Device.__table__.alias("gone")
        return ~exists().where(gone.c.id == device_id, gone.c.status != "active")

    async def _count(self, s: AsyncSession, stmt: Stmt) -> int:
        return int(await s.scalar(select(func.count()).select_from(stmt.subquery())) or 0)

    @staticmethod
    def _like(text: str) -> str:
        return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    # -- the device list ---------------------------------------------------------------

    def _device_filter(
        self,
        scope: Scope,
        q: str | None,
        os: str | None,
        model: str | None,
        group: str | None,
        status: str | None,
    ) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = [self._in_scope(Device.id, scope)]
        if q:
            pattern = f"%{self._like(q.lower())}%"
            conds.append(
                or_(func.lower(Device.name).like(pattern, escape="\\"), Device.id == q.lower())
            )
        if os:
            conds.append(self.fact("os.name") == os)
        if model:
            conds.append(self.fact("hw.model") == model)
        if status:
            conds.append(Device.status == status)
        if group:
            conds.append(
                exists()
                .where(device_groups.c.device_id == Device.id)
                .where(device_groups.c.group_id == Group.id, Group.name == group)
            )
        return conds

    def _device_order(self, sort: str, order: str) -> list[Any]:
        if sort not in DEVICE_SORTS:
            raise Invalid(f"sort is one of {', '.join(DEVICE_SORTS)}")
        if order not in ("asc", "desc"):
            raise Invalid("order is asc or desc")
        col: Any = {
            "name": func.lower(Device.name),
            "last_seen": Device.last_seen,
            "enrolled_at": Device.enrolled_at,
            "os": self.fact("os.name"),
            "model": self.fact("hw.model"),
            "status": Device.status,
        }[sort]
        if order == "asc":
            key = col.asc().nulls_first() if sort == "last_seen" else col.asc()
            return [key, Device.id.asc()]
        key = col.desc().nulls_last() if sort == "last_seen" else col.desc()
        return [key, Device.id.desc()]

    def _device_select(self) -> Stmt:
        return select(
            Device.id,
            Device.name,
            Device.status,
            self.fact("os.name").label("os_name"),
            self.fact("os.version").label("os_version"),
            self.fact("hw.manufacturer").label("manufacturer"),
            self.fact("hw.model").label("model"),
            Device.last_seen,
            Device.enrolled_at,
            Device.agent_version,
        )

    async def devices_page(
        self,
        scope: Scope,
        *,
        q: str | None = None,
        os: str | None = None,
        model: str | None = None,
        group: str | None = None,
        status: str | None = None,
        sort: str = "name",
        order: str = "asc",
        limit: int = 50,
        offset: int = 0,
    ) -> Page[DeviceRow]:
        """Devices filtered, sorted and paged; three statements whatever the page size.

        The total is exact up to 10,000 matches; above that, on PostgreSQL, it is the
        planner's estimate (`total_is_estimate`), as counting 100,000 wide rows per page
        view costs more than the page itself.
        """
        conds = self._device_filter(scope, q, os, model, group, status)
        stmt = (
            self._device_select()
            .where(*conds)
            .order_by(*self._device_order(sort, order))
            .limit(limit)
            .offset(offset)
        )
        async with self.db.read() as s:
            rows = (await s.execute(stmt)).all()
            total, estimated = await self._capped_count(s, select(Device.id).where(*conds))
            groups = await self._groups_of(s, [r.id for r in rows])
        items = [
            DeviceRow(
                id=r.id,
                name=r.name,
                status=r.status,
                os_name=r.os_name,
                os_version=r.os_version,
                manufacturer=r.manufacturer,
                model=r.model,
                last_seen=r.last_seen,
                enrolled_at=r.enrolled_at,
                agent_version=r.agent_version,
                groups=groups.get(r.id, []),
            )
            for r in rows
        ]
        if not estimated and total < offset + len(items):  # rows changed between the reads
            total = offset + len(items)
        return Page(
            items=items, total=total, total_is_estimate=estimated, limit=limit, offset=offset
        )

    async def _capped_count(self, s: AsyncSession, ids: Stmt) -> tuple[int, bool]:
        n = await self._count(s, ids.limit(EXACT_COUNT_LIMIT + 1))
        if n <= EXACT_COUNT_LIMIT:
            return n, False
        if self.db.dialect != "postgresql":
            return await self._count(s, ids), False
        estimate = await self._planner_rows(s, ids)
        return max(estimate, n), True

    async def _planner_rows(self, s: AsyncSession, stmt: Stmt) -> int:
        """PostgreSQL's estimate of the rows a statement returns (EXPLAIN, nothing run)."""
        conn = await s.connection()
        compiled = stmt.compile(dialect=conn.dialect)
        params = compiled.construct_params()
        positional = tuple(params[k] for k in (compiled.positiontup or ()))
        res = await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string, positional)
        plan: Any = res.scalar()
        if isinstance(plan, str):
            import json

            plan = json.loads(plan)
        return int(plan[0]["Plan"]["Plan Rows"])

    async def _groups_of(self, s: AsyncSession, ids: list[str]) -> dict[str, list[str]]:
        if not ids:
            return {}
        rows = await s.execute(
            select(device_groups.c.device_id, Group.name)
            .join(Group, Group.id == device_groups.c.group_id)
            .where(device_groups.c.device_id.in_(ids))
            .order_by(Group.name)
        )
        out: dict[str, list[str]] = {}
        for device_id, name in rows:
            out.setdefault(device_id, []).append(name)
        return out

    async def devices_csv(
        self,
        scope: Scope,
        *,
        q: str | None = None,
        os: str | None = None,
        model: str | None = None,
        group: str | None = None,
        status: str | None = None,
        sort: str = "name",
        order: str = "asc",
    ) -> AsyncIterator[str]:
        """The whole filtered device list as CSV (groups joined with ';')."""
        conds = self._device_filter(scope, q, os, model, group, status)
        stmt = self._device_select().where(*conds).order_by(*self._device_order(sort, order))
        columns = list(DeviceRow.model_fields)
        yield csv_line(columns)
        async for part in self._stream(stmt):
            groups = await self._groups_of_fresh([r.id for r in part])
            for r in part:
                yield csv_line([*r, groups.get(r.id, [])])

    async def _groups_of_fresh(self, ids: list[str]) -> dict[str, list[str]]:
        async with self.db.read() as s:
            return await self._groups_of(s, ids)

    async def _stream(self, stmt: Stmt, size: int = 1000) -> AsyncIterator[list[Any]]:
        """Rows in lists of `size`, from a server-side cursor (never the whole set in memory)."""
        async with self.db.read() as s:
            result = await s.stream(stmt.limit(MAX_EXPORT_ROWS))
            async for part in result.partitions(size):
                yield list(part)

    # -- who has software X ------------------------------------------------------------

    def _holders(
        self,
        scope: Scope,
        name: str,
        source: str | None,
        version: str | None,
        version_prefix: str | None,
    ) -> list[ColumnElement[bool]]:
        conds = [sw.name == name, self._active(sw.device_id), self._in_scope(sw.device_id, scope)]
        if source:
            conds.append(sw.source == source)
        if version is not None:
            conds.append(sw.version == version)
        if version_prefix:
            conds.append(sw.version.like(self._like(version_prefix) + "%", escape="\\"))
        return conds

    def _holders_select(self, conds: list[ColumnElement[bool]]) -> Stmt:
        return (
            select(
                Device.id.label("device_id"),
                Device.name.label("device_name"),
                sw.source,
                sw.name,
                sw.version,
                Device.last_seen,
            )
            .join_from(installed_software, Device, Device.id == sw.device_id)
            .where(*conds)
            .order_by(func.lower(Device.name), Device.id, sw.source)
        )

    async def who_has(
        self,
        scope: Scope,
        name: str,
        *,
        source: str | None = None,
        version: str | None = None,
        version_prefix: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[SoftwareHolder]:
        """Devices that have software `name` (from `source`; at `version` or `version_prefix`)."""
        conds = self._holders(scope, name, source, version, version_prefix)
        async with self.db.read() as s:
            # the exact count first (an index-only scan): it decides the shape of the page
            # query, as the planner's guess for a name outside its statistics can be off by
            # a hundredfold, and walking 100,000 devices in name order for 50 holders of a
            # rare package took 1.5 s
            total = int(
                await s.scalar(select(func.count()).select_from(installed_software).where(*conds))
                or 0
            )
            if total <= FEW_HOLDERS:
                stmt = self._few_holders_select(conds)
            else:
                stmt = self._holders_select(conds)
            rows = (await s.execute(stmt.limit(limit).offset(offset))).all() if total else []
        items = [SoftwareHolder.model_validate(r, from_attributes=True) for r in rows]
        return Page(items=items, total=total, limit=limit, offset=offset)

    def _few_holders_select(self, conds: list[ColumnElement[bool]]) -> Stmt:
        """Holders found by name first (materialised), then joined and sorted: few rows."""
        hits = (
            select(sw.device_id, sw.source, sw.name, sw.version)
            .where(*conds)
            .cte("hits")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        return (
            select(
                Device.id.label("device_id"),
                Device.name.label("device_name"),
                hits.c.source,
                hits.c.name,
                hits.c.version,
                Device.last_seen,
            )
            .join_from(hits, Device, Device.id == hits.c.device_id)
            .order_by(func.lower(Device.name), Device.id, hits.c.source)
        )

    async def who_has_csv(
        self,
        scope: Scope,
        name: str,
        *,
        source: str | None = None,
        version: str | None = None,
        version_prefix: str | None = None,
    ) -> AsyncIterator[str]:
        """Every holder as CSV."""
        stmt = self._holders_select(self._holders(scope, name, source, version, version_prefix))
        yield csv_line(SoftwareHolder.model_fields)
        async for part in self._stream(stmt):
            for r in part:
                yield csv_line(r)

    async def versions(
        self, scope: Scope, name: str, *, source: str | None = None
    ) -> list[VersionCount]:
        """Devices per version of software `name`, most common first."""
        conds = self._holders(scope, name, source, None, None)
        n = func.count().label("devices")
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(sw.source, sw.version, n)
                    .where(*conds)
                    .group_by(sw.source, sw.version)
                    .order_by(n.desc(), sw.source, sw.version)
                    .limit(10_000)
                )
            ).all()
        return [VersionCount(source=r.source, version=r.version, devices=r.devices) for r in rows]

    # -- who lacks software X ----------------------------------------------------------

    async def lacks(
        self,
        scope: Scope,
        name: str,
        *,
        source: str | None = None,
        min_version: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[MissingSoftware]:
        """Active devices without software `name`, or (with `min_version`) only older ones.

        Versions are compared with `version_key` in Python (SQL cannot order version
        strings); a device with several sources of it counts its newest version.
        """
        if min_version is None:
            stmt = self._lacking_select(scope, name, source)
            async with self.db.read() as s:
                rows = (await s.execute(stmt.limit(limit).offset(offset))).all()
                total = await self._count(s, stmt.order_by(None))
            items = [
                MissingSoftware(
                    device_id=r.id,
                    device_name=r.name,
                    installed_version=None,
                    last_seen=r.last_seen,
                )
                for r in rows
            ]
            return Page(items=items, total=total, limit=limit, offset=offset)
        everything = await self._lacking_all(scope, name, source, min_version)
        return Page(
            items=everything[offset : offset + limit],
            total=len(everything),
            limit=limit,
            offset=offset,
        )

    def _lacking_select(self, scope: Scope, name: str, source: str | None) -> Stmt:
        has = exists().where(sw.device_id == Device.id, sw.name == name)
        if source:
            has = has.where(sw.source == source)
        return (
            select(Device.id, Device.name, Device.last_seen)
            .where(Device.status == "active", ~has, self._in_scope(Device.id, scope))
            .order_by(func.lower(Device.name), Device.id)
        )

    async def _lacking_all(
        self, scope: Scope, name: str, source: str | None, min_version: str
    ) -> list[MissingSoftware]:
        floor = version_key(min_version)
        conds = self._holders(scope, name, source, None, None)
        newest: dict[str, tuple[Any, str]] = {}
        async with self.db.read() as s:
            missing = (
                await s.execute(self._lacking_select(scope, name, source).limit(MAX_EXPORT_ROWS))
            ).all()
            held = await s.execute(
                select(Device.id, Device.name, Device.last_seen, sw.version)
                .join_from(installed_software, Device, Device.id == sw.device_id)
                .where(*conds)
                .limit(MAX_EXPORT_ROWS)
            )
            for r in held:
                best = newest.get(r.id)
                if best is None or version_key(r.version) > version_key(best[1]):
                    newest[r.id] = (r, r.version)
        out = [
            MissingSoftware(
                device_id=r.id, device_name=r.name, installed_version=None, last_seen=r.last_seen
            )
            for r in missing
        ]
        out += [
            MissingSoftware(
                device_id=r.id, device_name=r.name, installed_version=v, last_seen=r.last_seen
            )
            for r, v in newest.values()
            if version_key(v) < floor
        ]
        out.sort(key=lambda m: (m.device_name.lower(), m.device_id))
        return out

    async def lacks_csv(
        self,
        scope: Scope,
        name: str,
        *,
        source: str | None = None,
        min_version: str | None = None,
    ) -> AsyncIterator[str]:
        """Every device lacking it, as CSV."""
        columns = list(MissingSoftware.model_fields)
        if min_version is not None:
            rows = await self._lacking_all(scope, name, source, min_version)
            async for line in csv_from_models(rows, columns):
                yield line
            return
        yield csv_line(columns)
        async for part in self._stream(self._lacking_select(scope, name, source)):
            for r in part:
                yield csv_line([r.id, r.name, None, r.last_seen])

    # -- top software ------------------------------------------------------------------

    async def top_software(
        self, scope: Scope, *, limit: int = 20, live: bool = False
    ) -> TopSoftware:
        """The most installed software by device count.

        Unscoped, it reads the summary (at most `summary_max_age_s` old, see
        `refresh_summary`): counting 20 million rows live takes seconds. A scoped caller,
        or `live=True`, gets a live count over the devices in question.
        """
        async with self.db.read() as s:
            if scope is None and not live:
                as_of = await s.scalar(
                    select(report_refreshes.c.refreshed_at).where(
                        report_refreshes.c.name == SUMMARY
                    )
                )
                if as_of is not None:
                    t = software_summary.c
                    rows = (
                        await s.execute(
                            select(t.source, t.name, t.devices, t.versions)
                            .order_by(t.devices.desc(), t.name, t.source)
                            .limit(limit)
                        )
                    ).all()
                    return TopSoftware(items=[_count(r) for r in rows], live=False, as_of=as_of)
            now = utcnow()
            n = func.count().label("devices")
            rows = (
                await s.execute(
                    select(
                        sw.source, sw.name, n, func.count(sw.version.distinct()).label("versions")
                    )
                    .where(self._active(sw.device_id), self._in_scope(sw.device_id, scope))
                    .group_by(sw.source, sw.name)
                    .order_by(n.desc(), sw.name, sw.source)
                    .limit(limit)
                )
            ).all()
        return TopSoftware(items=[_count(r) for r in rows], live=True, as_of=now)

    async def refresh_summary(self, *, force: bool = False) -> bool:
        """Recount the software summary if it is older than its maximum age; True if it did.

        One transaction: readers see the old counts until the new ones commit. On
        PostgreSQL an advisory lock lets one server process do it while the others skip.
        """
        started = time.monotonic()
        now = utcnow()
        async with self.db.transaction() as uow:
            s = uow.session
            if self.db.dialect == "postgresql":
                got = await s.scalar(select(func.pg_try_advisory_xact_lock(SUMMARY_LOCK)))
                if not got:
                    return False
            last = await s.scalar(
                select(report_refreshes.c.refreshed_at).where(report_refreshes.c.name == SUMMARY)
            )
            fresh = last is not None and now - last < timedelta(seconds=self.summary_max_age_s)
            if fresh and not force:
                return False
            await s.execute(delete(software_summary))
            await s.execute(
                software_summary.insert().from_select(
                    ["source", "name", "devices", "versions"],
                    select(sw.source, sw.name, func.count(), func.count(sw.version.distinct()))
                    .where(self._active(sw.device_id))
                    .group_by(sw.source, sw.name),
                )
            )
            took = time.monotonic() - started
            await s.execute(delete(report_refreshes).where(report_refreshes.c.name == SUMMARY))
            await s.execute(
                report_refreshes.insert().values(name=SUMMARY, refreshed_at=now, took_s=took)
            )
        return True

    async def tick(self) -> None:
        """The periodic job: refresh the summary when it is due."""
        await self.refresh_summary()

    # -- online/offline over time ------------------------------------------------------

    async def snapshot_fleet(
        self, *, online_within_s: float, period_s: float, now: datetime | None = None
    ) -> bool:
        """Record this period's active/online counts once; False if already recorded.

        Every server process runs this job; the period's start is the key, so the first
        insert wins and the others find the row (or lose the race on the key) and stop.
        Snapshots older than SNAPSHOT_KEEP_DAYS go in the same transaction.
        """
        now = now or utcnow()
        bucket = datetime.fromtimestamp(now.timestamp() // period_s * period_s, UTC)
        try:
            async with self.db.transaction() as uow:
                s = uow.session
                if await s.scalar(
                    select(fleet_snapshots.c.at).where(fleet_snapshots.c.at == bucket)
                ):
                    return False
                cutoff = now - timedelta(seconds=online_within_s)
                total, online, never = (
                    await s.execute(
                        select(
                            func.count(),
                            func.count().filter(Device.last_seen >= cutoff),
                            func.count().filter(Device.last_seen.is_(None)),
                        ).where(Device.status == "active")
                    )
                ).one()
                await s.execute(
                    fleet_snapshots.insert().values(
                        at=bucket, total=total, online=online, never_seen=never
                    )
                )
                await s.execute(
                    delete(fleet_snapshots).where(
                        fleet_snapshots.c.at < now - timedelta(days=SNAPSHOT_KEEP_DAYS)
                    )
                )
        except IntegrityError:
            return False  # another process recorded this period first
        return True

    async def fleet_history(self, days: float) -> list[FleetPoint]:
        """Active and online devices per snapshot over the last `days`, oldest first."""
        if not 0 < days <= SNAPSHOT_KEEP_DAYS:
            raise Invalid(f"days must be between 0 and {SNAPSHOT_KEEP_DAYS}")
        since = utcnow() - timedelta(days=days)
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(fleet_snapshots)
                    .where(fleet_snapshots.c.at >= since)
                    .order_by(fleet_snapshots.c.at)
                )
            ).all()
        return [
            FleetPoint(at=r.at, total=r.total, online=r.online, offline=r.total - r.online)
            for r in rows
        ]

    # -- devices not seen --------------------------------------------------------------

    def _not_seen_select(self, scope: Scope, days: float) -> Stmt:
        cutoff = utcnow() - timedelta(days=days)
        return (
            select(
                Device.id,
                Device.name,
                Device.last_seen,
                self.fact("os.name").label("os_name"),
                self.fact("hw.model").label("model"),
            )
            .where(
                Device.status == "active",
                or_(Device.last_seen.is_(None), Device.last_seen < cutoff),
                self._in_scope(Device.id, scope),
            )
            .order_by(Device.last_seen.asc().nulls_first(), Device.id.asc())
        )

    def _not_seen_row(self, r: Any, now: datetime) -> NotSeenDevice:
        since = None if r.last_seen is None else (now - r.last_seen).total_seconds() / 86400
        return NotSeenDevice(
            device_id=r.id,
            device_name=r.name,
            last_seen=r.last_seen,
            days_since=None if since is None else round(since, 2),
            os_name=r.os_name,
            model=r.model,
        )

    async def not_seen(
        self, scope: Scope, days: float, *, limit: int = 50, offset: int = 0
    ) -> Page[NotSeenDevice]:
        """Active devices not seen for `days` days or never, longest silent first."""
        stmt = self._not_seen_select(scope, days)
        now = utcnow()
        async with self.db.read() as s:
            rows = (await s.execute(stmt.limit(limit).offset(offset))).all()
            total = await self._count(s, stmt.order_by(None))
        items = [self._not_seen_row(r, now) for r in rows]
        return Page(items=items, total=total, limit=limit, offset=offset)

    async def not_seen_csv(self, scope: Scope, days: float) -> AsyncIterator[str]:
        """Every such device as CSV."""
        now = utcnow()
        columns = list(NotSeenDevice.model_fields)
        yield csv_line(columns)
        async for part in self._stream(self._not_seen_select(scope, days)):
            for r in part:
                row = self._not_seen_row(r, now)
                yield csv_line(getattr(row, c) for c in columns)

    # -- hardware ----------------------------------------------------------------------

    async def hardware(self, scope: Scope) -> list[HardwareModel]:
        """Active devices by manufacturer and model, with their age since enrolment.

        Age is counted from `enrolled_at`: inventories carry no purchase or firmware date.
        """
        if self.db.dialect == "postgresql":
            epoch: Any = func.extract("epoch", Device.enrolled_at)
        else:
            epoch = func.strftime("%s", Device.enrolled_at)
        maker, model = self.fact("hw.manufacturer"), self.fact("hw.model")
        n = func.count().label("devices")
        stmt = (
            select(
                maker.label("manufacturer"),
                model.label("model"),
                n,
                func.min(Device.enrolled_at).label("first"),
                func.max(Device.enrolled_at).label("last"),
                func.avg(epoch).label("mean_epoch"),
            )
            .where(Device.status == "active", self._in_scope(Device.id, scope))
            .group_by(maker, model)
            .order_by(n.desc(), maker, model)
            .limit(10_000)
        )
        async with self.db.read() as s:
            rows = (await s.execute(stmt)).all()
        now = utcnow()
        out = []
        for r in rows:
            first, last = _aware(r.first), _aware(r.last)
            out.append(
                HardwareModel(
                    manufacturer=r.manufacturer,
                    model=r.model,
                    devices=r.devices,
                    first_enrolled=first,
                    last_enrolled=last,
                    oldest_days=round((now - first).total_seconds() / 86400, 2),
                    mean_days=round((now.timestamp() - float(r.mean_epoch)) / 86400, 2),
                )
            )
        return out

    # -- errors ------------------------------------------------------------------------

    def _command_errors_select(self, scope: Scope, since: datetime) -> Stmt:
        return (
            select(
                CommandRun.id.label("run_id"),
                CommandRun.command_id,
                Command.kind,
                Device.id.label("device_id"),
                Device.name.label("device_name"),
                CommandRun.state,
                CommandRun.exit_code,
                CommandRun.error,
                CommandRun.finished_at,
                Command.created_by,
            )
            .join(Command, Command.id == CommandRun.command_id)
            .join(Device, Device.id == CommandRun.device_id)
            .where(
                CommandRun.state.in_(COMMAND_ERROR_STATES),
                CommandRun.finished_at >= since,
                self._in_scope(CommandRun.device_id, scope),
            )
            .order_by(CommandRun.finished_at.desc(), CommandRun.id)
        )

    def _install_errors_select(self, scope: Scope, since: datetime) -> Stmt:
        dd = DeploymentDevice
        return (
            select(
                dd.deployment_id,
                Deployment.name.label("deployment_name"),
                Deployment.package_name,
                Deployment.action,
                Device.id.label("device_id"),
                Device.name.label("device_name"),
                dd.state,
                dd.detail,
                dd.attempts,
                dd.updated_at,
            )
            .join(Deployment, Deployment.id == dd.deployment_id)
            .join(Device, Device.id == dd.device_id)
            .where(
                dd.state == "failed",
                dd.updated_at >= since,
                self._in_scope(dd.device_id, scope),
            )
            .order_by(dd.updated_at.desc(), dd.deployment_id, dd.device_id)
        )

    async def errors(
        self,
        scope: Scope,
        since: datetime,
        kind: Literal["commands", "installs"],
        *,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[CommandError] | Page[InstallError]:
        """Failed command runs (failed, interrupted, rejected, expired) or failed installs
        since a time, newest first."""
        if kind == "commands":
            stmt = self._command_errors_select(scope, since)
            async with self.db.read() as s:
                rows = (await s.execute(stmt.limit(limit).offset(offset))).all()
                total = await self._count(s, stmt.order_by(None))
            return Page[CommandError](
                items=[CommandError.model_validate(r, from_attributes=True) for r in rows],
                total=total,
                limit=limit,
                offset=offset,
            )
        if kind != "installs":
            raise Invalid("kind is commands or installs")
        stmt = self._install_errors_select(scope, since)
        async with self.db.read() as s:
            rows = (await s.execute(stmt.limit(limit).offset(offset))).all()
            total = await self._count(s, stmt.order_by(None))
        return Page[InstallError](
            items=[InstallError.model_validate(r, from_attributes=True) for r in rows],
            total=total,
            limit=limit,
            offset=offset,
        )

    async def errors_csv(
        self, scope: Scope, since: datetime, kind: Literal["commands", "installs"]
    ) -> AsyncIterator[str]:
        """Every such error as CSV."""
        if kind == "commands":
            stmt, model = self._command_errors_select(scope, since), CommandError
        elif kind == "installs":
            stmt, model = self._install_errors_select(scope, since), InstallError  # type: ignore[assignment]
        else:
            raise Invalid("kind is commands or installs")
        yield csv_line(model.model_fields)
        async for part in self._stream(stmt):
            for r in part:
                yield csv_line(r)


def _count(r: Any) -> SoftwareCount:
    return SoftwareCount(source=r.source, name=r.name, devices=r.devices, versions=r.versions)


def _aware(value: Any) -> datetime:
    # min()/max() over a UTCDateTime column come back as the driver gives them (SQLite: text)
    from datetime import UTC

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
