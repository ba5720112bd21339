"""The agent's push listener against a small local WebSocket server: signing, wakes, refusals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request

from custos import protocol
from custos.agent.push import PUSH_PATH, PushListener

DEVICE = "f" * 32


class FakeClient:
    """What PushListener needs of DeviceClient."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.device_id = DEVICE
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.clock_offset = 0.0


class Server:
    def __init__(self) -> None:
        self.public_key = b""
        self.refuse = False
        self.handshakes = 0
        self.verified = 0
        self.wakes_per_connection = 2

    def check(self, conn: ServerConnection, req: Request) -> Any:
        self.handshakes += 1
        h = req.headers
        ok = req.path == PUSH_PATH and protocol.verify_signature(
            self.public_key,
            h.get(protocol.H_SIGNATURE, ""),
            "GET",
            req.path,
            h.get(protocol.H_TIME, ""),
            h.get(protocol.H_DEVICE, ""),
            b"",
        )
        if self.refuse or not ok:
            return conn.respond(401, json.dumps({"error": "retired", "detail": "no"}))
        self.verified += 1
        return None

    async def handler(self, ws: ServerConnection) -> None:
        for _ in range(self.wakes_per_connection):
            await ws.send('{"type":"wake"}')
            await ws.send("not json")  # ignored
        # then the server goes away: the agent must come back


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, str]]:
    srv = Server()
    async with serve(srv.handler, "127.0.0.1", 0, process_request=srv.check) as s:
        port = s.sockets[0].getsockname()[1]
        yield srv, f"http://127.0.0.1:{port}"


async def _until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_listener_signs_wakes_and_reconnects(server: tuple[Server, str]) -> None:
    srv, url = server
    client = FakeClient(url)
    srv.public_key = client.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    woken: list[float] = []
    listener = PushListener(client, lambda: woken.append(1), ca_pem=None)  # type: ignore[arg-type]
    task = asyncio.create_task(listener.run())
    try:
        # one catch-up wake per connection, then the server's two nudges; then a reconnect
        await _until(lambda: srv.verified >= 2 and len(woken) >= 6)
        assert listener.wakes == len(woken)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_refused_device_stops_trying(server: tuple[Server, str]) -> None:
    srv, url = server
    srv.refuse = True
    woken: list[int] = []
    listener = PushListener(FakeClient(url), lambda: woken.append(1), ca_pem=None)  # type: ignore[arg-type]
    task = asyncio.create_task(listener.run())
    try:
        await _until(lambda: srv.handshakes >= 1)
        await asyncio.sleep(2.5)  # ordinary backoff would have retried by now
        assert srv.handshakes == 1
        assert woken == []
        assert not listener.connected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
