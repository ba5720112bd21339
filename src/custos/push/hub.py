"""Wake-up nudges for connected devices: in-process, or across processes via PostgreSQL NOTIFY.

(The MQTT backend, where agents subscribe to a broker instead, is in mqtt.py.)

A nudge carries no work, only "check in now"; a lost nudge costs at most one check-in
interval, so the backends favour simplicity over delivery guarantees.

The same channel carries the events that keep every process's caches coherent (see
`Event`): work queued for devices (now or at a later time) and device status changes.
Listeners registered with `listen` see every event, the sender's own included; `coherent`
says whether events can currently be trusted to arrive, and `on_resync` callbacks run when
they may have been missed (the listening connection was re-established).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from custos.push.schemas import PushDescriptor
from custos.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "custos_wake"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more
MAX_PAYLOAD = 7900
KEEPALIVE_S = 30.0
MAX_BACKOFF_S = 30.0


EventKind = Literal["work", "later", "status"]
# wire prefixes of the event kinds in a NOTIFY payload; a bare id list is "work"
_PREFIX: dict[str, str] = {"work": "w|", "later": "l|", "status": "s|"}


@dataclass(frozen=True, slots=True)
class Event:
    """Something every server process must hear about.

    work: runs are due now for these devices (they are also woken);
    later: runs become due at `at` (epoch seconds);
    status: these devices' status changed (cached statuses are stale).
    """

    kind: EventKind
    device_ids: tuple[str, ...]
    at: float | None = None


Listener = Callable[[Event], None]


def encode_event(kind: EventKind, at: float | None) -> str:
    """The payload prefix for one kind of event ("l|<epoch>|" carries its time)."""
    if kind == "later":
        return f"l|{at:.3f}|"
    return _PREFIX[kind]


def decode_event(payload: str) -> Event | None:
    """The event in a NOTIFY payload, or None for a malformed one."""
    kind: EventKind = "work"
    at: float | None = None
    body = payload
    if payload[1:2] == "|":
        tag = payload[0]
        if tag == "w":
            body = payload[2:]
        elif tag == "s":
            kind, body = "status", payload[2:]
        elif tag == "l":
            kind = "later"
            stamp, sep, body = payload[2:].partition("|")
            try:
                at = float(stamp)
            except ValueError:
                return None
            if not sep:
                return None
        else:
            return None
    ids = tuple(d for d in body.split(",") if d)
    return Event(kind, ids, at) if ids else None


class Subscription:
    """One listener for one device's nudges.

    With `on_wake` the hub calls it (in the event loop) when the device should check in;
    without, it sets `event`. The push route uses the callback so that an idle socket costs
    no task of its own besides the one reading from it (memory per connection, B4).
    """

    __slots__ = ("_event", "device_id", "on_wake")

    def __init__(self, device_id: str, on_wake: Callable[[], None] | None = None) -> None:
        self.device_id = device_id
        self.on_wake = on_wake
        self._event: asyncio.Event | None = None

    @property
    def event(self) -> asyncio.Event:
        """Set on every wake (made on first use)."""
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def wake(self) -> None:
        """Tell the listener."""
        if self.on_wake is not None:
            self.on_wake()
        else:
            self.event.set()


class PushHub(Protocol):
    """The push channel backend a server process holds."""

    async def start(self) -> None:
        """Open whatever the backend needs (called in the lifespan)."""

    async def stop(self) -> None:
        """Close it again."""

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Wake these devices wherever they are connected; never blocks (after commit)."""

    def announce(self, kind: EventKind, device_ids: Iterable[str], at: float | None = None) -> None:
        """Tell every process (this one included) about an event; never blocks."""

    def listen(self, listener: Listener) -> None:
        """Call `listener` for every event, in the event loop."""

    def on_resync(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever events may have been missed."""

    @property
    def coherent(self) -> bool:
        """Whether events reach this process now (false while reconnecting)."""

    def wake_local(self, device_ids: Iterable[str]) -> None:
        """Wake this process's own subscribers of these devices."""

    def subscribe(self, device_id: str, on_wake: Callable[[], None] | None = None) -> Subscription:
        """Listen for one device's nudges in this process."""

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop listening."""

    def descriptor(self) -> PushDescriptor | None:
        """What check-in responses tell devices about the channel (None: the WebSocket)."""


class _LocalSubscribers:
    """The subscriptions held by this process, by device id."""

    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        self._listeners: list[Listener] = []
        self._resync: list[Callable[[], None]] = []

    def listen(self, listener: Listener) -> None:
        """Call `listener` for every event."""
        self._listeners.append(listener)

    def on_resync(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever events may have been missed."""
        self._resync.append(callback)

    def _dispatch(self, event: Event) -> None:
        if event.kind == "work":
            self.wake_local(event.device_ids)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("push: event listener failed")
        if event.kind == "status":
            # after the listeners dropped the cached status: the push connections of these
            # devices look at it again (and close if the device was retired)
            self.wake_local(event.device_ids)

    def _resynced(self) -> None:
        for callback in self._resync:
            try:
                callback()
            except Exception:
                log.exception("push: resync callback failed")

    def subscribe(self, device_id: str, on_wake: Callable[[], None] | None = None) -> Subscription:
        """Listen for one device's nudges in this process."""
        sub = Subscription(device_id, on_wake)
        self._subs.setdefault(device_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop listening (idempotent)."""
        subs = self._subs.get(sub.device_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.device_id]

    def descriptor(self) -> PushDescriptor | None:
        """None: devices use this server's WebSocket (the default when the field is absent)."""
        return None

    @property
    def connected(self) -> int:
        """How many subscriptions this process holds."""
        return sum(len(s) for s in self._subs.values())

    def wake_local(self, device_ids: Iterable[str]) -> None:
        """Wake this process's own subscribers of these devices."""
        for d in device_ids:
            for sub in tuple(self._subs.get(d, ())):
                sub.wake()

    def _wake_all(self) -> None:
        for subs in list(self._subs.values()):
            for sub in tuple(subs):
                sub.wake()


class MemoryPush(_LocalSubscribers):
    """One process: a nudge sets the local subscribers' events (SQLite, single server)."""

    async def start(self) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to close."""

    @property
    def coherent(self) -> bool:
        """Always: there is no other process to hear from."""
        return True

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Wake the local subscribers of these devices."""
        self.announce("work", device_ids)

    def announce(self, kind: EventKind, device_ids: Iterable[str], at: float | None = None) -> None:
        """Deliver the event to this process's listeners at once."""
        ids = tuple(device_ids)
        if ids:
            self._dispatch(Event(kind, ids, at))


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
        self._pending: dict[str, set[str]] = {}  # payload prefix -> device ids
        self._kick = asyncio.Event()
        self._up = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._own_pid = -1  # the server backend of our connection: its NOTIFYs are our own
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

    @property
    def coherent(self) -> bool:
        """Whether the LISTEN connection is up (events sent meanwhile are lost otherwise)."""
        return self._up.is_set()

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Queue a NOTIFY for these devices; the connection task sends it."""
        self.announce("work", device_ids)

    def announce(self, kind: EventKind, device_ids: Iterable[str], at: float | None = None) -> None:
        """Dispatch the event here at once, and queue a NOTIFY for the other processes."""
        ids = tuple(device_ids)
        if not ids:
            return
        # this process must not wait for its own notification to come back: a device
        # checking in here right after the commit would find its work index stale
        self._dispatch(Event(kind, ids, at))
        prefix = encode_event(kind, at)
        self._pending.setdefault(prefix, set()).update(ids)
        self._kick.set()

    def _on_notify(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        if pid == self._own_pid:
            return  # sent by this process, which dispatched it already
        event = decode_event(payload)
        if event is not None:
            self._dispatch(event)

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
            self._own_pid = conn.get_server_pid()
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
                self._resynced()
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
            batch, self._pending = self._pending, {}
            try:
                for prefix, ids in batch.items():
                    for body in payloads(sorted(ids), MAX_PAYLOAD - len(prefix)):
                        await conn.execute(
                            "SELECT pg_notify($1, $2)", CHANNEL, prefix + body, timeout=10
                        )
            except BaseException:
                # sent again on the next connection (extra events are harmless)
                for prefix, ids in batch.items():
                    self._pending.setdefault(prefix, set()).update(ids)
                raise


def build_push(settings: Settings) -> PushHub:
    """The backend chosen by `push_backend` (auto: NOTIFY on PostgreSQL, else in-process).

    mqtt: devices are woken through a broker, around the auto choice (mqtt.py).
    """
    backend = settings.push_backend
    if backend == "mqtt":
        # devices hear the broker; the processes still share events the database's way
        from custos.push.mqtt import MqttPush

        inner = build_push(settings.model_copy(update={"push_backend": "auto"}))
        return MqttPush.from_settings(settings, inner)
    if backend == "auto":
        backend = "memory" if settings.is_sqlite else "postgres"
    if backend == "postgres":
        if not settings.database_url.startswith("postgresql"):
            raise ValueError("push_backend 'postgres' needs a PostgreSQL database")
        return PostgresNotifyPush(asyncpg_dsn(settings.database_url))
    return MemoryPush()
