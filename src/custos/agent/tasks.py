"""Scheduled tasks on the agent: kept in the local SQLite state, run with no network needed.

The server hands a task over as a `schedule` command (the full definition with a revision)
and takes it back with `unschedule`. The scheduler loop runs due occurrences from the local
table whether or not the server can be reached; each outcome (run, missed, interrupted) gets
the next per-task sequence number and goes to the task outbox in the same transaction, and
check-ins send the outbox in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from custos.agent.executor import run_process, script_argv
from custos.scheduling import Schedule, ScheduleError, due

log = logging.getLogger("custos.agent.tasks")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    definition TEXT NOT NULL,          -- JSON of the schedule command; '{}' once deleted
    deleted INTEGER NOT NULL DEFAULT 0,
    watermark REAL,                    -- server-clock time of the newest occurrence dealt with
    next_seq INTEGER NOT NULL DEFAULT 1,
    running_seq INTEGER,               -- set (committed) before an occurrence starts
    running_slot REAL,
    missed_count INTEGER NOT NULL DEFAULT 0,   -- missed occurrences not yet in the outbox
    missed_first REAL,
    missed_last REAL,
    missed_reason TEXT
);
CREATE TABLE IF NOT EXISTS task_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (task_id, seq)
);
"""

# per stream, per occurrence: a task's results wait on disk while the server is away
TASK_MAX_OUTPUT = 16 * 1024
# results of one task waiting for the server; past this, occurrences are counted missed
MAX_UNSENT_PER_TASK = 2000
MAX_TASK_BATCH_BYTES = 256 * 1024
# the loop looks again at least this often (clock offsets move, clocks jump)
MAX_SLEEP_S = 30.0


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _epoch(value: Any) -> float:
    return datetime.fromisoformat(str(value)).timestamp()


@dataclass(frozen=True)
class LocalTask:
    """A task as the agent holds it."""

    task_id: str
    revision: int
    definition: dict[str, Any]
    watermark: float
    running_seq: int | None
    running_slot: float | None

    @property
    def enabled(self) -> bool:
        """Whether occurrences should run."""
        return bool(self.definition.get("enabled", True))


