"""Schedules of offline tasks: cron or fixed interval, maintenance windows, misfire handling.

Pure computation with no I/O, shared by the server (validation, the next runs it shows) and
the agent (which runs the schedule from its local queue with no network). Times are aware
datetimes; an agent feeds in its server-corrected clock, so a device with a wrong clock still
runs a 03:00 job at the server's 03:00.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# an occurrence that is at most this late still runs, whatever the misfire grace (the loop
# wakes a little after the exact second, and a previous run of the same task may overrun)
ON_TIME_SLACK_S = 30.0
# occurrences examined per call, so a long sleep on a fast schedule cannot stall the agent
SCAN_LIMIT = 10_000
MIN_EVERY_S = 1
MAX_EVERY_S = 366 * 86400
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_TINY = timedelta(microseconds=1)


class ScheduleError(ValueError):
    """A schedule, window or time zone that cannot be used; the message says why."""


def zone(name: str) -> ZoneInfo:
    """An IANA time zone by name."""
    if not name or len(name) > 64 or "\x00" in name or name.startswith(("/", ".")):
        raise ScheduleError(f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown time zone {name!r}") from None


def check_cron(expr: str) -> str:
    """A valid 5-field cron expression (minute hour day-of-month month day-of-week)."""
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"a cron expression has 5 fields (minute hour day month weekday), not {len(fields)}"
        )
    norm = " ".join(fields)
    try:
        CronSim(norm, datetime(2000, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError, IndexError) as exc:
        raise ScheduleError(f"bad cron expression {expr!r}: {exc}") from None
    return norm


def _hhmm(value: str) -> time:
    m = _HHMM.match(value.strip())
    if not m:
        raise ScheduleError(f"{value!r} is not a time of day (HH:MM)")
    return time(int(m.group(1)), int(m.group(2)))


def parse_days(spec: str) -> list[int]:
    """Weekdays (0 = Monday) from 'mon-fri', 'sat,sun', 'mon,wed-fri', 'daily' or '*'."""
    spec = spec.strip().lower()
    if spec in ("*", "daily", "all", "every"):
        return list(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo not in DAY_NAMES or (hi and hi not in DAY_NAMES):
            raise ScheduleError(f"bad days {spec!r}: use e.g. mon-fri, sat,sun or daily")
        a, b = DAY_NAMES.index(lo), DAY_NAMES.index(hi or lo)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return sorted(days)


def parse_window(text: str, default_tz: str = "UTC") -> dict[str, Any]:
    """'mon-fri 01:00-05:00 Europe/Paris' (days and zone optional) as a window document."""
    parts = text.split()
    if not 1 <= len(parts) <= 3:
        raise ScheduleError("a window is '[DAYS] HH:MM-HH:MM [ZONE]', e.g. 'mon-fri 01:00-05:00'")
    span_at = next((i for i, p in enumerate(parts) if "-" in p and ":" in p), None)
    if span_at is None or span_at > 1:
        raise ScheduleError("a window needs a time span HH:MM-HH:MM, e.g. 'mon-fri 01:00-05:00'")
    days = parse_days(parts[0]) if span_at == 1 else list(range(7))
    start, _, end = parts[span_at].partition("-")
    rest = parts[span_at + 1 :]
    doc = {
        "days": days,
        "start": _hhmm(start).strftime("%H:%M"),
        "end": _hhmm(end).strftime("%H:%M"),
        "timezone": rest[0] if rest else default_tz,
    }
    Window.from_doc(doc)  # validates the zone
    return doc


@dataclass(frozen=True)
class Window:
    """Wall-clock hours on some weekdays in a zone; only there may an occurrence start.

    `end` is exclusive. An end at or before the start crosses midnight, and the window then
    belongs to the day it opens (sat 22:00-02:00 runs into Sunday morning); equal start and
    end mean the whole day.
    """

    days: frozenset[int]
    start: time
    end: time
    tz: ZoneInfo

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Window:
        """From its JSON document (days 0-6 with 0 = Monday, HH:MM times, IANA zone)."""
        days = doc.get("days")
        if (
            not isinstance(days, list)
            or not days
            or not all(isinstance(d, int) and 0 <= d <= 6 for d in days)
        ):
            raise ScheduleError("window days are a non-empty list of 0 (Monday) to 6 (Sunday)")
        return cls(
            frozenset(days),
            _hhmm(str(doc.get("start", ""))),
            _hhmm(str(doc.get("end", ""))),
            zone(str(doc.get("timezone") or "UTC")),
        )

    def contains(self, t: datetime) -> bool:
        """Whether instant t is inside the window."""
        local = t.astimezone(self.tz)
        clock, day = local.time().replace(tzinfo=None), local.weekday()
        if self.start == self.end:
            return day in self.days
        if self.start < self.end:
            return day in self.days and self.start <= clock < self.end
        # crosses midnight: the evening part of a listed day or the morning after it
        return (day in self.days and clock >= self.start) or (
            (day - 1) % 7 in self.days and clock < self.end
        )

    def next_open(self, t: datetime) -> datetime | None:
        """The first instant at or after t inside the window."""
        if self.contains(t):
            return t
        local = t.astimezone(self.tz)
        for k in range(9):
            day = local.date() + timedelta(days=k)
            if day.weekday() not in self.days:
                continue
            opening = datetime.combine(day, self.start, tzinfo=self.tz)
            if opening >= t:
                # an opening inside a DST gap resolves to a real instant just after it
                return opening.astimezone(UTC)
        return None  # pragma: no cover - a non-empty week always has an opening

    def describe(self) -> str:
        """'mon-fri 01:00-05:00 Europe/Paris'."""
        names = ",".join(DAY_NAMES[d] for d in sorted(self.days))
        if len(self.days) == 7:
            names = "daily"
        return f"{names} {self.start:%H:%M}-{self.end:%H:%M} {self.tz.key}"


@dataclass(frozen=True)
class Schedule:
    """When a task's occurrences fall: a cron expression in a zone, or every N seconds."""

    cron: str | None
    every_s: int | None
    tz: ZoneInfo
    anchor: datetime  # interval occurrences are anchor + k * every_s
    window: Window | None = None

    @classmethod
    def from_doc(
        cls, doc: dict[str, Any], window: dict[str, Any] | None, anchor: datetime
    ) -> Schedule:
        """From the task's schedule and window documents."""
        cron, every = doc.get("cron"), doc.get("every_s")
        if (cron is None) == (every is None):
            raise ScheduleError("a schedule is either cron or every_s")
        if every is not None and (
            not isinstance(every, int) or not MIN_EVERY_S <= every <= MAX_EVERY_S
        ):
            raise ScheduleError(f"every_s is {MIN_EVERY_S} to {MAX_EVERY_S} seconds")
        if anchor.tzinfo is None:
            raise ScheduleError("the anchor needs a time zone")
        return cls(
            check_cron(str(cron)) if cron is not None else None,
            every,
            zone(str(doc.get("timezone") or "UTC")),
            anchor,
            Window.from_doc(window) if window else None,
        )

    def _raw_after(self, t: datetime) -> datetime:
        if self.every_s is not None:
            step = timedelta(seconds=self.every_s)
            if t < self.anchor:
                return self.anchor + step
            k = (t - self.anchor) // step + 1
            return self.anchor + k * step
        assert self.cron is not None
        return next(CronSim(self.cron, t.astimezone(self.tz))).astimezone(UTC)

    def next_after(self, t: datetime, *, limit: int = 1000) -> datetime | None:
        """The first occurrence strictly after t that falls inside the window (if any)."""
        for _ in range(limit):
            c = self._raw_after(t)
            if self.window is None or self.window.contains(c):
                return c
            opening = self.window.next_open(c)
            if opening is None:  # pragma: no cover
                return None
            t = opening - _TINY  # an occurrence exactly at the opening counts
        return None

    def upcoming(self, after: datetime, n: int) -> list[datetime]:
        """The next n occurrences after `after` (fewer if the schedule runs dry)."""
        out: list[datetime] = []
        t = after
        while len(out) < n:
            nxt = self.next_after(t)
            if nxt is None:
                break
            out.append(nxt)
            t = nxt
        return out


