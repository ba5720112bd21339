"""Push wake-ups with real processes: a real agent on a 60 s interval gets new work in seconds."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from e2e_harness import E2E, AgentProcess, ServerProcess, signed_headers, wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from custos import protocol

pytestmark = [pytest.mark.e2e, pytest.mark.server_env(CUSTOS_CHECKIN_INTERVAL_S="60")]
PUSH = protocol.DEVICE_API + "/push"
WAKE_BUDGET_S = 3.0


def _push_connected(agent: AgentProcess, times: int = 1) -> bool:
    return agent.log_path.read_text(errors="replace").count("push connected") >= times


def _start_with_push(agent: AgentProcess) -> None:
    agent.start()
    wait_for("the agent's first check-in", lambda: agent.peek().get("last_checkin"))
    wait_for("the agent's push connection", lambda: _push_connected(agent))
    time.sleep(0.5)  # let the catch-up check-in after connecting finish


def _command_round_trip(admin: Any, device_id: str) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    cmd = admin.command(target=device_id, kind="ping")
    run = admin.wait_run(cmd["id"], timeout=30)
    elapsed = time.monotonic() - t0
    print(f"command to result: {elapsed:.3f}s")
    return elapsed, run


def test_a_real_agent_is_woken_at_once(e2e: E2E) -> None:
    agent = e2e.agent("push-1")
    _start_with_push(agent)
    assert agent.peek()["checkin_interval"] == "60"

    for _ in range(2):
        elapsed, run = _command_round_trip(e2e.admin, agent.device_id)
        assert run["state"] == "succeeded", run
        assert elapsed < WAKE_BUDGET_S, f"result after {elapsed:.2f}s with a 60 s interval"

    # with push off, the same agent waits for its interval
    agent.stop()
    agent.env["CUSTOS_AGENT_PUSH"] = "0"
    before = agent.log_path.read_text(errors="replace").count("push connected")
    last = agent.peek()["last_checkin"]
    agent.start()
    wait_for("a check-in without push", lambda: agent.peek().get("last_checkin") != last)
    cmd = e2e.admin.command(target=agent.device_id, kind="ping")
    time.sleep(WAKE_BUDGET_S)
    assert e2e.admin.run_of(cmd["id"])["state"] == "queued"  # type: ignore[index]
    assert agent.log_path.read_text(errors="replace").count("push connected") == before


def test_push_comes_back_after_a_server_crash(e2e: E2E) -> None:
    agent = e2e.agent("push-r")
    _start_with_push(agent)
    e2e.server.kill()
    e2e.server.start()
    # the agent reconnects on its own (backoff from 1 s) and checks in to catch up
    wait_for("the push connection to come back", lambda: _push_connected(agent, 2), timeout=30)
    time.sleep(0.5)
    elapsed, run = _command_round_trip(e2e.admin, agent.device_id)
    assert run["state"] == "succeeded", run
    assert elapsed < WAKE_BUDGET_S, f"result after {elapsed:.2f}s after the restart"


@contextmanager
def _socket(e2e: E2E, headers: dict[str, str]) -> Iterator[ClientConnection]:
    ctx = ssl.create_default_context(cafile=str(e2e.root / "ca.pem"))
    url = e2e.url.replace("https://", "wss://") + PUSH
    with connect(url, ssl=ctx, additional_headers=headers, open_timeout=10) as ws:
        yield ws


def _signed(agent: AgentProcess, key: Any = None) -> dict[str, str]:
    h = signed_headers(key or agent.device_key(), agent.device_id, b"", path=PUSH, method="GET")
    h.pop("content-type")
    return h


def test_push_is_authenticated_and_private(e2e: E2E) -> None:
    a, b = e2e.agent("push-a"), e2e.agent("push-b")

    # unsigned, signed with another device's key, signed for another path: refused
    for headers in (
        {},
        _signed(a, key=b.device_key()),
        {
            k: v
            for k, v in signed_headers(a.device_key(), a.device_id, b"", method="GET").items()
            if k != "content-type"
        },
    ):
        with pytest.raises(InvalidStatus) as exc, _socket(e2e, headers):
            pass
        assert exc.value.response.status_code == 401
        assert set(json.loads(exc.value.response.body)) == {"error", "detail"}

    with _socket(e2e, _signed(a)) as ws_a, _socket(e2e, _signed(b)) as ws_b:
        e2e.admin.command(target=b.device_id, kind="ping")
        assert json.loads(ws_b.recv(timeout=WAKE_BUDGET_S)) == {"type": "wake"}
        # A hears nothing of B's work
        with pytest.raises(TimeoutError):
            ws_a.recv(timeout=1.0)
        e2e.admin.command(target=a.device_id, kind="ping")
        assert json.loads(ws_a.recv(timeout=WAKE_BUDGET_S)) == {"type": "wake"}
        with pytest.raises(TimeoutError):
            ws_b.recv(timeout=0.5)

    # retiring a device hangs up its open channel at once, and it cannot open one again
    with _socket(e2e, _signed(b)) as ws_b:
        r = e2e.admin.post(f"/api/v1/devices/{b.device_id}/retire")
        assert r.status_code == 200, r.text
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # at most one last wake before the close
                ws_b.recv(timeout=WAKE_BUDGET_S)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert closed.value.rcvd.reason == "retired"
    with pytest.raises(InvalidStatus) as exc, _socket(e2e, _signed(b)):
        pass
    assert exc.value.response.status_code == 401
    assert json.loads(exc.value.response.body)["error"] == "retired"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # several processes: PostgreSQL
def test_nudge_crosses_server_processes(e2e: E2E) -> None:
    from e2e_harness import Admin

    # a second process on the same database (same CA passphrase), another port
    data2 = e2e.root / "server2-data"
    data2.mkdir()
    shutil.copy(e2e.server.data_dir / "ca-passphrase", data2 / "ca-passphrase")
    second = ServerProcess(e2e.server.db_url, data2, e2e.root / "server2.log")
    second.env.update(CUSTOS_CHECKIN_INTERVAL_S="60")
    e2e.logs.append(("second custos server output", second.log_path))
    admin2: Admin | None = None
    try:
        second.start()
        admin2 = Admin(second.url, e2e.root / "ca.pem")
        admin2.login()
        agent = e2e.agent("push-x")  # enrolled with, and connected to, server 1
        _start_with_push(agent)
        for _ in range(2):
            elapsed, run = _command_round_trip(admin2, agent.device_id)
            assert run["state"] == "succeeded", run
            assert elapsed < WAKE_BUDGET_S, f"result after {elapsed:.2f}s via the other server"
    finally:
        if admin2 is not None:
            admin2.close()
        # the agent holds a connection to server 1 only; server 2 can stop now
        second.stop()


def test_work_is_delivered_and_acknowledged_on_the_socket(e2e: E2E) -> None:
    """?deliver=1: the command comes down the socket and is acknowledged up it."""
    a, b = e2e.agent("deliver-a"), e2e.agent("deliver-b")
    path = PUSH + "?deliver=1"

    def headers(agent: AgentProcess) -> dict[str, str]:
        h = signed_headers(agent.device_key(), agent.device_id, b"", path=path, method="GET")
        h.pop("content-type")
        return h

    ctx = ssl.create_default_context(cafile=str(e2e.root / "ca.pem"))
    url = e2e.url.replace("https://", "wss://") + path
    with (
        connect(url, ssl=ctx, additional_headers=headers(a), open_timeout=10) as ws_a,
        connect(url, ssl=ctx, additional_headers=headers(b), open_timeout=10) as ws_b,
    ):
        cmd_b = e2e.admin.command(target=b.device_id, kind="ping")
        frame = json.loads(ws_b.recv(timeout=WAKE_BUDGET_S))
        assert frame["type"] == "checkin"
        (delivered,) = frame["response"]["commands"]
        assert delivered["kind"] == "ping"
        run_b = delivered["run_id"]
        assert e2e.admin.wait_run(cmd_b["id"], states=("sent",), timeout=5)["id"] == run_b
        with pytest.raises(TimeoutError):
            ws_a.recv(timeout=0.5)  # A hears nothing of B's work

        # rubbish and another device's run id change nothing; B's own ack does
        ws_b.send("not json")
        ws_b.send(json.dumps({"type": "ack", "run_ids": ["nope"]}))
        ws_a.send(json.dumps({"type": "ack", "run_ids": [run_b]}))
        time.sleep(0.5)
        assert e2e.admin.run_of(cmd_b["id"])["state"] == "sent"  # type: ignore[index]
        ws_b.send(json.dumps({"type": "ack", "run_ids": [run_b]}))
        assert e2e.admin.wait_run(cmd_b["id"], states=("acked",), timeout=5)["id"] == run_b

    # a real agent takes its work from the socket: the run is acknowledged without the
    # agent's own check-in loop (its interval is 60 s), then succeeds
    _start_with_push(a)
    elapsed, run = _command_round_trip(e2e.admin, a.device_id)
    assert run["state"] == "succeeded", run
    assert elapsed < WAKE_BUDGET_S
    assert "delivered on the socket" in a.log_path.read_text(errors="replace")


def _silent_push_socket(e2e: E2E, agent: AgentProcess) -> ssl.SSLSocket:
    """A device that upgrades to a push socket and then never reads again (a stuck peer)."""
    ctx = ssl.create_default_context(cafile=str(e2e.root / "ca.pem"))
    port = int(e2e.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {PUSH} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in _signed(agent).items()),
    ]
    tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return tls


def test_sigterm_does_not_wait_for_peers_that_never_close(e2e: E2E) -> None:
    """A stuck TLS peer cannot hold a restart for the graceful-shutdown timeout (10 s)."""
    agent = e2e.agent("push-stuck")
    stuck = [_silent_push_socket(e2e, agent) for _ in range(3)]
    # and an idle keep-alive HTTP connection
    ctx = ssl.create_default_context(cafile=str(e2e.root / "ca.pem"))
    idle = httpx.Client(verify=ctx)
    assert idle.get(e2e.url + "/healthz").status_code == 200
    try:
        server = e2e.server
        assert server.proc is not None
        t0 = time.monotonic()
        server.proc.terminate()
        server.proc.wait(15)
        elapsed = time.monotonic() - t0
        # uvicorn re-raises the SIGTERM it caught once it has shut down
        assert server.proc.returncode in (0, -15), server.log_tail()
        assert elapsed < 5.0, f"shutdown took {elapsed:.1f}s"
        assert "timeout graceful shutdown exceeded" not in server.log_tail()
        assert "Traceback" not in server.log_tail()
    finally:
        idle.close()
        for s in stuck:
            s.close()
    server.start()  # the fixture expects a running server
