"""Use cases for the command queue: queue, deliver exactly once, record results, uploads."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    String,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer
from sqlalchemy.sql.elements import ColumnElement

from custos.commands.models import Command, CommandRun, Upload
from custos.commands.schemas import (
    CommandCreate,
    CommandDetail,
    CommandOut,
    DeliveredCommand,
    RunOut,
    RunResult,
    UploadStart,
    UploadState,
)
from custos.db.base import new_id, utcnow
from custos.db.engine import Database, UnitOfWork
from custos.devices.models import Device
from custos.devices.service import Scope, in_scope, resolve_target
from custos.errors import Conflict, Invalid, NotFound, TooLarge
from custos.push.hub import PushHub

PENDING = ("queued", "sent")
TERMINAL = ("succeeded", "failed", "interrupted", "expired", "rejected", "cancelled")
# runs a result may still close
OPEN = ("queued", "sent", "acked")
RUN_ID_CHARS = set("0123456789abcdef")
# runs listed in the answer to creating a command (the counts cover all of them)
CREATE_RUNS_SHOWN = 100

# called in the recording transaction with the results that just closed runs of one kind
ResultHook = Callable[[AsyncSession, list[tuple[str, RunResult]]], Awaitable[None]]


def _counts(rows: Sequence[tuple[str, int]]) -> dict[str, int]:
    return {state: n for state, n in rows}


def _state_in(states: Sequence[str]) -> ColumnElement[bool]:
    """`state IN ('a', 'b')` written into the SQL (constants of this module, never input).

    A bound list would be an "expanding" parameter, which executemany does not allow and
    which makes a different SQL string per length.
    """
    return CommandRun.state.in_([literal_column(f"'{st}'") for st in states])


class CommandService:
    """Queues commands for devices and records what they report."""

    def __init__(self, db: Database, upload_dir: Path, max_output: int, *, push: PushHub) -> None:
        self.db = db
        self.upload_dir = upload_dir
        self.max_output = max_output
        self.push = push
        # the check-in's statements are built once: each batch of check-ins runs them with
        # new parameters only, so SQLAlchemy's compiled cache and asyncpg's prepared statements
        # are hit every time (an IN list of the batch's size was a new statement per size)
        self._pg = db.dialect == "postgresql"
        # a result closes a run of that device that is still open; a second report of the
        # same run (in this batch or later) finds it closed and changes nothing
        self._result_stmt = (
            update(CommandRun)
            .where(
                CommandRun.id == bindparam("r_id"),
                CommandRun.device_id == bindparam("r_dev"),
                _state_in(OPEN),
            )
            .values(
                state=bindparam("r_state"),
                exit_code=bindparam("r_exit"),
                stdout=bindparam("r_stdout"),
                stderr=bindparam("r_stderr"),
                truncated=bindparam("r_truncated"),
                error=bindparam("r_error"),
                started_at=bindparam("r_started"),
                finished_at=bindparam("r_finished"),
                received_at=bindparam("r_received"),
                result=bindparam("r_result"),
            )
        )
        # a device only ever acknowledges its own runs
        self._ack_stmt = (
            update(CommandRun)
            .where(
                CommandRun.id == bindparam("a_id"),
                CommandRun.device_id == bindparam("a_dev"),
                _state_in(PENDING),
            )
            .values(state="acked")
        )
        self._take_stmt = _take_statement() if self._pg else None
        # kind -> (hook, cheap test of a result): another feature's use of what runs return
        self._result_hooks: dict[str, tuple[ResultHook, Callable[[RunResult], bool]]] = {}

    def on_result(self, kind: str, hook: ResultHook, wants: Callable[[RunResult], bool]) -> None:
        """Call `hook` with each result that closes a run of `kind`, in the same transaction.

        `wants` looks at a result alone: only results it accepts cost a query (the kinds of
        their runs), so check-ins carrying other results stay as cheap as before.
        """
        self._result_hooks[kind] = (hook, wants)

    async def create(
        self, req: CommandCreate, created_by: str, scope: Scope = None
    ) -> CommandDetail:
        """One command, one run per target device, in one transaction."""
        async with self.db.transaction() as uow:
            s = uow.session
            device_ids = await resolve_target(s, req.target, scope)
            now = utcnow()
            if req.expires_at is not None and req.expires_at <= now:
                raise Invalid("expires_at is in the past")
            cmd = Command(
                id=new_id(),
                kind=req.kind,
                payload=req.payload(),
                target=req.target,
                created_by=created_by,
                created_at=now,
                not_before=req.not_before,
                expires_at=req.expires_at,
            )
            s.add(cmd)
            await s.flush()
            await _insert_runs(s, cmd.id, device_ids, now)
            command_id = cmd.id
            if req.not_before is None or req.not_before <= now:
                # woken only once the runs are committed, or a quick agent would find nothing
                uow.after_commit(lambda: self.push.nudge(device_ids))
            else:
                # every process's work index learns when these runs become due
                due_at = req.not_before.timestamp()
                uow.after_commit(lambda: self.push.announce("later", device_ids, due_at))
        # the answer lists the first runs only: rendering 10,000 of them would hold up this
        # process's deliveries to the very devices just woken (B3); GET shows them all
        return await self.show(command_id, run_limit=CREATE_RUNS_SHOWN)

    async def queue(
        self,
        uow: UnitOfWork,
        *,
        kind: str,
        payload: dict[str, Any],
        target: str,
        device_ids: Sequence[str],
        created_by: str,
        not_before: datetime | None = None,
    ) -> str:
        """Queue one command with a run per device inside the caller's transaction.

        Used by other services (scheduled tasks deliver their definitions this way, software
        deployments their work); like create(), the devices are told only after the commit:
        a nudge when it is due now, else every process's work index learns when it will be.
        """
        s = uow.session
        now = utcnow()
        if not_before is not None and not_before <= now:
            not_before = None
        cmd = Command(
            id=new_id(),
            kind=kind,
            payload=payload,
            target=target,
            created_by=created_by,
            created_at=now,
            not_before=not_before,
        )
        s.add(cmd)
        await s.flush()
        ids = list(device_ids)
        if ids:
            await _insert_runs(s, cmd.id, ids, now)
            if not_before is None:
                uow.after_commit(lambda: self.push.nudge(ids))
            else:
                due_at = not_before.timestamp()
                uow.after_commit(lambda: self.push.announce("later", ids, due_at))
        return cmd.id

    async def list_commands(
        self, *, limit: int, offset: int, scope: Scope = None
    ) -> list[CommandOut]:
        """Commands, newest first, with run counts by state (two queries).

        With a scope: only commands with a run on a device in it, counting only those runs.
        """
        async with self.db.read() as s:
            visible: Any = true()
            if scope is not None:
                visible = Command.id.in_(
                    select(CommandRun.command_id).where(in_scope(CommandRun.device_id, scope))
                )
            cmds = (
                await s.scalars(
                    select(Command)
                    .where(visible)
                    .order_by(Command.created_at.desc(), Command.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            ids = [c.id for c in cmds]
            counts: dict[str, dict[str, int]] = {i: {} for i in ids}
            if ids:
                for cid, state, n in (
                    await s.execute(
                        select(CommandRun.command_id, CommandRun.state, func.count())
                        .where(
                            CommandRun.command_id.in_(ids),
                            in_scope(CommandRun.device_id, scope),
                        )
                        .group_by(CommandRun.command_id, CommandRun.state)
                    )
                ).all():
                    counts[cid][state] = n
        return [self._out(c, counts[c.id]) for c in cmds]

    @staticmethod
    def _out(c: Command, counts: dict[str, int]) -> CommandOut:
        return CommandOut(
            id=c.id,
            kind=c.kind,
            payload=c.payload,
            target=c.target,
            created_by=c.created_by,
            created_at=c.created_at,
            not_before=c.not_before,
            expires_at=c.expires_at,
            counts=counts,
        )

    async def show(
        self,
        command_id: str,
        *,
        output: bool = True,
        run_limit: int | None = None,
        scope: Scope = None,
    ) -> CommandDetail:
        """A command and its runs by device name (all, or the first `run_limit`); counts of all.

        Without stdout/stderr when output is False (for polling).
        """
        async with self.db.read() as s:
            c = await s.get(Command, command_id)
            if c is None:
                raise NotFound(f"no command {command_id!r}")
            query = (
                select(CommandRun, Device.name)
                .join(Device, Device.id == CommandRun.device_id)
                .where(CommandRun.command_id == command_id, in_scope(CommandRun.device_id, scope))
                .order_by(Device.name, CommandRun.id)
                .options(*(() if output else (defer(CommandRun.stdout), defer(CommandRun.stderr))))
            )
            if run_limit is not None:
                query = query.limit(run_limit)
            rows = (await s.execute(query)).all()
            counts: dict[str, int] = {}
            if run_limit is not None and len(rows) >= run_limit:
                counts = _counts(
                    (
                        await s.execute(
                            select(CommandRun.state, func.count())
                            .where(
                                CommandRun.command_id == command_id,
                                in_scope(CommandRun.device_id, scope),
                            )
                            .group_by(CommandRun.state)
                        )
                    ).all()
                )
            else:
                for r, _ in rows:
                    counts[r.state] = counts.get(r.state, 0) + 1
            if scope is not None and not rows:
                raise NotFound(f"no command {command_id!r}")
        runs = [self._run_out(r, name, output=output) for r, name in rows]
        return CommandDetail(
            **self._out(c, counts).model_dump(), runs=runs, runs_total=sum(counts.values())
        )

    @staticmethod
    def _run_out(r: CommandRun, name: str, *, output: bool = True) -> RunOut:
        return RunOut(
            id=r.id,
            command_id=r.command_id,
            device_id=r.device_id,
            device_name=name,
            state=r.state,
            deliveries=r.deliveries,
            created_at=r.created_at,
            delivered_at=r.delivered_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            received_at=r.received_at,
            exit_code=r.exit_code,
            stdout=r.stdout if output else "",
            stderr=r.stderr if output else "",
            truncated=r.truncated,
            error=r.error,
            result=r.result,
        )

    # --- device side (called by the check-in, inside its transaction) ---

    async def take_pending(
        self, s: AsyncSession, device_id: str, limit: int
    ) -> list[DeliveredCommand]:
        """Runs due now, marked sent (oldest first); expired ones met on the way are closed."""
        return (await self.take_pending_many(s, [device_id], limit)).get(device_id, [])

    async def take_pending_many(
        self, s: AsyncSession, device_ids: Sequence[str], limit: int
    ) -> dict[str, list[DeliveredCommand]]:
        """take_pending for several devices in one statement: up to `limit` runs each."""
        if not device_ids:
            return {}
        now = utcnow()
        if self._take_stmt is not None:
            # PostgreSQL: choose, lock, mark and read back in one statement (one round trip)
            conn = await s.connection()
            result = await conn.execute(
                self._take_stmt, {"t_devs": list(device_ids), "t_lim": limit, "t_now": now}
            )
            # RETURNING has no order: oldest first, as the agent is to run them
            returned = sorted(result.all(), key=lambda r: (r.created_at, r.id))
            taken: dict[str, list[DeliveredCommand]] = {}
            for r in returned:
                if r.state == "sent":
                    taken.setdefault(r.device_id, []).append(
                        # straight from the database's typed columns: nothing to validate
                        DeliveredCommand.model_construct(
                            run_id=r.id,
                            kind=r.kind,
                            payload=r.payload,
                            not_before=r.not_before,
                            expires_at=r.expires_at,
                        )
                    )
            return taken
        ranked = _ranked_due(CommandRun.device_id.in_(list(device_ids)), now)
        rows = (
            await s.execute(
                select(
                    CommandRun.id,
                    CommandRun.device_id,
                    Command.kind,
                    Command.payload,
                    Command.not_before,
                    Command.expires_at,
                )
                .join(Command, Command.id == CommandRun.command_id)
                .where(
                    CommandRun.id.in_(select(ranked.c.id).where(ranked.c.rn <= limit)),
                    CommandRun.state.in_(PENDING),
                )
                .order_by(CommandRun.created_at, CommandRun.id)
                # a concurrent check-in of the same device skips runs this one is handing out
                .with_for_update(of=CommandRun, skip_locked=True)
            )
        ).all()
        out: dict[str, list[DeliveredCommand]] = {}
        sent: list[str] = []
        expired: list[str] = []
        for run_id, device_id, kind, payload, not_before, expires_at in rows:
            if expires_at is not None and expires_at <= now:
                expired.append(run_id)
                continue
            sent.append(run_id)
            out.setdefault(device_id, []).append(
                DeliveredCommand(
                    run_id=run_id,
                    kind=kind,
                    payload=payload,
                    not_before=not_before,
                    expires_at=expires_at,
                )
            )
        if sent:
            await s.execute(
                update(CommandRun)
                .where(CommandRun.id.in_(sent))
                .values(
                    state="sent",
                    deliveries=CommandRun.deliveries + 1,
                    delivered_at=func.coalesce(CommandRun.delivered_at, now),
                )
                .execution_options(synchronize_session=False)
            )
        if expired:
            await s.execute(
                update(CommandRun)
                .where(CommandRun.id.in_(expired))
                .values(state="expired", finished_at=now)
                .execution_options(synchronize_session=False)
            )
        return out

    async def acknowledge(self, s: AsyncSession, device_id: str, run_ids: Sequence[str]) -> None:
        """The agent has the runs in its local queue: stop re-sending them."""
        await self.acknowledge_many(s, [(device_id, run_ids)])

    async def acknowledge_many(
        self, s: AsyncSession, items: Sequence[tuple[str, Sequence[str]]]
    ) -> None:
        """acknowledge for several devices in one executemany (each only its own runs)."""
        params = [
            {"a_id": run_id, "a_dev": device_id}
            for device_id, run_ids in items
            for run_id in dict.fromkeys(run_ids)
        ]
        if params:
            conn = await s.connection()
            await conn.execute(self._ack_stmt, params)

    async def record_results(
        self, s: AsyncSession, device_id: str, results: Sequence[RunResult]
    ) -> list[str]:
        """Store results idempotently; returns the run ids the agent may drop from its outbox."""
        return (await self.record_results_many(s, [(device_id, results)]))[0]

    async def record_results_many(
        self, s: AsyncSession, items: Sequence[tuple[str, Sequence[RunResult]]]
    ) -> list[list[str]]:
        """record_results for several devices in one executemany; the accepted ids of each.

        Every id is accepted: unknown or foreign ids and runs already closed are dropped,
        never retried. The UPDATE itself checks owner and state (and locks the row), so the
        first report of a run closes it and any later one changes nothing.
        """
        now = utcnow()
        limit = self.max_output + 200
        out = []
        updates: list[dict[str, Any]] = []
        for device_id, results in items:
            out.append([res.run_id for res in results])
            for res in results:
                updates.append(
                    {
                        "r_id": res.run_id,
                        "r_dev": device_id,
                        "r_state": res.state,
                        "r_exit": res.exit_code,
                        "r_stdout": res.stdout[:limit],
                        "r_stderr": res.stderr[:limit],
                        "r_truncated": res.truncated or len(res.stdout) > limit,
                        "r_error": res.error,
                        "r_started": res.started_at,
                        "r_finished": res.finished_at or now,
                        "r_received": now,
                        "r_result": res.result,
                    }
                )
        hooked = await self._hooked_runs(s, items) if self._result_hooks else {}
        if updates:
            conn = await s.connection()
            await conn.execute(self._result_stmt, updates)
        if hooked:
            by_kind: dict[str, list[tuple[str, RunResult]]] = {}
            for device_id, results in items:
                for res in results:
                    entry = hooked.get(res.run_id)
                    if entry is not None and entry[0] == device_id:
                        # the first report of a run is the one that closed it
                        del hooked[res.run_id]
                        by_kind.setdefault(entry[1], []).append((device_id, res))
            for kind, closed in by_kind.items():
                await self._result_hooks[kind][0](s, closed)
        return out

    async def _hooked_runs(
        self, s: AsyncSession, items: Sequence[tuple[str, Sequence[RunResult]]]
    ) -> dict[str, tuple[str, str]]:
        """Open runs of a hooked kind among these results: run id -> (device id, kind).

        Read (and locked) before the results close them, so a result reported twice, at once
        or later, reaches the hook once.
        """
        wanted = [
            res.run_id
            for _, results in items
            for res in results
            if any(wants(res) for _, wants in self._result_hooks.values())
        ]
        if not wanted:
            return {}
        rows = (
            await s.execute(
                select(CommandRun.id, CommandRun.device_id, Command.kind)
                .join(Command, Command.id == CommandRun.command_id)
                .where(
                    CommandRun.id.in_(sorted(set(wanted))),
                    CommandRun.state.in_(OPEN),
                    Command.kind.in_(sorted(self._result_hooks)),
                )
                .with_for_update(of=CommandRun)
            )
        ).all()
        return {run_id: (device_id, kind) for run_id, device_id, kind in rows}

    async def expire_overdue(self) -> int:
        """Close pending runs whose command has expired (a periodic job)."""
        now = utcnow()
        async with self.db.transaction() as uow:
            expired_cmds = select(Command.id).where(Command.expires_at <= now)
            res = await uow.session.execute(
                update(CommandRun)
                .where(CommandRun.state.in_(PENDING), CommandRun.command_id.in_(expired_cmds))
                .values(state="expired", finished_at=now)
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount or 0)  # type: ignore[attr-defined]

    # --- file collection ---

    def _upload_path(self, run_id: str) -> Path:
        # the name comes from a validated run id, never from the device's path
        if len(run_id) != 32 or not set(run_id) <= RUN_ID_CHARS:
            raise NotFound("no such run")
        return self.upload_dir / run_id

    async def _collect_run(
        self, s: AsyncSession, device_id: str, run_id: str
    ) -> tuple[CommandRun, int]:
        self._upload_path(run_id)
        row = (
            await s.execute(
                select(CommandRun, Command.kind, Command.payload)
                .join(Command, Command.id == CommandRun.command_id)
                .where(CommandRun.id == run_id, CommandRun.device_id == device_id)
            )
        ).first()
        if row is None or row[1] != "collect_file":
            raise NotFound("no collect_file run with that id for this device")
        run = row[0]
        if run.state in TERMINAL:
            raise Conflict(f"run is already {run.state}")
        return run, int(row[2].get("max_bytes", 0))

    async def start_upload(
        self, device_id: str, run_id: str, req: UploadStart, limit: int
    ) -> UploadState:
        """Announce an upload (idempotent: a restarted agent gets the current offset back)."""
        async with self.db.transaction() as uow:
            s = uow.session
            _run, max_bytes = await self._collect_run(s, device_id, run_id)
            if req.size > min(limit, max_bytes):
                raise TooLarge(
                    f"file is {req.size} bytes; the limit for this collection is "
                    f"{min(limit, max_bytes)}"
                )
            up = await s.get(Upload, run_id)
            if up is not None and (up.size != req.size or up.sha256 != req.sha256):
                # the file changed since the first attempt: start over
                await s.delete(up)
                await s.flush()
                up = None
            if up is None:
                up = Upload(
                    run_id=run_id, source_path=req.source_path, size=req.size, sha256=req.sha256
                )
                s.add(up)
                await asyncio.to_thread(_reset_file, self._upload_path(run_id))
                if req.size == 0:
                    if req.sha256 != EMPTY_SHA256:
                        raise Conflict("an empty file has another hash", code="hash_mismatch")
                    up.complete = True
            await s.flush()
            return UploadState(
                run_id=run_id, size=up.size, received=up.received, complete=up.complete
            )

    async def append_upload(
        self, device_id: str, run_id: str, offset: int, chunk: bytes
    ) -> UploadState:
        """Append a chunk at exactly `offset`; the last one is checked against the hash."""
        if not chunk:
            raise Invalid("empty chunk", code="empty_chunk")
        mismatch = False
        async with self.db.transaction() as uow:
            s = uow.session
            await self._collect_run(s, device_id, run_id)
            up = await s.get(Upload, run_id, with_for_update=True)
            if up is None:
                raise NotFound("upload not started")
            if up.complete:
                return UploadState(run_id=run_id, size=up.size, received=up.received, complete=True)
            if offset != up.received:
                raise Conflict(f"expected offset {up.received}", code="offset_mismatch")
            if offset + len(chunk) > up.size:
                raise TooLarge("chunk goes past the announced size")
            path = self._upload_path(run_id)
            await asyncio.to_thread(_write_at, path, offset, chunk)
            up.received = offset + len(chunk)
            if up.received == up.size:
                if await _sha256_file(path) == up.sha256:
                    up.complete = True
                else:
                    # start over; the reset is committed before the agent hears of it
                    up.received = 0
                    mismatch = True
            state = UploadState(
                run_id=run_id, size=up.size, received=up.received, complete=up.complete
            )
        if mismatch:
            raise Conflict("file hash does not match; upload restarted", code="hash_mismatch")
        return state

    async def upload_file(self, run_id: str, scope: Scope = None) -> tuple[Path, Upload]:
        """The stored file of a completed collection, for download by an admin."""
        async with self.db.read() as s:
            up = await s.get(Upload, run_id) if len(run_id) == 32 else None
            if up is not None and scope is not None:
                visible = await s.scalar(
                    select(CommandRun.id).where(
                        CommandRun.id == run_id, in_scope(CommandRun.device_id, scope)
                    )
                )
                up = up if visible else None
        if up is None or not up.complete:
            raise NotFound("no completed upload for that run")
        return self._upload_path(run_id), up


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _reset_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _write_at(path: Path, offset: int, chunk: bytes) -> None:
    with path.open("r+b") as fh:
        fh.truncate(offset)
        fh.seek(offset)
        fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


async def _sha256_file(path: Path) -> str:
    def _hash() -> str:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    return await asyncio.to_thread(_hash)


def _ranked_due(devices: ColumnElement[bool], now: Any) -> Any:
    """The pending runs of `devices` that are due at `now`, numbered per device oldest first.

    Future work (a `not_before` still ahead) is left out so it cannot crowd out what is due.
    """
    return (
        select(
            CommandRun.id,
            func.row_number()
            .over(
                partition_by=CommandRun.device_id,
                order_by=(CommandRun.created_at, CommandRun.id),
            )
            .label("rn"),
        )
        .join(Command, Command.id == CommandRun.command_id)
        .where(
            devices,
            _state_in(PENDING),
            or_(Command.not_before.is_(None), Command.not_before <= now),
        )
        .subquery()
    )


def _take_statement() -> Any:
    """PostgreSQL: hand out up to `t_lim` due runs per device of `t_devs` in one statement.

    The runs are ranked per device (oldest first; future work does not crowd out what is
    due now), locked with SKIP LOCKED (a concurrent check-in of the same device skips runs
    this one is handing out), and marked: `sent`, or `expired` when their command has
    expired. RETURNING gives what the response needs. Parameters: t_devs (an array, so the
    SQL is the same for every batch size), t_lim, t_now.
    """
    now = bindparam("t_now", type_=CommandRun.finished_at.type)
    ranked = _ranked_due(
        CommandRun.device_id == any_(bindparam("t_devs", type_=ARRAY(String))), now
    )
    picked = (
        select(CommandRun.id)
        .where(
            CommandRun.id.in_(select(ranked.c.id).where(ranked.c.rn <= bindparam("t_lim"))),
            _state_in(PENDING),
        )
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    expired = Command.expires_at <= now  # NULL (never expires) is not true
    return (
        update(CommandRun)
        .where(CommandRun.id == picked.c.id, Command.id == CommandRun.command_id)
        .values(
            state=case((expired, "expired"), else_="sent"),
            deliveries=CommandRun.deliveries + case((expired, 0), else_=1),
            delivered_at=case(
                (expired, CommandRun.delivered_at),
                else_=func.coalesce(CommandRun.delivered_at, now),
            ),
            finished_at=case((expired, now), else_=CommandRun.finished_at),
        )
        .returning(
            CommandRun.id,
            CommandRun.device_id,
            CommandRun.created_at,
            CommandRun.state,
            Command.kind,
            Command.payload,
            Command.not_before,
            Command.expires_at,
        )
    )


@functools.cache
def _insert_runs_pg() -> Any:
    """PostgreSQL: all of a command's runs from two arrays (ids, devices) in one statement.

    The ORM's bulk insert sends 10,000 runs as ten pages of 1,000 VALUES rows, with
    10,000 parameter dicts built and bound first; this is the time between the POST and the
    commit that a fan-out (B3) waits for. Parameters: i_ids, i_devs, i_cmd, i_now. Built on
    first use (nothing at import time).
    """
    rows = (
        func.unnest(
            bindparam("i_ids", type_=ARRAY(String)), bindparam("i_devs", type_=ARRAY(String))
        )
        .table_valued("id", "dev")
        .render_derived()
    )
    columns = ["id", "command_id", "device_id", "state", "deliveries", "created_at"]
    columns += ["stdout", "stderr", "truncated", "result"]
    return insert(CommandRun).from_select(
        columns,
        select(
            rows.c.id,
            bindparam("i_cmd", type_=String),
            rows.c.dev,
            literal_column("'queued'"),
            literal_column("0"),
            bindparam("i_now", type_=CommandRun.created_at.type),
            literal_column("''"),
            literal_column("''"),
            literal_column("false"),
            literal_column("'{}'::jsonb"),
        ),
    )


async def _insert_runs(
    s: AsyncSession, command_id: str, device_ids: Sequence[str], now: datetime
) -> None:
    """One queued run per device (a single statement)."""
    conn = await s.connection()
    if conn.dialect.name == "postgresql":
        ids = [new_id() for _ in device_ids]
        params = {"i_ids": ids, "i_devs": list(device_ids), "i_cmd": command_id, "i_now": now}
        await conn.execute(_insert_runs_pg(), params)
        return
    await s.execute(
        insert(CommandRun),
        [
            {
                "id": new_id(),
                "command_id": command_id,
                "device_id": d,
                "state": "queued",
                "deliveries": 0,
                "created_at": now,
                "stdout": "",
                "stderr": "",
                "truncated": False,
                "result": {},
            }
            for d in device_ids
        ],
    )
