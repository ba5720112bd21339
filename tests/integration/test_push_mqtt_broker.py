"""The MQTT push channel against a Mosquitto configured as docs/operations.md says.

Own broker per test: a TLS listener for devices (client certificate from the Custos CA
required, its CN = device id taken as the user name and client id, ACL `pattern read
<prefix>/%u`) and a TLS + password listener for the server. Proves that a device hears its
own nudges only, that a device cannot forge nudges, and that the hub and the agent ride out
a broker that goes away.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_harness import (
    DeviceFiles,
    Mosquitto,
    free_port,
    issue_device,
    password_file,
    unique_prefix,
    until,
)

from custos.agent.push import MqttListener, mqtt_tls_context, push_target
from custos.devices.ca import CertificateAuthority
from custos.push.hub import MemoryPush, build_push
from custos.push.mqtt import MqttPush
from custos.settings import Settings

SERVER_USER = "custos-server"


class SecureBroker:
    """The documented two-listener Mosquitto, with a Custos CA and two enrolled devices."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertificateAuthority.create("Custos test CA")
        self.ca_file = root / "ca.pem"
        self.ca_file.write_text(self.ca.cert_pem)
        cert, key = self.ca.issue_server_cert(["127.0.0.1", "localhost"])
        (root / "broker.pem").write_text(cert)
        (root / "broker.key").write_text(key)
        self.prefix = unique_prefix("acl")
        self.password = secrets.token_urlsafe(16)
        (root / "custos.acl").write_text(
            f"# Custos server processes publish nudges\n"
            f"user {SERVER_USER}\n"
            f"topic write {self.prefix}/#\n\n"
            f"# a device (user name = certificate CN = device id) reads its own topic only\n"
            f"pattern read {self.prefix}/%u\n"
        )
        password_file(root / "custos.passwd", {SERVER_USER: self.password})
        self.device_port, self.server_port = free_port(), free_port()
        self.a, self.b, self.c = (issue_device(self.ca, root / "devices") for _ in range(3))
        self.broker = Mosquitto(root / "broker")

    def config(self) -> str:
        r = self.root
        return f"""
per_listener_settings true

# devices: TLS with a client certificate from the Custos CA
listener {self.device_port} 127.0.0.1
cafile {r}/ca.pem
certfile {r}/broker.pem
keyfile {r}/broker.key
require_certificate true
use_identity_as_username true
use_username_as_clientid true
acl_file {r}/custos.acl

# Custos servers: TLS, user name and password
listener {self.server_port} 127.0.0.1
cafile {r}/ca.pem
certfile {r}/broker.pem
keyfile {r}/broker.key
allow_anonymous false
password_file {r}/custos.passwd
acl_file {r}/custos.acl
"""

    def start(self) -> None:
        self.broker.start(self.config(), [self.device_port, self.server_port])

    def settings(self, tmp: Path) -> Settings:
        return Settings(
            data_dir=tmp / "data",
            push_backend="mqtt",
            mqtt_url=f"mqtts://127.0.0.1:{self.server_port}",
            mqtt_device_url=f"mqtts://localhost:{self.device_port}",
            mqtt_topic_prefix=self.prefix,
            mqtt_username=SERVER_USER,
            mqtt_password=self.password,
            mqtt_ca_file=self.ca_file,
        )

    def device_tls(self, dev: DeviceFiles) -> ssl.SSLContext:
        return mqtt_tls_context(self.ca.cert_pem, dev.cert, dev.key)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    world = SecureBroker(tmp_path)
    world.start()
    try:
        yield world
    finally:
        world.broker.stop()


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def _run(listener: MqttListener) -> asyncio.Task[None]:
    task = asyncio.create_task(listener.run())
    await until(lambda: listener.connected, what="the device's MQTT connection")
    await until(lambda: listener.wakes == 1, what="the catch-up wake after connecting")
    return task


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_device_hears_only_its_own_nudges(secure: SecureBroker, tmp_path: Path) -> None:
    hub = build_push(secure.settings(tmp_path))
    assert isinstance(hub, MqttPush)
    await hub.start()
    try:
        assert hub.up, secure.broker.log()
        # what check-ins tell devices; the agent parses it as it would from a response
        target = push_target(hub.descriptor().model_dump())
        assert (target.kind, target.tls, target.host, target.port) == (
            "mqtt", True, "localhost", secure.device_port,
        )  # fmt: skip

        # the real agent listeners, authenticated by their device certificates
        a = MqttListener(secure.a.device_id, Woken(), target, tls=secure.device_tls(secure.a))
        b = MqttListener(secure.b.device_id, Woken(), target, tls=secure.device_tls(secure.b))
        tasks = [await _run(a), await _run(b)]
        try:
            hub.nudge([secure.a.device_id])
            await until(lambda: a.wakes == 2, what="A's nudge")
            hub.nudge([secure.b.device_id])
            await until(lambda: b.wakes == 2, what="B's nudge")
            await asyncio.sleep(0.5)
            assert (a.wakes, b.wakes) == (2, 2)

            # another device tries to forge a nudge for B: devices have no write access
            async with aiomqtt.Client(
                "localhost", secure.device_port, tls_context=secure.device_tls(secure.c),
                protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
            ) as forger:  # fmt: skip
                await forger.publish(f"{secure.prefix}/{secure.b.device_id}", b"{}", qos=1)
            await asyncio.sleep(0.5)
            assert b.wakes == 2
        finally:
            await _stop(*tasks)

        # A, with its own certificate, subscribes to every device's topic (and to everything)
        async with aiomqtt.Client(
            "localhost", secure.device_port, tls_context=secure.device_tls(secure.a),
            protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
        ) as snoop:  # fmt: skip
            await snoop.subscribe(f"{secure.prefix}/#", qos=1)
            await snoop.subscribe("#", qos=1)
            hub.nudge([secure.b.device_id])
            hub.nudge([secure.a.device_id])  # published after B's
            heard: list[str] = []
            async with asyncio.timeout(5):
                async for msg in snoop.messages:
                    heard.append(msg.topic.value)
                    if msg.topic.value.endswith(secure.a.device_id):
                        break
            with pytest.raises(TimeoutError):  # and nothing more comes
                async with asyncio.timeout(0.5):
                    async for msg in snoop.messages:
                        heard.append(msg.topic.value)
            # (one copy per matching subscription: MQTT 5 brokers may deliver overlaps twice)
            assert heard and set(heard) == {f"{secure.prefix}/{secure.a.device_id}"}
    finally:
        await hub.stop()


