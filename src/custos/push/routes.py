"""The device's push WebSocket: signed like every device request, it carries only wake nudges."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Protocol

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from custos import protocol
from custos.devices.identity import DeviceAuth
from custos.devices.schemas import CheckinRequest
from custos.errors import DomainError, Unauthorized

if TYPE_CHECKING:  # the container builds the push sockets registry (custos.push.wire)
    from custos.server.container import Services

log = logging.getLogger(__name__)

device_router = APIRouter(prefix=protocol.DEVICE_API, tags=["device protocol"])
WAKE = '{"type":"wake"}'
# the largest frame a device may send (an acknowledgement of 500 runs is ~17 KB)
MAX_FRAME = 32 * 1024
CLOSE_REFUSED = 4401


@device_router.websocket("/push")
async def push(ws: WebSocket) -> None:
    """Verify the signed upgrade request, then tell the device whenever work is queued.

    Plain (`/push`): a `{"type":"wake"}` frame, and the device checks in. With `?deliver=1`
    the work itself comes down the socket as a check-in response, `{"type":"checkin",
    "response":{…}}`, and the device acknowledges with `{"type":"ack","run_ids":[…]}`;
    both go through the check-in's batched transactions, so a fan-out to thousands of
    connected devices costs a few statements rather than a check-in per device.
    """
    svc: Services = ws.app.state.services
    raw_path = ws.scope.get("raw_path") or ws.scope["path"].encode()
    qs = ws.scope.get("query_string", b"")
    path_qs = raw_path.decode("latin-1") + (("?" + qs.decode("latin-1")) if qs else "")
    try:
        auth = await svc.authenticator.verify("GET", path_qs, ws.headers, b"", check_status=True)
    except Unauthorized as exc:
        await _refuse(ws, exc)
        return
    deliver = qs == b"deliver=1"
    # one task per idle socket (this one, reading); a wake starts a short-lived sender
    sender = Sender(ws, svc, auth, deliver)
    # a device hears only its own nudges: the subscription is for the id it proved
    sub = svc.push.subscribe(auth.device_id, sender.wake)
    try:
        await ws.accept()
        await _receive(ws, svc, auth, deliver)
    except (WebSocketDisconnect, OSError, RuntimeError):
        pass  # the device went away mid-send
    finally:
        svc.push.unsubscribe(sub)
        sender.stop()


class PushSocket(Protocol):
    """What the push code needs of a socket: Starlette's WebSocket, or the bare protocol."""

    async def send_text(self, data: str) -> None:
        """Send one text message."""

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with a status code."""


class Sender:
    """Sends what a wake calls for; at most one send loop runs per socket."""

    __slots__ = ("again", "auth", "deliver", "svc", "task", "ws")

    def __init__(self, ws: PushSocket, svc: Services, auth: DeviceAuth, deliver: bool) -> None:
        self.ws, self.svc, self.auth, self.deliver = ws, svc, auth, deliver
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def wake(self) -> None:
        """Called by the hub: start the send loop, or have the running one go round again."""
        if self.task is None or self.task.done():
            self.again = False
            self.task = asyncio.create_task(self._run())
        else:
            self.again = True

    async def _run(self) -> None:
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            while True:
                if await self.svc.authenticator.status(self.auth.device_id) != "active":
                    # retired while connected (a hub "status" event woke us): hang up
                    await self.ws.close(code=CLOSE_REFUSED, reason="retired")
                    return
                if self.deliver:
                    await deliver(self.ws, self.svc, self.auth)
                else:
                    await self.ws.send_text(WAKE)
                if not self.again:
                    return
                self.again = False

    def stop(self) -> None:
        """Stop a send in progress (the socket is gone)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


async def deliver(
    ws: PushSocket, svc: Services, auth: DeviceAuth, acks: list[str] | None = None
) -> None:
    """Run a check-in on the device's behalf and send its answer if it hands out work.

    Without `acks` it is a woken check-in (the database is asked whatever the index says);
    with them, the acknowledgement of runs delivered earlier on this socket.
    """
    req = CheckinRequest(acks=acks) if acks else CheckinRequest(wake=True)
    try:
        body = await svc.checkin.checkin(auth, req)
    except DomainError as exc:
        log.info("push delivery to %s refused: %s", auth.device_id, exc.detail)
        return
    if b'"commands":[]' not in body:
        await ws.send_text('{"type":"checkin","response":' + body.decode() + "}")


def parse_ack(text: str) -> list[str] | None:
    """The run ids of an acknowledgement frame; None for anything else or anything malformed."""
    if len(text) > MAX_FRAME:
        return None
    try:
        frame = json.loads(text)
        if not isinstance(frame, dict) or frame.get("type") != "ack":
            return None
        req = CheckinRequest.model_validate({"acks": frame.get("run_ids")})
    except (ValueError, ValidationError):
        return None  # malformed: ignored, the run is delivered again at a check-in
    return req.acks or None


async def _receive(ws: WebSocket, svc: Services, auth: DeviceAuth, deliver_work: bool) -> None:
    """Read what the device sends until it disconnects: acknowledgements of delivered work."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if not deliver_work or not text:
                continue  # a plain push socket carries nothing from the device
            run_ids = parse_ack(text)
            if run_ids:
                # the answer may hand out work queued meanwhile
                await deliver(ws, svc, auth, acks=run_ids)


class DenialLogFilter(logging.Filter):
    """Drops uvicorn's spurious error after a WebSocket denial response.

    uvicorn's websockets-sansio protocol does not mark the handshake complete once a denial
    response is sent, and logs "ASGI callable returned without completing handshake" at ERROR
    for every refused device (Kludex/uvicorn PR #3138). Our only WebSocket route either
    accepts or sends a denial, so the message carries no information here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that one message."""
        return record.getMessage() != "ASGI callable returned without completing handshake."


DENIAL_LOG_FILTER = DenialLogFilter()


async def _refuse(ws: WebSocket, exc: Unauthorized) -> None:
    """A 401 with the usual error body when the server can send one, else close 4401."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        resp = JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=401)
        resp.headers[protocol.H_SERVER_TIME] = f"{time.time():.3f}"
        await ws.send_denial_response(resp)
    else:
        await ws.close(code=CLOSE_REFUSED, reason=exc.code)
