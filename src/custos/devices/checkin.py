"""The check-in: the hot path every device hits at its interval."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from sqlalchemy import bindparam, or_, select, update

from custos.commands.models import Command, CommandRun
from custos.commands.service import PENDING, CommandService
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.identity import DeviceAuth, ensure_active
from custos.devices.models import Device
from custos.devices.schemas import CheckinRequest, CheckinResponse
from custos.devices.service import apply_inventory
from custos.errors import Unauthorized

log = logging.getLogger(__name__)


class DeviceCheckin:
    """Takes results and inventory, hands out work; last-seen is batched, not written each time."""

    def __init__(
        self, db: Database, commands: CommandService, *, interval: int, max_commands: int
    ) -> None:
        self.db = db
        self.commands = commands
        self.interval = interval
        self.max_commands = max_commands
        self._seen: dict[str, tuple[datetime, float, str]] = {}
        pending = (
            select(CommandRun.id)
            .join(Command, Command.id == CommandRun.command_id)
            # two equalities rather than IN: an expanding IN is re-rendered on every execution
            .where(
                CommandRun.device_id == Device.id,
                or_(*(CommandRun.state == s for s in PENDING)),
                or_(Command.not_before.is_(None), Command.not_before <= bindparam("now")),
            )
            .exists()
        )
        self._status_stmt = select(Device.status, pending).where(
            Device.id == bindparam("device_id")
        )

    async def checkin(self, auth: DeviceAuth, req: CheckinRequest) -> CheckinResponse:
        """Record what the device sent and return its pending work, in one transaction."""
        # one query tells whether the device is still active and whether work waits for it
        row = await self.db.fetch_one(
            self._status_stmt, {"device_id": auth.device_id, "now": utcnow()}
        )
        status, waiting = (row[0], bool(row[1])) if row is not None else (None, False)
        ensure_active(status)
        self._seen[auth.device_id] = (utcnow(), round(auth.skew_s, 1), req.agent_version)
        if not (waiting or req.results or req.acks or req.inventory is not None):
            # the common case: nothing to record and nothing waiting: no transaction at all
            return CheckinResponse(
                commands=[],
                accepted_results=[],
                inventory_version=-1,
                inventory_resync=False,
                checkin_interval=self.interval,
                server_time=time.time(),
            )
        resync = False
        version: int | None = None
        async with self.db.transaction() as uow:
            s = uow.session
            accepted = await self.commands.record_results(s, auth.device_id, req.results)
            await self.commands.acknowledge(s, auth.device_id, req.acks)
            if req.inventory is not None:
                device = await s.get(Device, auth.device_id, with_for_update=True)
                if device is None:
                    raise Unauthorized("unknown device", code="unknown_device")
                resync = not await apply_inventory(s, device, req.inventory)
                version = device.inventory_version
            work = await self.commands.take_pending(s, auth.device_id, self.max_commands)
        return CheckinResponse(
            commands=work,
            accepted_results=accepted,
            inventory_version=version if version is not None else -1,
            inventory_resync=resync,
            checkin_interval=self.interval,
            server_time=time.time(),
        )

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
                agent_version=bindparam("b_ver"),
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
