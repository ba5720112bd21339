"""The baseline: a bare Starlette hello-world, served exactly as `custos server` serves Custos.

Same uvicorn settings as src/custos/cli/server_cmd.py: uvloop, httptools, `--workers N`
processes, warning-level logging, no access log, and (unless --insecure-http) TLS with the
same certificate files. It answers every path and method, so the load generator can send it
the very requests it sends Custos, and accepts a WebSocket on the push path that it just holds
open (the baseline of the push benchmarks).

    python bench/hello.py --port 9000 --insecure-http
    python bench/hello.py --port 9000 --certfile var/tls/server.pem --keyfile var/tls/server.key

With --floor the push path is not a Starlette WebSocket but `Floor`, a protocol that answers
any upgrade with 101 and then holds the socket doing nothing: what one idle (TLS) WebSocket
costs in this Python, uvicorn and uvloop at the very least (the floor of B4).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def hello(_request: Request) -> PlainTextResponse:
    """Hello, world."""
    return PlainTextResponse("Hello, world!")


async def hold(ws: WebSocket) -> None:
    """Accept any WebSocket and keep it open until the client leaves."""
    await ws.accept()
    try:
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    except WebSocketDisconnect:
        pass


class Floor(asyncio.Protocol):
    """uvicorn `ws=` class: 101 to any upgrade, then nothing (no framing, no pings, no state)."""

    __slots__ = ("connections", "transport")

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        self.connections = server_state.connections
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"sec-websocket-key:"):
                key = line.split(b":", 1)[1].strip()
                digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                    b"connection: Upgrade\r\nsec-websocket-accept: "
                    + base64.b64encode(digest)
                    + b"\r\n\r\n"
                )

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)

    def shutdown(self) -> None:
        self.transport.abort()


app = Starlette(
    routes=[
        WebSocketRoute("/api/device/v1/push", hold),
        Route("/{path:path}", hello, methods=["GET", "POST"]),
    ]
)


def main() -> None:
    """Serve the hello-world app."""
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--insecure-http", action="store_true", help="plain HTTP")
    ap.add_argument("--certfile")
    ap.add_argument("--keyfile")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--floor", action="store_true", help="push path: bare 101-and-hold protocol")
    args = ap.parse_args()
    ssl: dict[str, Any] = {}
    if not args.insecure_http:
        if not args.certfile or not args.keyfile:
            ap.error("HTTPS needs --certfile and --keyfile (or pass --insecure-http)")
        ssl = {"ssl_certfile": args.certfile, "ssl_keyfile": args.keyfile}
    uvicorn.run(
        "hello:app",
        app_dir=str(Path(__file__).resolve().parent),
        workers=args.workers if args.workers > 1 else None,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        ws=Floor if args.floor else "websockets-sansio",
        **ssl,
    )


if __name__ == "__main__":
    main()
