"""Use cases of the audit log: append an entry to the chain, list, export and verify it.

The chain
---------
Every entry carries `prev_hash` (the `hash` of the entry before it; 64 zeros for the first)
and `hash`, the lowercase hex SHA-256 of the entry's canonical encoding:

    canonical(entry) = orjson.dumps(
        {"action": str, "actor": str, "actor_id": int | null, "at": str, "detail": object,
         "id": int, "prev_hash": str, "remote": str, "result": str, "status": int | null,
         "target": str, "via": str},
        option=orjson.OPT_SORT_KEYS,
    )

that is: one JSON object of every column except `hash`, keys sorted (at every depth, the
keys of `detail` too), no whitespace, UTF-8 without escaping non-ASCII characters, and
`at` written as UTC with exactly six fractional digits and a `Z`
(`2026-11-24T10:00:00.000000Z`). `detail` holds only strings, integers (|n| < 2**53),
booleans, null, lists and objects: `clean_detail` turns anything else (floats included,
whose text form is not canonical across encoders) into a string before it is stored, so
what the database gives back encodes to the same bytes on SQLite and on PostgreSQL (JSONB).

Changing a stored entry changes its hash; recomputing the hash too breaks the next entry's
`prev_hash`; removing an entry leaves a gap in the ids and a broken link. What the chain
alone cannot show is entries cut off its end: `verify` reports the head (last id and hash)
so an auditor can keep it elsewhere and check it later (`anchor`).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Row, func, insert, or_, select, text
from sqlalchemy.exc import IntegrityError

from custos.accounts.service import TOKEN_PREFIX
from custos.audit.models import GENESIS_HASH, AuditEntry
from custos.audit.schemas import MAX_PAGE, RESULTS, VIAS, AuditEntryOut, AuditPage, VerifyReport
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.errors import Invalid

# pg_advisory_xact_lock key that serialises appends across server processes ("audt")
AUDIT_LOCK = 0x6175_6474
# an append that lost a race (possible on SQLite across processes) reads the head again
MAX_APPEND_ATTEMPTS = 50
VERIFY_BATCH = 5000
EXPORT_BATCH = 2000

MAX_DETAIL_BYTES = 2048
MAX_DETAIL_STR = 200
MAX_DETAIL_ITEMS = 20
MAX_DETAIL_DEPTH = 3
_MAX_SAFE_INT = 2**53 - 1
_LIMITS = {"actor": 150, "action": 100, "target": 300, "remote": 100}

CSV_COLUMNS = (
    "id",
    "at",
    "actor",
    "actor_id",
    "via",
    "action",
    "target",
    "remote",
    "result",
    "status",
    "detail",
    "prev_hash",
    "hash",
)

# detail keys that name secrets are dropped, whatever their value
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwords",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "tokens",
        "secret",
        "secrets",
        "otp",
        "totp",
        "hotp",
        "authorization",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "apikey",
        "csrf",
    }
)
_SECRET_SUBSTRINGS = ("password", "passwd", "secret", "token", "passphrase")
_KEY_WORDS = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------- the encoding


def format_at(at: datetime) -> str:
    """The canonical text of a timestamp: UTC, microseconds, 'Z'."""
    if at.tzinfo is None:
        raise ValueError("audit timestamps are timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_bytes(fields: Mapping[Any, Any]) -> bytes:
    """The bytes an entry's hash is computed over (see the module docstring).

    `fields` holds every column except `hash`; `at` may be a datetime or its canonical text.
    """
    at = fields["at"]
    doc = {
        "action": fields["action"],
        "actor": fields["actor"],
        "actor_id": fields["actor_id"],
        "at": at if isinstance(at, str) else format_at(at),
        "detail": fields["detail"],
        "id": fields["id"],
        "prev_hash": fields["prev_hash"],
        "remote": fields["remote"],
        "result": fields["result"],
        "status": fields["status"],
        "target": fields["target"],
        "via": fields["via"],
    }
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def entry_hash(fields: Mapping[Any, Any]) -> str:
    """The hex SHA-256 of an entry's canonical encoding."""
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def hash_csv_row(row: Mapping[str, str]) -> str:
    """Recompute the hash of an exported CSV row (so an export can be checked on its own)."""
    return entry_hash(
        {
            "id": int(row["id"]),
            "at": row["at"],
            "actor": row["actor"],
            "actor_id": int(row["actor_id"]) if row["actor_id"] else None,
            "via": row["via"],
            "action": row["action"],
            "target": row["target"],
            "remote": row["remote"],
            "result": row["result"],
            "status": int(row["status"]) if row["status"] else None,
            "detail": orjson.loads(row["detail"]),
            "prev_hash": row["prev_hash"],
        }
    )


