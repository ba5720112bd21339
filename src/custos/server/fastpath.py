"""The device check-in, served ahead of the framework's router.

Check-ins are nearly all of a server's traffic and nearly always empty. For those, FastAPI's
route matching (dozens of routes) and dependency solving cost more than the check-in itself,
so this ASGI layer answers exactly `POST /api/device/v1/checkin` without a query string
itself, calling the same services with the same validation and the same error shape as the
route registered in `custos.devices.routes` (which stays, for OpenAPI and for any other form
of the request). Body limits are enforced by `RequestGuard`, which wraps this layer.
"""

from __future__ import annotations

import logging
import time

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from custos import protocol
from custos.devices.schemas import CheckinRequest
from custos.errors import DomainError, Unavailable
from custos.server.container import Services
from custos.server.http import parse_body

log = logging.getLogger(__name__)

CHECKIN_PATH = protocol.DEVICE_API + "/checkin"
_JSON = (b"content-type", b"application/json")


class CheckinFastPath:
    """ASGI middleware: the check-in without the router; everything else passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != CHECKIN_PATH
            or scope["method"] != "POST"
            or scope.get("query_string")
        ):
            await self.app(scope, receive, send)
            return
        status, extra, body = await self._checkin(scope, receive)
        if status == 0:
            return  # the client went away before sending its body
        headers = [_JSON, (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _checkin(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        chunks: list[bytes] = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return 0, [], b""
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k.startswith(b"x-custos-")
        }
        svc: Services = scope["app"].state.services
        try:
            auth = await svc.authenticator.verify(
                "POST", scope.get("raw_path", CHECKIN_PATH.encode()).decode("latin-1"), headers, raw
            )
            return 200, [], await svc.checkin.checkin(auth, parse_body(CheckinRequest, raw))
        except DomainError as exc:
            extra = []
            if exc.status == 401:
                # lets an agent with a wrong clock correct itself and retry
                extra.append((protocol.H_SERVER_TIME.encode(), f"{time.time():.3f}".encode()))
            elif isinstance(exc, Unavailable):
                extra.append((b"retry-after", str(exc.retry_after).encode()))
            return exc.status, extra, orjson.dumps({"error": exc.code, "detail": exc.detail})
        except Exception:
            log.exception("unhandled error in a check-in")
            return 500, [], b'{"error":"internal","detail":"internal server error"}'
