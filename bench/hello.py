"""The baseline: a bare Starlette hello-world, served exactly as `custos server` serves Custos.

Same uvicorn settings as src/custos/cli/server_cmd.py: uvloop, httptools, `--workers N`
processes, warning-level logging, no access log, and (unless --insecure-http) TLS with the
same certificate files. It answers every path and method, so the load generator can send it
the very requests it sends Custos, and accepts a WebSocket on the push path that it just holds
open (the baseline of the push benchmarks).

    python bench/hello.py --port 9000 --insecure-http
    python bench/hello.py --port 9000 --certfile var/tls/server.pem --keyfile var/tls/server.key
"""

from __future__ import annotations

import argparse
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
        ws="websockets-sansio",
        **ssl,
    )


if __name__ == "__main__":
    main()
