"""HTTP for the audit log: list, export as CSV, verify the chain (reads only; writes come from
`custos.audit.middleware.AuditMiddleware`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from custos.accounts.service import Principal
from custos.audit.schemas import MAX_PAGE, AuditPage, VerifyReport
from custos.db.base import utcnow
from custos.server.container import Services
from custos.server.http import require, services
from custos.validation import AwareTime

router = APIRouter(prefix="/api/v1", tags=["audit"])

# reading, exporting and verifying the log all need audit.view (admin and auditor roles)
viewer = require("audit.view")

ActorQ = Query(default=None, max_length=150, description="exact username ('' = anonymous)")
ActionQ = Query(
    default=None,
    max_length=100,
    pattern=r"^[A-Za-z0-9_.\- /{}]*$",
    description="action or prefix: 'device' matches device.retire",
)
TargetQ = Query(default=None, max_length=300, description="exact target, e.g. device:ID")
ResultQ = Query(default=None, description="ok | denied | failed | error")
SinceQ = Query(default=None, description="entries at or after this time")
UntilQ = Query(default=None, description="entries before this time")


@router.get("/audit", response_model=AuditPage)
async def list_audit(
    actor: str | None = ActorQ,
    action: str | None = ActionQ,
    target: str | None = TargetQ,
    result: Literal["ok", "denied", "failed", "error"] | None = ResultQ,
    since: AwareTime | None = SinceQ,
    until: AwareTime | None = UntilQ,
    limit: int = Query(default=100, ge=1, le=MAX_PAGE),
    before_id: int | None = Query(default=None, ge=1, le=2**63 - 1, description="page cursor"),
    _who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> AuditPage:
    """Audit entries, newest first; `next_before_id` is the cursor of the next page."""
    return await svc.audit.query(
        actor=actor,
        action_prefix=action,
        target=target,
        result=result,
        since=since,
        until=until,
        limit=limit,
        before_id=before_id,
    )


@router.get("/audit.csv", response_class=StreamingResponse)
async def export_audit(
    actor: str | None = ActorQ,
    action: str | None = ActionQ,
    target: str | None = TargetQ,
    result: Literal["ok", "denied", "failed", "error"] | None = ResultQ,
    since: AwareTime | None = SinceQ,
    until: AwareTime | None = UntilQ,
    _who: Principal = Depends(viewer),
    svc: Services = Depends(services),
) -> StreamingResponse:
    """The matching entries as CSV in chain order, streamed (hashes included)."""
    rows = svc.audit.export_csv(
        actor=actor,
        action_prefix=action,
        target=target,
        result=result,
        since=since,
        until=until,
    )
    name = f"custos-audit-{_stamp(utcnow())}.csv"
    return StreamingResponse(
        rows,
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


@router.get("/audit/verify", response_model=VerifyReport)
async def verify_audit(
    _who: Principal = Depends(viewer), svc: Services = Depends(services)
) -> VerifyReport:
    """Recompute the whole chain (for an independent check, run `custos audit verify`)."""
    return await svc.audit.verify()


def _stamp(at: datetime) -> str:
    return at.strftime("%Y%m%dT%H%M%SZ")