# --------------------------------------------------------------------------- input hygiene


def _clean_str(value: str, limit: int) -> str:
    # PostgreSQL text and JSONB refuse NUL; lone surrogates cannot be encoded as UTF-8
    value = value.replace("\x00", "")
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return value.encode("utf-8", "replace").decode("utf-8")


def is_secret_key(key: str) -> bool:
    """Whether a detail key names a secret (password, token, secret, OTP, …)."""
    low = key.lower()
    if any(s in low for s in _SECRET_SUBSTRINGS):
        return True
    words = _KEY_WORDS.findall(_CAMEL.sub("_", key).lower())
    if any(w in _SECRET_WORDS for w in words):
        return True
    return "key" in words and any(w in ("private", "api", "signing", "access") for w in words)


def _clean_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else str(value)
    if isinstance(value, str):
        if value.startswith(TOKEN_PREFIX):  # an API token: never keep one
            return "[redacted]"
        return _clean_str(value, MAX_DETAIL_STR)
    if depth >= MAX_DETAIL_DEPTH:
        return "…"
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth + 1)
    if isinstance(value, list | tuple):
        return [_clean_value(v, depth + 1) for v in list(value)[:MAX_DETAIL_ITEMS]]
    # floats, datetimes, anything else: their text (floats have no canonical JSON form)
    return _clean_str(str(value), MAX_DETAIL_STR)