@dataclass(frozen=True)
class Due:
    """What a scheduler should do now for one task."""

    run: datetime | None  # the occurrence to run now, if any
    missed: int  # occurrences given up (not run), oldest first_missed .. newest last_missed
    first_missed: datetime | None
    last_missed: datetime | None
    watermark: datetime  # the newest occurrence dealt with; the next call starts after it
    complete: bool  # False: more past occurrences remain to be examined (call again)


def due(
    schedule: Schedule,
    watermark: datetime,
    now: datetime,
    grace_s: float,
    *,
    limit: int | None = None,
) -> Due | None:
    """Occurrences after `watermark` up to `now`: the newest runs, the rest are missed.

    Misfire rule: when several occurrences passed (the agent was off, asleep or busy), only
    the newest is run, and only if it is no later than `grace_s` (or the on-time slack) and,
    when it is late, the window is still open; every other one is reported missed.
    """
    limit = SCAN_LIMIT if limit is None else limit
    count = 0
    first = prev = latest = None
    t = watermark
    while count < limit:
        nxt = schedule.next_after(t)
        if nxt is None or nxt > now:
            break
        count += 1
        first = first or nxt
        prev, latest = latest, nxt
        t = nxt
    if latest is None:
        return None
    if count >= limit and (schedule.next_after(latest) or now) <= now:
        return Due(None, count, first, latest, latest, complete=False)
    late = (now - latest).total_seconds()
    in_window = schedule.window is None or schedule.window.contains(now)
    if late <= ON_TIME_SLACK_S or (late <= grace_s and in_window):
        missed_first = first if count > 1 else None
        return Due(latest, count - 1, missed_first, prev, latest, complete=True)
    return Due(None, count, first, latest, latest, complete=True)
