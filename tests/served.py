"""An in-process app (lifespan already running) served by a real uvicorn on TCP, restartable.

Used by tests that need real sockets: the simulator's push connections, the bare push
WebSocket protocol. `ws` picks uvicorn's WebSocket protocol class; the app's services are
put in uvicorn's lifespan state, where the bare protocol looks for them, as the app's own
lifespan does when `custos server` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait until `check` holds (polled every 50 ms); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server(uvicorn.Server):
    """uvicorn in the test's own loop; the test, not a signal, decides when it stops."""

    services: Any = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.services is not None:
            self.lifespan.state["services"] = self.services
        await super().startup(sockets)


class Served:
    """The app served over real TCP until `stop` (which closes connections as a SIGTERM does)."""

    def __init__(self, app: Any, *, ws: Any = "auto") -> None:
        self.app = app
        self.ws = ws
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            ws=self.ws,
        )
        self._server = _Server(config)
        self._server.services = self.app.state.services
        self._task = asyncio.create_task(self._server.serve())
        await eventually(lambda: self._server is not None and self._server.started, 10)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 10)
        self._server = self._task = None
