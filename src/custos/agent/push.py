"""The agent's push listener: one connection that only says "check in now".

By default a WebSocket to the server; when check-in responses name an MQTT broker
("push": {"kind": "mqtt", ...}), a subscription to this device's own topic there instead.
Push is an optimisation: without it the agent still gets its work at the next check-in.
So every failure here is logged and retried with backoff, and never stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from custos import protocol
from custos.agent.client import DeviceClient, pinned_context

if TYPE_CHECKING:
    from custos.agent.state import AgentState

log = logging.getLogger("custos.agent.push")

PUSH_PATH = protocol.DEVICE_API + "/push"
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
# a refused device: the check-in path reports it; trying every minute would only add noise
REFUSED_PAUSE_S = 600.0
# a connection that lasted this long counts as healthy: backoff starts again from 1 s
STABLE_S = 30.0


def push_url(base_url: str) -> str:
    """wss://host/api/device/v1/push for https://host (ws:// for plain http)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + PUSH_PATH
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + PUSH_PATH
    raise ValueError(f"not an http(s) URL: {base_url!r}")


def backoff_delay(failures: int) -> float:
    """1 s doubling to 60 s, with jitter (half to full) so a fleet does not reconnect at once."""
    base = min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** max(0, failures - 1))
    return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy


async def keep_connected(
    listener: PushListener | MqttListener,
    refused: Callable[[Exception], str | None],
    what: str,
) -> None:
    """Run `listener._listen_once` forever: jittered backoff after a failure, a long pause
    after a refusal (`refused` returns the warning to log, or None for a plain failure)."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await listener._listen_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            warning = refused(exc)
            if warning is not None:
                log.warning("%s", warning)
                await asyncio.sleep(REFUSED_PAUSE_S * random.uniform(0.9, 1.1))  # noqa: S311
                continue
            log.info("%s failed or lost: %s: %s", what, type(exc).__name__, exc)
        finally:
            listener.connected = False
        failures = 1 if time.monotonic() - started >= STABLE_S else failures + 1
        delay = backoff_delay(failures)
        log.debug("%s: reconnecting in %.1fs", what, delay)
        await asyncio.sleep(delay)


class PushListener:
    """Keeps one WebSocket open and calls `on_wake` for every nudge (and after each connect)."""

    def __init__(
        self,
        client: DeviceClient,
        on_wake: Callable[[], None],
        *,
        ca_pem: str | None,
        ping_interval: float = 30.0,
        on_work: Callable[[dict[str, Any]], list[str]] | None = None,
        on_acked: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.client = client
        self.on_wake = on_wake
        # with on_work the server hands work down the socket (?deliver=1): on_work queues
        # it and returns the run ids, which are acknowledged on the socket, then on_acked
        self.on_work = on_work
        self.on_acked = on_acked
        self.query = "?deliver=1" if on_work is not None else ""
        self.url = push_url(client.base_url) + self.query
        self.ssl = pinned_context(ca_pem) if ca_pem and self.url.startswith("wss://") else None
        self.ping_interval = ping_interval
        self.connected = False
        self.wakes = 0

    def _headers(self) -> dict[str, str]:
        ts = int(time.time() + self.client.clock_offset)
        return protocol.sign_request(
            self.client.key, self.client.device_id, "GET", PUSH_PATH + self.query, b"", ts
        )

    async def run(self) -> None:
        """Connect, listen, reconnect with backoff; until cancelled."""
        from websockets.exceptions import InvalidStatus

        def refused(exc: Exception) -> str | None:
            if isinstance(exc, InvalidStatus):
                status = exc.response.status_code
                if status in (401, 403) and b"clock_skew" not in (exc.response.body or b""):
                    # the check-in path reports the refusal (and a retired device's exit)
                    return f"push refused (HTTP {status}); not retrying for a while"
            return None

        await keep_connected(self, refused, "push connection")

    async def _listen_once(self) -> None:
        from websockets.asyncio.client import connect

        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
        async with connect(
            self.url,
            additional_headers=self._headers(),
            user_agent_header="custos-agent",
            compression=None,  # frames are a few bytes; deflate state would cost memory
            open_timeout=20,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_interval,
            close_timeout=5,
            max_size=64 * 1024,
            **kwargs,
        ) as ws:
            self.connected = True
            log.info("push connected")
            # nudges sent while we were not connected are lost: check in once to catch up
            self._wake()
            try:
                async for raw in ws:
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(msg, dict):
                        continue
                    if msg.get("type") == "wake":
                        self._wake()
                    elif msg.get("type") == "checkin" and self.on_work is not None:
                        await self._take(ws, msg.get("response"))
            except asyncio.CancelledError:
                # the agent is stopping: say goodbye properly (1000) rather than 1011
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)
                raise

    def _wake(self) -> None:
        self.wakes += 1
        self.on_wake()

    async def _take(self, ws: Any, response: Any) -> None:
        """Work handed down the socket: queue it, then acknowledge it on the socket."""
        assert self.on_work is not None
        if not isinstance(response, dict):
            return
        try:
            run_ids = self.on_work(response)
        except Exception:
            log.exception("push: could not take the delivered work; a check-in will fetch it")
            self._wake()
            return
        if run_ids:
            log.info("push: %d command(s) delivered on the socket", len(run_ids))
            await ws.send(json.dumps({"type": "ack", "run_ids": run_ids}))
            if self.on_acked is not None:
                # were the acknowledgement lost, the server would hand the runs out again
                # and the queue would recognise them
                self.on_acked(run_ids)


# --- MQTT: the broker named by the server holds the connection ---

MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MQTT_TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,7}$")
MQTT_MAX_URL = 512
MQTT_MAX_PREFIX = 128
# the broker must not send us more than this in one packet (a wake is 15 bytes)
MQTT_MAX_PACKET = 4096
# CONNACK/SUBACK codes that mean "not allowed" (MQTT 3.1.1: 4, 5; MQTT 5: 0x86, 0x87, 0x8A)
MQTT_REFUSED = frozenset({4, 5, 0x86, 0x87, 0x8A})
PUSH_STATE_KEY = "push_channel"


@dataclass(frozen=True)
class PushTarget:
    """Where to listen for nudges: the server's WebSocket, or one topic on an MQTT broker."""

    kind: str
    url: str = ""
    tls: bool = False
    host: str = ""
    port: int = 0
    topic_prefix: str = ""


