"""HTTP for enrolment tokens, devices and groups (admin) and enrol/check-in (device)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse

from custos import protocol
from custos.accounts.service import Principal
from custos.devices.schemas import (
    CheckinRequest,
    CheckinResponse,
    DeviceDetail,
    DeviceOut,
    EnrollRequest,
    EnrollResponse,
    GroupCreate,
    GroupMembers,
    GroupOut,
    InventoryChangeOut,
    SessionOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
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

admin_router = APIRouter(prefix="/api/v1", tags=["devices"])
device_router = APIRouter(prefix=protocol.DEVICE_API, tags=["device protocol"])


def _server_url(request: Request, svc: Services) -> str:
    return svc.settings.public_url or str(request.base_url).rstrip("/")


@admin_router.get("/ca")
async def ca_info(svc: Services = Depends(services)) -> dict[str, str]:
    """The CA certificate and its fingerprint (public)."""
    return {"ca_certificate": svc.ca.cert_pem, "fingerprint": svc.ca.fingerprint}


@admin_router.post("/enrollment-tokens", response_model=TokenCreated, status_code=201)
async def create_token(
    body: TokenCreate,
    request: Request,
    who: Principal = Depends(require("devices.enroll")),
    svc: Services = Depends(services),
) -> TokenCreated:
    """Create an enrolment token; the secret is in this response only."""
    return await svc.enrollment.create_token(body, who.username, _server_url(request, svc))


@admin_router.get("/enrollment-tokens", response_model=list[TokenOut])
async def list_tokens(
    _who: Principal = Depends(require("devices.enroll")), svc: Services = Depends(services)
) -> list[TokenOut]:
    """Every enrolment token."""
    return await svc.enrollment.list_tokens()


@admin_router.post("/enrollment-tokens/{token_id}/revoke", response_model=TokenOut)
async def revoke_token(
    token_id: int = Path(ge=1, le=2**31 - 1),
    _who: Principal = Depends(require("devices.enroll")),
    svc: Services = Depends(services),
) -> TokenOut:
    """Revoke an enrolment token."""
    return await svc.enrollment.revoke_token(token_id)


@admin_router.get("/devices", response_model=list[DeviceOut])
async def list_devices(
    q: str | None = Query(default=None, max_length=200),
    group: str | None = Query(default=None, max_length=100),
    status: str | None = Query(default=None, pattern="^(active|retired)$"),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> list[DeviceOut]:
    """Devices, filtered and paginated."""
    return await svc.devices.list_devices(
        q=q,
        group=group,
        status=status,
        limit=limit,
        offset=offset,
        scope=who.device_scope("devices.view"),
    )


@admin_router.get("/devices/{ref}", response_model=DeviceDetail)
async def show_device(
    ref: str,
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> DeviceDetail:
    """One device (by id or unique name) with its inventory."""
    return await svc.devices.show(ref, who.device_scope("devices.view"))


@admin_router.get("/devices/{ref}/history", response_model=list[InventoryChangeOut])
async def device_history(
    ref: str,
    key: str | None = Query(default=None, max_length=512, description="key prefix, e.g. sw."),
    limit: int = Query(default=500, ge=1, le=10_000),
    who: Principal = Depends(require("devices.view")),
    svc: Services = Depends(services),
) -> list[InventoryChangeOut]:
    """Inventory changes, newest first."""
    return await svc.devices.history(
        ref, key_prefix=key, limit=limit, scope=who.device_scope("devices.view")
    )


@admin_router.post("/devices/{ref}/retire", response_model=DeviceDetail)
async def retire_device(
    ref: str,
    who: Principal = Depends(require("devices.manage")),
    svc: Services = Depends(services),
) -> DeviceDetail:
    """Retire a device and revoke its certificate."""
    return await svc.devices.retire(ref, who.device_scope("devices.manage"))


@admin_router.post("/groups", response_model=GroupOut, status_code=201)
async def create_group(
    body: GroupCreate,
    _who: Principal = Depends(require_everywhere("devices.manage")),
    svc: Services = Depends(services),
) -> GroupOut:
    """Create a group."""
    return await svc.devices.create_group(body)


@admin_router.get("/groups", response_model=list[GroupOut])
async def list_groups(
    _who: Principal = Depends(require("devices.view")), svc: Services = Depends(services)
) -> list[GroupOut]:
    """Groups with member counts."""
    return await svc.devices.list_groups()


@admin_router.post("/groups/{name}/devices", response_model=GroupOut)
async def add_group_members(
    name: str,
    body: GroupMembers,
    _who: Principal = Depends(require_everywhere("devices.manage")),
    svc: Services = Depends(services),
) -> GroupOut:
    """Add devices to a group."""
    return await svc.devices.add_to_group(name, body.devices)


# --- device protocol ---


@device_router.get("/ca", response_class=PlainTextResponse)
async def device_ca(svc: Services = Depends(services)) -> str:
    """The CA certificate, PEM (the agent checks its fingerprint before trusting it)."""
    return svc.ca.cert_pem


@device_router.post("/enroll", response_model=EnrollResponse, status_code=201)
async def enroll(body: EnrollRequest, svc: Services = Depends(services)) -> EnrollResponse:
    """Trade an enrolment token and a CSR for a device certificate."""
    return await svc.enrollment.enroll(body)


@device_router.post(
    "/checkin",
    response_model=CheckinResponse,
    openapi_extra=body_schema(CheckinRequest),
)
async def checkin(request: Request) -> Response:
    """One signed check-in: results and inventory in, work out."""
    svc: Services = request.app.state.services
    auth, raw = await signed_device(request)
    body = await svc.checkin.checkin(auth, parse_body(CheckinRequest, raw))
    return Response(body, media_type="application/json")


@device_router.post("/session", response_model=SessionOut)
async def open_session(request: Request) -> SessionOut:
    """Trade one Ed25519-signed request for a session key that signs later requests (HMAC)."""
    svc: Services = request.app.state.services
    auth, _ = await signed_device(request, allow_session=False)
    token, key, expires = svc.authenticator.open_session(auth.device_id)
    return SessionOut(
        token=token, key=protocol.encode_key(key), expires_at=expires, server_time=time.time()
    )
