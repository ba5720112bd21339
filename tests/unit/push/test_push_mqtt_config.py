"""The MQTT backend's configuration, and the agent's reading of the push descriptor."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from custos.agent.push import WEBSOCKET, PushTarget, push_target
from custos.push.hub import MemoryPush, PostgresNotifyPush, build_push
from custos.push.mqtt import BrokerAddress, MqttPush, check_topic_prefix, parse_mqtt_url
from custos.settings import Settings

PG = "postgresql+asyncpg://u@db.example:5432/custos"


def test_broker_urls():
    assert parse_mqtt_url("mqtt://broker") == BrokerAddress(False, "broker", 1883)
    assert parse_mqtt_url("mqtts://broker") == BrokerAddress(True, "broker", 8883)
    assert parse_mqtt_url("mqtts://10.0.0.5:9883/") == BrokerAddress(True, "10.0.0.5", 9883)
    assert parse_mqtt_url("mqtt://[::1]:1884") == BrokerAddress(False, "::1", 1884)
    for bad, why in (
        ("http://broker", "mqtt://"),
        ("mqtt://", "no host"),
        ("mqtt://user:pw@broker", "credentials"),
        ("mqtt://broker:70000", "Port"),
        ("mqtt://broker/topic", "no path"),
        ("mqtt://broker?x=1", "no path"),
        ("mqtt://" + "b" * 600, "at most"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_mqtt_url(bad)


def test_topic_prefixes():
    assert check_topic_prefix("custos/wake") == "custos/wake"
    assert check_topic_prefix("site-1/custos.prod/wake_up") == "site-1/custos.prod/wake_up"
    for bad in ("", "a/#", "a/+/b", "/a", "a/", "a//b", "$SYS/x", "a b", "a\x00", "x" * 200):
        with pytest.raises(ValueError, match="topic prefix"):
            check_topic_prefix(bad)


def test_settings_refuse_bad_mqtt_configuration_without_echoing_it(tmp_path: Path):
    with pytest.raises(ValidationError) as exc:
        Settings(data_dir=tmp_path, mqtt_url="mqtt://custos:hunter2secret@broker")
    assert "hunter2secret" not in str(exc.value)  # the value may be a secret: never shown
    assert "mqtt_url" in str(exc.value)
    with pytest.raises(ValidationError, match="mqtt_topic_prefix"):
        Settings(data_dir=tmp_path, mqtt_topic_prefix="custos/#")
    with pytest.raises(ValidationError, match="go together"):
        Settings(data_dir=tmp_path, mqtt_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="push_backend"):
        Settings(data_dir=tmp_path, push_backend="kafka")


def test_mqtt_backend_wraps_the_databases_hub(tmp_path: Path):
    s = Settings(
        data_dir=tmp_path,
        push_backend="mqtt",
        mqtt_url="mqtt://10.0.0.5:1883",
        mqtt_device_url="mqtts://mqtt.example.org",
        mqtt_topic_prefix="fleet/wake",
    )
    hub = build_push(s)
    assert isinstance(hub, MqttPush)
    assert isinstance(hub.inner, MemoryPush)
    assert hub.broker == BrokerAddress(False, "10.0.0.5", 1883)
    # devices are told the public URL, the same for all of them
    assert hub.descriptor().model_dump() == {
        "kind": "mqtt",
        "url": "mqtts://mqtt.example.org",
        "topic_prefix": "fleet/wake",
    }
    on_pg = build_push(s.model_copy(update={"db": PG}))
    assert isinstance(on_pg, MqttPush)
    assert isinstance(on_pg.inner, PostgresNotifyPush)
    # the WebSocket backends tell devices nothing (null: keep using the WebSocket)
    assert build_push(Settings(data_dir=tmp_path)).descriptor() is None


def test_unreadable_broker_tls_files_are_a_configuration_error(tmp_path: Path):
    s = Settings(
        data_dir=tmp_path,
        push_backend="mqtt",
        mqtt_url="mqtts://broker",
        mqtt_ca_file=tmp_path / "missing-ca.pem",
    )
    with pytest.raises(ValueError, match="MQTT TLS files"):
        build_push(s)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="MQTT TLS files"):
        build_push(s.model_copy(update={"mqtt_ca_file": tmp_path / "junk.pem"}))


def test_agent_reads_the_descriptor():
    assert push_target(None) is WEBSOCKET
    assert push_target({"kind": "websocket"}) is WEBSOCKET
    assert push_target(
        {"kind": "mqtt", "url": "mqtts://b.example:8884", "topic_prefix": "custos/wake"}
    ) == PushTarget("mqtt", "mqtts://b.example:8884", True, "b.example", 8884, "custos/wake")
    assert push_target({"kind": "mqtt", "url": "mqtt://b", "topic_prefix": "w"}).port == 1883
    for bad in (
        "mqtt",
        {"kind": "carrier-pigeon"},
        {"kind": "mqtt"},
        {"kind": "mqtt", "url": "https://b", "topic_prefix": "w"},
        {"kind": "mqtt", "url": "mqtt://u:p@b", "topic_prefix": "w"},
        {"kind": "mqtt", "url": "mqtt://b:99999", "topic_prefix": "w"},
        {"kind": "mqtt", "url": "mqtt://b", "topic_prefix": "#"},
        {"kind": "mqtt", "url": "mqtt://b", "topic_prefix": 5},
        {"kind": "mqtt", "url": "mqtt://" + "b" * 600, "topic_prefix": "w"},
    ):
        with pytest.raises(ValueError):
            push_target(bad)