WEBSOCKET = PushTarget("websocket")


def push_target(descriptor: Any) -> PushTarget:
    """The channel a check-in response names (None: the WebSocket); ValueError if unusable."""
    if descriptor is None:
        return WEBSOCKET
    if not isinstance(descriptor, dict):
        raise ValueError("the push descriptor is not an object")
    kind = descriptor.get("kind")
    if kind == "websocket":
        return WEBSOCKET
    if kind != "mqtt":
        raise ValueError(f"unknown push channel kind {str(kind)[:40]!r}")
    url, prefix = descriptor.get("url"), descriptor.get("topic_prefix")
    if not isinstance(url, str) or len(url) > MQTT_MAX_URL:
        raise ValueError("the MQTT URL is missing or too long")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad MQTT URL: {exc}") from None
    if parts.scheme not in MQTT_PORTS or not parts.hostname:
        raise ValueError("the MQTT URL must be mqtt://host[:port] or mqtts://host[:port]")
    if parts.username is not None or parts.path not in ("", "/") or parts.query:
        raise ValueError("the MQTT URL must carry only a host and a port")
    if (
        not isinstance(prefix, str)
        or len(prefix) > MQTT_MAX_PREFIX
        or not MQTT_TOPIC_PREFIX_RE.match(prefix)
    ):
        raise ValueError("the MQTT topic prefix is missing or not a plain topic path")
    return PushTarget(
        "mqtt",
        url=url,
        tls=parts.scheme == "mqtts",
        host=parts.hostname,
        port=port or MQTT_PORTS[parts.scheme],
        topic_prefix=prefix,
    )