class TaskStore:
    """The task tables in the agent's SQLite file; every method is one short transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    # --- definitions ---

    def apply(self, definition: dict[str, Any]) -> bool:
        """Store a task's definition if its revision is newer than what is held."""
        task_id, revision = str(definition["task_id"]), int(definition["revision"])
        since = _epoch(definition["revision_at"])
        with self._tx():
            row = self.db.execute(
                "SELECT revision, watermark FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is not None and row[0] >= revision:
                return False
            # occurrences before this revision are not this revision's to run or to miss
            watermark = max(since, row[1] or since) if row is not None else since
            self.db.execute(
                "INSERT INTO tasks (task_id, revision, definition, watermark) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(task_id) DO UPDATE SET revision = excluded.revision,"
                " definition = excluded.definition, deleted = 0, watermark = excluded.watermark",
                (task_id, revision, json.dumps(definition), watermark),
            )
        return True

    def remove(self, task_id: str, revision: int) -> bool:
        """Forget a task (its unsent results still go); the row stays as a revision guard."""
        with self._tx():
            row = self.db.execute(
                "SELECT revision FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is not None and row[0] >= revision:
                return False
            self.db.execute(
                "INSERT INTO tasks (task_id, revision, definition, deleted) VALUES (?, ?, '{}', 1)"
                " ON CONFLICT(task_id) DO UPDATE SET revision = excluded.revision,"
                " definition = '{}', deleted = 1",
                (task_id, revision),
            )
        return True

    def tasks(self) -> list[LocalTask]:
        """Tasks held (not deleted), enabled or not."""
        rows = self.db.execute(
            "SELECT task_id, revision, definition, watermark, running_seq, running_slot"
            " FROM tasks WHERE deleted = 0 ORDER BY task_id"
        ).fetchall()
        return [LocalTask(r[0], r[1], json.loads(r[2]), r[3] or 0.0, r[4], r[5]) for r in rows]

    def get(self, task_id: str) -> LocalTask | None:
        """One held task."""
        return next((t for t in self.tasks() if t.task_id == task_id), None)

    # --- occurrences ---

    def _unsent(self, task_id: str) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM task_outbox WHERE task_id = ?", (task_id,)
        ).fetchone()
        return int(row[0])

    def _emit(self, task_id: str, result: dict[str, Any]) -> int:
        """Append one result with the task's next sequence number (inside a transaction)."""
        seq = int(
            self.db.execute("SELECT next_seq FROM tasks WHERE task_id = ?", (task_id,)).fetchone()[
                0
            ]
        )
        result = {**result, "task_id": task_id, "seq": seq}
        self.db.execute(
            "INSERT INTO task_outbox (task_id, seq, result, created_at) VALUES (?, ?, ?, ?)",
            (task_id, seq, json.dumps(result, separators=(",", ":")), time.time()),
        )
        self.db.execute("UPDATE tasks SET next_seq = ? WHERE task_id = ?", (seq + 1, task_id))
        return seq

    def _flush_missed(self, task_id: str, revision: int, offset: float) -> None:
        row = self.db.execute(
            "SELECT missed_count, missed_first, missed_last, missed_reason FROM tasks"
            " WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        if not row or not row[0]:
            return
        count, first, last, reason = row
        self._emit(
            task_id,
            {
                "revision": revision,
                "state": "missed",
                "scheduled_at": _iso(last),
                "missed_count": count,
                "first_missed_at": _iso(first) if count > 1 else None,
                "clock_offset_s": round(offset, 3),
                "error": reason,
            },
        )
        self.db.execute(
            "UPDATE tasks SET missed_count = 0, missed_first = NULL, missed_last = NULL,"
            " missed_reason = NULL WHERE task_id = ?",
            (task_id,),
        )

    def missed(
        self,
        task: LocalTask,
        count: int,
        first: float,
        last: float,
        reason: str,
        *,
        offset: float,
        watermark: float,
        emit: bool = True,
    ) -> None:
        """Record occurrences that were not run: one coalesced `missed` result."""
        with self._tx():
            self.db.execute(
                "UPDATE tasks SET missed_count = missed_count + ?,"
                " missed_first = COALESCE(missed_first, ?), missed_last = ?, missed_reason = ?,"
                " watermark = MAX(COALESCE(watermark, 0), ?) WHERE task_id = ?",
                (count, first, last, reason, watermark, task.task_id),
            )
            if emit and self._unsent(task.task_id) < MAX_UNSENT_PER_TASK:
                self._flush_missed(task.task_id, task.revision, offset)

    def begin(self, task: LocalTask, slot: float, offset: float) -> int | None:
        """Claim an occurrence before it runs (committed); None when the outbox is full."""
        with self._tx():
            if self._unsent(task.task_id) >= MAX_UNSENT_PER_TASK:
                return None
            self._flush_missed(task.task_id, task.revision, offset)
            seq = int(
                self.db.execute(
                    "SELECT next_seq FROM tasks WHERE task_id = ?", (task.task_id,)
                ).fetchone()[0]
            )
            self.db.execute(
                "UPDATE tasks SET running_seq = ?, running_slot = ?, next_seq = ?"
                " WHERE task_id = ?",
                (seq, slot, seq + 1, task.task_id),
            )
        return seq

    def finish(self, task_id: str, seq: int, slot: float, result: dict[str, Any]) -> None:
        """Put an occurrence's result in the outbox and close it, atomically."""
        result = {**result, "task_id": task_id, "seq": seq}
        with self._tx():
            self.db.execute(
                "INSERT OR IGNORE INTO task_outbox (task_id, seq, result, created_at)"
                " VALUES (?, ?, ?, ?)",
                (task_id, seq, json.dumps(result, separators=(",", ":")), time.time()),
            )
            self.db.execute(
                "UPDATE tasks SET running_seq = NULL, running_slot = NULL,"
                " watermark = MAX(COALESCE(watermark, 0), ?) WHERE task_id = ?",
                (slot, task_id),
            )

    def interrupted(self) -> list[tuple[str, int, float, int]]:
        """(task id, seq, slot, revision) of occurrences running when the agent stopped."""
        return [
            (r[0], r[1], r[2] or 0.0, r[3])
            for r in self.db.execute(
                "SELECT task_id, running_seq, running_slot, revision FROM tasks"
                " WHERE running_seq IS NOT NULL"
            )
        ]

    # --- outbox ---

    def outbox(self, limit: int = 100, budget: int = MAX_TASK_BATCH_BYTES) -> list[dict[str, Any]]:
        """Unsent results in the order they were produced, within `budget` bytes (one always)."""
        out: list[dict[str, Any]] = []
        used = 0
        for (raw,) in self.db.execute(
            "SELECT result FROM task_outbox ORDER BY id LIMIT ?", (limit,)
        ):
            size = len(raw.encode())
            if out and used + size > budget:
                break
            out.append(json.loads(raw))
            used += size
        return out

    def sent(self, refs: list[dict[str, Any]]) -> None:
        """The server stored these results (or does not want them)."""
        with self._tx():
            self.db.executemany(
                "DELETE FROM task_outbox WHERE task_id = ? AND seq = ?",
                [(str(r.get("task_id")), int(r.get("seq", 0))) for r in refs],
            )

    def pending(self) -> int:
        """How many results wait for the server."""
        return int(self.db.execute("SELECT COUNT(*) FROM task_outbox").fetchone()[0])

    def counts(self) -> dict[str, int]:
        """Tasks held and results waiting, for `custos agent status`."""
        held = self.db.execute("SELECT COUNT(*) FROM tasks WHERE deleted = 0").fetchone()[0]
        return {"tasks": int(held), "task_outbox": self.pending()}


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class TaskScheduler:
    """Runs held tasks at their occurrences, by the server's clock as last learnt; no network."""

    def __init__(
        self,
        store: TaskStore,
        *,
        clock_offset: Callable[[], float],
        work_dir: Path,
        on_result: Callable[[], None] = lambda: None,
        wall_clock: Callable[[], float] = time.time,
        max_output: int = TASK_MAX_OUTPUT,
    ) -> None:
        self.store = store
        self.clock_offset = clock_offset
        self.work_dir = work_dir
        self.on_result = on_result
        self.wall_clock = wall_clock
        self.max_output = max_output
        self._changed = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._schedules: dict[tuple[str, int], Schedule | None] = {}

    def server_now(self) -> float:
        """The server's idea of now (this device's clock plus the learnt offset)."""
        return self.wall_clock() + self.clock_offset()

    # --- commands from the server ---

    def handle(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Apply a `schedule` or `unschedule` command; returns the command's result."""
        task_id, revision = str(payload.get("task_id", "")), int(payload.get("revision", 0))
        if kind == "schedule":
            try:
                self._schedule_of(payload)
            except (ScheduleError, KeyError, TypeError, ValueError) as exc:
                return {"state": "rejected", "error": f"cannot use this schedule: {exc}"}
            changed = self.store.apply(payload)
        else:
            # an occurrence already running finishes; its result is sent and then dropped
            changed = self.store.remove(task_id, revision)
        self._changed.set()
        return {"result": {"task_id": task_id, "revision": revision, "applied": changed}}

    def _schedule_of(self, definition: dict[str, Any]) -> Schedule:
        return Schedule.from_doc(
            definition["schedule"], definition.get("window"), _dt(_epoch(definition["anchor"]))
        )

    def _cached_schedule(self, task: LocalTask) -> Schedule | None:
        key = (task.task_id, task.revision)
        if key not in self._schedules:
            try:
                self._schedules[key] = self._schedule_of(task.definition)
            except (ScheduleError, KeyError, TypeError, ValueError):
                log.exception("task %s has an unusable schedule", task.task_id)
                self._schedules[key] = None
        return self._schedules[key]

    # --- the loop ---

    def recover(self) -> None:
        """Occurrences that were running when the agent stopped are reported, never re-run."""
        offset = self.clock_offset()
        for task_id, seq, slot, revision in self.store.interrupted():
            log.warning("task %s occurrence %d was interrupted by an agent restart", task_id, seq)
            self.store.finish(
                task_id,
                seq,
                slot,
                {
                    "revision": revision,
                    "state": "interrupted",
                    "scheduled_at": _iso(slot),
                    "clock_offset_s": round(offset, 3),
                    "error": "the agent stopped while this occurrence ran; it was not re-run",
                },
            )

    def tick(self) -> float:
        """Deal with every due occurrence; returns seconds until the next one (capped)."""
        now_ts = self.server_now()
        now = _dt(now_ts)
        offset = self.clock_offset()
        sleep = MAX_SLEEP_S
        for task in self.store.tasks():
            if task.task_id in self._running or not task.enabled:
                continue
            sched = self._cached_schedule(task)
            if sched is None:
                continue
            grace = float(task.definition.get("misfire_grace_s", 0))
            d = due(sched, _dt(task.watermark), now, grace)
            watermark = task.watermark
            if d is not None:
                watermark = d.watermark.timestamp()
                if not d.complete:
                    self.store.missed(
                        task, d.missed, d.first_missed.timestamp() if d.first_missed else now_ts,
                        watermark, "the agent was not running at these times",
                        offset=offset, watermark=watermark, emit=False,
                    )  # fmt: skip
                    sleep = 0.0
                    continue
                if d.run is None:
                    assert d.first_missed is not None and d.last_missed is not None
                    late = now_ts - d.last_missed.timestamp()
                    self.store.missed(
                        task, d.missed, d.first_missed.timestamp(), d.last_missed.timestamp(),
                        self._why_missed(late, grace), offset=offset, watermark=watermark,
                    )  # fmt: skip
                    self.on_result()
                else:
                    if d.missed:
                        assert d.first_missed is not None and d.last_missed is not None
                        first, last = d.first_missed.timestamp(), d.last_missed.timestamp()
                        self.store.missed(
                            task, d.missed, first, last,
                            "only the newest of several overdue occurrences is run",
                            offset=offset, watermark=last, emit=False,
                        )  # fmt: skip
                    self._start(task, d.run.timestamp(), offset)
                    continue
            nxt = sched.next_after(_dt(watermark))
            if nxt is not None:
                sleep = min(sleep, max(0.0, nxt.timestamp() - now_ts))
        return sleep

    @staticmethod
    def _why_missed(late: float, grace: float) -> str:
        if late <= grace:
            return "not run: the maintenance window had closed by the time it could start"
        return (
            f"not run: {late:.0f} s late, past the misfire grace of {grace:.0f} s "
            "(the agent was stopped, asleep or busy)"
        )

    def _start(self, task: LocalTask, slot: float, offset: float) -> None:
        seq = self.store.begin(task, slot, offset)
        if seq is None:
            self.store.missed(
                task, 1, slot, slot,
                f"not run: {MAX_UNSENT_PER_TASK} results are waiting for the server",
                offset=offset, watermark=slot, emit=False,
            )  # fmt: skip
            return
        self._running[task.task_id] = asyncio.create_task(
            self._run(task, seq, slot, offset), name=f"task:{task.task_id}:{seq}"
        )

    async def _run(self, task: LocalTask, seq: int, slot: float, offset: float) -> None:
        started = self.wall_clock()
        try:
            result = await self._execute(task, seq)
        except asyncio.CancelledError:
            # stopped (agent shutdown or task deleted): left as running, reported interrupted
            self._running.pop(task.task_id, None)
            raise
        except Exception as exc:  # a bug must not kill the scheduler
            log.exception("task %s occurrence %d failed", task.task_id, seq)
            result = {"state": "failed", "error": f"agent error: {exc}"}
        result.update(
            revision=task.revision,
            scheduled_at=_iso(slot),
            started_at=_iso(started),
            finished_at=_iso(self.wall_clock()),
            clock_offset_s=round(offset, 3),
        )
        self.store.finish(task.task_id, seq, slot, result)
        self._running.pop(task.task_id, None)
        log.info("task %s occurrence %d: %s", task.definition.get("name"), seq, result["state"])
        self.on_result()
        self._changed.set()

    async def _execute(self, task: LocalTask, seq: int) -> dict[str, Any]:
        d = task.definition
        action = d.get("action") or {}
        timeout = float(d.get("timeout_s", 3600))
        path: Path | None = None
        try:
            if d.get("kind") == "exec":
                argv = [str(a) for a in action.get("argv") or []]
            elif d.get("kind") == "script":
                interpreter = str(action.get("interpreter"))
                suffix = {"sh": ".sh", "python": ".py", "powershell": ".ps1"}.get(interpreter, "")
                self.work_dir.mkdir(exist_ok=True, mode=0o700)
                path = self.work_dir / f"task-{task.task_id}-{seq}{suffix}"
                path.write_text(str(action.get("script", "")))
                argv = script_argv(interpreter, str(path), [str(a) for a in action.get("args", [])])
            else:
                return {"state": "rejected", "error": f"unknown task kind {d.get('kind')!r}"}
            res = await run_process(argv, timeout=timeout, max_output=self.max_output)
        except ValueError as exc:
            return {"state": "rejected", "error": str(exc)}
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        if res.error:
            return {"state": "failed", "error": res.error, "duration_s": round(res.duration_s, 3)}
        out: dict[str, Any] = {
            "state": "succeeded" if res.exit_code == 0 and not res.timed_out else "failed",
            "exit_code": res.exit_code,
            "stdout": res.stdout,
            "stderr": res.stderr,
            "truncated": res.truncated,
            "duration_s": round(res.duration_s, 3),
        }
        if res.timed_out:
            out["error"] = "timed out; the process group was killed"
        return out

    async def run_pending(self) -> None:
        """Deal with what is due now and wait for the occurrences it started (`--once`)."""
        self.recover()
        for _ in range(100):
            if self.tick() > 0 or not self._running:
                break
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Tick at each occurrence (or when the tasks change) until stop is set."""
        self.recover()
        try:
            while not stop.is_set():
                self._changed.clear()
                try:
                    delay = self.tick()
                except Exception:
                    log.exception("the task scheduler failed; trying again")
                    delay = 5.0
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=delay + 0.01)
        finally:
            running = list(self._running.values())
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
