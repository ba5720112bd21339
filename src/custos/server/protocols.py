"""uvicorn protocol classes that do not let TLS close handshakes hold up a shutdown.

On SIGTERM uvicorn asks every connection to close and waits until all are gone. Closing a
TLS transport waits for the peer's close_notify (up to the event loop's 30 s TLS shutdown
timeout), and clients that have already dropped the socket, or that reconnect at once, often
never send one; so every restart used to sit out `timeout_graceful_shutdown` (B5). These
subclasses abort a connection that is still closing after a short grace period. In-flight
HTTP requests are not affected: their transport is not closing until the response is sent.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from typing import Any, NamedTuple

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

# long enough for a close frame and close_notify to cross a slow link
CLOSE_GRACE_S = 1.0


def _abort_if_stuck(transport: asyncio.BaseTransport | None) -> None:
    if transport is not None and transport.is_closing():
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)  # type: ignore[attr-defined]


class DrainingWebSocketProtocol(WebSocketsSansIOProtocol):
    """Sends 1012 (service restart), then aborts if the close does not complete in time."""

    def shutdown(self) -> None:
        """Close for shutdown; a socket that is already closing is just closed."""
        try:
            super().shutdown()
        except InvalidState:
            # the device or the app began the close first (uvicorn would raise here and
            # stop shutting down the remaining connections)
            self.transport.close()
        _abort_if_stuck(self.transport)


class DrainingHttpProtocol(HttpToolsProtocol):
    """Idle keep-alive connections close at once; a stuck TLS close is aborted.

    On plain TCP it also offers the zero-copy file extensions (SENDFILE_EXTENSION below).
    """

    _file_extensions: dict[str, dict[object, object]] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Note whether this connection can carry file bodies with sendfile, and the client's
        TLS certificate if it showed one (verified against the Custos CA by the handshake)."""
        super().connection_made(transport)
        extensions: dict[str, dict[object, object]] = dict(sendfile_extensions(transport))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                # the ASGI TLS extension's place; OMA DM clients prove their identity with it
                extensions["tls"] = {"client_cert_der": der}
        self._file_extensions = extensions or None

    def on_message_begin(self) -> None:
        """A new request: its scope advertises the extensions this connection has."""
        super().on_message_begin()
        if self._file_extensions:
            self.scope["extensions"] = dict(self._file_extensions)

    def on_headers_complete(self) -> None:
        """uvicorn builds the cycle inline; ours adds the file messages to its send."""
        super().on_headers_complete()
        if (
            self._file_extensions
            and SENDFILE_EXTENSION in self._file_extensions
            and type(self.cycle) is RequestResponseCycle
        ):
            self.cycle.__class__ = SendfileCycle

    def connection_lost(self, exc: Exception | None) -> None:
        """Also stop a sendfile transfer in flight."""
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, SendfileCycle):
            cycle.connection_lost()

    def shutdown(self) -> None:
        """Close for shutdown (an in-flight request still gets its response)."""
        super().shutdown()
        _abort_if_stuck(self.transport)


# --- zero-copy file bodies -------------------------------------------------------------
#
# An ASGI app that finds SENDFILE_EXTENSION in scope["extensions"] may answer a request with
# `http.response.start` (with a content-length) followed by one
# {"type": "custos.sendfile", "segments": [(path, offset, size), ...]} message; the
# standard {"type": "http.response.pathsend", "path": ...} (whole file) is offered as well.
# The bytes go from the page cache to the socket with os.sendfile, never through Python.
# Both are offered only on plain TCP (TLS needs the bytes in user space) where the platform
# has os.sendfile; apps fall back to http.response.body messages otherwise.

SENDFILE_EXTENSION = "custos.sendfile"
PATHSEND_EXTENSION = "http.response.pathsend"


class FileSegment(NamedTuple):
    """`size` bytes of the file at `path` from `offset`."""

    path: str
    offset: int
    size: int


def sendfile_extensions(transport: asyncio.BaseTransport) -> dict[str, dict[object, object]]:
    """The file-body extensions this connection can carry (none under TLS)."""
    if not hasattr(os, "sendfile") or transport.get_extra_info("sslcontext") is not None:
        return {}
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return {}
    return {SENDFILE_EXTENSION: {}, PATHSEND_EXTENSION: {}}


