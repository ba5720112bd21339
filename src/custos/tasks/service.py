"""Use cases for scheduled tasks: define, hand to agents through the command queue, record runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from custos.commands.service import CommandService
from custos.db.base import new_id, utcnow
from custos.db.engine import Database, UnitOfWork
from custos.devices.models import Device
from custos.devices.service import resolve_device, resolve_target
from custos.errors import Conflict, Invalid, NotFound
from custos.scheduling import Schedule, ScheduleError, Window
from custos.tasks.models import ScheduledTask, TaskRun, TaskTarget
from custos.tasks.schemas import (
    TaskCreate,
    TaskDetail,
    TaskDeviceOut,
    TaskOut,
    TaskResult,
    TaskResultRef,
    TaskRunOut,
)

NEXT_RUNS_SHOWN = 5


def definition(task: ScheduledTask) -> dict[str, Any]:
    """The payload of a `schedule` command: everything an agent needs to run the task alone."""
    return {
        "task_id": task.id,
        "name": task.name,
        "revision": task.revision,
        "revision_at": task.updated_at.isoformat(),
        "anchor": task.created_at.isoformat(),
        "enabled": task.enabled,
        "kind": task.kind,
        "action": task.action,
        "timeout_s": task.timeout_s,
        "schedule": task.schedule,
        "window": task.window,
        "misfire_grace_s": task.misfire_grace_s,
    }


def schedule_of(task: ScheduledTask) -> Schedule:
    """The task's schedule as the agent computes it."""
    return Schedule.from_doc(task.schedule, task.window, task.created_at)


def describe(schedule: dict[str, Any], window: dict[str, Any] | None) -> str:
    """'cron 0 3 * * * (UTC), in mon-fri 01:00-05:00 Europe/Paris' for lists."""
    if schedule.get("cron"):
        text = f"cron {schedule['cron']} ({schedule.get('timezone', 'UTC')})"
    else:
        text = f"every {schedule.get('every_s')} s"
    if window:
        try:
            text += f", in {Window.from_doc(window).describe()}"
        except ScheduleError:
            text += ", in a window"
    return text


