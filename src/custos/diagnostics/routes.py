"""Admin HTTP for a device's diagnostics reports (queued by a `diagnose` command)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query

from custos.accounts.service import Principal
from custos.diagnostics.schemas import ReportOut, ReportSummary
from custos.server.container import Services
from custos.server.http import require, services

router = APIRouter(prefix="/api/v1", tags=["diagnostics"])


@router.get("/devices/{ref}/diagnostics", response_model=list[ReportSummary])
async def list_reports(
    ref: str = Path(max_length=255),
    limit: int = Query(default=20, ge=1, le=500),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> list[ReportSummary]:
    """A device's diagnostics reports, newest first, without their data."""
    return await svc.diagnostics.list_reports(
        ref, limit=limit, scope=who.device_scope("devices.view")
    )


@router.get("/devices/{ref}/diagnostics/{report_id}", response_model=ReportOut)
async def show_report(
    ref: str = Path(max_length=255),
    report_id: int = Path(ge=1, le=2**31 - 1),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> ReportOut:
    """One diagnostics report with what the device sent."""
    return await svc.diagnostics.get_report(ref, report_id, who.device_scope("devices.view"))
