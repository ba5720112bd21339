"""The agent's local state: identity, command queue, outbox and acknowledged inventory.

One SQLite file in the state directory, written before anything is acted on, so that a restart
or a crash loses nothing and never runs a command twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    not_before REAL,
    expires_at REAL,
    state TEXT NOT NULL DEFAULT 'received',  -- received | running | done
    acked INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    result TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class QueuedCommand:
    """A command as held in the local queue."""

    run_id: str
    kind: str
    payload: dict[str, Any]
    not_before: float | None
    expires_at: float | None
    state: str


class AgentState:
    """Access to the agent's SQLite file; every method is one short transaction."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "agent.db"
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # --- key/value ---

    def get(self, key: str, default: str | None = None) -> str | None:
        """A stored value."""
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return row[0] if row else default

    def set(self, **values: str) -> None:
        """Store values atomically."""
        with self._tx():
            self._db.executemany(
                "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                list(values.items()),
            )

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    # --- queue ---

    def enqueue(self, commands: list[dict[str, Any]]) -> list[str]:
        """Store delivered commands (duplicates ignored by run id); returns ids now held."""
        now = time.time()
        with self._tx():
            for c in commands:
                self._db.execute(
                    "INSERT OR IGNORE INTO queue (run_id, kind, payload, not_before, expires_at,"
                    " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        c["run_id"],
                        c["kind"],
                        json.dumps(c.get("payload") or {}),
                        c.get("not_before"),
                        c.get("expires_at"),
                        now,
                    ),
                )
        return [c["run_id"] for c in commands]

    def unacked(self) -> list[str]:
        """Run ids received but not yet acknowledged to the server."""
        return [r[0] for r in self._db.execute("SELECT run_id FROM queue WHERE acked = 0")]

    def mark_acked(self, run_ids: list[str]) -> None:
        """The server knows we hold these."""
        with self._tx():
            self._db.executemany(
                "UPDATE queue SET acked = 1 WHERE run_id = ?", [(r,) for r in run_ids]
            )

    def runnable(self, now: float) -> list[QueuedCommand]:
        """Received commands whose time has come, oldest first."""
        rows = self._db.execute(
            "SELECT run_id, kind, payload, not_before, expires_at, state FROM queue"
            " WHERE state = 'received' AND (not_before IS NULL OR not_before <= ?)"
            " ORDER BY received_at, run_id",
            (now,),
        ).fetchall()
        return [QueuedCommand(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]

    def next_due(self) -> float | None:
        """When the earliest deferred command becomes runnable."""
        row = self._db.execute(
            "SELECT MIN(not_before) FROM queue WHERE state = 'received' AND not_before IS NOT NULL"
        ).fetchone()
        return row[0] if row else None

    def claim(self, run_id: str) -> bool:
        """Mark a command running before it starts; False if something else already did."""
        with self._tx():
            cur = self._db.execute(
                "UPDATE queue SET state = 'running' WHERE run_id = ? AND state = 'received'",
                (run_id,),
            )
            return cur.rowcount == 1

    def finish(self, run_id: str, result: dict[str, Any]) -> None:
        """Record a result in the outbox and close the command, atomically."""
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO outbox (run_id, result, created_at) VALUES (?, ?, ?)",
                (run_id, json.dumps(result), time.time()),
            )
            self._db.execute("UPDATE queue SET state = 'done' WHERE run_id = ?", (run_id,))

    def interrupted(self) -> list[str]:
        """Commands that were running when the agent last stopped."""
        return [r[0] for r in self._db.execute("SELECT run_id FROM queue WHERE state = 'running'")]

    # --- outbox ---

    def outbox(self, limit: int = 100) -> list[dict[str, Any]]:
        """Unsent results, in the order they were produced."""
        rows = self._db.execute(
            "SELECT result FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def sent(self, run_ids: list[str]) -> None:
        """The server stored these results."""
        with self._tx():
            self._db.executemany("DELETE FROM outbox WHERE run_id = ?", [(r,) for r in run_ids])

    def counts(self) -> dict[str, int]:
        """Queue and outbox sizes, for `custos agent status`."""
        out = {
            f"queue_{state}": n
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state")
        }
        out["outbox"] = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return out

    def prune(self, older_than_s: float = 30 * 86400) -> None:
        """Forget finished commands after a while (their ids only guard against redelivery)."""
        with self._tx():
            self._db.execute(
                "DELETE FROM queue WHERE state = 'done' AND received_at < ?",
                (time.time() - older_than_s,),
            )


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
