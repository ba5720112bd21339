"""Wake-up nudges through an MQTT broker: the server publishes, each agent subscribes to its topic.

For fleets larger than the server processes want to hold sockets for: the broker (Mosquitto,
EMQX) holds the devices' connections, and a server process keeps one connection to it. A
nudge for device D is a QoS 1, non-retained `{"type":"wake"}` on `<prefix>/<D>`. The broker
enforces who may read what (docs/operations.md): a device authenticates with its Custos
certificate and may read only `<prefix>/<its id>`.

`MqttPush` wraps the hub the database implies (in-process on SQLite, NOTIFY on
PostgreSQL), which still carries the events that keep every process's caches coherent and
still wakes the WebSocket of agents that do not know about MQTT. The broker adds one
publish per device woken, sent by the process that queued the work, once the inner hub
publish per device woken, sent by the process that queued the work, right after the commit.
A device woken this way checks in with `"wake": true`, so a process whose work index has
not heard of the work yet still looks in the database: there is nothing to wait for.

The broker is not essential to serve: if it is down the server starts and runs, logs at
warning and reconnects with jittered backoff; devices get their work at their next check-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import secrets
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import SecretStr

from custos.push.hub import EventKind, Listener, PushHub, Subscription
from custos.push.schemas import PushDescriptor

if TYPE_CHECKING:
    import aiomqtt

    from custos.settings import Settings

log = logging.getLogger(__name__)

WAKE = b'{"type":"wake"}'
MAX_BACKOFF_S = 30.0
# nudges published at once; paho queues what exceeds its in-flight window
PUBLISH_BATCH = 500
PUBLISH_TIMEOUT_S = 10.0
# while the broker is down, remember at most this many devices to nudge (~100 bytes each);
# beyond it nudges are dropped: those devices get their work at their next check-in
MAX_PENDING = 200_000
# what the broker may send us: wake messages are a few bytes
MAX_PACKET_BYTES = 4096
MAX_URL_CHARS = 512
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# topic levels of safe characters: no wildcards, no '$' topics, nothing an ACL file would split
TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,7}$")
MAX_TOPIC_PREFIX_CHARS = 128


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens, from an mqtt:// or mqtts:// URL."""

    tls: bool
    host: str
    port: int


