"""The check-in: the hot path every device hits at its interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime

import orjson
from sqlalchemy import bindparam, func, update

from custos.commands.index import WorkIndex
from custos.commands.schemas import DeliveredCommand
from custos.commands.service import CommandService
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.identity import DeviceAuth
from custos.devices.models import Device
from custos.devices.schemas import CheckinRequest, CheckinResponse
from custos.devices.service import apply_inventory
from custos.errors import Unauthorized
from custos.push.schemas import PushDescriptor
from custos.tasks.schemas import TaskResultRef
from custos.tasks.service import record_task_results

log = logging.getLogger(__name__)

_WOKEN = CheckinRequest(wake=True)  # never changed: shared by every woken push check-in
_NO_WORK = b'{"commands":[]'  # how every answer that hands out nothing begins


class DeviceCheckin:
    """Takes results and inventory, hands out work; last-seen is batched, not written each time.

    An empty check-in from a device with nothing due touches no database at all: the
    caller has checked the device's status against the authenticator's cache, and the
    work index says whether anything may be waiting. Only while the index is not trusted
    (starting, or hub events possibly missed) does it go to the database, in a shared batch.
    """

    def __init__(
        self,
        db: Database,
        commands: CommandService,
        work: WorkIndex,
        *,
        interval: int,
        max_commands: int,
        push: PushDescriptor | None = None,
    ) -> None:
        self.db = db
        self.commands = commands
        self.work = work
        self._batch: CheckinBatcher = CheckinBatcher(
            self._process_batch, workers=1 if db.dialect == "sqlite" else 2
        )
        self.interval = interval
        self.max_commands = max_commands
        self.push = push  # the same for every device: where to listen for nudges
        self._seen: dict[str, tuple[datetime, float | None, str]] = {}
        self._empty_head = (
            b'{"commands":[],"accepted_results":[],"inventory_version":-1,'
            b'"inventory_resync":false,"checkin_interval":%d,"server_time":' % interval
        )
        self._empty_tail = (
            b"}" if push is None else b',"push":' + push.model_dump_json().encode() + b"}"
        )
        # the batched check-in's answer: the same fields as CheckinResponse, in its order
        self._work_tail = (
            b',"inventory_version":-1,"inventory_resync":false,"checkin_interval":%d,'
            b'"server_time":' % interval
        )
        self._work_end = (
            b',"accepted_task_results":[],"push":'
            + (b"null" if push is None else push.model_dump_json().encode())
            + b"}"
        )

    def empty_response(self) -> bytes:
        """The JSON of a check-in that hands out nothing (built without pydantic)."""
        return self._empty_head + repr(time.time()).encode() + self._empty_tail

    async def checkin(self, auth: DeviceAuth, req: CheckinRequest) -> bytes:
        """Record what the device sent and return its pending work (JSON), in one transaction.

        The caller has verified that the device is active.
        """
        device_id = auth.device_id
        self._seen[device_id] = (utcnow(), round(auth.skew_s, 1), req.agent_version)
        busy = bool(req.results or req.task_results or req.acks or req.inventory is not None)
        if not busy and not req.wake and not self.work.may_have_work(device_id):
            # the common case: nothing to record and nothing waiting. A woken device goes
            # on to the database whatever the index says: the nudge may have overtaken the
            # event that tells this process about the work (processes behind a load balancer).
            # An untrusted index (starting, events possibly missed) says "maybe" for every
            # device, and those check-ins share the batcher's transactions: a reconnect storm
            # then costs a few statements per batch instead of a query per device, which
            # exhausted the connection pool at 10,000 devices
            return self.empty_response()
        if req.inventory is None and not req.task_results:
            # results, acks and work only: joined with concurrent check-ins in one transaction
            return await self._batch.submit(device_id, req)
        generation = self.work.generation(device_id)
        resync = False
        version: int | None = None
        async with self.db.transaction() as uow:
            s = uow.session
            accepted = await self.commands.record_results(s, device_id, req.results)
            accepted_tasks = await record_task_results(s, device_id, req.task_results)
            await self.commands.acknowledge(s, device_id, req.acks)
            if req.inventory is not None:
                device = await s.get(Device, device_id, with_for_update=True)
                if device is None:
                    raise Unauthorized("unknown device", code="unknown_device")
                resync = not await apply_inventory(s, device, req.inventory)
                version = device.inventory_version
            work = await self.commands.take_pending(s, device_id, self.max_commands)
        # runs handed out stay pending until acknowledged, so only an empty take drains
        self.work.settle(device_id, generation, drained=not work)
        return self._render(work, accepted, accepted_tasks, version, resync)

    async def push_checkins(
        self, items: list[tuple[DeviceAuth, list[str] | None]]
    ) -> list[bytes | None]:
        """Check-ins on behalf of push-connected devices, in one batch (see custos.push.wire).

        Each item is a woken device (None: look for work) or the run ids it acknowledged on
        its socket. The answers are in order: the check-in response for a device that is
        handed work, None for one that is not (nothing goes down its socket). The caller has
        verified that the devices are active. Should the batch fail, the check-ins are
        retried one by one through the batcher, so an error reaches only its own device.
        """
        now = utcnow()
        reqs: list[tuple[str, CheckinRequest]] = []
        for auth, acks in items:
            d = auth.device_id
            prev = self._seen.get(d)
            self._seen[d] = (now, round(auth.skew_s, 1), prev[2] if prev else "")
            reqs.append((d, CheckinRequest(acks=acks) if acks else _WOKEN))
        try:
            bodies = await self._process_batch(reqs)
        except Exception as exc:
            log.info("push check-in batch of %d failed (%s); one by one", len(reqs), exc)
            done = await asyncio.gather(
                *(self._batch.submit(d, r) for d, r in reqs), return_exceptions=True
            )
            bodies = [b if isinstance(b, bytes) else _NO_WORK for b in done]
        return [None if b.startswith(_NO_WORK) else b for b in bodies]

    def _render(
        self,
        work: list[DeliveredCommand],
        accepted: list[str],
        accepted_tasks: list[TaskResultRef] | None = None,
        version: int | None = None,
        resync: bool = False,
    ) -> bytes:
        return (
            CheckinResponse(
                commands=work,
                accepted_results=accepted,
                accepted_task_results=accepted_tasks or [],
                inventory_version=version if version is not None else -1,
                inventory_resync=resync,
                checkin_interval=self.interval,
                server_time=time.time(),
                push=self.push,
            )
            .model_dump_json()
            .encode()
        )

    async def _process_batch(self, items: list[tuple[str, CheckinRequest]]) -> list[bytes]:
        """Results, acks and work of several check-ins in one transaction (a few statements).

        A device present twice gets its work in its first check-in (as a concurrent
        check-in of the same device would skip the runs the other one is handing out).
        """
        devices = list(dict.fromkeys(d for d, _ in items))
        generations = {d: self.work.generation(d) for d in devices}
        async with self.db.transaction() as uow:
            s = uow.session
            accepted = await self.commands.record_results_many(
                s, [(d, r.results) for d, r in items]
            )
            await self.commands.acknowledge_many(s, [(d, r.acks) for d, r in items])
            work = await self.commands.take_pending_many(s, devices, self.max_commands)
        for d in devices:
            self.work.settle(d, generations[d], drained=not work.get(d))
        out = []
        for (d, _), acc in zip(items, accepted, strict=True):
            out.append(self._render_work(work.pop(d, []), acc))
        return out

    def _render_work(self, work: list[DeliveredCommand], accepted: list[str]) -> bytes:
        """`_render` for a batched check-in (no inventory, no task results), without pydantic.

        Check-ins under load are mostly these; building and serialising the response models
        cost more than the rest of the check-in's share of its batch. Datetimes are written
        as pydantic writes them (UTC as `Z`); anything orjson cannot write goes through
        pydantic instead.
        """
        try:
            commands = orjson.dumps(
                [
                    {
                        "run_id": c.run_id,
                        "kind": c.kind,
                        "payload": c.payload,
                        "not_before": c.not_before,
                        "expires_at": c.expires_at,
                    }
                    for c in work
                ],
                option=orjson.OPT_UTC_Z,
            )
        except orjson.JSONEncodeError:
            return self._render(work, accepted)
        return b"".join(
            (
                b'{"commands":',
                commands,
                b',"accepted_results":',
                orjson.dumps(accepted),
                self._work_tail,
                repr(time.time()).encode(),
                self._work_end,
            )
        )

    async def stop(self) -> None:
        """Stop the batch workers (pending check-ins are failed)."""
        await self._batch.stop()

    def note_seen(self, device_id: str, agent_version: str) -> None:
        """Another protocol's device was heard from (OMA DM): batched like a check-in."""
        self._seen[device_id] = (utcnow(), None, agent_version)

    async def flush_last_seen(self) -> int:
        """Write the batched last-seen times in one statement (a periodic job)."""
        if not self._seen:
            return 0
        batch, self._seen = self._seen, {}
        params = [
            {"b_id": k, "b_seen": seen, "b_skew": skew, "b_ver": ver}
            for k, (seen, skew, ver) in batch.items()
        ]
        stmt = (
            update(Device)
            .where(Device.id == bindparam("b_id"))
            .values(
                last_seen=bindparam("b_seen"),
                last_clock_skew_s=bindparam("b_skew"),
                # "" (a push-woken check-in carries no version): keep the stored one
                agent_version=func.coalesce(
                    func.nullif(bindparam("b_ver"), ""), Device.agent_version
                ),
            )
        )
        try:
            async with self.db.transaction() as uow:
                conn = await uow.session.connection()
                await conn.execute(stmt, params)
        except Exception:
            # keep the newest of what we had and what arrived meanwhile
            for k, v in batch.items():
                self._seen.setdefault(k, v)
            raise
        return len(params)


