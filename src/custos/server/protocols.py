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

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
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
    """Idle keep-alive connections close at once; a stuck TLS close is aborted."""

    def shutdown(self) -> None:
        """Close for shutdown (an in-flight request still gets its response)."""
        super().shutdown()
        _abort_if_stuck(self.transport)