class TaskService:
    """Scheduled tasks; their definitions travel to agents as `schedule`/`unschedule` commands."""

    def __init__(self, db: Database, commands: CommandService) -> None:
        self.db = db
        self.commands = commands

    async def create(self, req: TaskCreate, created_by: str) -> TaskDetail:
        """A task, its target devices and one `schedule` command for them, in one transaction."""
        now = utcnow()
        try:
            # refuses a cron and window that never meet, before anything is written
            probe = Schedule.from_doc(req.schedule_doc(), req.window_doc(), now)
            if probe.next_after(now) is None:
                raise Invalid("the schedule never falls inside the window")
        except ScheduleError as exc:
            raise Invalid(str(exc)) from None
        async with self.db.transaction() as uow:
            s = uow.session
            if await s.scalar(select(ScheduledTask.id).where(ScheduledTask.name == req.name)):
                raise Conflict(f"a task named {req.name!r} exists")
            device_ids = await resolve_target(s, req.target)
            task = ScheduledTask(
                id=new_id(),
                name=req.name,
                target=req.target,
                kind=req.kind,
                action=req.action(),
                timeout_s=req.timeout_s,
                schedule=req.schedule_doc(),
                window=req.window_doc(),
                misfire_grace_s=req.misfire_grace_s,
                enabled=req.enabled,
                revision=1,
                created_by=created_by,
                created_at=now,
                updated_at=now,
            )
            s.add(task)
            await s.flush()
            s.add_all(TaskTarget(task_id=task.id, device_id=d) for d in device_ids)
            await s.flush()
            await self._deliver(uow, task, "schedule", definition(task), device_ids, created_by)
            task_id = task.id
        return await self.show(task_id)

    async def _deliver(
        self,
        uow: UnitOfWork,
        task: ScheduledTask,
        kind: str,
        payload: dict[str, Any],
        device_ids: Sequence[str],
        created_by: str,
    ) -> None:
        await self.commands.queue(
            uow,
            kind=kind,
            payload=payload,
            target=f"task:{task.name}",
            device_ids=device_ids,
            created_by=created_by,
        )

    async def _active_targets(self, s: AsyncSession, task_id: str) -> list[str]:
        return list(
            (
                await s.scalars(
                    select(TaskTarget.device_id)
                    .join(Device, Device.id == TaskTarget.device_id)
                    .where(TaskTarget.task_id == task_id, Device.status == "active")
                )
            ).all()
        )

    @staticmethod
    async def _find(s: AsyncSession, ref: str, *, lock: bool = False) -> ScheduledTask:
        stmt = select(ScheduledTask).where(
            ScheduledTask.id == ref if len(ref) == 32 else ScheduledTask.name == ref
        )
        task = await s.scalar(stmt.with_for_update() if lock else stmt)
        if task is None and len(ref) == 32:
            task = await s.scalar(select(ScheduledTask).where(ScheduledTask.name == ref))
        if task is None:
            raise NotFound(f"no task {ref!r}")
        return task

    async def set_enabled(self, ref: str, enabled: bool, by: str) -> TaskDetail:
        """Enable or disable a task; agents get the new revision (no-op when unchanged)."""
        async with self.db.transaction() as uow:
            s = uow.session
            task = await self._find(s, ref, lock=True)
            if task.enabled != enabled:
                task.enabled = enabled
                task.revision += 1
                task.updated_at = utcnow()
                await s.flush()
                devices = await self._active_targets(s, task.id)
                await self._deliver(uow, task, "schedule", definition(task), devices, by)
            task_id = task.id
        return await self.show(task_id)

    async def delete(self, ref: str, by: str) -> None:
        """Delete a task and its runs; agents are told to forget it."""
        async with self.db.transaction() as uow:
            s = uow.session
            task = await self._find(s, ref, lock=True)
            devices = await self._active_targets(s, task.id)
            payload = {"task_id": task.id, "revision": task.revision + 1}
            await self._deliver(uow, task, "unschedule", payload, devices, by)
            await s.execute(delete(TaskRun).where(TaskRun.task_id == task.id))
            await s.execute(delete(TaskTarget).where(TaskTarget.task_id == task.id))
            await s.delete(task)

    async def list_tasks(self, *, limit: int, offset: int) -> list[TaskOut]:
        """Tasks by name, with their number of target devices (two queries)."""
        async with self.db.read() as s:
            tasks = (
                await s.scalars(
                    select(ScheduledTask).order_by(ScheduledTask.name).limit(limit).offset(offset)
                )
            ).all()
            counts: dict[str, int] = {}
            if tasks:
                counts = {
                    tid: n
                    for tid, n in (
                        await s.execute(
                            select(TaskTarget.task_id, func.count())
                            .where(TaskTarget.task_id.in_([t.id for t in tasks]))
                            .group_by(TaskTarget.task_id)
                        )
                    ).all()
                }
        return [self._out(t, counts.get(t.id, 0)) for t in tasks]

    @staticmethod
    def _out(t: ScheduledTask, devices: int) -> TaskOut:
        return TaskOut(
            id=t.id,
            name=t.name,
            target=t.target,
            kind=t.kind,
            action=t.action,
            timeout_s=t.timeout_s,
            schedule=t.schedule,
            window=t.window,
            describe=describe(t.schedule, t.window),
            misfire_grace_s=t.misfire_grace_s,
            enabled=t.enabled,
            revision=t.revision,
            created_by=t.created_by,
            created_at=t.created_at,
            updated_at=t.updated_at,
            devices=devices,
        )

    async def show(self, ref: str) -> TaskDetail:
        """A task, its next occurrences and each target device's latest report (three queries)."""
        async with self.db.read() as s:
            task = await self._find(s, ref)
            stats = (
                select(
                    TaskRun.device_id.label("device_id"),
                    func.count().label("n"),
                    func.max(TaskRun.seq).label("max_seq"),
                )
                .where(TaskRun.task_id == task.id)
                .group_by(TaskRun.device_id)
                .subquery()
            )
            targets = (
                await s.execute(
                    select(Device, stats.c.n, stats.c.max_seq)
                    .join(TaskTarget, TaskTarget.device_id == Device.id)
                    .outerjoin(stats, stats.c.device_id == Device.id)
                    .where(TaskTarget.task_id == task.id)
                    .order_by(Device.name)
                )
            ).all()
            last: dict[str, TaskRun] = {}
            if any(row[2] is not None for row in targets):
                latest = (
                    select(TaskRun)
                    .join(
                        stats,
                        (stats.c.device_id == TaskRun.device_id) & (stats.c.max_seq == TaskRun.seq),
                    )
                    .where(TaskRun.task_id == task.id)
                    .options(defer(TaskRun.stdout), defer(TaskRun.stderr))
                )
                last = {r.device_id: r for r in (await s.scalars(latest)).all()}
        out = []
        for dev, n, max_seq in targets:
            r = last.get(dev.id)
            out.append(
                TaskDeviceOut(
                    device_id=dev.id,
                    device_name=dev.name,
                    status=dev.status,
                    clock_skew_s=dev.last_clock_skew_s,
                    runs=n or 0,
                    last_seq=max_seq,
                    last_state=r.state if r else None,
                    last_scheduled_at=r.scheduled_at if r else None,
                    last_started_at=r.started_at if r else None,
                    last_received_at=r.received_at if r else None,
                    last_clock_offset_s=r.clock_offset_s if r else None,
                    missing_seqs=(max_seq or 0) - (n or 0),
                )
            )
        next_runs: list[datetime] = []
        if task.enabled:
            try:
                next_runs = schedule_of(task).upcoming(utcnow(), NEXT_RUNS_SHOWN)
            except ScheduleError:
                next_runs = []
        return TaskDetail(
            **self._out(task, len(out)).model_dump(), next_runs=next_runs, targets=out
        )

    async def runs(
        self, ref: str, *, device: str | None, limit: int, offset: int
    ) -> list[TaskRunOut]:
        """A task's reported occurrences, newest first (by sequence), optionally for one device."""
        async with self.db.read() as s:
            task = await self._find(s, ref)
            stmt = (
                select(TaskRun, Device.name)
                .join(Device, Device.id == TaskRun.device_id)
                .where(TaskRun.task_id == task.id)
            )
            if device is not None:
                dev = await resolve_device(s, device)
                stmt = stmt.where(TaskRun.device_id == dev.id)
            rows = (
                await s.execute(
                    stmt.order_by(TaskRun.seq.desc(), Device.name).limit(limit).offset(offset)
                )
            ).all()
        return [_run_out(r, name) for r, name in rows]


