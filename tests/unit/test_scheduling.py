"""Schedules, maintenance windows and misfire decisions, on fixed clocks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from custos.scheduling import (
    ON_TIME_SLACK_S,
    Schedule,
    ScheduleError,
    Window,
    check_cron,
    due,
    parse_days,
    parse_window,
)

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday


def at(h: int, m: int = 0, s: int = 0, day: int = 0) -> datetime:
    return T0 + timedelta(days=day, hours=h, minutes=m, seconds=s)


def cron(expr: str, window: dict | None = None, tz: str = "UTC") -> Schedule:
    return Schedule.from_doc({"cron": expr, "timezone": tz}, window, T0)


def every(seconds: int, window: dict | None = None) -> Schedule:
    return Schedule.from_doc({"every_s": seconds}, window, T0)


def test_cron_validation():
    assert check_cron(" 0  3 * * mon-fri ") == "0 3 * * mon-fri"
    for bad in ("0 3 * * *  *", "* * * *", "61 * * * *", "0 0 30 2 *", "@daily", "a b c d e"):
        with pytest.raises(ScheduleError):
            check_cron(bad)


def test_cron_next_in_zone_and_strictly_after():
    s = cron("0 3 * * *", tz="Europe/Paris")
    # 03:00 in Paris is 02:00 UTC in winter
    assert s.next_after(T0) == at(2)
    assert s.next_after(at(2)) == at(2, day=1)
    assert s.upcoming(T0, 3) == [at(2), at(2, day=1), at(2, day=2)]


def test_interval_anchored_at_creation():
    s = every(600)
    assert s.next_after(T0) == at(0, 10)
    assert s.next_after(at(0, 10)) == at(0, 20)
    assert s.next_after(at(0, 14, 59)) == at(0, 20)
    assert s.next_after(T0 - timedelta(days=1)) == at(0, 10)  # never before the anchor


def test_window_plain_and_across_midnight():
    w = Window.from_doc(parse_window("mon-fri 01:00-05:00"))
    assert w.contains(at(1)) and w.contains(at(4, 59)) and not w.contains(at(5))
    assert not w.contains(at(3, day=5))  # Saturday
    night = Window.from_doc(parse_window("sat 22:00-02:00 UTC"))
    assert night.contains(at(23, day=5)) and night.contains(at(1, day=6))  # into Sunday
    assert not night.contains(at(23, day=6)) and not night.contains(at(1, day=5))
    assert night.next_open(at(12)) == at(22, day=5)
    whole = Window.from_doc({"days": [6], "start": "00:00", "end": "00:00"})
    assert whole.contains(at(13, day=6)) and not whole.contains(at(13, day=5))


def test_window_in_its_own_zone():
    w = Window.from_doc(parse_window("daily 01:00-02:00 Asia/Tokyo"))  # 16:00-17:00 UTC
    assert w.contains(at(16, 30)) and not w.contains(at(1, 30))


def test_schedule_only_fires_inside_the_window():
    # every 15 minutes, but only mon-fri 01:00-02:00
    s = cron("*/15 * * * *", parse_window("mon-fri 01:00-02:00"))
    assert s.upcoming(T0, 5) == [at(1), at(1, 15), at(1, 30), at(1, 45), at(1, day=1)]
    # Friday's last slot is followed by Monday's first
    assert s.next_after(at(1, 45, day=4)) == at(1, day=7)
    ev = every(3600, parse_window("sat,sun 00:00-00:00"))
    assert ev.next_after(T0) == at(0, day=5)


def test_parse_days_and_window_errors():
    assert parse_days("mon,wed-fri") == [0, 2, 3, 4]
    assert parse_days("fri-mon") == [0, 4, 5, 6]
    assert parse_days("daily") == list(range(7))
    for bad in ("", "mon-fri", "mon 25:00-03:00", "xyz 01:00-02:00", "01:00-02:00 Mars/Base"):
        with pytest.raises(ScheduleError):
            parse_window(bad)
    with pytest.raises(ScheduleError):
        Window.from_doc({"days": [], "start": "01:00", "end": "02:00"})
    with pytest.raises(ScheduleError):
        Schedule.from_doc({"cron": "* * * * *", "every_s": 5}, None, T0)
    with pytest.raises(ScheduleError):
        Schedule.from_doc({"every_s": 0}, None, T0)


def test_due_on_time_runs():
    s = every(60)
    d = due(s, T0, at(0, 1, 2), grace_s=0)
    assert d is not None and d.run == at(0, 1) and d.missed == 0 and d.complete
    assert d.watermark == at(0, 1)
    assert due(s, d.watermark, at(0, 1, 30), grace_s=0) is None


def test_due_misfire_within_grace_runs_newest_once():
    s = every(60)
    # the agent was off for 10 minutes; grace 5 minutes: the newest (10:00) runs, 9 missed
    d = due(s, T0, at(0, 10, 20), grace_s=300)
    assert d is not None and d.run == at(0, 10)
    assert (d.missed, d.first_missed, d.last_missed) == (9, at(0, 1), at(0, 9))


def test_due_misfire_past_grace_is_missed():
    s = cron("0 3 * * *")
    # woke at 05:00, two hours late, grace one hour: missed, not run
    d = due(s, T0, at(5), grace_s=3600)
    assert d is not None and d.run is None
    assert (d.missed, d.first_missed, d.last_missed, d.watermark) == (1, at(3), at(3), at(3))
    # grace 0 still runs what is only slightly late (the loop's own delay)
    d = due(s, T0, at(3, 0, int(ON_TIME_SLACK_S) - 1), grace_s=0)
    assert d is not None and d.run == at(3)


def test_due_late_run_needs_an_open_window():
    s = cron("30 1 * * *", parse_window("daily 01:00-02:00"))
    inside = due(s, T0, at(1, 50), grace_s=3600)
    assert inside is not None and inside.run == at(1, 30)
    closed = due(s, T0, at(2, 10), grace_s=3600)
    assert closed is not None and closed.run is None and closed.missed == 1


def test_due_scan_is_bounded():
    s = every(1)
    d = due(s, T0, at(10), grace_s=3600, limit=1000)
    assert d is not None and not d.complete and d.run is None
    assert d.missed == 1000 and d.watermark == T0 + timedelta(seconds=1000)
    rest = due(s, d.watermark, T0 + timedelta(seconds=1500), grace_s=3600, limit=1000)
    assert rest is not None and rest.complete and rest.run == T0 + timedelta(seconds=1500)
    assert rest.missed == 499
