"""Webhooks through the real `custos` CLI against a real server process, to a real receiver."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, clean_env, wait_for

from custos.webhooks.service import verify_signature
from webhook_receiver import Answer, Received, Receiver

# the CLI is what is tested here: one database is enough (the services run on both elsewhere)
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120
    )


def _signed(secret: str, req: Received) -> bool:
    h = req.headers
    return verify_signature(
        secret.encode(), h["x-custos-timestamp"], req.body, h["x-custos-signature"]
    )


def test_webhook_commands_and_the_servers_delivery_job(e2e: E2E, tmp_path: Path) -> None:
    env = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "cli"), COLUMNS="200")
    login = _cli(
        env,
        *("login", e2e.url, "--user", "admin", "--password-stdin"),
        *("--ca-fingerprint", e2e.fingerprint),
        stdin=ADMIN_PASSWORD + "\n",
    )
    assert login.returncode == 0, login.stderr
    with Receiver() as rx:
        added = _cli(
            env,
            *("webhook", "add", "cmdb", rx.url + "/hook"),
            *("--event", "device.enrolled", "--event", "ping"),
        )
        assert added.returncode == 0, added.stderr
        secret = added.stdout.strip()  # stdout carries the secret alone
        assert secret.startswith("whsec_") and "shown only now" in added.stderr
        bad = _cli(env, "webhook", "add", "x", rx.url, "--event", "device.melted")
        assert bad.returncode == 1 and "unknown event" in bad.stderr
        bad = _cli(env, "webhook", "add", "y", "gopher://h/", "--event", "ping")
        assert bad.returncode == 1 and "http://" in bad.stderr

        listed = _cli(env, "webhook", "ls", "--json")
        hooks = json.loads(listed.stdout)
        assert [h["name"] for h in hooks] == ["cmdb"] and secret not in listed.stdout
        assert "cmdb" in _cli(env, "webhook", "ls").stdout

        ok = _cli(env, "webhook", "test", "cmdb")
        assert ok.returncode == 0 and "delivered" in ok.stderr and "HTTP 200" in ok.stderr
        ping = rx.requests[-1]
        assert ping.headers["x-custos-event"] == "ping" and _signed(secret, ping)

        rx.script = [Answer(500, b"receiver broke")]
        failed = _cli(env, "webhook", "test", "cmdb", "--json")
        assert failed.returncode == 1
        failed_id = json.loads(failed.stdout)["id"]
        assert json.loads(failed.stdout)["error"] == "HTTP 500"
        again = _cli(env, "webhook", "redeliver", failed_id)
        assert again.returncode == 0 and "delivered" in again.stderr, again.stderr

        # a real agent enrols; the server's own job sends device.enrolled within seconds
        agent = e2e.agent("kiosk-9")
        wait_for(
            "device.enrolled delivery",
            lambda: any(r.headers["x-custos-event"] == "device.enrolled" for r in rx.requests),
        )
        enrolled = next(r for r in rx.requests if r.headers["x-custos-event"] == "device.enrolled")
        assert _signed(secret, enrolled)
        assert json.loads(enrolled.body)["data"]["device_id"] == agent.device_id

        log = json.loads(_cli(env, "webhook", "deliveries", "cmdb", "--json").stdout)
        events = [d["event"] for d in log]
        assert events.count("ping") == 3 and events.count("device.enrolled") == 1
        redelivered = next(d for d in log if d["redelivery_of"] == failed_id)
        assert redelivered["state"] == "delivered"
        table = _cli(env, "webhook", "deliveries", "cmdb")
        assert table.returncode == 0 and failed_id in table.stdout and "HTTP 500" in table.stdout

        assert _cli(env, "webhook", "rm", "cmdb").returncode == 0
        assert json.loads(_cli(env, "webhook", "ls", "--json").stdout) == []
        gone = _cli(env, "webhook", "deliveries", "cmdb")
        assert gone.returncode == 1 and "no webhook named" in gone.stderr
