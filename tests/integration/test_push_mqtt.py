"""The MQTT push backend against the shared Mosquitto on 127.0.0.1:1883 (unique prefix per test)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_harness import SHARED_BROKER, unique_prefix, until

from custos.agent.push import WEBSOCKET, MqttListener, PushChannel, PushListener, push_target
from custos.push.hub import Event, MemoryPush, PostgresNotifyPush
from custos.push.mqtt import MqttPush


@pytest.fixture
def prefix() -> str:
    return unique_prefix("int")


@pytest.fixture
def settings(settings: Any, prefix: str) -> Any:
    """The usual test settings, with the MQTT backend on the shared broker."""
    return settings.model_copy(
        update={"push_backend": "mqtt", "mqtt_url": SHARED_BROKER, "mqtt_topic_prefix": prefix}
    )


@pytest.fixture
async def watcher(prefix: str) -> AsyncIterator[aiomqtt.Client]:
    """A plain client subscribed to every topic under the prefix."""
    async with aiomqtt.Client(
        "127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5, timeout=10
    ) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        yield client


async def _collect(client: aiomqtt.Client, n: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            got.append(msg)
            if len(got) >= n:
                break
    return got


async def test_nudges_are_published_per_device(prefix: str, watcher: aiomqtt.Client) -> None:
    inner = MemoryPush()
    hub = MqttPush(inner, SHARED_BROKER, topic_prefix=prefix)
    await hub.start()
    try:
        assert hub.up
        ids = [f"{i:032x}" for i in range(1200)]  # more than one publish batch
        local = hub.subscribe(ids[7])
        t0 = time.perf_counter()
        hub.nudge(ids)
        assert time.perf_counter() - t0 < 0.05  # queued, not sent inline
        assert local.event.is_set()  # this process's WebSocket subscribers hear it too
        msgs = await _collect(watcher, len(ids), timeout=60)
        assert sorted(m.topic.value for m in msgs) == sorted(f"{prefix}/{d}" for d in ids)
        assert {m.payload for m in msgs} == {b'{"type":"wake"}'}
        assert {m.qos for m in msgs} == {1}
        assert not any(m.retain for m in msgs)
        await until(lambda: hub.published == len(ids), what="every PUBACK")

        # events other than work reach the processes but wake nobody
        hub.announce("status", [ids[0]])
        hub.announce("work", [ids[1]])
        (msg,) = await _collect(watcher, 1)
        assert msg.topic.value == f"{prefix}/{ids[1]}"
    finally:
        await hub.stop()
    assert not hub.up


async def test_a_queued_command_is_published_after_commit(
    api: Any, prefix: str, watcher: aiomqtt.Client
) -> None:
    hub = api.services.push
    assert isinstance(hub, MqttPush)
    inner = MemoryPush if api.services.settings.is_sqlite else PostgresNotifyPush
    assert isinstance(hub.inner, inner)  # processes still share events the database's way
    dev = await api.new_device("mqtt-1")
    other = await api.new_device("mqtt-2")
    try:
        # every check-in response names the broker, empty or not
        expected = {"kind": "mqtt", "url": SHARED_BROKER, "topic_prefix": prefix}
        resp = await dev.checkin({})
        assert resp["commands"] == [] and resp["push"] == expected

        await api.command(dev.device_id, kind="ping")
        (msg,) = await _collect(watcher, 1)
        assert msg.topic.value == f"{prefix}/{dev.device_id}"
        assert json.loads(msg.payload) == {"type": "wake"}
        # published after the commit: the woken device finds its work
        resp = await dev.checkin({})
        assert [c["kind"] for c in resp["commands"]] == ["ping"]
        assert resp["push"] == expected

        # a command for the other device is not published on this one's topic
        await api.command(other.device_id, kind="ping")
        (msg,) = await _collect(watcher, 1)
        assert msg.topic.value == f"{prefix}/{other.device_id}"
        # a refused command publishes nothing
        r = await api.post("/api/v1/commands", json={"target": "nope", "kind": "ping"})
        assert r.status_code == 404, r.text
        with pytest.raises(TimeoutError):
            await _collect(watcher, 1, timeout=0.5)
    finally:
        for d in (dev, other):
            await d.aclose()
            d.state.close()


class FakeState:
    """The part of AgentState the push channel uses."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.kv: dict[str, str] = {}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.kv.get(key, default)

    def set(self, **values: str) -> None:
        self.kv.update(values)


