"""Outbound webhooks: subscriptions, `emit` (inside a caller's transaction) and delivery.

Delivery is at-least-once. `emit` only writes pending rows in the caller's transaction, so an
event exists exactly when the change it describes was committed. The periodic job
(`WebhookService.deliver_due`) claims due rows in one short transaction by moving their
`next_attempt_at` forward by a lease (on PostgreSQL with FOR UPDATE SKIP LOCKED, so two
server processes never claim the same row), sends outside any transaction, then records
the outcome. A process that dies mid-send leaves the row to be claimed again once the lease
has run out; receivers de-duplicate on the delivery id.

Receivers check `X-Custos-Signature: sha256=<hex>`, the HMAC-SHA256 under the webhook's
secret (its UTF-8 bytes) of `f"{X-Custos-Timestamp}."` followed by the raw body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from custos.db.base import new_id, utcnow
from custos.db.engine import Database
from custos.errors import Conflict, Invalid, NotFound
from custos.webhooks.models import Webhook, WebhookDelivery
from custos.webhooks.schemas import MAX_URL, DeliveryOut, WebhookCreate, WebhookCreated, WebhookOut

log = logging.getLogger(__name__)

EVENTS: tuple[str, ...] = (
    "device.enrolled",
    "device.noncompliant",
    "device.compliant",
    "device.lost",
    "device.found",
    "device.locked",
    "device.wiped",
    "deployment.failed",
    "ping",
)
ALL_EVENTS = "*"

# the wait after the 1st, 2nd, … failed attempt; after the last one the delivery is `failed`
BACKOFF_S: tuple[int, ...] = (10, 30, 120, 600, 1800, 3600, 7200, 14400)
MAX_RETRY_AFTER_S = 3600
MAX_RESPONSE_BYTES = 64 * 1024
EXCERPT_CHARS = 500
RETENTION = timedelta(days=30)
PURGE_EVERY_S = 3600.0
# claimed per transaction, and sent at most this many at a time
BATCH = 50
PARALLEL = 10
# one deliver_due call stops claiming more batches after this long (the next tick goes on)
MAX_RUN_S = 30.0
USER_AGENT = "Custos-Webhook/1"
SECRET_PREFIX = "whsec_"  # noqa: S105 (a marker, not a secret)
MAX_SECRET_SEALED = 500


def sign(secret: bytes, timestamp: int | str, body: bytes) -> str:
    """The X-Custos-Signature value for a body sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: bytes,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance_s: int = 300,
    now: float | None = None,
) -> bool:
    """What a receiver does: a matching signature on a recent timestamp (replays refused)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def check_url(url: str) -> str:
    """The URL if it is an http(s) URL with a host, at most MAX_URL characters; else Invalid."""
    if len(url) > MAX_URL:
        raise Invalid(f"the URL is longer than {MAX_URL} characters", code="bad_url")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise Invalid("the URL contains spaces or control characters", code="bad_url")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise Invalid(f"the URL is malformed: {exc}", code="bad_url") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise Invalid("the URL must start with http:// or https://", code="bad_url")
    if not parts.hostname:
        raise Invalid("the URL has no host", code="bad_url")
    return url


def check_events(events: Sequence[str]) -> list[str]:
    """The subscribed events, de-duplicated in order; unknown names are Invalid."""
    out: list[str] = []
    for e in events:
        if e != ALL_EVENTS and e not in EVENTS:
            raise Invalid(
                f"unknown event {e[:60]!r}; known: {', '.join(EVENTS)} (or * for all)",
                code="unknown_event",
            )
        if e not in out:
            out.append(e)
    return [ALL_EVENTS] if ALL_EVENTS in out else out


def retry_delay(attempt: int, status: int | None, retry_after: str | None) -> int | None:
    """Seconds until the next try after failed attempt number `attempt`; None: give up."""
    if attempt > len(BACKOFF_S):
        return None
    delay = BACKOFF_S[attempt - 1]
    if status in (429, 503) and retry_after:
        asked = _parse_retry_after(retry_after)
        if asked is not None:
            delay = min(asked, MAX_RETRY_AFTER_S)
    return delay


def _parse_retry_after(value: str) -> int | None:
    v = value.strip()
    if v.isdigit():
        return int(v[:10])
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, int(when.timestamp() - time.time()))


def _json_doc(data: dict[str, Any]) -> dict[str, Any]:
    """`data` as plain JSON types (datetimes become ISO strings), as it will be stored."""
    doc = orjson.loads(orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS))
    if not isinstance(doc, dict):
        raise TypeError("webhook event data must be a JSON object")
    return doc


async def emit(session: AsyncSession, event: str, data: dict[str, Any]) -> int:
    """Queue `event` for every enabled webhook subscribed to it (or to *), in the caller's
    open transaction; returns how many deliveries were queued. No network I/O."""
    if event not in EVENTS:
        raise ValueError(f"unknown webhook event {event!r}")
    rows = (
        await session.execute(select(Webhook.id, Webhook.events).where(Webhook.enabled.is_(True)))
    ).all()
    targets = [wid for wid, events in rows if event in events or ALL_EVENTS in events]
    if not targets:
        return 0
    doc = _json_doc(data)
    now = utcnow()
    await session.execute(
        insert(WebhookDelivery),
        [
            {
                "id": new_id(),
                "webhook_id": wid,
                "event": event,
                "data": doc,
                "state": "pending",
                "attempts": 0,
                "created_at": now,
                "next_attempt_at": now,
                "error": "",
                "response": "",
            }
            for wid in targets
        ],
    )
    return len(targets)


@dataclass(frozen=True)
class _Claim:
    """A delivery this process holds the lease on, with what it needs to send it."""

    id: str
    webhook: str
    event: str
    data: dict[str, Any]
    created_at: datetime
    attempt: int
    url: str
    secret_sealed: str


@dataclass(frozen=True)
class _Outcome:
    status: int | None
    error: str
    response: str
    retry_after: str | None
    duration_ms: int


class WebhookService:
    """Webhook CRUD for the admin API, and the job that sends due deliveries."""

    def __init__(
        self,
        db: Database,
        secret: bytes,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.db = db
        # seals webhook secrets at rest; derived from the CA so every process has the same
        self._aead = AESGCM(secret)
        self.timeout_s = timeout_s
        self._transport = transport
        # a claimed batch is sent PARALLEL at a time, each within timeout_s: the lease covers it
        self.lease = timedelta(seconds=timeout_s * -(-BATCH // PARALLEL) + 60)
        self._purged_at: float | None = None

    # ------------------------------------------------------------------ admin

    async def create(self, req: WebhookCreate, created_by: str) -> WebhookCreated:
        """A new webhook; its secret (given or generated) is returned this once only."""
        url = check_url(req.url)
        events = check_events(req.events)
        secret = req.secret if req.secret is not None else SECRET_PREFIX + secrets.token_urlsafe(32)
        if secret != secret.strip() or not secret.isprintable():
            raise Invalid(
                "the secret may not contain control characters or surrounding spaces",
                code="bad_secret",
            )
        now = utcnow()
        try:
            async with self.db.transaction() as uow:
                s = uow.session
                if await s.scalar(select(Webhook.id).where(Webhook.name == req.name)):
                    raise Conflict(f"a webhook named {req.name!r} exists", code="exists")
                hook = Webhook(
                    name=req.name,
                    url=url,
                    events=events,
                    secret_sealed=self._seal(req.name, secret),
                    enabled=True,
                    created_by=created_by,
                    created_at=now,
                )
                s.add(hook)
                await s.flush()
                out = _webhook_out(hook)
        except IntegrityError:
            # a concurrent create of the same name won the race
            raise Conflict(f"a webhook named {req.name!r} exists", code="exists") from None
        return WebhookCreated(**out.model_dump(), secret=secret)

    async def list_webhooks(self) -> list[WebhookOut]:
        """Every webhook with its pending and failed delivery counts."""
        async with self.db.read() as s:
            hooks = (await s.scalars(select(Webhook).order_by(Webhook.name))).all()
            stats = (
                await s.execute(
                    select(
                        WebhookDelivery.webhook_id,
                        WebhookDelivery.state,
                        func.count(),
                        func.max(WebhookDelivery.created_at),
                    ).group_by(WebhookDelivery.webhook_id, WebhookDelivery.state)
                )
            ).all()
        counts: dict[tuple[int, str], int] = {}
        last: dict[int, datetime] = {}
        for wid, state, n, newest in stats:
            counts[(wid, state)] = n
            if newest is not None:
                newest = _aware(newest)
                if wid not in last or newest > last[wid]:
                    last[wid] = newest
        return [
            _webhook_out(
                h,
                pending=counts.get((h.id, "pending"), 0),
                failed=counts.get((h.id, "failed"), 0),
                last_delivery_at=last.get(h.id),
            )
            for h in hooks
        ]

    async def delete(self, name: str) -> None:
        """Remove a webhook and its delivery log."""
        async with self.db.transaction() as uow:
            wid = await self._id(uow.session, name)
            # explicit, not only ON DELETE CASCADE: SQLite enforces that per connection only
            await uow.session.execute(
                delete(WebhookDelivery).where(WebhookDelivery.webhook_id == wid)
            )
            await uow.session.execute(delete(Webhook).where(Webhook.id == wid))

    async def deliveries(
        self, name: str, *, limit: int = 50, offset: int = 0, state: str | None = None
    ) -> list[DeliveryOut]:
        """One webhook's delivery log, newest first."""
        async with self.db.read() as s:
            wid = await self._id(s, name)
            q = (
                select(WebhookDelivery)
                .where(WebhookDelivery.webhook_id == wid)
                .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                .limit(limit)
                .offset(offset)
            )
            if state is not None:
                q = q.where(WebhookDelivery.state == state)
            rows = (await s.scalars(q)).all()
        return [_delivery_out(d, name) for d in rows]

    async def delivery(self, delivery_id: str) -> DeliveryOut:
        """One delivery by id."""
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(WebhookDelivery, Webhook.name)
                    .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                    .where(WebhookDelivery.id == delivery_id)
                )
            ).first()
        if row is None:
            raise NotFound(f"no webhook delivery {delivery_id[:40]!r}")
        return _delivery_out(row[0], row[1])

    async def test(self, name: str) -> DeliveryOut:
        """Send a `ping` to one webhook now (retried like any delivery if it fails)."""
        async with self.db.transaction() as uow:
            wid = await self._id(uow.session, name)
            claim = await self._queue_claimed(
                uow.session, wid, "ping", {"webhook": name, "message": "ping from Custos"}, None
            )
        return await self._deliver_now(claim)

    async def redeliver(self, delivery_id: str) -> DeliveryOut:
        """Send a past delivery's event again now, as a new delivery that points back to it."""
        async with self.db.transaction() as uow:
            orig = await uow.session.get(WebhookDelivery, delivery_id)
            if orig is None:
                raise NotFound(f"no webhook delivery {delivery_id[:40]!r}")
            claim = await self._queue_claimed(
                uow.session, orig.webhook_id, orig.event, orig.data, orig.id
            )
        return await self._deliver_now(claim)

    # ------------------------------------------------------------------ the job

    async def deliver_due(self) -> int:
        """Send every due delivery (the periodic job); returns how many were attempted.

        Also deletes deliveries older than RETENTION, at most once an hour per process.
        """
        await self._maybe_purge()
        started = time.monotonic()
        total = 0
        claimed = await self._claim(BATCH)
        if not claimed:
            return 0
        sem = asyncio.Semaphore(PARALLEL)
        async with self._client() as http:
            while claimed:
                await asyncio.gather(*(self._attempt(http, c, sem) for c in claimed))
                total += len(claimed)
                if len(claimed) < BATCH or time.monotonic() - started > MAX_RUN_S:
                    break
                claimed = await self._claim(BATCH)
        return total

    async def purge_old(self, now: datetime | None = None) -> int:
        """Delete deliveries created more than RETENTION ago; returns how many."""
        cutoff = (now or utcnow()) - RETENTION
        async with self.db.transaction() as uow:
            res = await uow.session.execute(
                delete(WebhookDelivery)
                .where(WebhookDelivery.created_at < cutoff)
                .execution_options(synchronize_session=False)
            )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def _maybe_purge(self) -> None:
        now = time.monotonic()
        if self._purged_at is not None and now - self._purged_at < PURGE_EVERY_S:
            return
        self._purged_at = now
        n = await self.purge_old()
        if n:
            log.info("webhooks: deleted %d deliveries older than %s", n, RETENTION)

    async def _claim(self, limit: int) -> list[_Claim]:
        """Take the lease on up to `limit` due deliveries, in one short transaction."""
        now = utcnow()
        async with self.db.transaction() as uow:
            q = (
                select(
                    WebhookDelivery.id,
                    Webhook.name,
                    WebhookDelivery.event,
                    WebhookDelivery.data,
                    WebhookDelivery.created_at,
                    WebhookDelivery.attempts,
                    Webhook.url,
                    Webhook.secret_sealed,
                )
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    Webhook.enabled.is_(True),
                )
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
            )
            if self.db.dialect == "postgresql":
                # another process's claim in flight is skipped, not waited for
                q = q.with_for_update(of=WebhookDelivery, skip_locked=True)
            rows = (await uow.session.execute(q)).all()
            if not rows:
                return []
            await uow.session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_([r[0] for r in rows]))
                .values(
                    attempts=WebhookDelivery.attempts + 1,
                    next_attempt_at=now + self.lease,
                    last_attempt_at=now,
                )
                .execution_options(synchronize_session=False)
            )
        return [
            _Claim(
                id=r[0],
                webhook=r[1],
                event=r[2],
                data=r[3],
                created_at=_aware(r[4]),
                attempt=r[5] + 1,
                url=r[6],
                secret_sealed=r[7],
            )
            for r in rows
        ]

    async def _queue_claimed(
        self,
        s: AsyncSession,
        webhook_id: int,
        event: str,
        data: dict[str, Any],
        redelivery_of: str | None,
    ) -> _Claim:
        """A new delivery already leased to this process (sent right away by the caller)."""
        hook = await s.get(Webhook, webhook_id)
        if hook is None:
            raise NotFound("the webhook has been removed")
        now = utcnow()
        row = WebhookDelivery(
            id=new_id(),
            webhook_id=webhook_id,
            event=event,
            data=data,
            state="pending",
            attempts=1,
            created_at=now,
            next_attempt_at=now + self.lease,
            last_attempt_at=now,
            error="",
            response="",
            redelivery_of=redelivery_of,
        )
        s.add(row)
        await s.flush()
        return _Claim(
            id=row.id,
            webhook=hook.name,
            event=event,
            data=data,
            created_at=now,
            attempt=1,
            url=hook.url,
            secret_sealed=hook.secret_sealed,
        )

    async def _deliver_now(self, claim: _Claim) -> DeliveryOut:
        async with self._client() as http:
            await self._attempt(http, claim)
        return await self.delivery(claim.id)

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(
            transport=self._transport,
            follow_redirects=False,  # a redirect could lead the signed body anywhere
            timeout=self.timeout_s,
        ) as http:
            yield http

    async def _attempt(
        self, http: httpx.AsyncClient, c: _Claim, sem: asyncio.Semaphore | None = None
    ) -> None:
        """Send one claimed delivery and record how it went (never raises)."""
        try:
            if sem is None:
                outcome = await self._send(http, c)
            else:
                async with sem:
                    outcome = await self._send(http, c)
        except Exception as exc:  # a bug must not leave the row leased until the lease ends
            log.exception("webhook delivery %s: unexpected error", c.id)
            outcome = _Outcome(None, f"internal error: {type(exc).__name__}", "", None, 0)
        try:
            await self._record(c, outcome)
        except Exception:
            log.exception("webhook delivery %s: could not record the outcome", c.id)

    async def _send(self, http: httpx.AsyncClient, c: _Claim) -> _Outcome:
        body = orjson.dumps(
            {"id": c.id, "event": c.event, "created_at": c.created_at.isoformat(), "data": c.data}
        )
        try:
            secret = self._open(c.webhook, c.secret_sealed)
        except (InvalidTag, ValueError):
            return _Outcome(None, "the webhook's secret cannot be decrypted", "", None, 0)
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            # no compressed answers: only a bounded excerpt is read, and never inflated
            "Accept-Encoding": "identity",
            "X-Custos-Event": c.event,
            "X-Custos-Delivery": c.id,
            "X-Custos-Timestamp": str(ts),
            "X-Custos-Signature": sign(secret.encode(), ts, body),
        }
        started = time.monotonic()
        status: int | None = None
        retry_after: str | None = None
        location = ""
        excerpt = b""
        error = ""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with http.stream("POST", c.url, content=body, headers=headers) as resp:
                    status = resp.status_code
                    retry_after = resp.headers.get("retry-after")
                    location = resp.headers.get("location", "")
                    async for chunk in resp.aiter_raw():
                        excerpt += chunk
                        if len(excerpt) >= MAX_RESPONSE_BYTES:
                            break  # the rest is not read; the connection is dropped
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except httpx.TimeoutException as exc:
            error = f"timed out ({type(exc).__name__})"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration = int((time.monotonic() - started) * 1000)
        text = excerpt[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")[:EXCERPT_CHARS]
        if status is not None and 200 <= status < 300:
            # the receiver accepted it; a body that then stalls or breaks does not undo that
            error = ""
        elif status is not None:
            reason = f"HTTP {status}"
            if 300 <= status < 400:
                reason += ": redirects are not followed" + (f" (to {location})" if location else "")
            error = f"{reason}; then {error}" if error else reason
        return _Outcome(status, error[:EXCERPT_CHARS], text, retry_after, duration)

    async def _record(self, c: _Claim, o: _Outcome) -> None:
        now = utcnow()
        ok = o.status is not None and 200 <= o.status < 300 and not o.error
        values: dict[str, Any] = {
            "status_code": o.status,
            "error": o.error,
            "response": o.response,
            "duration_ms": o.duration_ms,
        }
        if ok:
            values.update(state="delivered", delivered_at=now, next_attempt_at=None, error="")
        else:
            delay = retry_delay(c.attempt, o.status, o.retry_after)
            if delay is None:
                values.update(state="failed", next_attempt_at=None)
            else:
                values.update(next_attempt_at=now + timedelta(seconds=delay))
        async with self.db.transaction() as uow:
            # only while the lease is still ours: a row re-claimed after its lease ran out
            # (this process stalled) now belongs to the later attempt
            await uow.session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == c.id,
                    WebhookDelivery.attempts == c.attempt,
                    WebhookDelivery.state == "pending",
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    # ------------------------------------------------------------------ internals

    async def _id(self, s: AsyncSession, name: str) -> int:
        wid = await s.scalar(select(Webhook.id).where(Webhook.name == name))
        if wid is None:
            raise NotFound(f"no webhook named {name[:100]!r}")
        return int(wid)

    def _seal(self, name: str, secret: str) -> str:
        nonce = os.urandom(12)
        sealed = base64.urlsafe_b64encode(
            nonce + self._aead.encrypt(nonce, secret.encode(), _aad(name))
        ).decode()
        if len(sealed) > MAX_SECRET_SEALED:
            raise Invalid("the secret is too long", code="bad_secret")
        return sealed

    def _open(self, name: str, sealed: str) -> str:
        raw = base64.urlsafe_b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], _aad(name)).decode()


def _aad(name: str) -> bytes:
    # binds a sealed secret to its webhook: copying it onto another row does not decrypt
    return b"custos-webhook-secret\n" + name.encode()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _webhook_out(
    h: Webhook, *, pending: int = 0, failed: int = 0, last_delivery_at: datetime | None = None
) -> WebhookOut:
    return WebhookOut(
        id=h.id,
        name=h.name,
        url=h.url,
        events=list(h.events),
        enabled=h.enabled,
        created_by=h.created_by,
        created_at=h.created_at,
        pending=pending,
        failed=failed,
        last_delivery_at=last_delivery_at,
    )


def _delivery_out(d: WebhookDelivery, webhook: str) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        webhook=webhook,
        event=d.event,
        state=d.state,
        attempts=d.attempts,
        created_at=d.created_at,
        next_attempt_at=d.next_attempt_at if d.state == "pending" else None,
        last_attempt_at=d.last_attempt_at,
        delivered_at=d.delivered_at,
        status_code=d.status_code,
        duration_ms=d.duration_ms,
        error=d.error,
        response=d.response,
        redelivery_of=d.redelivery_of,
        data=d.data,
    )
