"""HTTP for commands (admin) and file uploads (device)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from custos import protocol
from custos.accounts.service import Principal
from custos.commands.schemas import (
    CommandCreate,
    CommandDetail,
    CommandOut,
    UploadStart,
    UploadState,
)
from custos.server.container import Services
from custos.server.http import body_schema, parse_body, require, services, signed_device

admin_router = APIRouter(prefix="/api/v1", tags=["commands"])
device_router = APIRouter(prefix=protocol.DEVICE_API, tags=["device protocol"])


@admin_router.post("/commands", response_model=CommandDetail, status_code=201)
async def create_command(
    body: CommandCreate,
    who: Principal = Depends(require("commands.run")),
    svc: Services = Depends(services),
) -> CommandDetail:
    """Queue a command for a device, a list of devices or a group."""
    return await svc.commands.create(body, who.username, who.device_scope("commands.run"))


@admin_router.get("/commands", response_model=list[CommandOut])
async def list_commands(
    limit: int = Query(default=50, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    who: Principal = Depends(require("commands.view")),
    svc: Services = Depends(services),
) -> list[CommandOut]:
    """Commands, newest first."""
    return await svc.commands.list_commands(
        limit=limit, offset=offset, scope=who.device_scope("commands.view")
    )


@admin_router.get("/commands/{command_id}", response_model=CommandDetail)
async def show_command(
    command_id: str,
    output: bool = Query(default=True, description="false: leave stdout/stderr out (polling)"),
    who: Principal = Depends(require("commands.view")),
    svc: Services = Depends(services),
) -> CommandDetail:
    """A command with every device's run."""
    return await svc.commands.show(
        command_id, output=output, scope=who.device_scope("commands.view")
    )


@admin_router.get("/runs/{run_id}/file")
async def download_collected(
    run_id: str,
    who: Principal = Depends(require("commands.view")),
    svc: Services = Depends(services),
) -> FileResponse:
    """The file a collect_file run brought back."""
    path, up = await svc.commands.upload_file(run_id, who.device_scope("commands.view"))
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=up.source_path.replace("\\", "/").rsplit("/", 1)[-1] or run_id,
        headers={"X-Custos-Sha256": up.sha256},
    )


@device_router.post(
    "/uploads/{run_id}", response_model=UploadState, openapi_extra=body_schema(UploadStart)
)
async def start_upload(
    run_id: str, request: Request, svc: Services = Depends(services)
) -> UploadState:
    """Announce a collected file (size and hash); returns how much is already held."""
    auth, raw = await signed_device(request)
    body = parse_body(UploadStart, raw)
    return await svc.commands.start_upload(
        auth.device_id, run_id, body, svc.settings.max_upload_bytes
    )


@device_router.put("/uploads/{run_id}", response_model=UploadState)
async def append_upload(
    run_id: str,
    request: Request,
    offset: int = Query(ge=0, le=2**62),
    svc: Services = Depends(services),
) -> UploadState:
    """Append one chunk at `offset`."""
    auth, raw = await signed_device(request)
    return await svc.commands.append_upload(auth.device_id, run_id, offset, raw)
