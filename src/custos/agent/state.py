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


# The server refuses bodies over 4 MiB; a result is kept well under that once encoded, and a
# check-in carries results up to a budget, so no output can wedge the outbox.
MAX_RESULT_BYTES = 1_500_000
MAX_BATCH_BYTES = 3_000_000
_TRUNCATION_NOTE = "\n[custos: output truncated to fit the result size limit]\n"


def fit_result(result: dict[str, Any], limit: int) -> str:
    """The result as JSON of at most `limit` UTF-8 bytes, cutting stdout/stderr if needed."""
    res = dict(result)
    for _ in range(8):
        encoded = json.dumps(res, separators=(",", ":"), ensure_ascii=False)
        excess = len(encoded.encode()) - limit
        if excess <= 0:
            return encoded
        # cut the longer stream by what its characters cost once encoded (escapes: up to 6 bytes)
        field = max(("stdout", "stderr"), key=lambda f: len(str(res.get(f) or "")))
        text = str(res.get(field) or "")
        if not text:
            res["result"] = {"note": "result too large; details dropped"}
            res["error"] = (str(res.get("error") or ""))[:1000] or None
            continue
        per_char = len(json.dumps(text, ensure_ascii=False).encode()) / len(text)
        keep = max(0, len(text) - int(excess / per_char) - len(_TRUNCATION_NOTE) - 64)
        res[field] = text[:keep] + _TRUNCATION_NOTE
        res["truncated"] = True
    return json.dumps(
        {k: res.get(k) for k in ("run_id", "state", "exit_code", "started_at", "finished_at")}
        | {"truncated": True, "error": "result too large to report"},
        separators=(",", ":"),
    )


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
        # scripts, outputs and the device key live here: private even if the directory existed
        state_dir.chmod(0o700)
        self.path = state_dir / "agent.db"
        self.path.touch(mode=0o600, exist_ok=True)
        self.path.chmod(0o600)
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
        encoded = fit_result(result, MAX_RESULT_BYTES)
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO outbox (run_id, result, created_at) VALUES (?, ?, ?)",
                (run_id, encoded, time.time()),
            )
            self._db.execute("UPDATE queue SET state = 'done' WHERE run_id = ?", (run_id,))

    def interrupted(self) -> list[str]:
        """Commands that were running when the agent last stopped."""
        return [r[0] for r in self._db.execute("SELECT run_id FROM queue WHERE state = 'running'")]

    # --- outbox ---

    def outbox(self, limit: int = 100, budget: int = MAX_BATCH_BYTES) -> list[dict[str, Any]]:
        """Unsent results in the order they were produced, as many as fit in `budget` bytes.

        The first result always goes (each is at most MAX_RESULT_BYTES), so the outbox drains.
        """
        out: list[dict[str, Any]] = []
        used = 0
        for (raw,) in self._db.execute("SELECT result FROM outbox ORDER BY seq LIMIT ?", (limit,)):
            size = len(raw.encode())
            if out and used + size > budget:
                break
            out.append(json.loads(raw))
            used += size
        return out

    def sent(self, run_ids: list[str]) -> None:
        """The server stored these results."""
        with self._tx():
            self._db.executemany("DELETE FROM outbox WHERE run_id = ?", [(r,) for r in run_ids])

    def replace_result(self, run_id: str, result: dict[str, Any]) -> None:
        """Swap an unsent result for another (a smaller one the server will accept)."""
        with self._tx():
            self._db.execute(
                "UPDATE outbox SET result = ? WHERE run_id = ?",
                (json.dumps(result, separators=(",", ":")), run_id),
            )

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
