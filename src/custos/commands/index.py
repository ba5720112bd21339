"""Which devices may have work waiting: the check-in's way to skip the database.

Nearly every check-in finds nothing to do. Each server process keeps the set of devices
that may have due runs, so that an empty check-in from any other device needs no query.
The set errs on the side of "maybe": a false "maybe" costs one query, a false "no" would
hide work until the next resync, so:

- every process hears of new runs through the push hub's events ("work" for runs due now,
  "later" for runs with a future not_before), the sender's own process included;
- a device leaves the set only when a check-in took everything due for it and no event
  for it arrived meanwhile (a per-device generation number tells);
- the set is rebuilt from the database at start, whenever the hub says events may have
  been missed, and at a slow interval as a safety net; while it is not known to be
  complete (`trusted` is false) every device counts as "maybe".
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from datetime import UTC, datetime

from sqlalchemy import func, or_, select

from custos.commands.models import Command, CommandRun
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.push.hub import Event, PushHub

log = logging.getLogger(__name__)

PENDING_STATES = ("queued", "sent")


class WorkIndex:
    """Devices that may have due work, kept coherent across processes by hub events."""

    def __init__(self, db: Database, hub: PushHub) -> None:
        self.db = db
        self.hub = hub
        self._maybe: dict[str, int] = {}  # device id -> generation of its last mark
        self._later: list[tuple[float, str]] = []  # (due epoch, device id), a heap
        self._gen = 0
        self._loaded = False
        self._marks_during_load: list[set[str]] = []  # one set per load in progress
        self._load_task: asyncio.Task[None] | None = None
        self.loads = 0
        hub.listen(self._on_event)
        hub.on_resync(self.invalidate)

    @property
    def trusted(self) -> bool:
        """Whether a device outside the set really has nothing due."""
        return self._loaded and self.hub.coherent

    def __len__(self) -> int:
        return len(self._maybe)

    def may_have_work(self, device_id: str) -> bool:
        """False only when the device certainly has nothing due now."""
        if not self.trusted:
            return True
        if self._later and self._later[0][0] <= time.time():
            self.promote()
        return device_id in self._maybe

    def generation(self, device_id: str) -> int:
        """Taken before looking for work; handed back to `settle`."""
        return self._maybe.get(device_id, -1)

    def settle(self, device_id: str, generation: int, *, drained: bool) -> None:
        """After a check-in took work: forget the device if it has nothing left.

        Nothing is forgotten when an event for the device arrived after `generation`
        was taken: the run it announced may have committed after the check-in looked.
        """
        if drained and generation >= 0 and self._maybe.get(device_id) == generation:
            del self._maybe[device_id]

    def mark(self, device_ids: tuple[str, ...] | list[str]) -> None:
        """These devices may have due work now."""
        self._gen += 1
        gen = self._gen
        for d in device_ids:
            self._maybe[d] = gen
        for marks in self._marks_during_load:
            marks.update(device_ids)

    def mark_later(self, device_ids: tuple[str, ...] | list[str], at: float) -> None:
        """These devices get due work at `at` (epoch seconds)."""
        for d in device_ids:
            heapq.heappush(self._later, (at, d))

    def promote(self, now: float | None = None) -> list[str]:
        """Move runs whose time has come into the set; returns their devices."""
        now = time.time() if now is None else now
        due: list[str] = []
        while self._later and self._later[0][0] <= now:
            due.append(heapq.heappop(self._later)[1])
        if due:
            self.mark(due)
        return due

    async def tick(self) -> None:
        """Wake this process's push subscribers whose deferred runs just became due."""
        due = self.promote()
        if due:
            self.hub.wake_local(due)

    def _on_event(self, event: Event) -> None:
        if event.kind == "work":
            self.mark(event.device_ids)
        elif event.kind == "later" and event.at is not None:
            self.mark_later(event.device_ids, event.at)

    def invalidate(self) -> None:
        """Events may have been missed: distrust the set until it is rebuilt."""
        self._loaded = False
        if self._load_task is None or self._load_task.done():
            self._load_task = asyncio.get_running_loop().create_task(
                self._reload_quietly(), name="work-index-reload"
            )

    async def _reload_quietly(self) -> None:
        try:
            await self.load()
        except Exception:
            log.exception("work index: reload failed; check-ins query the database until it works")

    async def load(self) -> None:
        """Rebuild the set from the database (marks that arrive meanwhile are kept)."""
        marks: set[str] = set()
        self._marks_during_load.append(marks)
        try:
            due, later = await self._query()
        finally:
            self._marks_during_load.remove(marks)
        self._gen += 1
        gen = self._gen
        fresh = {d: gen for d in due}
        for d in marks:
            fresh[d] = self._maybe.get(d, gen)
        self._maybe = fresh
        self._later = later
        heapq.heapify(self._later)
        self._loaded = True
        self.loads += 1
        log.debug("work index: %d devices with due work, %d deferred", len(due), len(later))

    async def _query(self) -> tuple[list[str], list[tuple[float, str]]]:
        now = utcnow()
        pending = CommandRun.state.in_(PENDING_STATES)
        async with self.db.read() as s:
            due = (
                await s.scalars(
                    select(CommandRun.device_id)
                    .join(Command, Command.id == CommandRun.command_id)
                    .where(pending, or_(Command.not_before.is_(None), Command.not_before <= now))
                    .distinct()
                )
            ).all()
            later = (
                await s.execute(
                    select(CommandRun.device_id, func.min(Command.not_before))
                    .join(Command, Command.id == CommandRun.command_id)
                    .where(pending, Command.not_before > now)
                    .group_by(CommandRun.device_id)
                )
            ).all()
        return list(due), [(_epoch(at), d) for d, at in later if at is not None]


def _epoch(at: datetime) -> float:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()