class CheckinBatcher:
    """Group commit for check-ins: those that arrive while a transaction runs share the next.

    Each worker takes everything queued (up to `max_batch`) and hands it to `process`, one
    transaction for the lot; under load the batch grows and the cost per check-in falls,
    idle it is a batch of one. Should a batch fail, its check-ins are retried one by one, so
    that an error reaches only the check-in it belongs to.
    """

    def __init__(
        self,
        process: Callable[[list[tuple[str, CheckinRequest]]], Awaitable[list[bytes]]],
        *,
        workers: int,
        max_batch: int = 200,
    ) -> None:
        self.process = process
        self.workers = workers
        self.max_batch = max_batch
        self._queue: deque[tuple[str, CheckinRequest, asyncio.Future[bytes]]] = deque()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.largest = 0

    async def submit(self, device_id: str, req: CheckinRequest) -> bytes:
        """Queue one check-in; its response once its batch has committed."""
        if not self._tasks:
            self._tasks = [
                asyncio.get_running_loop().create_task(self._work(), name=f"checkin-batch-{i}")
                for i in range(self.workers)
            ]
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._queue.append((device_id, req, fut))
        self._ready.set()
        return await fut

    async def stop(self) -> None:
        """Cancel the workers and fail whatever is still queued."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        while self._queue:
            _, _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            batch: list[tuple[str, CheckinRequest, asyncio.Future[bytes]]] = []
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if not item[2].cancelled():  # the client went away
                    batch.append(item)
            if batch:
                try:
                    await self._run(batch)
                except Exception as exc:
                    # a worker must outlive any one batch: fail its check-ins, keep serving
                    log.exception("check-in batch of %d failed", len(batch))
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)

    async def _run(self, batch: list[tuple[str, CheckinRequest, asyncio.Future[bytes]]]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        try:
            responses = await self.process([(d, r) for d, r, _ in batch])
        except asyncio.CancelledError:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(RuntimeError("server shutting down"))
            raise
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][2].done():
                    batch[0][2].set_exception(exc)
                return
            log.info("a batch of %d check-ins failed (%s); one by one", len(batch), exc)
            for item in batch:
                await self._run([item])
            return
        for (_, _, fut), body in zip(batch, responses, strict=True):
            if not fut.done():
                fut.set_result(body)