def _run_out(r: TaskRun, name: str) -> TaskRunOut:
    delay = None
    if r.started_at is not None and r.scheduled_at is not None:
        delay = round((r.started_at - r.scheduled_at).total_seconds(), 3)
    return TaskRunOut(
        task_id=r.task_id,
        device_id=r.device_id,
        device_name=name,
        seq=r.seq,
        revision=r.revision,
        state=r.state,
        scheduled_at=r.scheduled_at,
        missed_count=r.missed_count,
        first_missed_at=r.first_missed_at,
        agent_started_at=r.agent_started_at,
        agent_finished_at=r.agent_finished_at,
        clock_offset_s=r.clock_offset_s,
        started_at=r.started_at,
        finished_at=r.finished_at,
        received_at=r.received_at,
        delay_s=delay,
        exit_code=r.exit_code,
        stdout=r.stdout,
        stderr=r.stderr,
        truncated=r.truncated,
        error=r.error,
        duration_s=r.duration_s,
    )


def _corrected(t: datetime | None, offset: float | None) -> datetime | None:
    if t is None:
        return None
    return t + timedelta(seconds=offset or 0.0)


async def record_task_results(
    s: AsyncSession, device_id: str, results: Sequence[TaskResult]
) -> list[TaskResultRef]:
    """Store reported occurrences idempotently, inside the check-in's transaction.

    Returns every result the agent may drop from its outbox: stored now, stored before
    (a re-sent upload), or for a task this device does not have (deleted: nothing to keep).
    """
    if not results:
        return []
    ids = list({r.task_id for r in results})
    mine = set(
        (
            await s.scalars(
                select(TaskTarget.task_id).where(
                    TaskTarget.device_id == device_id, TaskTarget.task_id.in_(ids)
                )
            )
        ).all()
    )
    now = utcnow()
    rows = []
    seen: set[tuple[str, int]] = set()
    for r in results:
        if r.task_id not in mine or (r.task_id, r.seq) in seen:
            continue
        seen.add((r.task_id, r.seq))
        offset = r.clock_offset_s
        rows.append(
            {
                "task_id": r.task_id,
                "device_id": device_id,
                "seq": r.seq,
                "revision": r.revision,
                "state": r.state,
                "scheduled_at": r.scheduled_at,
                "missed_count": r.missed_count,
                "first_missed_at": r.first_missed_at,
                "agent_started_at": r.started_at,
                "agent_finished_at": r.finished_at,
                "clock_offset_s": offset,
                "started_at": _corrected(r.started_at, offset),
                "finished_at": _corrected(r.finished_at, offset),
                "received_at": now,
                "exit_code": r.exit_code,
                "stdout": r.stdout,
                "stderr": r.stderr,
                "truncated": r.truncated,
                "error": r.error,
                "duration_s": r.duration_s,
            }
        )
    if rows:
        bind = s.get_bind()
        insert = pg_insert if bind.dialect.name == "postgresql" else sqlite_insert
        # the first copy of a result wins; a re-sent one (the agent missed the answer) is a no-op
        stmt = insert(TaskRun).on_conflict_do_nothing(
            index_elements=["task_id", "device_id", "seq"]
        )
        await s.execute(stmt, rows)
    return [TaskResultRef(task_id=r.task_id, seq=r.seq) for r in results]
