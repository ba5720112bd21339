"""The policy state in the agent's SQLite file: the bundle, rule statuses, the report outbox.

New tables in the agent's existing connection (`AgentState._db`), so that a bundle, the
last statuses and unsent reports survive restarts and work with no network.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS policy_bundle (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    bundle_sha TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    doc TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_status (
    rule_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_outbox (
    seq INTEGER PRIMARY KEY,
    report TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy_guard (
    name TEXT PRIMARY KEY,        -- a file name in the state dir, or kv:<key>
    sha256 TEXT NOT NULL,
    value TEXT,                   -- a kv value (files keep a backup copy in <state>/guard/)
    updated REAL NOT NULL
);
"""

# Offline for weeks must not grow the file without end: the oldest reports go first.
MAX_OUTBOX = 500


class PolicyStore:
    """Bundle, statuses, report outbox and guard snapshots; every method is one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    # --- meta ---

    def meta(self, key: str, default: str | None = None) -> str | None:
        """A stored policy value (next seq, last evaluation, …)."""
        row = self.db.execute("SELECT v FROM policy_meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: str) -> None:
        """Store policy values atomically."""
        with self._tx():
            self._set_meta(values)

    def _set_meta(self, values: dict[str, str]) -> None:
        self.db.executemany(
            "INSERT INTO policy_meta (k, v) VALUES (?, ?)"
            " ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            list(values.items()),
        )

    # --- bundle ---

    def bundle(self) -> dict[str, Any] | None:
        """The bundle held, or None before the first one."""
        row = self.db.execute("SELECT doc FROM policy_bundle WHERE id = 1").fetchone()
        return json.loads(row[0]) if row else None

    def store_bundle(self, doc: dict[str, Any]) -> bool:
        """Keep a bundle unless the one held is newer (same sha: nothing to do)."""
        sha, issued = str(doc["bundle_sha"]), str(doc["issued_at"])
        with self._tx():
            row = self.db.execute(
                "SELECT bundle_sha, issued_at FROM policy_bundle WHERE id = 1"
            ).fetchone()
            # same time, other sha: a resend of a newer bundle (the server's times strictly
            # increase per device), so it is applied; an older time never is
            if row is not None and (row[0] == sha or _newer(row[1], issued)):
                return False
            self.db.execute(
                "INSERT INTO policy_bundle (id, bundle_sha, issued_at, doc, received)"
                " VALUES (1, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                " bundle_sha = excluded.bundle_sha, issued_at = excluded.issued_at,"
                " doc = excluded.doc, received = excluded.received",
                (sha, issued, json.dumps(doc, separators=(",", ":")), time.time()),
            )
        return True

    # --- statuses ---

    def statuses(self) -> dict[str, tuple[str, str]]:
        """rule id -> (status, detail) of the last evaluation."""
        return {
            r[0]: (r[1], r[2])
            for r in self.db.execute("SELECT rule_id, status, detail FROM policy_status")
        }

    def save_evaluation(
        self, statuses: dict[str, tuple[str, str]], report: dict[str, Any] | None, at: float
    ) -> int | None:
        """Replace the statuses and queue the report (numbered here), atomically; its seq."""
        seq: int | None = None
        with self._tx():
            self.db.execute("DELETE FROM policy_status")
            self.db.executemany(
                "INSERT INTO policy_status (rule_id, status, detail, updated) VALUES (?, ?, ?, ?)",
                [(k, s, d, at) for k, (s, d) in statuses.items()],
            )
            meta = {"last_evaluation": str(at)}
            if report is not None:
                seq = int(self._meta_in_tx("next_seq") or "1")
                report = {"seq": seq, **report}
                self.db.execute(
                    "INSERT INTO policy_outbox (seq, report, created) VALUES (?, ?, ?)",
                    (seq, json.dumps(report, separators=(",", ":"), ensure_ascii=False), at),
                )
                self.db.execute("DELETE FROM policy_outbox WHERE seq <= ?", (seq - MAX_OUTBOX,))
                meta |= {"next_seq": str(seq + 1), "last_report": str(at)}
                meta["last_reported_sha"] = str(report.get("bundle_sha", ""))
            self._set_meta(meta)
        return seq

    def _meta_in_tx(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM policy_meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    # --- outbox ---

    def outbox(self, limit: int = 20) -> list[tuple[int, dict[str, Any]]]:
        """Unsent reports, oldest first."""
        return [
            (r[0], json.loads(r[1]))
            for r in self.db.execute(
                "SELECT seq, report FROM policy_outbox ORDER BY seq LIMIT ?", (limit,)
            )
        ]

    def sent(self, seq: int) -> None:
        """The server stored this report (or will never take it)."""
        with self._tx():
            self.db.execute("DELETE FROM policy_outbox WHERE seq = ?", (seq,))

    def pending(self) -> int:
        """How many reports wait for the server."""
        return int(self.db.execute("SELECT COUNT(*) FROM policy_outbox").fetchone()[0])

    # --- guard ---

    def guard(self) -> dict[str, tuple[str, str | None]]:
        """name -> (sha256, kv value) of the snapshot."""
        return {
            r[0]: (r[1], r[2])
            for r in self.db.execute("SELECT name, sha256, value FROM policy_guard")
        }

    def set_guard(self, name: str, sha: str, value: str | None = None) -> None:
        """Record (or replace) one guarded item's snapshot."""
        with self._tx():
            self.db.execute(
                "INSERT INTO policy_guard (name, sha256, value, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET sha256 = excluded.sha256,"
                " value = excluded.value, updated = excluded.updated",
                (name, sha, value, time.time()),
            )

    # --- status ---

    def summary(self) -> dict[str, Any]:
        """Bundle sha, last evaluation, non-compliant rules, unsent reports (agent status)."""
        row = self.db.execute("SELECT bundle_sha FROM policy_bundle WHERE id = 1").fetchone()
        bad = self.db.execute(
            "SELECT COUNT(*) FROM policy_status WHERE status IN ('noncompliant', 'error')"
        ).fetchone()[0]
        last = self.meta("last_evaluation")
        return {
            "policy_bundle_sha": row[0] if row else None,
            "policy_last_evaluation": _iso(float(last)) if last else None,
            "policy_noncompliant": int(bad),
            "policy_outbox": self.pending(),
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _newer(a: str, b: str) -> bool:
    """Whether ISO time a is after b (unparsable times compare as text)."""
    try:
        return datetime.fromisoformat(a) > datetime.fromisoformat(b)
    except ValueError:
        return a > b


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
