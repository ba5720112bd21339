"""A minimal keep-alive HTTP/1.1 client for the B2 load generator.

httpx costs the load generator ~1 ms of CPU per request, which on a 2-core machine leaves
the server too little to be measured at 2,000 check-ins/s. This client does only what a
check-in needs (POST, Content-Length bodies, keep-alive) over asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit


class RawHTTP:
    """One persistent connection; one request at a time."""

    def __init__(self, url: str, ssl_ctx: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl_ctx if parts.scheme == "https" else None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
            )
        return self._reader, self._writer

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """POST and read the whole answer: (status, body)."""
        reader, writer = await self._open()
        head = [f"POST {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        try:
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("the server closed the connection")
            status = int(status_line.split(b" ", 2)[1])
            length = 0
            close = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            data = await reader.readexactly(length) if length else b""
        except BaseException:
            await self.close()
            raise
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
