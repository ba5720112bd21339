"""HTTP for packages, labels and deployments (admin) and for transfers and status (device)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from custos import protocol
from custos.accounts.service import Principal
from custos.errors import Invalid, NotFound, TooLarge
from custos.server.container import Services
from custos.server.http import body_schema, parse_body, require_everywhere, services, signed_device
from custos.server.protocols import SENDFILE_EXTENSION, FileSegmentsResponse
from custos.software.schemas import (
    CatalogInstall,
    DeploymentCreate,
    DeploymentDetail,
    DeploymentOut,
    LabelCreate,
    LabelOut,
    PackageDetail,
    PackageOut,
    StatusReport,
    TransferRequest,
)
from custos.software.transfer import RangeError, parse_range

admin_router = APIRouter(prefix="/api/v1", tags=["software"])
device_router = APIRouter(prefix=protocol.DEVICE_API, tags=["device protocol"])
PACKAGES_PATH = "/api/v1/packages"


# --- packages ---------------------------------------------------------------------------


@admin_router.post(
    "/packages",
    response_model=PackageDetail,
    status_code=201,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def upload_package(
    request: Request,
    filename: str = Query(min_length=1, max_length=255),
    name: str | None = Query(default=None, max_length=100),
    version: str | None = Query(default=None, max_length=100),
    destination: str | None = Query(default=None, max_length=4096),
    mode: str | None = Query(default=None, pattern=r"^0?[0-7]{3,4}$"),
    who: Principal = Depends(require_everywhere("software.manage")),
    svc: Services = Depends(services),
) -> PackageDetail:
    """Upload a package file as the raw request body (streamed to disk, then inspected)."""
    tmp = await receive_file(request, svc)
    try:
        return await svc.software.add_package(
            tmp,
            filename=filename,
            name=name,
            version=version,
            destination=destination,
            mode=int(mode, 8) if mode else None,
            created_by=who.username,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


async def receive_file(request: Request, svc: Services) -> Path:
    """Stream a raw request body to a temporary file, refusing more than max_package_bytes."""
    limit = svc.settings.max_package_bytes
    tmp_dir = svc.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", dir=tmp_dir)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise TooLarge(f"a package is at most {limit} bytes")
                fh.write(part)
        if size == 0:
            raise Invalid("the request body (the package file) is empty")
    except BaseException:
        os.unlink(path)  # nothing half-received is kept
        raise
    return path


@admin_router.get("/packages", response_model=list[PackageOut])
async def list_packages(
    name: str | None = Query(default=None, max_length=100),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    _who: Principal = Depends(require_everywhere("software.view")),
    svc: Services = Depends(services),
) -> list[PackageOut]:
    """Package versions, newest first."""
    return await svc.software.list_packages(name=name, limit=limit, offset=offset)


@admin_router.get("/packages/{ref}", response_model=PackageDetail)
async def show_package(
    ref: str,
    _who: Principal = Depends(require_everywhere("software.view")),
    svc: Services = Depends(services),
) -> PackageDetail:
    """One package: id, NAME (newest) or NAME==VERSION."""
    return await svc.software.show_package(ref)


@admin_router.delete("/packages/{ref}", status_code=204)
async def remove_package(
    ref: str,
    _who: Principal = Depends(require_everywhere("software.manage")),
    svc: Services = Depends(services),
) -> Response:
    """Delete a package version that no deployment uses."""
    await svc.software.remove_package(ref)
    return Response(status_code=204)


# --- labels -----------------------------------------------------------------------------


@admin_router.post("/labels", response_model=LabelOut, status_code=201)
async def create_label(
    body: LabelCreate,
    _who: Principal = Depends(require_everywhere("software.manage")),
    svc: Services = Depends(services),
) -> LabelOut:
    """A label: devices whose inventory matches every condition."""
    return await svc.software.create_label(body)


@admin_router.get("/labels", response_model=list[LabelOut])
async def list_labels(
    _who: Principal = Depends(require_everywhere("software.view")),
    svc: Services = Depends(services),
) -> list[LabelOut]:
    """Labels with their current number of devices."""
    return await svc.software.list_labels()


@admin_router.delete("/labels/{name}", status_code=204)
async def remove_label(
    name: str,
    _who: Principal = Depends(require_everywhere("software.manage")),
    svc: Services = Depends(services),
) -> Response:
    """Delete a label."""
    await svc.software.remove_label(name)
    return Response(status_code=204)


# --- deployments ------------------------------------------------------------------------


@admin_router.post("/deployments", response_model=DeploymentDetail, status_code=201)
async def create_deployment(
    body: DeploymentCreate,
    who: Principal = Depends(require_everywhere("software.deploy")),
    svc: Services = Depends(services),
) -> DeploymentDetail:
    """Deploy (or remove) a package on devices, groups and labels."""
    return await svc.software.create_deployment(body, who.username)


@admin_router.get("/deployments", response_model=list[DeploymentOut])
async def list_deployments(
    limit: int = Query(default=50, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    _who: Principal = Depends(require_everywhere("software.view")),
    svc: Services = Depends(services),
) -> list[DeploymentOut]:
    """Deployments, newest first, with device counts by state."""
    return await svc.software.list_deployments(limit=limit, offset=offset)


@admin_router.get("/deployments/{ref}", response_model=DeploymentDetail)
async def show_deployment(
    ref: str,
    _who: Principal = Depends(require_everywhere("software.view")),
    svc: Services = Depends(services),
) -> DeploymentDetail:
    """A deployment with every device's status."""
    return await svc.software.show_deployment(ref)


