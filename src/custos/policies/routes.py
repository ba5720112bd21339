"""HTTP for policies, compliance and lost devices (admin) and policy reports (device)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request, Response

from custos import protocol
from custos.accounts.service import Principal
from custos.errors import TooLarge
from custos.policies.schemas import (
    MAX_REPORT_BYTES,
    AssignmentIn,
    ComplianceEventOut,
    ComplianceRow,
    DeviceCompliance,
    LockIn,
    LostIn,
    LostOut,
    PolicyAdd,
    PolicyDetail,
    PolicyOut,
    PolicyReport,
    WipeIn,
    WipeOut,
)
from custos.server.container import Services
from custos.server.http import (
    body_schema,
    parse_body,
    require,
    require_everywhere,
    services,
    signed_device,
)

admin_router = APIRouter(prefix="/api/v1", tags=["policies"])
device_router = APIRouter(prefix=protocol.DEVICE_API, tags=["device protocol"])


@admin_router.post("/policies", response_model=PolicyDetail)
async def add_policy(
    body: PolicyAdd,
    response: Response,
    who: Principal = Depends(require_everywhere("policies.manage")),
    svc: Services = Depends(services),
) -> PolicyDetail:
    """Add a profile (YAML or JSON text); a new version if one of its name exists."""
    out = await svc.policies.add(
        body.document,
        who.username,
        may_lock=who.can_everywhere("devices.lock"),
        may_wipe=who.can_everywhere("devices.wipe"),
    )
    response.status_code = 201 if out.created else 200
    return out


@admin_router.get("/policies", response_model=list[PolicyOut])
async def list_policies(
    _who: Principal = Depends(require_everywhere("policies.view")),
    svc: Services = Depends(services),
) -> list[PolicyOut]:
    """Policies with assignments and compliance counts."""
    return await svc.policies.list_policies()


@admin_router.get("/policies/{ref}", response_model=PolicyDetail)
async def show_policy(
    ref: str,
    version: int | None = Query(default=None, ge=1, le=2**31 - 1),
    _who: Principal = Depends(require_everywhere("policies.view")),
    svc: Services = Depends(services),
) -> PolicyDetail:
    """A policy (by id or name), its document (current or `version`) and its versions."""
    return await svc.policies.show(ref, version)


@admin_router.delete("/policies/{ref}", status_code=204)
async def remove_policy(
    ref: str,
    _who: Principal = Depends(require_everywhere("policies.manage")),
    svc: Services = Depends(services),
) -> Response:
    """Delete a policy; its devices get bundles without its rules."""
    await svc.policies.remove(ref)
    return Response(status_code=204)


@admin_router.post("/policies/{ref}/assignments", response_model=PolicyDetail)
async def assign_policy(
    ref: str,
    body: AssignmentIn,
    who: Principal = Depends(require_everywhere("policies.manage")),
    svc: Services = Depends(services),
) -> PolicyDetail:
    """Assign a policy to all devices, a group or a label."""
    return await svc.policies.assign(
        ref,
        body,
        who.username,
        may_lock=who.can_everywhere("devices.lock"),
        may_wipe=who.can_everywhere("devices.wipe"),
    )


@admin_router.delete("/policies/{ref}/assignments", response_model=PolicyDetail)
async def unassign_policy(
    ref: str,
    kind: str = Query(pattern="^(all|group|label)$"),
    target: str = Query(default="", max_length=100),
    _who: Principal = Depends(require_everywhere("policies.manage")),
    svc: Services = Depends(services),
) -> PolicyDetail:
    """Remove one assignment."""
    return await svc.policies.unassign(ref, kind, target)


@admin_router.get("/compliance", response_model=list[ComplianceRow])
async def compliance_report(
    status: str | None = Query(default=None, pattern="^(compliant|noncompliant|pending)$"),
    policy: str | None = Query(default=None, max_length=100),
    limit: int = Query(default=1000, ge=1, le=10_000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> list[ComplianceRow]:
    """Devices under a policy and their compliance (filter: status, policy)."""
    return await svc.policies.compliance(
        status=status, policy=policy, limit=limit, offset=offset,
        scope=who.device_scope("devices.view"),
    )  # fmt: skip


@admin_router.get("/devices/{ref}/compliance", response_model=DeviceCompliance)
async def device_compliance(
    ref: str,
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> DeviceCompliance:
    """A device's compliance: rules, recent history, held/quarantined, lost."""
    return await svc.policies.device_compliance(ref, who.device_scope("devices.view"))


@admin_router.get("/devices/{ref}/compliance/history", response_model=list[ComplianceEventOut])
async def compliance_history(
    ref: str,
    rule: str | None = Query(default=None, max_length=1200),
    since: datetime | None = None,
    limit: int = Query(default=500, ge=1, le=10_000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> list[ComplianceEventOut]:
    """A device's compliance history, newest first (one rule with `rule`)."""
    return await svc.policies.history(
        ref, rule=rule, since=since, limit=limit, offset=offset,
        scope=who.device_scope("devices.view"),
    )  # fmt: skip


@admin_router.post("/devices/{ref}/lost", response_model=LostOut)
async def mark_lost(
    ref: str,
    body: LostIn,
    who: Principal = Depends(require("devices.lock")),
    svc: Services = Depends(services),
) -> LostOut:
    """Mark a device lost: lock and/or wipe at its next contact, or auto-wipe when silent."""
    wipes = body.wipe != "none" or body.auto_wipe_days is not None
    scope = who.device_scope("devices.wipe" if wipes else "devices.lock")
    return await svc.policies.mark_lost(
        ref, body, who.username, scope=scope, may_wipe=who.can("devices.wipe")
    )


@admin_router.post("/devices/{ref}/found", response_model=LostOut)
async def mark_found(
    ref: str,
    who: Principal = Depends(require("devices.lock")),
    svc: Services = Depends(services),
) -> LostOut:
    """A lost device is back: pending lock and wipe are cancelled, a lock is undone."""
    return await svc.policies.found(ref, who.username, scope=who.device_scope("devices.lock"))


@admin_router.post("/devices/{ref}/lock")
async def lock_device(
    ref: str,
    body: LockIn,
    who: Principal = Depends(require("devices.lock")),
    svc: Services = Depends(services),
) -> dict[str, str]:
    """Lock a device at its next contact."""
    return await svc.policies.lock(ref, body, who.username, scope=who.device_scope("devices.lock"))


@admin_router.post("/devices/{ref}/wipe", response_model=WipeOut, status_code=202)
async def wipe_device(
    ref: str,
    body: WipeIn,
    who: Principal = Depends(require("devices.wipe")),
    svc: Services = Depends(services),
) -> WipeOut:
    """Wipe a device at its next contact (confirm with its name unless a dry run)."""
    return await svc.policies.wipe(ref, body, who.username, scope=who.device_scope("devices.wipe"))


@admin_router.get("/wipes", response_model=list[WipeOut])
async def list_wipes(
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> list[WipeOut]:
    """Wipe orders, newest first."""
    return await svc.policies.wipes(
        limit=limit, offset=offset, scope=who.device_scope("devices.view")
    )


# --- device side ------------------------------------------------------------------------


@device_router.post("/policy/report", openapi_extra=body_schema(PolicyReport))
async def policy_report(request: Request, svc: Services = Depends(services)) -> dict[str, int]:
    """A device reports one policy evaluation (idempotent by its sequence number)."""
    auth, raw = await signed_device(request)
    if len(raw) > MAX_REPORT_BYTES:
        raise TooLarge(f"a policy report is at most {MAX_REPORT_BYTES} bytes")
    accepted = await svc.policies.record_report(auth.device_id, parse_body(PolicyReport, raw))
    return {"accepted": accepted}
