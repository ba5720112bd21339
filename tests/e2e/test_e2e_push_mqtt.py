"""Push through an MQTT broker with real processes: the server publishes, the agent subscribes.

The server runs with CUSTOS_PUSH_BACKEND=mqtt against the shared Mosquitto on
127.0.0.1:1883 (a topic prefix of its own, so parallel runs do not collide).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from e2e_harness import E2E, AgentProcess, free_port, wait_for

pytestmark = [pytest.mark.e2e]
PREFIX = f"custos-test/e2e-{uuid.uuid4().hex[:10]}/wake"
BROKER = "mqtt://127.0.0.1:1883"
WAKE_BUDGET_S = 3.0


@contextmanager
def _watch(topic: str) -> Iterator[queue.Queue[Any]]:
    """A plain MQTT client that collects what is published on `topic`."""
    got: queue.Queue[Any] = queue.Queue()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.put(msg)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "could not subscribe on the shared broker"
        yield got
    finally:
        client.disconnect()
        client.loop_stop()


def _log(agent: AgentProcess) -> str:
    return agent.log_path.read_text(errors="replace")


@pytest.mark.server_env(
    CUSTOS_CHECKIN_INTERVAL_S="60",
    CUSTOS_PUSH_BACKEND="mqtt",
    CUSTOS_MQTT_URL=BROKER,
    CUSTOS_MQTT_TOPIC_PREFIX=PREFIX,
)
def test_a_real_agent_is_woken_through_the_broker(e2e: E2E) -> None:
    agent = e2e.agent("mqtt-1")
    agent.start()
    wait_for("the agent's first check-in", lambda: agent.peek().get("last_checkin"))
    # told by the check-in response, the agent subscribes to its own topic on the broker
    wait_for("the MQTT subscription", lambda: "push connected (MQTT" in _log(agent))
    stored = json.loads(agent.peek()["push_channel"])
    assert stored == {"kind": "mqtt", "url": BROKER, "topic_prefix": PREFIX}
    assert agent.peek()["checkin_interval"] == "60"
    time.sleep(0.5)  # let the catch-up check-in after connecting finish

    topic = f"{PREFIX}/{agent.device_id}"
    with _watch(topic) as published:
        for _ in range(2):
            t0 = time.monotonic()
            cmd = e2e.admin.command(target=agent.device_id, kind="ping")
            run = e2e.admin.wait_run(cmd["id"], timeout=30)
            elapsed = time.monotonic() - t0
            print(f"command to result through MQTT: {elapsed:.3f}s")
            assert run["state"] == "succeeded", run
            assert elapsed < WAKE_BUDGET_S, f"result after {elapsed:.2f}s with a 60 s interval"
            msg = published.get(timeout=5)  # the nudge went through the broker
            assert (msg.topic, json.loads(msg.payload), msg.retain) == (
                topic, {"type": "wake"}, False,
            )  # fmt: skip
    # only once the server told it: never before the switch, nothing after
    assert _log(agent).count("push: switching to " + BROKER) == 1


DEAD_PORT = free_port()


@pytest.mark.server_env(
    CUSTOS_CHECKIN_INTERVAL_S="2",
    CUSTOS_PUSH_BACKEND="mqtt",
    CUSTOS_MQTT_URL=f"mqtt://127.0.0.1:{DEAD_PORT}",
    CUSTOS_MQTT_TOPIC_PREFIX=PREFIX,
)
def test_without_a_broker_work_still_arrives_at_check_in(e2e: E2E) -> None:
    # the server started (the harness waited for /healthz) although nothing listens there
    assert "push: MQTT broker" in e2e.server.log_tail()
    agent = e2e.agent("mqtt-dead")
    agent.start()
    wait_for("the agent's first check-in", lambda: agent.peek().get("last_checkin"))
    wait_for("a failed MQTT connect", lambda: "push (MQTT) failed or lost" in _log(agent))
    cmd = e2e.admin.command(target=agent.device_id, kind="ping")
    run = e2e.admin.wait_run(cmd["id"], timeout=20)
    assert run["state"] == "succeeded", run
    assert agent.running and e2e.server.running
    assert "push connected (MQTT" not in _log(agent)