async def test_clients_without_a_custos_certificate_are_refused(secure: SecureBroker) -> None:
    async def connect(port: int, tls: ssl.SSLContext, **kw: Any) -> None:
        async with aiomqtt.Client(
            "127.0.0.1", port, tls_context=tls, protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
            **kw,
        ):  # fmt: skip
            pass

    trust = ssl.create_default_context(cafile=str(secure.ca_file))
    # no client certificate at all
    with pytest.raises(aiomqtt.MqttError):
        await connect(secure.device_port, trust)
    # a certificate from another CA, even with a real device's id as its CN
    rogue_ca = CertificateAuthority.create("Rogue CA")
    rogue = issue_device(rogue_ca, secure.root / "rogue")
    ctx = ssl.create_default_context(cafile=str(secure.ca_file))
    ctx.load_cert_chain(str(rogue.cert), str(rogue.key))
    with pytest.raises(aiomqtt.MqttError):
        await connect(secure.device_port, ctx)
    # the server listener: no password, a wrong one
    with pytest.raises(aiomqtt.MqttCodeError):
        await connect(secure.server_port, trust)
    with pytest.raises(aiomqtt.MqttCodeError):
        await connect(secure.server_port, trust, username=SERVER_USER, password="wrong")
    # while a real device gets in
    await connect(secure.device_port, secure.device_tls(secure.a))


async def test_hub_and_agent_ride_out_a_broker_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker down at start: the hub starts anyway, keeps nudges, publishes them once it is up."""
    port = free_port()
    broker = Mosquitto(tmp_path / "plain")
    config = f"listener {port} 127.0.0.1\nallow_anonymous true\n"
    prefix = unique_prefix("restart")
    hub = MqttPush(MemoryPush(), f"mqtt://127.0.0.1:{port}", topic_prefix=prefix)
    device = "d" * 32
    woken = Woken()
    listener = MqttListener(device, woken, push_target(hub.descriptor().model_dump()), tls=None)
    task: asyncio.Task[None] | None = None
    caplog.set_level(logging.WARNING, logger="custos.push.mqtt")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await hub.start()  # nothing listens: start gives up waiting at once
        assert loop.time() - t0 < 3
        assert not hub.up
        assert any("MQTT broker" in r.getMessage() for r in caplog.records)
        local = hub.subscribe(device)
        hub.nudge([device])  # never blocks, never raises; kept for later
        assert local.event.is_set()  # WebSocket subscribers of this process are woken at once
        assert hub.published == 0
        task = asyncio.create_task(listener.run())

        broker.start(config, [port])
        await until(lambda: hub.up and hub.published == 1, 40, "the hub to publish the backlog")
        await until(lambda: listener.connected, 40, "the agent to reconnect")
        before = woken.count
        hub.nudge([device])
        await until(lambda: woken.count == before + 1, what="a nudge through the broker")

        # the broker dies: both notice, come back, and carry on
        broker.stop()
        await until(lambda: not hub.up and not listener.connected, what="noticing the outage")
        hub.nudge([device])
        broker.start(config, [port])
        await until(lambda: hub.up and hub.published == 3, 40, "the hub to reconnect")
        await until(lambda: listener.connected, 40, "the agent to reconnect again")
        assert hub.connects == 2
    finally:
        if task is not None:
            await _stop(task)
        await hub.stop()
        broker.stop()