def _clean_mapping(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = _clean_str(str(k), 64)
        if is_secret_key(key):
            continue
        if len(out) >= MAX_DETAIL_ITEMS:
            out["_truncated"] = True
            break
        out[key] = _clean_value(v, depth)
    return out


def clean_detail(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    """A small, secret-free, canonically encodable copy of `detail`.

    Keys naming secrets are dropped; strings, lists and nesting are cut short; a result
    still over MAX_DETAIL_BYTES keeps its first keys (sorted) that fit, plus `_truncated`.
    """
    if not detail:
        return {}
    out = _clean_mapping(detail, 0)
    if len(orjson.dumps(out)) <= MAX_DETAIL_BYTES:
        return out
    kept: dict[str, Any] = {"_truncated": True}
    for key in sorted(out):
        trial = {**kept, key: out[key]}
        if len(orjson.dumps(trial)) <= MAX_DETAIL_BYTES:
            kept = trial
    return kept


# --------------------------------------------------------------------------- the service


def _out(row: Any) -> AuditEntryOut:
    return AuditEntryOut(
        id=row.id,
        at=row.at,
        actor=row.actor,
        actor_id=row.actor_id,
        via=row.via,
        action=row.action,
        target=row.target,
        remote=row.remote,
        result=row.result,
        status=row.status,
        detail=row.detail,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


_COLUMNS = (
    AuditEntry.id,
    AuditEntry.at,
    AuditEntry.actor,
    AuditEntry.actor_id,
    AuditEntry.via,
    AuditEntry.action,
    AuditEntry.target,
    AuditEntry.remote,
    AuditEntry.result,
    AuditEntry.status,
    AuditEntry.detail,
    AuditEntry.prev_hash,
    AuditEntry.hash,
)


class AuditService:
    """Appends to, reads and checks the audit chain."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self,
        action: str,
        *,
        result: str,
        actor: str = "",
        actor_id: int | None = None,
        via: str = "anonymous",
        target: str = "",
        remote: str = "",
        status: int | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditEntryOut:
        """Append one entry in its own short transaction and return it.

        Call it after the action's own transaction has ended (committed or not), so that
        refused and failed actions are recorded as well as successful ones.
        """
        if result not in RESULTS:
            raise ValueError(f"audit result must be one of {RESULTS}, not {result!r}")
        if via not in VIAS:
            raise ValueError(f"audit via must be one of {VIAS}, not {via!r}")
        fields: dict[str, Any] = {
            "actor": _clean_str(actor, _LIMITS["actor"]),
            "actor_id": actor_id,
            "via": via,
            "action": _clean_str(action, _LIMITS["action"]),
            "target": _clean_str(target, _LIMITS["target"]),
            "remote": _clean_str(remote, _LIMITS["remote"]),
            "result": result,
            "status": status,
            "detail": clean_detail(detail),
        }
        for attempt in range(MAX_APPEND_ATTEMPTS):
            try:
                return await self._append(fields)
            except IntegrityError:
                # another process took the same id/prev_hash first: read the new head again
                if attempt == MAX_APPEND_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.1)))  # noqa: S311
        raise AssertionError("unreachable")

    async def _append(self, fields: dict[str, Any]) -> AuditEntryOut:
        async with self.db.transaction() as uow:
            s = uow.session
            if self.db.dialect == "postgresql":
                # one appender at a time across every server process; held until commit, so
                # the head read below is the committed head
                await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": AUDIT_LOCK})
            # On SQLite this process's appends are serialised by Database's write lock; another
            # process may still slip in between this read and the insert (SQLite's BEGIN is
            # deferred), and then the insert fails on the primary key or the unique prev_hash
            head = (
                await s.execute(
                    select(AuditEntry.id, AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)
                )
            ).first()
            entry = dict(fields)
            entry["id"] = 1 if head is None else head[0] + 1
            entry["prev_hash"] = GENESIS_HASH if head is None else head[1]
            # microseconds are all both databases keep
            entry["at"] = utcnow()
            entry["hash"] = entry_hash(entry)
            await s.execute(insert(AuditEntry).values(**entry))
        return AuditEntryOut(**entry)

    # ----------------------------------------------------------------------- reading

    @staticmethod
    def _filters(
        actor: str | None,
        action_prefix: str | None,
        target: str | None,
        result: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if actor is not None:
            where.append(AuditEntry.actor == actor)
        if action_prefix:
            # "device" matches device.retire and device itself, not devices.x
            p = action_prefix.rstrip(".")
            where.append(
                or_(AuditEntry.action == p, AuditEntry.action.startswith(p + ".", autoescape=True))
            )
        if target is not None:
            where.append(AuditEntry.target == target)
        if result is not None:
            if result not in RESULTS:
                raise Invalid(f"result is one of {', '.join(RESULTS)}")
            where.append(AuditEntry.result == result)
        if since is not None:
            where.append(AuditEntry.at >= since)
        if until is not None:
            where.append(AuditEntry.at < until)
        return where

    async def query(
        self,
        *,
        actor: str | None = None,
        action_prefix: str | None = None,
        target: str | None = None,
        result: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> AuditPage:
        """Entries matching every filter given, newest first, at most `limit` (≤ 500).

        Pages are cut by id (keyset): the next page is `before_id=page.next_before_id`.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise Invalid(f"limit is between 1 and {MAX_PAGE}")
        where = self._filters(actor, action_prefix, target, result, since, until)
        if before_id is not None:
            where.append(AuditEntry.id < before_id)
        stmt = select(*_COLUMNS).where(*where).order_by(AuditEntry.id.desc()).limit(limit)
        async with self.db.read() as s:
            rows = (await s.execute(stmt)).all()
        entries = [_out(r) for r in rows]
        nxt = entries[-1].id if len(entries) == limit else None
        return AuditPage(entries=entries, next_before_id=nxt)

    async def export_csv(
        self,
        *,
        actor: str | None = None,
        action_prefix: str | None = None,
        target: str | None = None,
        result: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        batch: int = EXPORT_BATCH,
    ) -> AsyncIterator[str]:
        """CSV lines (header first) of the matching entries in chain order, read in batches.

        Values are exported exactly as hashed (`at` and `detail` in their canonical text), so
        `hash_csv_row` recomputes each row's hash from the file alone. Nothing is escaped for
        spreadsheets: a value starting with '=' stays as it is (open exports as text).
        """
        where = self._filters(actor, action_prefix, target, result, since, until)
        yield _csv_line(CSV_COLUMNS)
        after = 0
        while True:
            stmt = (
                select(*_COLUMNS)
                .where(AuditEntry.id > after, *where)
                .order_by(AuditEntry.id)
                .limit(batch)
            )
            async with self.db.read() as s:
                rows = (await s.execute(stmt)).all()
            for r in rows:
                yield _csv_line(_csv_values(r))
            if len(rows) < batch:
                return
            after = rows[-1].id

    async def verify(
        self,
        progress: ProgressFn | None = None,
        *,
        anchor: tuple[int, str] | None = None,
        batch: int = VERIFY_BATCH,
    ) -> VerifyReport:
        """Recompute every hash in id order, a batch at a time; stop at the first bad entry.

        `progress(checked, total)` is called after every batch. `anchor` is a (id, hash)
        reported by an earlier run: that entry must still exist with that hash.
        """
        async with self.db.read() as s:
            total = int(await s.scalar(select(func.coalesce(func.max(AuditEntry.id), 0))) or 0)
        prev_id, prev_hash, checked = 0, GENESIS_HASH, 0
        anchor_seen = anchor is None
        while True:
            stmt = select(*_COLUMNS).where(AuditEntry.id > prev_id).order_by(AuditEntry.id)
            async with self.db.read() as s:
                rows = (await s.execute(stmt.limit(batch))).all()
            if not rows:
                break
            for r in rows:
                bad = _check(r, prev_id, prev_hash)
                if bad is not None:
                    return VerifyReport(
                        ok=False,
                        checked=checked,
                        first_bad_id=r.id,
                        reason=bad,
                        head_id=prev_id or None,
                        head_hash=prev_hash if prev_id else None,
                    )
                if anchor is not None and r.id == anchor[0]:
                    if r.hash != anchor[1]:
                        return VerifyReport(
                            ok=False,
                            checked=checked,
                            first_bad_id=r.id,
                            reason="the entry's hash differs from the anchor",
                        )
                    anchor_seen = True
                prev_id, prev_hash = r.id, r.hash
                checked += 1
            if progress is not None:
                progress(checked, max(total, checked))
            # let other tasks run between batches (the API serves verify too)
            await asyncio.sleep(0)
        head = (prev_id or None, prev_hash if prev_id else None)
        if not anchor_seen:
            assert anchor is not None
            return VerifyReport(
                ok=False,
                checked=checked,
                first_bad_id=anchor[0],
                reason=f"the anchor entry {anchor[0]} is gone (entries were cut off the end)",
                head_id=head[0],
                head_hash=head[1],
            )
        return VerifyReport(ok=True, checked=checked, head_id=head[0], head_hash=head[1])


def _check(row: Row[Any], prev_id: int, prev_hash: str) -> str | None:
    """Why this entry breaks the chain, or None."""
    if row.id != prev_id + 1:
        if row.id - prev_id == 2:
            return f"entry {prev_id + 1} is missing"
        return f"entries {prev_id + 1} to {row.id - 1} are missing"
    if row.prev_hash != prev_hash:
        return "prev_hash is not the hash of the entry before"
    if entry_hash(row._mapping) != row.hash:
        return "the entry's content does not match its hash"
    return None


def _csv_values(row: Row[Any]) -> Sequence[Any]:
    return (
        row.id,
        format_at(row.at),
        row.actor,
        "" if row.actor_id is None else row.actor_id,
        row.via,
        row.action,
        row.target,
        row.remote,
        row.result,
        "" if row.status is None else row.status,
        orjson.dumps(row.detail, option=orjson.OPT_SORT_KEYS).decode(),
        row.prev_hash,
        row.hash,
    )


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue()
