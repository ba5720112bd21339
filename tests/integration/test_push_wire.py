"""The bare push WebSocket protocol (custos.push.wire) under a real uvicorn, on real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from custos import protocol
from custos.push.wire import PushWireProtocol
from served import Served, eventually

pytestmark = pytest.mark.asyncio
PUSH = protocol.DEVICE_API + "/push"


@pytest.fixture
async def served(api: Any) -> AsyncIterator[Served]:
    srv = Served(api.app, ws=PushWireProtocol)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _signed(dev: Any, target: str) -> dict[str, str]:
    return protocol.sign_request(
        dev.identity.key, dev.device_id, "GET", target, b"", int(time.time())
    )


async def _open(served: Served, dev: Any, deliver: bool = False) -> Any:
    target = PUSH + ("?deliver=1" if deliver else "")
    return await connect(
        "ws" + served.url[4:] + target,
        additional_headers=_signed(dev, target),
        ping_interval=None,
        open_timeout=5,
        close_timeout=2,
    )


async def _raw(served: Served, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(request)
    await writer.drain()
    return reader, writer


def _upgrade(target: str, headers: dict[str, str], key: str | None = None) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        "host: test",
        "upgrade: websocket",
        "connection: Upgrade",
        f"sec-websocket-key: {key}",
        "sec-websocket-version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def _accepted(served: Served, dev: Any, deliver: bool = False) -> Any:
    target = PUSH + ("?deliver=1" if deliver else "")
    reader, writer = await _raw(served, _upgrade(target, _signed(dev, target)))
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


async def test_refusals_are_http_errors_with_reasons(api: Any, served: Served) -> None:
    dev = await api.new_device("w1")
    # no signature
    with pytest.raises(InvalidStatus) as err:
        await connect("ws" + served.url[4:] + PUSH, open_timeout=5)
    resp = err.value.response
    assert resp.status_code == 401
    assert json.loads(resp.body)["error"] == "unsigned"
    assert float(resp.headers[protocol.H_SERVER_TIME]) > 0
    # signed for another path (the signature covers the path and query)
    with pytest.raises(InvalidStatus) as err:
        await connect(
            "ws" + served.url[4:] + PUSH + "?deliver=1",
            additional_headers=_signed(dev, PUSH),
            open_timeout=5,
        )
    assert err.value.response.status_code == 401
    # not the push path, a bad key, a wrong version
    for request, status in [
        (_upgrade("/api/device/v1/other", {}), b"404"),
        (_upgrade(PUSH, _signed(dev, PUSH), key="short"), b"400"),
        (_upgrade(PUSH, _signed(dev, PUSH)).replace(b"version: 13", b"version: 8"), b"4"),
    ]:
        reader, writer = await _raw(served, request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.split(b" ")[1].startswith(status), head
        assert b"application/json" in head
        assert await asyncio.wait_for(reader.read(), 5)  # the JSON body, then EOF
        writer.close()
    # a retired device is refused at the upgrade
    r = await api.post(f"/api/v1/devices/{dev.device_id}/retire")
    assert r.status_code in (200, 204), r.text
    with pytest.raises(InvalidStatus) as err:
        await _open(served, dev)
    assert err.value.response.status_code == 401


async def test_a_nudge_reaches_the_device_and_only_it(api: Any, served: Served) -> None:
    a, b = await api.new_device("wa"), await api.new_device("wb")
    ws_a, ws_b = await _open(served, a), await _open(served, b)
    try:
        await eventually(lambda: len(api.services.push_sockets.open) == 2, 5)
        sent = time.monotonic()
        await api.command(a.device_id, kind="ping")
        assert json.loads(await asyncio.wait_for(ws_a.recv(), 2)) == {"type": "wake"}
        assert time.monotonic() - sent < 1.0
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws_b.recv(), 0.5)
        # the client's pings are answered
        await asyncio.wait_for(await ws_a.ping(), 2)
    finally:
        await ws_a.close()
        await ws_b.close()
    await eventually(lambda: not api.services.push_sockets.open, 5)


async def test_delivery_and_acknowledgement_on_the_socket(api: Any, served: Served) -> None:
    dev = await api.new_device("wd")
    ws = await _open(served, dev, deliver=True)
    try:
        cmd = await api.command(dev.device_id, kind="ping")
        frame = json.loads(await asyncio.wait_for(ws.recv(), 3))
        assert frame["type"] == "checkin"
        run_ids = [c["run_id"] for c in frame["response"]["commands"]]
        assert run_ids == [cmd["runs"][0]["id"]]
        # acknowledged on the socket, in two fragments
        ack = orjson.dumps({"type": "ack", "run_ids": run_ids}).decode()
        await ws.send(part for part in (ack[:10], ack[10:]))

        async def acked() -> bool:
            c = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
            return bool(c["runs"][0]["state"] == "acked")

        await eventually(acked, 5)
        # acknowledged runs are not handed out again at a check-in
        resp = await dev.checkin({"agent_version": "t", "results": [], "acks": []})
        assert resp["commands"] == []
    finally:
        await ws.close()


async def test_a_fan_out_is_served_in_shared_batches(api: Any, served: Served) -> None:
    # one command to several connected devices: the sockets are served by a few batched
    # check-ins (not a task and a check-in each), plain sockets get a wake, deliver sockets
    # their own run, and the acknowledgements are batched the same way
    sockets = api.services.push_sockets
    sockets.batch = 3
    devs = [await api.new_device(f"fan{i}") for i in range(7)]
    plain = [await _open(served, d) for d in devs[:2]]
    delivering = [await _open(served, d, deliver=True) for d in devs[2:]]
    try:
        await eventually(lambda: len(sockets.open) == 7, 5)
        before = sockets.chunks
        cmd = await api.command(",".join(d.device_id for d in devs), kind="ping")
        run_of = {r["device_id"]: r["id"] for r in cmd["runs"]}
        for ws in plain:
            assert json.loads(await asyncio.wait_for(ws.recv(), 3)) == {"type": "wake"}
        for dev, ws in zip(devs[2:], delivering, strict=True):
            frame = json.loads(await asyncio.wait_for(ws.recv(), 3))
            assert frame["type"] == "checkin"
            assert [c["run_id"] for c in frame["response"]["commands"]] == [run_of[dev.device_id]]
        # 7 sockets in chunks of at most 3: 2 or 3 chunks, 5 deliveries in at most 3 check-ins
        assert 1 <= sockets.chunks - before <= 3
        before = sockets.chunks
        for dev, ws in zip(devs[2:], delivering, strict=True):
            await ws.send(
                orjson.dumps({"type": "ack", "run_ids": [run_of[dev.device_id]]}).decode()
            )

        async def all_acked() -> bool:
            c = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
            return bool(c["counts"] == {"acked": 5, "queued": 2})

        await eventually(all_acked, 5)
        assert 1 <= sockets.chunks - before <= 5
        # nothing more comes down a socket whose work is acknowledged
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(delivering[0].recv(), 0.3)
    finally:
        for ws in plain + delivering:
            await ws.close()
    await eventually(lambda: not sockets.open, 5)


async def test_protocol_violations_close_with_the_right_code(api: Any, served: Served) -> None:
    dev = await api.new_device("wp")
    cases = [
        (bytes((0x81, 5)) + b"hello", 1002),  # not masked
        (_masked(0x1, b"x" * 40_000), 1009),  # over MAX_FRAME
        (_masked(0x1, b"\xff\xfe"), 1007),  # not UTF-8
        (_masked(0x0, b"orphan"), 1002),  # continuation without a message
        (_masked(0x9, b"p", fin=False), 1002),  # fragmented control frame
    ]
    for data, code in cases:
        reader, writer = await _accepted(served, dev, deliver=True)
        writer.write(data)
        await writer.drain()
        opcode, payload = await _read_frame(reader)
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == code, (data[:4], payload)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hangs up
        writer.close()


async def test_ping_close_and_keepalive(api: Any, served: Served) -> None:
    dev = await api.new_device("wk")
    reader, writer = await _accepted(served, dev)
    writer.write(_masked(0x9, b"hi"))
    assert await _read_frame(reader) == (0xA, b"hi")
    writer.write(_masked(0x8, struct.pack("!H", 1000)))
    opcode, payload = await _read_frame(reader)
    assert opcode == 0x8 and payload == struct.pack("!H", 1000)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()

    # a peer that answers nothing is dropped at the second sweep; a live one stays
    sockets = api.services.push_sockets
    silent_r, silent_w = await _accepted(served, dev)
    live = await _open(served, await api.new_device("wl"))
    try:
        await eventually(lambda: len(sockets.open) == 2, 5)
        await sockets.sweep()
        assert await _read_frame(silent_r) == (0x9, b"")  # pinged
        await asyncio.sleep(0.3)  # the websockets client answers its ping
        await sockets.sweep()
        assert await asyncio.wait_for(silent_r.read(), 5) == b""  # aborted
        await eventually(lambda: len(sockets.open) == 1, 5)
        assert sockets.dropped == 1
        await asyncio.wait_for(await live.ping(), 2)
    finally:
        silent_w.close()
        await live.close()


async def test_server_shutdown_closes_with_1012(api: Any, served: Served) -> None:
    dev = await api.new_device("ws")
    ws = await _open(served, dev)
    await eventually(lambda: len(api.services.push_sockets.open) == 1, 5)
    started = time.monotonic()
    await served.stop()
    with pytest.raises(ConnectionClosed) as err:
        await asyncio.wait_for(ws.recv(), 5)
    assert err.value.rcvd is not None and err.value.rcvd.code == 1012
    assert time.monotonic() - started < 3
