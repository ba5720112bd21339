"""The push WebSocket as a bare asyncio protocol: the same channel, a fraction of the memory.

A connected device spends nearly all its life idle on its push socket, so what one idle
socket costs the server bounds how many devices a process can hold (B4). Served through
ASGI, each socket carried uvicorn's WebSocket protocol and the websockets state machine,
an ASGI scope and queue, and a task parked in the route: about 27 KiB before TLS.
`PushWireProtocol` is handed the connection by uvicorn's HTTP protocol when a client asks
for a WebSocket (it is uvicorn's `ws=` protocol class), answers the push path itself and
holds an idle device in a few hundred bytes: no task, no queue, no parser objects. Work is
still done where it was: the signed upgrade is verified by the device authenticator, a
nudge goes through the hub's subscription callback, and deliveries and acknowledgements
run through the same check-in code (`custos.push.routes`) as the ASGI route, which stays
for other servers and for in-process tests.

The framing is RFC 6455 as a server needs it: masked client frames of at most MAX_FRAME
bytes, text messages (fragmented or not), ping, pong and close; no extensions. Dead peers
are found by one keepalive sweep per process (`PushSockets.sweep`), not a timer per socket.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import struct
import time
from collections.abc import Mapping
from itertools import islice
from typing import Any
from urllib.parse import unquote

import orjson

from custos import protocol
from custos.devices.identity import DeviceAuth
from custos.errors import DomainError, Unavailable
from custos.push.hub import Subscription
from custos.push.routes import CLOSE_REFUSED, MAX_FRAME, WAKE, Sender, deliver, parse_ack

try:  # the C version websockets ships; the pure-Python one otherwise
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - depends on the wheel
    from websockets.utils import apply_mask

log = logging.getLogger(__name__)

PUSH_PATH = protocol.DEVICE_API + "/push"
MAX_HANDSHAKE = 16 * 1024  # the upgrade request with its signature headers is well under 2 KiB
MAX_BUFFERED_OUT = 256 * 1024  # a device that does not read its socket is cut off
MAX_PENDING_ACKS = 16  # acknowledgement frames waiting; more are dropped (re-sent at check-in)
CLOSE_GRACE_S = 1.0  # after our close frame, how long the peer has to close the TCP side
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL = 1000, 1001, 1002
CLOSE_BAD_DATA, CLOSE_TOO_BIG, CLOSE_RESTART = 1007, 1009, 1012

_HANDSHAKE, _OPEN, _CLOSING = 0, 1, 2
FANOUT_BATCH = 500  # sockets served by one batched check-in
FANOUT_WORKERS = 2  # such check-ins in flight (one runs its SQL while the other writes)
_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One unfragmented, unmasked frame (server to client)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with a status code and a short reason."""
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])


_WAKE_FRAME = frame(OP_TEXT, WAKE.encode())  # the same bytes for every plain socket


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455


