"""OMA DM over HTTP: the SyncML endpoint for devices, and the admin API for accounts and nodes."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from custos.accounts.service import Principal
from custos.omadm.schemas import (
    AccountCreate,
    AccountCreated,
    AccountOut,
    OpsQueued,
    OpsRequest,
    RotateRequest,
    UserAlert,
)
from custos.omadm.service import Peer
from custos.server.container import Services
from custos.server.http import client_address, require, services

admin_router = APIRouter(prefix="/api/v1/omadm", tags=["omadm"])

# a TLS-terminating proxy among trusted_proxies passes the verified client certificate here
# (nginx: proxy_set_header X-Client-Cert $ssl_client_escaped_cert)
CLIENT_CERT_HEADER = "x-client-cert"
MAX_CERT_HEADER = 16 * 1024


def _client_cert(request: Request, svc: Services) -> bytes | None:
    """The client's certificate (DER): from this server's TLS, or from a certificate proxy.

    Only peers in `omadm_cert_proxies` may pass one in X-Client-Cert (the proxy must
    overwrite that header, never forward a client's); the certificate must be ours and
    currently valid. A certificate in a header proves nothing about the key, so the proxy
    is trusted to have verified the TLS handshake.
    """
    tls = request.scope.get("extensions", {}).get("tls") or {}
    der = tls.get("client_cert_der")
    if der:
        return bytes(der)
    header = request.headers.get(CLIENT_CERT_HEADER)
    proxies = svc.settings.omadm_cert_proxies
    if not header or len(header) > MAX_CERT_HEADER or not proxies:
        return None
    from custos.audit.middleware import in_networks

    client = request.scope.get("client")
    if not client or not in_networks(str(client[0]), proxies):
        return None
    try:
        cert = x509.load_pem_x509_certificate(unquote(header).encode())
        cert.verify_directly_issued_by(svc.ca.cert)
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return None
    except Exception:  # not PEM, not ours, a bad signature: no certificate
        return None
    return cert.public_bytes(serialization.Encoding.DER)


def endpoint_url(request: Request, svc: Services) -> str:
    """The endpoint's URL as devices reach it: under `public_url` when that is set (behind
    a TLS-terminating proxy the request shows the proxy's plain-HTTP hop), else the request's.
    RespURI and the SCOMO/FUMO download links are made from it."""
    public = svc.settings.public_url
    if not public:
        return str(request.url)
    url = public.rstrip("/") + svc.settings.omadm_path
    return f"{url}?{request.url.query}" if request.url.query else url


async def syncml_endpoint(request: Request) -> Response:
    """One SyncML DM message in (XML or WBXML), one out."""
    svc: Services = request.app.state.services
    body = await request.body()
    if len(body) > svc.settings.omadm_max_msg_size + 1024:
        return Response(
            f"message larger than this server's MaxMsgSize ({svc.settings.omadm_max_msg_size})\n",
            status_code=413,
            media_type="text/plain",
        )
    peer = Peer(
        client_cert_der=_client_cert(request, svc),
        hmac=request.headers.get("x-syncml-hmac"),
        url=endpoint_url(request, svc),
        session_token=request.query_params.get("s", "")[:64],
        address=client_address(request),
    )
    reply = await svc.omadm.handle(body, request.headers.get("content-type"), peer)
    return Response(
        reply.body, status_code=reply.status, media_type=reply.content_type, headers=reply.headers
    )


async def scomo_download(token: str, request: Request) -> Response:
    """A package for SCOMO's DownloadInstall: the token names the device and package."""
    from fastapi.responses import FileResponse

    svc: Services = request.app.state.services
    path, filename = await svc.omadm.download(token)
    return FileResponse(path, filename=filename, media_type="application/octet-stream")


def install(app: object, path: str) -> None:
    """The SyncML endpoint at the configured path, and SCOMO downloads under it."""
    app.add_api_route(  # type: ignore[attr-defined]
        path, syncml_endpoint, methods=["POST"], include_in_schema=False
    )
    app.add_api_route(  # type: ignore[attr-defined]
        path + "/pkg/{token}", scomo_download, methods=["GET"], include_in_schema=False
    )


@admin_router.post("/devices", response_model=AccountCreated, status_code=201)
async def enroll(
    body: AccountCreate,
    who: Principal = Depends(require("devices.enroll")),
    svc: Services = Depends(services),
) -> AccountCreated:
    """Register an OMA DM device; the answer holds its credentials and key, shown once."""
    if not who.can_everywhere("devices.enroll"):
        from custos.errors import Forbidden

        raise Forbidden("registering OMA DM devices needs devices.enroll without a group scope")
    return await svc.omadm.enroll(body, who.username)


@admin_router.get("/devices", response_model=list[AccountOut])
async def list_devices(
    who: Principal = Depends(require("devices.view")), svc: Services = Depends(services)
) -> list[AccountOut]:
    """OMA DM devices with their DM identity and last session."""
    return await svc.omadm.list_accounts(who.device_scope("devices.view"))


@admin_router.post("/devices/{ref}/ops", response_model=OpsQueued, status_code=201)
async def queue_ops(
    ref: str,
    body: OpsRequest,
    who: Principal = Depends(require("commands.run")),
    svc: Services = Depends(services),
) -> OpsQueued:
    """Queue Get/Replace/Add/Delete/Exec/Copy on a device's nodes and wake it (package #0).

    Lock/wipe and DM account nodes need more than commands.run (checked by the service)."""
    return await svc.omadm.queue_ops(ref, body, who)


@admin_router.post("/devices/{ref}/alert", response_model=OpsQueued, status_code=201)
async def user_alert(
    ref: str,
    body: UserAlert,
    who: Principal = Depends(require("commands.run")),
    svc: Services = Depends(services),
) -> OpsQueued:
    """Show the device's user a message, a yes/no question, a text field or a choice."""
    return await svc.omadm.queue_alert(ref, body, who.username, who.device_scope("commands.run"))


@admin_router.post("/devices/{ref}/rotate", response_model=OpsQueued, status_code=201)
async def rotate_credentials(
    ref: str,
    body: RotateRequest | None = None,
    who: Principal = Depends(require("devices.manage")),
    svc: Services = Depends(services),
) -> OpsQueued:
    """Give the device new DM account secrets over the protocol (DMAcc AppAuth Replaces);
    the old ones hold until the device has taken the new ones. The secrets are never shown."""
    notify = body.notify if body is not None else True
    return await svc.omadm.rotate_credentials(
        ref, notify, who.username, who.device_scope("devices.manage")
    )


@admin_router.post("/devices/{ref}/notify")
async def notify(
    ref: str,
    who: Principal = Depends(require("commands.run")),
    svc: Services = Depends(services),
) -> dict[str, object]:
    """Send package #0 now: the device opens a session."""
    device_id = await svc.omadm.device_id(ref, who.device_scope("commands.run"))
    sent, detail = await svc.omadm.notify(device_id)
    return {"device_id": device_id, "sent": sent, "detail": detail}


@admin_router.get("/devices/{ref}/package0")
async def package0(
    ref: str,
    who: Principal = Depends(require("commands.run")),
    svc: Services = Depends(services),
) -> Response:
    """A fresh package #0 for the device, for a gateway that fetches rather than receives."""
    device_id = await svc.omadm.device_id(ref, who.device_scope("commands.run"))
    data = await svc.omadm.package0(device_id)
    return Response(data, media_type="application/vnd.syncml.notification")
