"""HTTP for scheduled tasks (admin); agents receive them as commands and report at check-in."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Response

from custos.accounts.service import Principal
from custos.server.container import Services
from custos.server.http import require_everywhere, services
from custos.tasks.schemas import TaskCreate, TaskDetail, TaskOut, TaskRunOut

admin_router = APIRouter(prefix="/api/v1", tags=["tasks"])


@admin_router.post("/tasks", response_model=TaskDetail, status_code=201)
async def create_task(
    body: TaskCreate,
    who: Principal = Depends(require_everywhere("tasks.manage")),
    svc: Services = Depends(services),
) -> TaskDetail:
    """Create a scheduled task and hand it to its target devices."""
    return await svc.tasks.create(body, who.username)


@admin_router.get("/tasks", response_model=list[TaskOut])
async def list_tasks(
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    _who: Principal = Depends(require_everywhere("tasks.view")),
    svc: Services = Depends(services),
) -> list[TaskOut]:
    """Tasks by name."""
    return await svc.tasks.list_tasks(limit=limit, offset=offset)


@admin_router.get("/tasks/{ref}", response_model=TaskDetail)
async def show_task(
    ref: str,
    _who: Principal = Depends(require_everywhere("tasks.view")),
    svc: Services = Depends(services),
) -> TaskDetail:
    """A task (by id or name) with its next runs and each device's latest report."""
    return await svc.tasks.show(ref)


@admin_router.post("/tasks/{ref}/enable", response_model=TaskDetail)
async def enable_task(
    ref: str,
    who: Principal = Depends(require_everywhere("tasks.manage")),
    svc: Services = Depends(services),
) -> TaskDetail:
    """Enable a task on its devices."""
    return await svc.tasks.set_enabled(ref, True, who.username)


@admin_router.post("/tasks/{ref}/disable", response_model=TaskDetail)
async def disable_task(
    ref: str,
    who: Principal = Depends(require_everywhere("tasks.manage")),
    svc: Services = Depends(services),
) -> TaskDetail:
    """Disable a task: agents keep it but stop running it."""
    return await svc.tasks.set_enabled(ref, False, who.username)


@admin_router.delete("/tasks/{ref}", status_code=204)
async def delete_task(
    ref: str,
    who: Principal = Depends(require_everywhere("tasks.manage")),
    svc: Services = Depends(services),
) -> Response:
    """Delete a task and its recorded runs; agents forget it."""
    await svc.tasks.delete(ref, who.username)
    return Response(status_code=204)


@admin_router.get("/tasks/{ref}/runs", response_model=list[TaskRunOut])
async def task_runs(
    ref: str,
    device: str | None = Query(default=None, max_length=255, description="device id or name"),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    _who: Principal = Depends(require_everywhere("tasks.view")),
    svc: Services = Depends(services),
) -> list[TaskRunOut]:
    """Reported occurrences, newest first."""
    return await svc.tasks.runs(ref, device=device, limit=limit, offset=offset)