def mqtt_tls_context(broker_ca_pem: str, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Trust only the broker's CA (the Custos CA unless told otherwise); show our certificate.

    The device certificate (CN = device id, issued by the Custos CA at enrolment) is what
    the broker checks: it takes the CN as the user name, which its ACL limits to our topic.
    """
    ctx = ssl.create_default_context(cadata=broker_ca_pem)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class _Refused(Exception):
    """The broker said this device may not subscribe."""


class MqttListener:
    """Subscribes to `<prefix>/<device id>` and calls `on_wake` per message (and per connect)."""

    def __init__(
        self,
        device_id: str,
        on_wake: Callable[[], None],
        target: PushTarget,
        *,
        tls: ssl.SSLContext | None,
        keepalive: int = 60,
    ) -> None:
        self.device_id = device_id
        self.on_wake = on_wake
        self.target = target
        self.topic = f"{target.topic_prefix}/{device_id}"
        self.tls = tls if target.tls else None
        self.keepalive = keepalive
        self.connected = False
        self.wakes = 0

    async def run(self) -> None:
        """Connect, listen, reconnect with backoff; until cancelled."""
        from aiomqtt import MqttCodeError

        def refused(exc: Exception) -> str | None:
            rc = getattr(exc, "rc", None)
            if isinstance(exc, _Refused) or (
                isinstance(exc, MqttCodeError) and getattr(rc, "value", rc) in MQTT_REFUSED
            ):
                # refused for good (retired, not in the broker's ACL): the check-in path
                # reports what the server thinks; retrying often only adds noise
                return f"push: the MQTT broker refused this device ({exc}); pausing"
            return None

        await keep_connected(self, refused, "push (MQTT)")

    async def _listen_once(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = MQTT_MAX_PACKET
        async with aiomqtt.Client(
            self.target.host,
            self.target.port,
            identifier=self.device_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            tls_context=self.tls,
            keepalive=self.keepalive,
            timeout=20,
            properties=props,
            max_queued_incoming_messages=16,  # wakes coalesce; a longer queue adds nothing
        ) as client:
            codes = await client.subscribe(self.topic, qos=1)
            if any(getattr(c, "is_failure", False) for c in codes):
                raise _Refused(f"subscription to {self.topic} refused")
            self.connected = True
            log.info("push connected (MQTT %s, topic %s)", self.target.url, self.topic)
            # nudges sent while we were not connected are lost: check in once to catch up
            self._wake()
            async for msg in client.messages:
                if msg.topic.value == self.topic:
                    self._wake()

    def _wake(self) -> None:
        self.wakes += 1
        self.on_wake()


class PushChannel:
    """Runs the listener the server names in its check-in responses (the WebSocket by default).

    The last channel named is kept in the agent's state, so a restarted agent listens in
    the right place before its first check-in. A channel this agent cannot use (an unknown
    kind, a bad URL, unreadable certificate files) falls back to the WebSocket, which
    every Custos server keeps open.
    """

    def __init__(
        self,
        client: DeviceClient,
        on_wake: Callable[[], None],
        *,
        state: AgentState,
        ca_pem: str | None,
        mqtt_ca_pem: str | None = None,
        on_work: Callable[[dict[str, Any]], list[str]] | None = None,
        on_acked: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.client = client
        self.on_wake = on_wake
        self.on_work = on_work  # work delivered on the WebSocket (see PushListener)
        self.on_acked = on_acked
        self.state = state
        self.ca_pem = ca_pem
        self.mqtt_ca_pem = mqtt_ca_pem
        self._changed = asyncio.Event()
        self.listener: PushListener | MqttListener | None = None
        self._raw: Any = None
        self.target = WEBSOCKET
        stored = state.get(PUSH_STATE_KEY)
        if stored:
            with contextlib.suppress(ValueError):
                self._raw = json.loads(stored)
                self.target = push_target(self._raw)

    @property
    def connected(self) -> bool:
        """Whether the current listener holds its connection."""
        return self.listener is not None and self.listener.connected

    def configure(self, descriptor: Any) -> None:
        """Follow the `push` field of a check-in response (cheap when it did not change)."""
        if descriptor == self._raw:
            return
        self._raw = descriptor
        try:
            target = push_target(descriptor)
        except ValueError as exc:
            log.warning("push: cannot use the channel the server named (%s); using WebSocket", exc)
            target = WEBSOCKET
        self.state.set(**{PUSH_STATE_KEY: json.dumps(descriptor)})
        if target != self.target:
            log.info("push: switching to %s", target.url or target.kind)
            self.target = target
            self._changed.set()

    def _websocket(self) -> PushListener:
        return PushListener(
            self.client,
            self.on_wake,
            ca_pem=self.ca_pem,
            on_work=self.on_work,
            on_acked=self.on_acked,
        )

    def _listener(self, target: PushTarget) -> PushListener | MqttListener:
        if target.kind != "mqtt":
            return self._websocket()
        tls = None
        if target.tls:
            broker_ca = self.mqtt_ca_pem or self.ca_pem
            if not broker_ca:
                raise ValueError("no CA to verify the MQTT broker with")
            tls = mqtt_tls_context(
                broker_ca, self.state.dir / "device.pem", self.state.dir / "device.key"
            )
        return MqttListener(self.client.device_id, self.on_wake, target, tls=tls)

    async def run(self) -> None:
        """Listen where told; switch when told otherwise; until cancelled."""
        while True:
            self._changed.clear()
            target = self.target
            try:
                listener = self._listener(target)
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning("push: cannot listen on %s (%s); using WebSocket", target.url, exc)
                listener = self._websocket()
            self.listener = listener
            task = asyncio.create_task(listener.run(), name="push-listener")
            changed = asyncio.create_task(self._changed.wait())
            try:
                await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (task, changed):
                    t.cancel()
                await asyncio.gather(task, changed, return_exceptions=True)
            if changed.cancelled():
                # the listener itself ended (a bug: it loops until cancelled); do not spin
                log.error("push listener stopped unexpectedly; restarting it shortly")
                await asyncio.sleep(backoff_delay(5))