@admin_router.post("/deployments/{ref}/{action}", response_model=DeploymentDetail)
async def change_deployment(
    ref: str,
    action: str,
    _who: Principal = Depends(require_everywhere("software.deploy")),
    svc: Services = Depends(services),
) -> DeploymentDetail:
    """pause, resume or abort."""
    if action not in ("pause", "resume", "abort"):
        raise Invalid("the action is pause, resume or abort")
    return await svc.software.set_state(ref, action)


# --- device side ------------------------------------------------------------------------


@device_router.post("/software/status", status_code=204, openapi_extra=body_schema(StatusReport))
async def software_status(request: Request, svc: Services = Depends(services)) -> Response:
    """A device reports progress on a deployment."""
    auth, raw = await signed_device(request)
    await svc.software.report(auth.device_id, parse_body(StatusReport, raw))
    return Response(status_code=204)


@device_router.get("/software/catalog")
async def software_catalog(request: Request, svc: Services = Depends(services)) -> Any:
    """Packages this device may install on request."""
    auth, _ = await signed_device(request)
    return {"packages": await svc.software.catalog(auth.device_id)}


@device_router.post("/software/install", openapi_extra=body_schema(CatalogInstall))
async def software_install(request: Request, svc: Services = Depends(services)) -> Any:
    """Queue a catalogue package for this device now."""
    auth, raw = await signed_device(request)
    body = parse_body(CatalogInstall, raw)
    return await svc.software.request_install(auth.device_id, body.name)


@device_router.post("/transfers", openapi_extra=body_schema(TransferRequest))
async def create_transfer(request: Request, svc: Services = Depends(services)) -> Any:
    """The plan for getting a package: what comes from the device's base, what from the wire."""
    auth, raw = await signed_device(request)
    body = parse_body(TransferRequest, raw)
    return await svc.software.plan_transfer(auth.device_id, body.package_id, body.base_sha256)


@device_router.get("/transfers/{plan_id}")
async def get_transfer(
    plan_id: str, request: Request, svc: Services = Depends(services)
) -> Response:
    """The plan's wire body, streamed, with byte ranges for resuming."""
    auth, _ = await signed_device(request)
    planner = svc.software.planner
    try:
        plan = await planner.load_plan(plan_id)
    except (KeyError, FileNotFoundError, ValueError):
        raise NotFound("no such transfer") from None
    await svc.software.check_plan_access(auth.device_id, plan.target_sha256)
    size = plan.wire_size
    etag = f'"{plan_id}"'
    headers = {"accept-ranges": "bytes", "etag": etag, "x-custos-sha256": plan.wire_sha256}
    offload = svc.settings.transfer_offload == "x-accel"
    # the wire body as one file; until it is written (in the background) the chunk frames
    whole = None
    if offload or svc.settings.transfer_wire_files:
        whole = await planner.ready_wire_file(plan, plan_id)
    if offload and whole is not None:
        # the front nginx sends the file, with Range and If-Range (docs/deploy-nginx.md)
        headers["x-accel-redirect"] = svc.settings.transfer_offload_prefix + whole.name
        return Response(headers=headers, media_type="application/octet-stream")
    start, end, status = 0, size, 200
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if header and (if_range is None or if_range.strip() == etag):
        try:
            rng = parse_range(header, size)
        except RangeError as exc:
            return Response(
                status_code=416,
                headers={**headers, "content-range": f"bytes */{size}"},
                content=str(exc),
            )
        if rng is not None:
            start, end = rng
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    if svc.settings.transfer_sendfile and SENDFILE_EXTENSION in request.scope.get("extensions", {}):
        # zero-copy: the server sends byte ranges of stored files with sendfile
        if whole is not None or plan.kind == "delta":
            segments = planner.wire_segments(plan, start, end, whole)
        else:  # a walk over the plan's pieces
            segments = await asyncio.to_thread(planner.wire_segments, plan, start, end)
        return FileSegmentsResponse(
            segments, status_code=status, headers=headers, media_type="application/octet-stream"
        )
    return StreamingResponse(
        planner.iter_wire(plan, start, end),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )
