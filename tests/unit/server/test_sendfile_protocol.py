"""The zero-copy file extensions of our uvicorn protocol (custos.sendfile, pathsend), on a real
uvicorn server in a thread, under uvloop (what `custos server` runs) and plain asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from starlette.responses import FileResponse

from custos.server.protocols import (
    PATHSEND_EXTENSION,
    SENDFILE_EXTENSION,
    DrainingHttpProtocol,
    FileSegment,
    FileSegmentsResponse,
    sendfile_extensions,
)

MiB = 1024 * 1024


class App:
    """A bare ASGI app: /seg sends `segments`, /file a FileResponse, /plain a small body."""

    def __init__(self, segments: list[FileSegment], whole: Path) -> None:
        self.segments = segments
        self.whole = whole
        self.scopes: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.scopes.append(scope)
        path = scope["path"]
        try:
            if path == "/seg":
                total = sum(s.size for s in self.segments)
                await FileSegmentsResponse(self.segments, headers={"content-length": str(total)})(
                    scope, receive, send
                )
            elif path == "/short":  # the segments carry less than the content-length says
                total = sum(s.size for s in self.segments) + 1
                await FileSegmentsResponse(self.segments, headers={"content-length": str(total)})(
                    scope, receive, send
                )
            elif path == "/file":
                await FileResponse(self.whole)(scope, receive, send)
            else:
                body = b"plain " + path.encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        except BaseException as exc:
            self.errors.append(exc)
            raise


@pytest.fixture
def files(tmp_path: Path) -> tuple[list[FileSegment], bytes, Path]:
    """Three files and segments of them (one empty), with the bytes they make."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(os.urandom(3 * MiB + 17))
    b.write_bytes(os.urandom(5 * MiB))
    c.write_bytes(os.urandom(1000))
    segments = [
        FileSegment(str(a), 11, 3 * MiB),
        FileSegment(str(c), 0, 0),
        FileSegment(str(b), 0, 5 * MiB),
        FileSegment(str(c), 999, 1),
        FileSegment(str(a), 0, 10),
    ]
    want = a.read_bytes()[11 : 11 + 3 * MiB] + b.read_bytes() + c.read_bytes()[999:]
    want += a.read_bytes()[:10]
    return segments, want, b


@contextlib.contextmanager
def running(app: App, loop: str) -> Iterator[str]:
    """uvicorn with our protocol class on a free port, in a thread with its own loop."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, http=DrainingHttpProtocol, lifespan="off", log_level="critical", loop="none"
    )
    server = uvicorn.Server(config)
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    )

    def run() -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raw_get(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    return s


def read_response(s: socket.socket, delay: float = 0.0) -> tuple[bytes, bytes]:
    """Head and body of one content-length response from a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        assert data, "connection closed before the head"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        if delay:
            time.sleep(delay)
        data = s.recv(65536)
        assert data, f"connection closed after {len(body)} of {length} body bytes"
        body += data
    return head, body


LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])


@LOOPS
def test_segments_arrive_in_order_and_the_connection_is_reused(
    files: tuple[list[FileSegment], bytes, Path], loop: str
) -> None:
    segments, want, _ = files
    app = App(segments, files[2])
    with running(app, loop) as url, httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(3):
            r = http.get("/seg")
            assert r.status_code == 200
            assert r.headers["content-length"] == str(len(want))
            assert hashlib.sha256(r.content).digest() == hashlib.sha256(want).digest()
            # the next response on the same keep-alive connection follows cleanly
            assert http.get("/plain").content == b"plain /plain"
        ports = {s["client"][1] for s in app.scopes}
    assert len(ports) == 1  # one connection for all six requests
    assert SENDFILE_EXTENSION in app.scopes[0]["extensions"]
    assert PATHSEND_EXTENSION in app.scopes[0]["extensions"]
    assert not app.errors


@LOOPS
def test_a_slow_reader_gets_every_byte(
    files: tuple[list[FileSegment], bytes, Path], loop: str
) -> None:
    segments, want, _ = files
    with running(App(segments, files[2]), loop) as url:
        port = int(url.rsplit(":", 1)[1])
        s = raw_get(port, "/seg", rcvbuf=16 * 1024)
        try:
            s.settimeout(30)
            # small reads with pauses at first: the server meets a full socket many times
            head, body = read_response(s, delay=0.0005)
        finally:
            s.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert body == want


@LOOPS
def test_a_client_that_goes_away_mid_body_leaks_nothing(
    files: tuple[list[FileSegment], bytes, Path], loop: str
) -> None:
    segments, want, _ = files
    app = App(segments, files[2])
    with running(app, loop) as url:
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/plain").status_code == 200  # warm up
        before = open_fds()
        for _ in range(5):
            s = raw_get(port, "/seg", rcvbuf=16 * 1024)
            s.recv(1000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # a reset, mid-body
        # and one that stops reading without closing, then closes
        s = raw_get(port, "/seg", rcvbuf=16 * 1024)
        s.recv(1000)
        time.sleep(0.2)
        s.close()
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/seg").content == want  # still serving
        deadline = time.monotonic() + 10
        while open_fds() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds() <= before
    assert not app.errors


@LOOPS
def test_pathsend_serves_a_file_response(
    files: tuple[list[FileSegment], bytes, Path], loop: str
) -> None:
    segments, _, whole = files
    with running(App(segments, whole), loop) as url, httpx.Client(base_url=url) as http:
        r = http.get("/file")
        assert r.status_code == 200
        assert r.content == whole.read_bytes()
        # a range is Starlette's own (copying) path; HEAD sends no body
        r = http.get("/file", headers={"range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == whole.read_bytes()[10:20]
        r = http.head("/file")
        assert r.status_code == 200 and r.content == b""
        assert http.get("/plain").status_code == 200


@LOOPS
def test_segments_that_do_not_fill_the_content_length_close_the_connection(
    files: tuple[list[FileSegment], bytes, Path], loop: str
) -> None:
    segments, _, whole = files
    app = App(segments, whole)
    with running(app, loop) as url:
        port = int(url.rsplit(":", 1)[1])
        s = raw_get(port, "/short")
        s.settimeout(10)
        with pytest.raises(AssertionError, match="connection closed"):
            read_response(s)
        s.close()
    assert app.errors and "content-length" in str(app.errors[0])


@LOOPS
def test_a_missing_file_closes_the_connection_mid_body(tmp_path: Path, loop: str) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"x" * 100_000)
    segments = [FileSegment(str(real), 0, 100_000), FileSegment(str(tmp_path / "gone"), 0, 10)]
    app = App(segments, real)
    with running(app, loop) as url:
        port = int(url.rsplit(":", 1)[1])
        s = raw_get(port, "/seg")
        s.settimeout(10)
        with pytest.raises(AssertionError, match="connection closed after 100000 of 100010"):
            read_response(s)
        s.close()
    assert isinstance(app.errors[0], FileNotFoundError)


def test_no_file_extensions_under_tls() -> None:
    sock = socket.socket()
    try:
        plain = SimpleNamespace(get_extra_info=lambda k, d=None: {"socket": sock}.get(k, d))
        tls = SimpleNamespace(
            get_extra_info=lambda k, d=None: {"socket": sock, "sslcontext": object()}.get(k, d)
        )
        assert SENDFILE_EXTENSION in sendfile_extensions(plain)  # type: ignore[arg-type]
        assert sendfile_extensions(tls) == {}  # type: ignore[arg-type]
    finally:
        sock.close()