class FakeClient:
    base_url = "http://127.0.0.1:9"  # nothing listens: the WebSocket keeps retrying
    device_id = "c" * 32
    clock_offset = 0.0
    key = None


async def test_the_agent_listens_where_the_server_says(prefix: str, tmp_path: Path) -> None:
    hub = MqttPush(MemoryPush(), SHARED_BROKER, topic_prefix=prefix)
    await hub.start()
    state = FakeState(tmp_path)
    woken: list[int] = []
    channel = PushChannel(
        FakeClient(),  # type: ignore[arg-type]
        lambda: woken.append(1),
        state=state,  # type: ignore[arg-type]
        ca_pem=None,
    )
    task = asyncio.create_task(channel.run())
    try:
        # no descriptor yet (an old server): the WebSocket
        await until(lambda: isinstance(channel.listener, PushListener), what="the WebSocket")
        assert channel.target == WEBSOCKET

        descriptor = hub.descriptor().model_dump()
        channel.configure(descriptor)
        await until(lambda: isinstance(channel.listener, MqttListener), what="the switch")
        await until(lambda: channel.connected and woken == [1], what="the MQTT connection")
        listener = channel.listener
        assert isinstance(listener, MqttListener)
        assert listener.topic == f"{prefix}/{FakeClient.device_id}"
        hub.nudge([FakeClient.device_id])
        await until(lambda: len(woken) == 2, what="the nudge")
        hub.nudge(["e" * 32])  # another device's
        channel.configure(dict(descriptor))  # the same descriptor again: nothing changes
        await asyncio.sleep(0.5)
        assert len(woken) == 2
        assert channel.listener is listener
        assert json.loads(state.kv["push_channel"]) == descriptor

        # a restarted agent listens on the broker before its first check-in
        again = PushChannel(FakeClient(), lambda: None, state=state, ca_pem=None)  # type: ignore[arg-type]
        assert again.target == push_target(descriptor)

        # something this agent cannot use, or the field gone: back to the WebSocket
        channel.configure({"kind": "mqtt", "url": "mqtt://h", "topic_prefix": "a/#"})
        await until(lambda: isinstance(channel.listener, PushListener), what="the fallback")
        channel.configure(descriptor)
        await until(lambda: channel.connected, what="MQTT again")
        channel.configure(None)
        await until(lambda: isinstance(channel.listener, PushListener), what="WebSocket again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await hub.stop()


class SlowInner(MemoryPush):
    """An inner hub whose events take their time to come back (as NOTIFY's do)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Event] = []
        self.up = True

    @property
    def coherent(self) -> bool:
        return self.up

    def announce(self, kind: Any, device_ids: Any, at: float | None = None) -> None:
        self.held.append(Event(kind, tuple(device_ids), at))

    def deliver(self) -> None:
        held, self.held = self.held, []
        for event in held:
            self._dispatch(event)


async def test_a_nudge_is_published_at_once_and_only_by_its_sender(
    prefix: str, watcher: aiomqtt.Client
) -> None:
    """No waiting for the event to come back: a woken check-in says `wake` and asks the DB."""
    inner = SlowInner()
    hub = MqttPush(inner, SHARED_BROKER, topic_prefix=prefix)
    heard: list[Event] = []
    hub.listen(heard.append)  # e.g. a work index
    await hub.start()
    try:
        a, b = "a" * 32, "b" * 32
        hub.nudge([a])
        (msg,) = await _collect(watcher, 1, timeout=2)
        assert msg.topic.value == f"{prefix}/{a}"
        assert heard == []  # published before this process's own event came back
        inner.deliver()
        assert [e.device_ids for e in heard] == [(a,)]
        with pytest.raises(TimeoutError):
            await _collect(watcher, 1, timeout=0.4)  # the event is not published again

        # another process's event is not ours to publish
        inner._dispatch(Event("work", (b,)))
        with pytest.raises(TimeoutError):
            await _collect(watcher, 1, timeout=0.4)
    finally:
        await hub.stop()