class _SegmentSender:
    """Feeds file segments to a non-blocking socket from the loop's writability callbacks.

    The socket's fd belongs to the transport and the loop refuses a second watcher on it, so
    a dup of it is watched instead (same socket, separate epoll registration). Each callback
    makes one sendfile call: a partial send means the socket buffer is full, and the level-
    triggered watcher calls again once the kernel has room.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock_fd: int, segments: list[FileSegment]):
        self.loop = loop
        self.segments = deque(segments)
        self.done: asyncio.Future[None] = loop.create_future()
        self.sent = 0
        self._file = -1
        self._fd = os.dup(sock_fd)
        self._watching = False

    def start(self) -> None:
        """Send what fits now; watch the socket for the rest."""
        self._pump()
        if not self.done.done():
            self.loop.add_writer(self._fd, self._pump)
            self._watching = True

    def _pump(self) -> None:
        try:
            while self.segments:
                seg = self.segments[0]
                if seg.size == 0:
                    self._next_segment()
                    continue
                if self._file < 0:
                    self._file = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                n = os.sendfile(self._fd, self._file, seg.offset, seg.size)
                if n == 0:
                    raise RuntimeError(f"{seg.path} ends before its segment does")
                self.sent += n
                if n < seg.size:
                    self.segments[0] = FileSegment(seg.path, seg.offset + n, seg.size - n)
                    return  # the socket buffer is full
                self._next_segment()
        except (BlockingIOError, InterruptedError):
            return
        except BaseException as exc:
            self.finish(exc)
            return
        self.finish(None)

    def _next_segment(self) -> None:
        self.segments.popleft()
        if self._file >= 0:
            os.close(self._file)
            self._file = -1

    def close(self) -> None:
        """Stop (the awaiting task was cancelled, or the transfer is over)."""
        self.finish(None)

    def finish(self, exc: BaseException | None) -> None:
        """Stop watching, release the descriptors, settle `done` (idempotent)."""
        if self._watching:
            self._watching = False
            self.loop.remove_writer(self._fd)  # before the close: epoll keys on the socket
        if self._file >= 0:
            os.close(self._file)
            self._file = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class SendfileCycle(RequestResponseCycle):
    """uvicorn's request/response cycle plus the custos.sendfile and pathsend messages."""

    sender: _SegmentSender | None = None

    async def send(self, message: Any) -> None:
        """ASGI send; file messages complete the response with sendfile."""
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == SENDFILE_EXTENSION:
            segments = [FileSegment(str(p), int(o), int(c)) for p, o, c in message["segments"]]
        elif kind == PATHSEND_EXTENSION:
            path = str(message["path"])
            segments = [FileSegment(path, 0, os.stat(path).st_size)]
        else:
            await super().send(message)
            return
        if self.disconnected:
            return
        if not self.response_started or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r} outside a response body")
        if any(s.offset < 0 or s.size < 0 for s in segments):
            raise RuntimeError("a file segment with a negative offset or count")
        if self.scope["method"] != "HEAD":
            if self.chunked_encoding:
                raise RuntimeError(f"{kind} needs a content-length response")
            total = sum(s.size for s in segments)
            if total != self.expected_content_length:
                raise RuntimeError(
                    f"{kind} carries {total} bytes, content-length says "
                    f"{self.expected_content_length}"
                )
            await self._send_segments(segments)
            if self.disconnected:
                return
        self.expected_content_length = 0
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    async def _flushed(self) -> None:
        # what the transport still buffers (the head) must reach the socket first
        transport = self.transport
        if not transport.get_write_buffer_size():
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)  # paused until empty
        try:
            while transport.get_write_buffer_size() and not self.disconnected:
                if self.flow.write_paused:
                    await self.flow.drain()
                else:
                    await asyncio.sleep(0.001)
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def _send_segments(self, segments: list[FileSegment]) -> None:
        await self._flushed()
        if self.disconnected:
            return
        sock = self.transport.get_extra_info("socket")
        sender = _SegmentSender(asyncio.get_running_loop(), sock.fileno(), segments)
        self.sender = sender
        try:
            sender.start()
            await sender.done
        except (BrokenPipeError, ConnectionResetError):
            self.disconnected = True
        except ConnectionAbortedError:
            pass  # the transport went away under us: connection_lost marked the cycle
        finally:
            sender.close()
            self.sender = None
            self.expected_content_length -= sender.sent

    def connection_lost(self) -> None:
        """The transport is gone: stop a transfer that waits for the socket."""
        if self.sender is not None:
            self.sender.finish(ConnectionAbortedError("the connection was closed"))


class FileSegmentsResponse(Response):
    """A response whose body is byte ranges of files, sent with the custos.sendfile message.

    Only for requests whose scope offers SENDFILE_EXTENSION; `headers` must hold the
    content-length (the sum of the segment sizes).
    """

    def __init__(
        self,
        segments: list[FileSegment],
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        self.segments = segments
        super().__init__(None, status_code, headers, media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Head first, then the files."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": SENDFILE_EXTENSION, "segments": self.segments})
