"""Real servers for the downloader's tests: a ranged file server and a TCP proxy that cuts.

`FileServer` is a small Starlette app served by uvicorn on 127.0.0.1 that honours
Range/If-Range/ETag itself (so a test can make it misbehave on purpose) and logs every
request with the body bytes it handed to the socket. `CutProxy` sits between the
downloader and the server, forwards raw TCP, cuts chosen connections after a number of
bytes and can slow down like a congested link.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from custos import protocol

SERVE_CHUNK = 16 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Logged:
    """One request as the server saw it."""

    path: str
    range: str | None
    if_range: str | None
    status: int
    start: int = 0
    sent: int = 0  # body bytes handed to uvicorn (and so to the socket)


@dataclass
class FileServer:
    """Serves `bodies` under /files/<name> and /api/device/v1/transfers/<name>.

    mode: "range" (correct), "ignore_range" (always 200), "tamper" (same size, one byte
    changed), "refuse_range" (416 to every range), "overrun" (chunked 200 with extra bytes).
    `fail_first` answers that many requests with 503 first. With `device_key` set, the
    device routes demand a valid Ed25519 request signature.
    """

    bodies: dict[str, bytes] = field(default_factory=dict)
    mode: str = "range"
    fail_first: int = 0
    device_key: bytes | None = None
    log: list[Logged] = field(default_factory=list)

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route("/files/{name}", self._serve),
                Route(protocol.DEVICE_API + "/transfers/{name}", self._serve_signed),
            ]
        )

    @staticmethod
    def etag(name: str) -> str:
        """The strong entity tag the server gives `name`."""
        return f'"{name}"'

    def starts(self) -> list[int | None]:
        """Where each logged request's range started (None: no Range header)."""
        return [e.start if e.range else None for e in self.log]

    async def _serve_signed(self, request: Request) -> Response:
        if self.device_key is not None:
            h = request.headers
            path_qs = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            ok = protocol.verify_signature(
                self.device_key,
                h.get(protocol.H_SIGNATURE, ""),
                request.method,
                path_qs,
                h.get(protocol.H_TIME, ""),
                h.get(protocol.H_DEVICE, ""),
                b"",
            )
            if not ok:
                return Response('{"error":"bad_signature"}', 401)
        return await self._serve(request)

    async def _serve(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = Logged(
            request.url.path,
            request.headers.get("range"),
            request.headers.get("if-range"),
            200,
        )
        self.log.append(entry)
        if self.fail_first > 0:
            self.fail_first -= 1
            entry.status = 503
            return Response("busy", 503, headers={"retry-after": "0"})
        body = self.bodies.get(name)
        if body is None:
            entry.status = 404
            return Response("no such file", 404)
        if self.mode == "tamper":
            mid = len(body) // 2
            body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
        etag = self.etag(name)
        headers = {"etag": etag, "accept-ranges": "bytes"}
        start, end = 0, len(body) - 1
        m = _RANGE.fullmatch(entry.range or "")
        use_range = (
            m is not None
            and self.mode != "ignore_range"
            and (entry.if_range is None or entry.if_range == etag)
        )
        if use_range and m is not None:
            start = int(m.group(1))
            if m.group(2):
                end = min(end, int(m.group(2)))
            entry.start = start
            if self.mode == "refuse_range" or start >= len(body) or end < start:
                entry.status = 416
                return Response(b"", 416, headers={"content-range": f"bytes */{len(body)}"})
            entry.status = 206
            headers["content-range"] = f"bytes {start}-{end}/{len(body)}"
        if self.mode == "overrun":
            return StreamingResponse(
                self._chunks(request, entry, body + b"extra", 0, len(body) + 4), 200
            )
        headers["content-length"] = str(end - start + 1)
        return StreamingResponse(
            self._chunks(request, entry, body, start, end), entry.status, headers
        )

    async def _chunks(
        self, request: Request, entry: Logged, body: bytes, start: int, end: int
    ) -> AsyncIterator[bytes]:
        pos = start
        while pos <= end:
            # uvicorn drops writes silently once the client is gone: stop counting then
            if await request.is_disconnected():
                return
            chunk = body[pos : min(pos + SERVE_CHUNK, end + 1)]
            yield chunk
            entry.sent += len(chunk)  # uvicorn has taken it: it is on its way to the socket
            pos += len(chunk)


class _Server(uvicorn.Server):
    """uvicorn in the test's loop; the test, not a signal, decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(app: Starlette, *, sndbuf: int | None = None) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1; yields the port. `sndbuf` caps each connection's send buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:  # accepted sockets inherit it (Linux)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@dataclass
class ProxyConn:
    """What one proxied connection carried."""

    upstream: int = 0  # bytes read from the server
    downstream: int = 0  # bytes delivered to the client
    header_len: int | None = None  # length of the response head, once seen
    cut: bool = False
    _head: bytearray = field(default_factory=bytearray)

    @property
    def body_delivered(self) -> int:
        """Response body bytes the client was given on this connection."""
        return max(0, self.downstream - (self.header_len or self.downstream))


class CutProxy:
    """A TCP proxy to 127.0.0.1:`upstream_port`.

    Connection i is cut (both sides closed) after `cuts[i]` bytes towards the client, if
    given and not None. Once `slow_after` bytes in total have gone to the client, every
    `slow_chunk` bytes wait `slow_delay_s`, like a congested link.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        cuts: list[int | None] | None = None,
        slow_after: int | None = None,
        slow_chunk: int = 16 * 1024,
        slow_delay_s: float = 0.0,
        rcvbuf: int | None = 32 * 1024,
    ) -> None:
        self.upstream_port = upstream_port
        self.cuts = list(cuts or [])
        self.slow_after = slow_after
        self.slow_chunk = slow_chunk
        self.slow_delay_s = slow_delay_s
        self.rcvbuf = rcvbuf
        self.conns: list[ProxyConn] = []
        self.total_down = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> CutProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # ending the connections ends their handlers (a cancelled handler task is logged
        # as an error by asyncio.streams)
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = len(self.conns)
        conn = ProxyConn()
        self.conns.append(conn)
        cut = self.cuts[index] if index < len(self.cuts) else None
        up_writer: asyncio.StreamWriter | None = None
        self._writers.add(writer)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.rcvbuf is not None:  # a small window: little in flight when the cut comes
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(
                    sock, ("127.0.0.1", self.upstream_port)
                )
            except OSError:
                sock.close()
                raise
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            self._writers.add(up_writer)
            if cut == 0:
                conn.cut = True
                return
            to_server = asyncio.create_task(_pump(reader, up_writer))
            try:
                await self._down(up_reader, writer, conn, cut)
            finally:
                to_server.cancel()
                await asyncio.gather(to_server, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
            self._tasks.discard(task)

    async def _down(
        self,
        up: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        conn: ProxyConn,
        cut: int | None,
    ) -> None:
        while True:
            slow = self.slow_after is not None and self.total_down >= self.slow_after
            data = await up.read(self.slow_chunk if slow else 64 * 1024)
            if not data:
                return
            conn.upstream += len(data)
            if cut is not None and conn.downstream + len(data) >= cut:
                data = data[: cut - conn.downstream]
                conn.cut = True
            if conn.header_len is None:
                conn._head += data[:8192]
                end = conn._head.find(b"\r\n\r\n")
                if end >= 0:
                    conn.header_len = end + 4
            client.write(data)
            await client.drain()
            conn.downstream += len(data)
            self.total_down += len(data)
            if conn.cut:
                return
            if slow:
                await asyncio.sleep(self.slow_delay_s)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(64 * 1024):
        writer.write(data)
        await writer.drain()


def sha(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()
