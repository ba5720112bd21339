"""HTTP for reports: JSON by default, CSV with `?format=csv` or a `.csv` path.

Every route needs `reports.view`; a caller holding it only on some groups sees only the
devices of those groups (the service filters by `principal.device_scope`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from custos.accounts.service import Principal
from custos.db.base import utcnow
from custos.reports.schemas import (
    CommandError,
    DeviceRow,
    FleetPoint,
    HardwareModel,
    InstallError,
    MissingSoftware,
    NotSeenDevice,
    Page,
    SoftwareHolder,
    TopSoftware,
    VersionCount,
)
from custos.reports.service import Scope, csv_from_models
from custos.server.container import Services
from custos.server.http import require, require_everywhere, services

router = APIRouter(prefix="/api/v1/reports", tags=["reports"])
viewer = require("reports.view")

Format = Literal["json", "csv"]
SortKey = Literal["name", "last_seen", "enrolled_at", "os", "model", "status"]
Order = Literal["asc", "desc"]

_NAME = Query(min_length=1, max_length=255, description="software name, exactly as inventoried")
_SOURCE = Query(default=None, pattern="^[A-Za-z0-9_-]{1,20}$", description="dpkg, rpm, pip, …")
_LIMIT = Query(default=50, ge=1, le=1000)
_OFFSET = Query(default=0, ge=0, le=10_000_000)


def _scope(who: Principal) -> Scope:
    return who.device_scope("reports.view")


def _wants_csv(request: Request, fmt: Format) -> bool:
    return fmt == "csv" or request.url.path.endswith(".csv")


def _csv(lines: AsyncIterator[str], *parts: str) -> StreamingResponse:
    """A streamed CSV download; the file name is built from safe characters only."""
    stem = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p)[:60] for p in ("custos", *parts) if p)
    name = f"{stem}-{utcnow():%Y%m%d-%H%M%S}.csv"
    return StreamingResponse(
        lines,
        media_type="text/csv; charset=utf-8",
        headers={
            "content-disposition": f'attachment; filename="{name}"',
            "x-content-type-options": "nosniff",
        },
    )


@router.get("/devices", response_model=Page[DeviceRow])
@router.get("/devices.csv", include_in_schema=False, response_model=None)
async def devices(
    request: Request,
    q: str | None = Query(default=None, max_length=200, description="part of the name, or id"),
    os: str | None = Query(default=None, max_length=100, description="os.name, exactly"),
    model: str | None = Query(default=None, max_length=200, description="hw.model, exactly"),
    group: str | None = Query(default=None, max_length=100),
    status: Literal["active", "retired"] | None = None,
    sort: SortKey = "name",
    order: Order = "asc",
    limit: int = _LIMIT,
    offset: int = _OFFSET,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> Page[DeviceRow] | StreamingResponse:
    """The device list: filter, sort, page (or every match as CSV)."""
    filters = {"q": q, "os": os, "model": model, "group": group, "status": status}
    if _wants_csv(request, format):
        lines = svc.reports.devices_csv(_scope(who), sort=sort, order=order, **filters)
        return _csv(lines, "devices")
    return await svc.reports.devices_page(
        _scope(who), sort=sort, order=order, limit=limit, offset=offset, **filters
    )


@router.get("/software/who-has", response_model=Page[SoftwareHolder])
@router.get("/software/who-has.csv", include_in_schema=False, response_model=None)
async def who_has(
    request: Request,
    name: str = _NAME,
    source: str | None = _SOURCE,
    version: str | None = Query(default=None, max_length=255),
    version_prefix: str | None = Query(default=None, max_length=255),
    limit: int = _LIMIT,
    offset: int = _OFFSET,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> Page[SoftwareHolder] | StreamingResponse:
    """Devices that have a piece of software (at a version, or a version prefix)."""
    kw = {"source": source, "version": version, "version_prefix": version_prefix}
    if _wants_csv(request, format):
        return _csv(svc.reports.who_has_csv(_scope(who), name, **kw), "who-has", name)
    return await svc.reports.who_has(_scope(who), name, limit=limit, offset=offset, **kw)


@router.get("/software/versions", response_model=list[VersionCount])
@router.get("/software/versions.csv", include_in_schema=False, response_model=None)
async def versions(
    request: Request,
    name: str = _NAME,
    source: str | None = _SOURCE,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> list[VersionCount] | StreamingResponse:
    """How many devices hold each version of a piece of software."""
    rows = await svc.reports.versions(_scope(who), name, source=source)
    if _wants_csv(request, format):
        return _csv(csv_from_models(rows, list(VersionCount.model_fields)), "versions", name)
    return rows


@router.get("/software/lacks", response_model=Page[MissingSoftware])
@router.get("/software/lacks.csv", include_in_schema=False, response_model=None)
async def lacks(
    request: Request,
    name: str = _NAME,
    source: str | None = _SOURCE,
    min_version: str | None = Query(default=None, min_length=1, max_length=255),
    limit: int = _LIMIT,
    offset: int = _OFFSET,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> Page[MissingSoftware] | StreamingResponse:
    """Active devices without a piece of software, or with a version below `min_version`."""
    kw = {"source": source, "min_version": min_version}
    if _wants_csv(request, format):
        return _csv(svc.reports.lacks_csv(_scope(who), name, **kw), "lacks", name)
    return await svc.reports.lacks(_scope(who), name, limit=limit, offset=offset, **kw)


@router.get("/software/top", response_model=TopSoftware)
@router.get("/software/top.csv", include_in_schema=False, response_model=None)
async def top_software(
    request: Request,
    limit: int = Query(default=20, ge=1, le=1000),
    live: bool = Query(default=False, description="count now instead of reading the summary"),
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> TopSoftware | StreamingResponse:
    """The most installed software by device count."""
    top = await svc.reports.top_software(_scope(who), limit=limit, live=live)
    if _wants_csv(request, format):
        return _csv(csv_from_models(top.items, ["source", "name", "devices", "versions"]), "top")
    return top


@router.get("/not-seen", response_model=Page[NotSeenDevice])
@router.get("/not-seen.csv", include_in_schema=False, response_model=None)
async def not_seen(
    request: Request,
    days: float = Query(default=30, ge=0, le=36500),
    limit: int = _LIMIT,
    offset: int = _OFFSET,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> Page[NotSeenDevice] | StreamingResponse:
    """Active devices that have not checked in for `days` days, or never."""
    if _wants_csv(request, format):
        return _csv(svc.reports.not_seen_csv(_scope(who), days), "not-seen", f"{days:g}d")
    return await svc.reports.not_seen(_scope(who), days, limit=limit, offset=offset)


@router.get("/fleet-history", response_model=list[FleetPoint])
@router.get("/fleet-history.csv", include_in_schema=False, response_model=None)
async def fleet_history(
    request: Request,
    days: float = Query(default=7, gt=0, le=400),
    format: Format = "json",
    _who: Principal = Depends(require_everywhere("reports.view")),
    svc: Services = Depends(services),
) -> list[FleetPoint] | StreamingResponse:
    """Active and online devices over time (one snapshot per fleet_snapshot_s; fleet-wide)."""
    rows = await svc.reports.fleet_history(days)
    if _wants_csv(request, format):
        return _csv(csv_from_models(rows, list(FleetPoint.model_fields)), "fleet", f"{days:g}d")
    return rows


@router.get("/hardware", response_model=list[HardwareModel])
@router.get("/hardware.csv", include_in_schema=False, response_model=None)
async def hardware(
    request: Request,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> list[HardwareModel] | StreamingResponse:
    """Active devices by manufacturer and model, with age since enrolment."""
    rows = await svc.reports.hardware(_scope(who))
    if _wants_csv(request, format):
        return _csv(csv_from_models(rows, list(HardwareModel.model_fields)), "hardware")
    return rows


@router.get("/errors", response_model=Page[CommandError] | Page[InstallError])
@router.get("/errors.csv", include_in_schema=False, response_model=None)
async def errors(
    request: Request,
    kind: Literal["commands", "installs"] = "commands",
    since: AwareDatetime | None = Query(
        default=None, description="ISO 8601 with a time zone; default 7 days ago"
    ),
    limit: int = _LIMIT,
    offset: int = _OFFSET,
    format: Format = "json",
    who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> Page[CommandError] | Page[InstallError] | StreamingResponse:
    """Failed command runs or failed installs since a time, newest first."""
    start = since if since is not None else utcnow() - timedelta(days=7)
    if _wants_csv(request, format):
        return _csv(svc.reports.errors_csv(_scope(who), start, kind), "errors", kind)
    return await svc.reports.errors(_scope(who), start, kind, limit=limit, offset=offset)