def http_error(
    status: int, code: str, detail: str, extra: Mapping[str, str] | None = None
) -> bytes:
    """A complete HTTP/1.1 error response with the JSON error body; the connection closes."""
    body = orjson.dumps({"error": code, "detail": detail})
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    head += ["content-type: application/json", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (extra or {}).items()]
    head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class PushSockets:
    """The push sockets this process holds: the keepalive sweep, counting, and the fan-out.

    A wake or an acknowledgement does not start a task per socket: the socket joins a queue
    that a few workers (`FANOUT_WORKERS`) drain in chunks of up to `FANOUT_BATCH`, each chunk
    one batched check-in (`DeviceCheckin.push_checkins`: a few statements for all of them)
    followed by plain transport writes. One command to 10,000 connected devices (B3) used to
    create 10,000 tasks, futures and coroutine chains inside the request that queued it; the
    objects they kept alive made the collector run full collections (~250 ms each) several
    times during the fan-out. Woken sockets go before acknowledgements: the acknowledgement
    only stops a re-send, the work frame is what the device waits for.
    """

    def __init__(
        self,
        ping_interval_s: float,
        *,
        batch: int = FANOUT_BATCH,
        workers: int = FANOUT_WORKERS,
    ) -> None:
        self.ping_interval_s = ping_interval_s
        self.open: set[PushWireProtocol] = set()
        self.dropped = 0  # sockets closed for missing two sweeps in a row
        self.batch = max(1, batch)
        self.workers = max(1, workers)
        # insertion-ordered sets: a socket woken twice before its turn is served once
        self._woken: dict[PushWireProtocol, None] = {}
        self._acking: dict[PushWireProtocol, None] = {}
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # held, so no worker is collected early
        self.chunks = 0  # batched check-ins run for push sockets (for tests and the curious)

    def wake(self, conn: PushWireProtocol) -> None:
        """The hub woke this socket's device: plain nudge, or its work down the socket."""
        self._woken[conn] = None
        self._start()

    def acked(self, conn: PushWireProtocol) -> None:
        """The socket has acknowledgement frames waiting (`conn._acks`)."""
        self._acking[conn] = None
        self._start()

    def forget(self, conn: PushWireProtocol) -> None:
        """The socket is gone: nothing more to send it."""
        self._woken.pop(conn, None)
        self._acking.pop(conn, None)

    def _start(self) -> None:
        if self._running < self.workers:
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._work(), name="push-fanout")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        try:
            while self._woken or self._acking:
                chunk = self._take()
                if chunk:
                    try:
                        await self._serve(chunk)
                    except Exception:
                        # a worker must outlive any chunk; its runs stay pending and are
                        # handed out at the devices' next check-in
                        log.exception("push: delivering to %d sockets failed", len(chunk))
        finally:
            self._running -= 1

    def _take(self) -> list[tuple[PushWireProtocol, list[str] | None]]:
        """Up to `batch` sockets: woken ones first, then one acknowledgement frame each."""
        chunk: list[tuple[PushWireProtocol, list[str] | None]] = []
        for conn in list(islice(self._woken, self.batch)):
            del self._woken[conn]
            chunk.append((conn, None))
        room = self.batch - len(chunk)
        for conn in list(islice(self._acking, room)) if room > 0 else ():
            del self._acking[conn]
            if conn._acks:
                chunk.append((conn, conn._acks.pop(0)))
            if conn._acks:
                self._acking[conn] = None  # its next frame in a later chunk
        return chunk

    async def _serve(self, chunk: list[tuple[PushWireProtocol, list[str] | None]]) -> None:
        todo: list[tuple[PushWireProtocol, DeviceAuth, list[str] | None]] = []
        services: Any = None
        for conn, acks in chunk:
            auth = conn.auth
            if conn.state != _OPEN or auth is None:
                continue
            services = conn.services
            try:
                status = await services.authenticator.status(auth.device_id)
            except Exception as exc:
                # one device's lookup failing (the database away) must not cost the rest of
                # the chunk its wake: its check-in is authenticated again anyway
                log.info("push: status of %s unknown (%s)", auth.device_id, type(exc).__name__)
                status = "active"
            if status != "active":
                # retired while connected (a hub "status" event woke us): hang up
                await conn.close(CLOSE_REFUSED, "retired")
                continue
            if acks is None and not conn.deliver:
                conn.write(_WAKE_FRAME)
            else:
                todo.append((conn, auth, acks))
        if not todo:
            return
        self.chunks += 1
        bodies = await services.checkin.push_checkins([(a, acks) for _, a, acks in todo])
        for (conn, _, _), body in zip(todo, bodies, strict=True):
            if body is not None and conn.state == _OPEN:
                conn.write(frame(OP_TEXT, b'{"type":"checkin","response":' + body + b"}"))

    async def sweep(self) -> None:
        """Ping every socket; drop those that showed no sign of life since the last sweep."""
        ping = frame(OP_PING)
        for conn in list(self.open):
            if conn.pinged:
                self.dropped += 1
                conn.abort()
            else:
                conn.pinged = True
                conn.write(ping)