def parse_mqtt_url(url: str) -> BrokerAddress:
    """mqtt://host[:port] or mqtts://host[:port]; ValueError with the reason otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"an MQTT URL is at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid MQTT URL: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError("an MQTT URL starts with mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "put broker credentials in mqtt_username / mqtt_password, not in the URL "
            "(the URL is sent to devices)"
        )
    if not parts.hostname:
        raise ValueError("the MQTT URL has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("an MQTT URL has no path, query or fragment")
    return BrokerAddress(
        parts.scheme == "mqtts", parts.hostname, port or DEFAULT_PORTS[parts.scheme]
    )


def check_topic_prefix(prefix: str) -> str:
    """The prefix if it is a plain topic path (no wildcards, no empty levels); else ValueError."""
    if len(prefix) > MAX_TOPIC_PREFIX_CHARS or not TOPIC_PREFIX_RE.match(prefix):
        raise ValueError(
            "the topic prefix is 1-8 levels of letters, digits, '_', '.', '-' joined by '/' "
            f"(at most {MAX_TOPIC_PREFIX_CHARS} characters)"
        )
    return prefix


def _backoff(failures: int) -> float:
    return min(MAX_BACKOFF_S, 0.5 * 2**failures) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter


class MqttPush:
    """One broker connection per server process, around the database's own hub."""

    def __init__(
        self,
        inner: PushHub,
        url: str,
        *,
        topic_prefix: str = "custos/wake",
        device_url: str | None = None,
        username: str | None = None,
        password: SecretStr | None = None,
        tls_context: ssl.SSLContext | None = None,
        start_wait_s: float = 5.0,
        keepalive_s: int = 30,
    ) -> None:
        self.inner = inner
        self.broker = parse_mqtt_url(url)
        self.url = url
        self.prefix = check_topic_prefix(topic_prefix)
        device_url = device_url or url
        parse_mqtt_url(device_url)
        self._descriptor = PushDescriptor(kind="mqtt", url=device_url, topic_prefix=self.prefix)
        self.username = username
        self._password = password
        if self.broker.tls and tls_context is None:
            tls_context = ssl.create_default_context()
        self._tls = tls_context if self.broker.tls else None
        self.start_wait_s = start_wait_s
        self.keepalive_s = keepalive_s
        self.client_id = f"custos-server-{secrets.token_hex(6)}"
        self._pending: set[str] = set()
        self._kick = asyncio.Event()
        self._up = asyncio.Event()
        self._tried = asyncio.Event()
        self._stopping = False
        self._dropping = False
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        self.published = 0

    @classmethod
    def from_settings(cls, settings: Settings, inner: PushHub) -> MqttPush:
        """The backend as configured; unreadable TLS files are a ValueError (a config error)."""
        ctx: ssl.SSLContext | None = None
        if parse_mqtt_url(settings.mqtt_url).tls:
            try:
                ctx = ssl.create_default_context(
                    cafile=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None
                )
                if settings.mqtt_cert_file and settings.mqtt_key_file:
                    ctx.load_cert_chain(str(settings.mqtt_cert_file), str(settings.mqtt_key_file))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the MQTT TLS files: {exc}") from None
        hub = cls(
            inner,
            settings.mqtt_url,
            topic_prefix=settings.mqtt_topic_prefix,
            device_url=settings.mqtt_device_url,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            tls_context=ctx,
        )
        if not parse_mqtt_url(hub._descriptor.url or "").tls:
            log.warning(
                "push: devices are told to use %s without TLS: the broker cannot tell devices "
                "apart, so any client can hear any nudge (use mqtts:// outside a lab)",
                hub._descriptor.url,
            )
        return hub

    async def publish_once(self, suffix: str, payload: bytes) -> None:
        """One QoS 1 message to <prefix>/<suffix> over a connection of its own.

        For OMA DM's package #0, whose subscriber (the device, or a gateway that forwards it
        by SMS) is not an agent; rare enough that a short-lived connection is the simple way.
        """
        import aiomqtt

        topic = f"{self.prefix}/{check_topic_prefix(suffix)}"
        async with aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.username,
            password=self._password.get_secret_value() if self._password else None,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=self._tls,
            timeout=10,
        ) as client:
            await client.publish(topic, payload, qos=1)

    # --- what devices are told ---

    def descriptor(self) -> PushDescriptor:
        """What every check-in response tells devices: this broker and topic prefix."""
        return self._descriptor

    # --- lifecycle ---

    @property
    def up(self) -> bool:
        """Whether the broker connection is open now."""
        return self._up.is_set()

    async def start(self) -> None:
        """Start the inner hub; connect in the background, waiting only for the first try."""
        await self.inner.start()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="push-mqtt")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), self.start_wait_s)
        if not self._up.is_set():
            log.warning("push: MQTT broker %s not connected yet; retrying in background", self.url)

    async def stop(self) -> None:
        """Send what is queued (briefly), disconnect, stop reconnecting; stop the inner hub."""
        self._stopping = True
        self._kick.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.inner.stop()

    # --- the hub protocol: events go through the inner hub, wakes also to the broker ---

    @property
    def coherent(self) -> bool:
        """Whether events reach this process (the inner hub's concern, not the broker's)."""
        return self.inner.coherent

    def nudge(self, device_ids: Iterable[str]) -> None:
        """Wake these devices: an event to every process, and a publish to each device's topic."""
        ids = list(device_ids)
        self.inner.nudge(ids)
        self._queue(ids)

    def announce(self, kind: EventKind, device_ids: Iterable[str], at: float | None = None) -> None:
        """Tell every process about an event; work due now is also published to the devices."""
        ids = list(device_ids)
        self.inner.announce(kind, ids, at)
        if kind == "work":
            self._queue(ids)

    def wake_local(self, device_ids: Iterable[str]) -> None:
        """Wake these devices (deferred work that became due).

        Every process calls this for the same devices, so with several processes a device
        gets one nudge from each: an extra check-in, which is harmless.
        """
        ids = list(device_ids)
        self.inner.wake_local(ids)
        self._queue(ids)

    def listen(self, listener: Listener) -> None:
        """Events come from the inner hub."""
        self.inner.listen(listener)

    def on_resync(self, callback: Callable[[], None]) -> None:
        """Resyncs come from the inner hub."""
        self.inner.on_resync(callback)

    def subscribe(self, device_id: str, on_wake: Callable[[], None] | None = None) -> Subscription:
        """A WebSocket subscriber (agents that do not use MQTT)."""
        return self.inner.subscribe(device_id, on_wake)

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop listening."""
        self.inner.unsubscribe(sub)

    def _queue(self, ids: list[str]) -> None:
        if not ids:
            return
        if not self._up.is_set() and len(self._pending) + len(ids) > MAX_PENDING:
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "push: MQTT broker down and %d nudges queued; dropping more until it is back",
                    len(self._pending),
                )
            return
        self._pending.update(ids)
        self._kick.set()

    def _client(self) -> aiomqtt.Client:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = MAX_PACKET_BYTES
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=self.username,
            password=self._password.get_secret_value() if self._password else None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            tls_context=self._tls,
            keepalive=self.keepalive_s,
            timeout=10,
            properties=props,
            max_inflight_messages=100,
            max_queued_incoming_messages=16,
        )
        client.pending_calls_threshold = PUBLISH_BATCH + 50  # our batches are expected
        return client

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            opened: float | None = None
            try:
                async with self._client() as client:
                    opened = time.monotonic()
                    await self._serve(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, unreachable, TLS, dropped: retry, never die
                error = f"{type(exc).__name__}: {exc}"
            else:
                error = "connection closed"
            finally:
                self._up.clear()
                self._tried.set()
            if self._stopping:
                break
            # a link that keeps dropping at once must not turn into a tight reconnect loop
            stable = opened is not None and time.monotonic() - opened > MAX_BACKOFF_S
            failures = 1 if stable else failures + 1
            delay = _backoff(failures)
            what = "connection lost" if opened is not None else "cannot connect"
            log.warning(
                "push: MQTT broker %s: %s (%s); retry in %.1fs", self.url, what, error, delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_stopping(), delay)

    async def _wait_stopping(self) -> None:
        while not self._stopping:
            self._kick.clear()
            await self._kick.wait()

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish queued nudges until the link drops (or we stop with nothing left to send)."""
        self.connects += 1
        self._dropping = False
        self._up.set()
        self._tried.set()
        if self.connects > 1:
            log.info("push: MQTT connection to %s re-established", self.url)
        watcher = asyncio.create_task(self._watch(client))
        sender = asyncio.create_task(self._send(client))
        try:
            done, _ = await asyncio.wait({watcher, sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watcher, sender):
                t.cancel()
            await asyncio.gather(watcher, sender, return_exceptions=True)
        for t in done:
            t.result()  # the watcher's disconnect error, or the sender's failure

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Raises when the connection drops (we subscribe to nothing: no message comes)."""
        async for _msg in client.messages:
            pass

    async def _send(self, client: aiomqtt.Client) -> None:
        """Publish queued nudges; returns once stopping with nothing left to send."""
        while True:
            if not self._pending:
                if self._stopping:
                    return
                await self._kick.wait()
                self._kick.clear()
                continue
            ids, self._pending = self._pending, set()
            try:
                await self._publish(client, list(ids))
            except BaseException:
                # sent again on the next connection (an extra nudge costs one check-in)
                self._pending |= ids
                raise
            self.published += len(ids)

    async def _publish(self, client: aiomqtt.Client, ids: list[str]) -> None:
        for i in range(0, len(ids), PUBLISH_BATCH):
            await asyncio.gather(
                *(
                    client.publish(
                        f"{self.prefix}/{d}", WAKE, qos=1, retain=False, timeout=PUBLISH_TIMEOUT_S
                    )
                    for d in ids[i : i + PUBLISH_BATCH]
                )
            )
