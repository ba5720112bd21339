"""Admin HTTP for webhooks: list, create, delete, delivery log, test ping, redeliver."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from custos.accounts.service import Principal
from custos.server.container import Services
from custos.server.http import require_everywhere, services
from custos.webhooks.schemas import DeliveryOut, WebhookCreate, WebhookCreated, WebhookOut

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])
_MANAGE = require_everywhere("webhooks.manage")


@router.get("", response_model=list[WebhookOut])
async def list_webhooks(
    _who: Principal = Depends(_MANAGE), svc: Services = Depends(services)
) -> list[WebhookOut]:
    """Every webhook (never its secret), with pending and failed delivery counts."""
    return await svc.webhooks.list_webhooks()


@router.post("", response_model=WebhookCreated, status_code=201)
async def create_webhook(
    body: WebhookCreate, who: Principal = Depends(_MANAGE), svc: Services = Depends(services)
) -> WebhookCreated:
    """A new webhook; the answer carries its signing secret, shown this once only."""
    return await svc.webhooks.create(body, created_by=who.username)


# declared before /{name}/…: a delivery id is never a webhook's name here
@router.post("/deliveries/{delivery_id}/redeliver", response_model=DeliveryOut, status_code=201)
async def redeliver(
    delivery_id: str, _who: Principal = Depends(_MANAGE), svc: Services = Depends(services)
) -> DeliveryOut:
    """Send a past delivery's event again now, as a new delivery."""
    return await svc.webhooks.redeliver(delivery_id)


@router.delete("/{name}", status_code=204)
async def delete_webhook(
    name: str, _who: Principal = Depends(_MANAGE), svc: Services = Depends(services)
) -> Response:
    """Remove a webhook and its delivery log."""
    await svc.webhooks.delete(name)
    return Response(status_code=204)


@router.get("/{name}/deliveries", response_model=list[DeliveryOut])
async def list_deliveries(
    name: str,
    state: Literal["pending", "delivered", "failed"] | None = Query(default=None),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    _who: Principal = Depends(_MANAGE),
    svc: Services = Depends(services),
) -> list[DeliveryOut]:
    """One webhook's delivery log, newest first."""
    return await svc.webhooks.deliveries(name, limit=limit, offset=offset, state=state)


@router.post("/{name}/test", response_model=DeliveryOut, status_code=201)
async def test_webhook(
    name: str, _who: Principal = Depends(_MANAGE), svc: Services = Depends(services)
) -> DeliveryOut:
    """Send a `ping` event to the webhook now; the answer says how it went."""
    return await svc.webhooks.test(name)