class PushWireProtocol(asyncio.Protocol):
    """uvicorn's `ws=` class: the device push channel, with no ASGI and no task while idle."""

    __slots__ = (
        "_ack_task",
        "_acks",
        "_buf",
        "_fragments",
        "_handshake",
        "_sender",
        "_sub",
        "auth",
        "connections",
        "deliver",
        "pinged",
        "services",
        "sockets",
        "state",
        "transport",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.connections: set[Any] = server_state.connections
        self.services: Any = app_state.get("services")
        self.sockets: PushSockets | None = getattr(self.services, "push_sockets", None)
        self.transport: asyncio.Transport | None = None
        self.state = _HANDSHAKE
        self._buf = b""
        self._fragments: list[bytes] | None = None
        self._handshake: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        self._sender: Any = None
        self._acks: list[list[str]] = []
        self._ack_task: asyncio.Task[None] | None = None
        self.auth: DeviceAuth | None = None
        self.deliver = False
        self.pinged = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """uvicorn hands over the transport (the upgrade request follows as data)."""
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        """The upgrade request, then frames."""
        self._buf += data
        self.pinged = False
        if self.state == _HANDSHAKE:
            if self._handshake is None:
                self._begin_handshake()
            return
        self._read_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the socket: subscription, registry, tasks."""
        self.connections.discard(self)
        self.state = _CLOSING
        if self.sockets is not None:
            self.sockets.open.discard(self)
            self.sockets.forget(self)
        if self._sub is not None and self.services is not None:
            self.services.push.unsubscribe(self._sub)
            self._sub = None
        for task in (self._handshake, self._ack_task):
            if task is not None and not task.done():
                task.cancel()
        if self._sender is not None:
            self._sender.stop()
        self._buf = b""

    def shutdown(self) -> None:
        """Server shutdown (uvicorn calls this): 1012 to open sockets, then close."""
        if self.state == _OPEN:
            self.write(close_frame(CLOSE_RESTART, "server restart"))
        self._close_transport()

    # --- what the shared push code needs of a socket (see custos.push.routes) ---

    async def send_text(self, text: str) -> None:
        """Send one text message (raises ConnectionResetError once the socket is gone)."""
        if self.state != _OPEN or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the push socket is closed")
        self.write(frame(OP_TEXT, text.encode()))

    async def close(self, code: int = CLOSE_NORMAL, reason: str | None = None) -> None:
        """Send a close frame and close the connection."""
        if self.state == _OPEN:
            self.write(close_frame(code, reason or ""))
        self._close_transport()

    # --- internals ---

    def write(self, data: bytes) -> None:
        """Queue bytes on the transport; a peer that does not read is cut off."""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if t.get_write_buffer_size() > MAX_BUFFERED_OUT:
            log.info("push: %s does not read its socket; dropped", self._who())
            t.abort()

    def abort(self) -> None:
        """Drop the connection at once (dead peer)."""
        if self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        self.state = _CLOSING
        t = self.transport
        if t is None:
            return
        if not t.is_closing():
            t.close()
        # a TLS close waits for the peer's close_notify, which a gone peer never sends
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, t.abort)

    def _who(self) -> str:
        return self.auth.device_id if self.auth is not None else "a device"

    def _refuse(self, status: int, code: str, detail: str, retry_after: int = 0) -> None:
        extra = {}
        if status == 401:
            extra[protocol.H_SERVER_TIME] = f"{time.time():.3f}"  # lets the agent fix its clock
        if retry_after:
            extra["retry-after"] = str(retry_after)
        self.write(http_error(status, code, detail, extra))
        self._close_transport()

    def _begin_handshake(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HANDSHAKE:
                self._refuse(400, "bad_request", "upgrade request too large")
            return  # uvicorn passes the whole request at once; more would be odd but fine
        head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4 :]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or parts[0] != "GET":
            self._refuse(400, "bad_request", "a WebSocket upgrade is a GET")
            return
        target = parts[1]
        path, _, qs = target.partition("?")
        if unquote(path) != PUSH_PATH:
            self._refuse(404, "not_found", "no WebSocket endpoint here")
            return
        key = headers.get("sec-websocket-key", "")
        try:
            key_ok = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            key_ok = False
        if headers.get("sec-websocket-version") != "13" or not key_ok:
            self._refuse(400, "bad_request", "WebSocket version 13 with a valid key required")
            return
        if self.services is None:
            self._refuse(503, "busy", "the server is starting", retry_after=2)
            return
        self._handshake = asyncio.get_running_loop().create_task(
            self._authenticate(target, headers, key, qs == "deliver=1")
        )

    async def _authenticate(
        self, target: str, headers: dict[str, str], key: str, deliver: bool
    ) -> None:
        svc = self.services
        try:
            auth = await svc.authenticator.verify("GET", target, headers, b"", check_status=True)
        except Unavailable as exc:
            self._refuse(exc.status, exc.code, exc.detail, retry_after=exc.retry_after)
            return
        except DomainError as exc:
            self._refuse(exc.status, exc.code, exc.detail)
            return
        except Exception:
            log.exception("push: verifying an upgrade failed")
            self._refuse(503, "busy", "could not verify the request now", retry_after=5)
            return
        finally:
            self._handshake = None
        if self.transport is None or self.transport.is_closing():
            return
        self.auth, self.deliver = auth, deliver
        self.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: " + accept_key(key).encode() + b"\r\n\r\n"
        )
        self.state = _OPEN
        # a device hears only its own nudges: the subscription is for the id it proved
        self._sub = svc.push.subscribe(auth.device_id, self._wake)
        if self.sockets is not None:
            self.sockets.open.add(self)
        if self._buf:
            self._read_frames()

    def _wake(self) -> None:
        assert self.auth is not None  # subscribed only once authenticated
        if self.sockets is not None:
            self.sockets.wake(self)
            return
        if self._sender is None:
            self._sender = Sender(self, self.services, self.auth, self.deliver)
        self._sender.wake()

    def _fail(self, code: int, reason: str) -> None:
        log.info("push: closing %s's socket: %s", self._who(), reason)
        self.write(close_frame(code, reason))
        self._close_transport()

    def _read_frames(self) -> None:
        buf = self._buf
        while self.state == _OPEN and len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            opcode, n, pos = b0 & 0x0F, b1 & 0x7F, 2
            if b0 & 0x70 or not b1 & 0x80:
                self._fail(CLOSE_PROTOCOL, "reserved bits set or frame not masked")
                return
            if n == 126:
                if len(buf) < 4:
                    break
                (n,) = struct.unpack_from("!H", buf, 2)
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, 2)
                pos = 10
            if n > MAX_FRAME:
                self._fail(CLOSE_TOO_BIG, "frame too large")
                return
            if len(buf) < pos + 4 + n:
                break
            payload = apply_mask(buf[pos + 4 : pos + 4 + n], buf[pos : pos + 4])
            buf = buf[pos + 4 + n :]
            self._buf = buf
            self._on_frame(bool(b0 & 0x80), opcode, payload)
            buf = self._buf
        self._buf = buf if self.state == _OPEN else b""

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode >= 0x8:  # control frames: short and never fragmented
            if not fin or len(payload) > 125:
                self._fail(CLOSE_PROTOCOL, "bad control frame")
            elif opcode == OP_PING:
                self.write(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                self.write(close_frame(code) if code is not None else frame(OP_CLOSE))
                self._close_transport()
            elif opcode != OP_PONG:
                self._fail(CLOSE_PROTOCOL, "unknown control frame")
            return
        if opcode == OP_CONT:
            if self._fragments is None:
                self._fail(CLOSE_PROTOCOL, "continuation without a message")
                return
            self._fragments.append(payload)
            if sum(map(len, self._fragments)) > MAX_FRAME:
                self._fail(CLOSE_TOO_BIG, "message too large")
                return
            if not fin:
                return
            message, self._fragments = b"".join(self._fragments), None
            self._on_text(message)
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(CLOSE_PROTOCOL, "new message inside a fragmented one")
            elif not fin:
                self._fragments = [payload] if opcode == OP_TEXT else []
            elif opcode == OP_TEXT:
                self._on_text(payload)
            # binary messages carry nothing on this channel
        else:
            self._fail(CLOSE_PROTOCOL, "unknown opcode")

    def _on_text(self, data: bytes) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self._fail(CLOSE_BAD_DATA, "text is not UTF-8")
            return
        if not self.deliver:
            return  # a plain push socket carries nothing from the device
        run_ids = parse_ack(text)
        if not run_ids:
            return
        if len(self._acks) >= MAX_PENDING_ACKS:
            return  # unacknowledged runs are handed out again at the next check-in
        self._acks.append(run_ids)
        if self.sockets is not None:
            self.sockets.acked(self)  # the answer may hand out work queued meanwhile
        elif self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.get_running_loop().create_task(self._process_acks())

    async def _process_acks(self) -> None:
        assert self.auth is not None
        while self._acks and self.state == _OPEN:
            run_ids = self._acks.pop(0)
            # the answer may hand out work queued meanwhile
            await deliver(self, self.services, self.auth, acks=run_ids)
