"""Wake-up nudges for connected devices: in-process, or across processes via PostgreSQL NOTIFY.

A nudge carries no work, only "check in now"; a lost nudge costs at most one check-in
interval, so the backends favour simplicity over delivery guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from custos.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "custos_wake"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
MAX_PAYLOAD = 7900
KEEPALIVE_S = 30.0
MAX_BACKOFF_S = 30.0


class Subscription:
    """One listener for one device's nudges: `event` is set when the device should check in."""

    __slots__ = ("device_id", "event")

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.event = asyncio.Event()


class PushHub(Protocol):
    """The push channel backend a server process holds."""

    async def start(self) -> None:
        """Open whatever the backend needs (called in the lifespan)."""

    async def stop(self) -> None:
        """Close it again."""

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Wake these devices wherever they are connected; never blocks (after commit)."""

    def subscribe(self, device_id: str) -> Subscription:
        """Listen for one device's nudges in this process."""

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop listening."""


class _LocalSubscribers:
    """The subscriptions held by this process, by device id."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}

    def subscribe(self, device_id: str) -> Subscription:
        """Listen for one device's nudges in this process."""
        sub = Subscription(device_id)
        self._subs.setdefault(device_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop listening (idempotent)."""
        subs = self._subs.get(sub.device_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.device_id]

    @property
    def connected(self) -> int:
        """How many subscriptions this process holds."""
        return sum(len(s) for s in self._subs.values())

    def _wake_local(self, device_ids: Iterable[str]) -> None:
        for d in device_ids:
            for sub in self._subs.get(d, ()):
                sub.event.set()

    def _wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.event.set()


class MemoryPush(_LocalSubscribers):
    """One process: a nudge sets the local subscribers' events (SQLite, single server)."""

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Wake the local subscribers of these devices."""
        self._wake_local(device_ids)


def payloads(device_ids: Iterable[str], limit: int = MAX_PAYLOAD) -> Iterator[str]:
    """Comma-joined device ids, cut into payloads shorter than `limit` bytes."""
    chunk: list[str] = []
    size = 0
    for d in device_ids:
        n = len(d.encode()) + (1 if chunk else 0)
        if chunk and size + n > limit:
            yield ",".join(chunk)
            chunk, size = [], 0
            n = len(d.encode())
        chunk.append(d)
        size += n
    if chunk:
        yield ",".join(chunk)


def asyncpg_dsn(database_url: str) -> str:
    """The libpq DSN asyncpg wants, from the SQLAlchemy URL."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class PostgresNotifyPush(_LocalSubscribers):
    """Several processes on one PostgreSQL: NOTIFY on one channel, every process LISTENs.

    One dedicated connection (outside SQLAlchemy's pool, which would reuse it for queries)
    both listens and sends. Each process, the sender included, wakes its own subscribers
    when a notification arrives. If the connection drops it is reopened with backoff, and
    then every local subscriber is woken once, since nudges may have been missed meanwhile.
    """

    def __init__(
        self, dsn: str, *, keepalive_s: float = KEEPALIVE_S, start_wait_s: float = 10.0
    ) -> None:
        super().__init__()
        self.dsn = dsn
        self.keepalive_s = keepalive_s
        self.start_wait_s = start_wait_s
        self._pending: set[str] = set()
        self._kick = asyncio.Event()
        self._up = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self.connects = 0

    async def start(self) -> None:
        """Open the connection (waiting a little for it; push is not essential to serve)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="push-postgres")
        try:
            await asyncio.wait_for(self._up.wait(), self.start_wait_s)
        except TimeoutError:
            log.warning("push: PostgreSQL LISTEN connection not up yet; retrying in background")

    async def stop(self) -> None:
        """Close the connection and stop reconnecting."""
        self._stopping = True
        self._kick.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Queue a NOTIFY for these devices; the connection task sends it."""
        before = len(self._pending)
        self._pending.update(device_ids)
        if len(self._pending) != before:
            self._kick.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._wake_local(payload.split(","))

    async def _run(self) -> None:
        import asyncpg

        failures = 0
        while not self._stopping:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
            except Exception as exc:  # unreachable, refused, TLS, auth: retry, never die
                failures += 1
                delay = min(MAX_BACKOFF_S, 0.5 * 2**failures) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning("push: cannot connect to PostgreSQL (%s); retry in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_stopping(), delay)
                continue
            self._conn = conn
            conn.add_termination_listener(lambda _c: self._kick.set())
            opened = time.monotonic()
            try:
                await conn.add_listener(CHANNEL, self._on_notify)
                self.connects += 1
                self._up.set()
                if self.connects > 1:
                    log.info("push: LISTEN connection re-established; waking local devices")
                # nudges from other processes may have been missed while we were not listening
                self._wake_all()
                await self._serve(conn)
            except Exception as exc:
                if not self._stopping:
                    log.warning("push: PostgreSQL connection lost (%s); reconnecting", exc)
            finally:
                self._up.clear()
                self._conn = None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
                if not conn.is_closed():
                    conn.terminate()
            if self._stopping:
                break
            # a link that keeps dropping at once must not turn into a tight reconnect loop
            failures = 0 if time.monotonic() - opened > MAX_BACKOFF_S else failures + 1
            delay = min(MAX_BACKOFF_S, 0.5 * 2**failures) * random.uniform(0.5, 1.0)  # noqa: S311
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_stopping(), delay)

    async def _wait_stopping(self) -> None:
        while not self._stopping:
            self._kick.clear()
            await self._kick.wait()

    async def _serve(self, conn: Any) -> None:
        """Send queued nudges; ping when idle so a dead link is noticed."""
        while not self._stopping and not conn.is_closed():
            if not self._pending:
                try:
                    await asyncio.wait_for(self._kick.wait(), self.keepalive_s)
                except TimeoutError:
                    await conn.execute("SELECT 1", timeout=10)
                    continue
            self._kick.clear()
            if self._stopping or conn.is_closed():
                return
            ids, self._pending = self._pending, set()
            try:
                for payload in payloads(sorted(ids)):
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload, timeout=10)
            except BaseException:
                # sent again on the next connection (extra nudges are harmless)
                self._pending |= ids
                raise


def build_push(settings: Settings) -> PushHub:
    """The backend chosen by `push_backend` (auto: NOTIFY on PostgreSQL, else in-process)."""
    backend = settings.push_backend
    if backend == "auto":
        backend = "memory" if settings.is_sqlite else "postgres"
    if backend == "postgres":
        if not settings.database_url.startswith("postgresql"):
            raise ValueError("push_backend 'postgres' needs a PostgreSQL database")
        return PostgresNotifyPush(asyncpg_dsn(settings.database_url))
    return MemoryPush()
