"""The agent's push listener: one WebSocket to the server that only says "check in now".

Push is an optimisation: without it the agent still gets its work at the next check-in.
So every failure here is logged and retried with backoff, and never stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from custos import protocol
from custos.agent.client import DeviceClient, pinned_context

log = logging.getLogger("custos.agent.push")

PUSH_PATH = protocol.DEVICE_API + "/push"
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
# a refused device: the check-in path reports it; trying every minute would only add noise
REFUSED_PAUSE_S = 600.0
# a connection that lasted this long counts as healthy: backoff starts again from 1 s
STABLE_S = 30.0


def push_url(base_url: str) -> str:
    """wss://host/api/device/v1/push for https://host (ws:// for plain http)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + PUSH_PATH
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + PUSH_PATH
    raise ValueError(f"not an http(s) URL: {base_url!r}")


def backoff_delay(failures: int) -> float:
    """1 s doubling to 60 s, with jitter (half to full) so a fleet does not reconnect at once."""
    base = min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** max(0, failures - 1))
    return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy


class PushListener:
    """Keeps one WebSocket open and calls `on_wake` for every nudge (and after each connect)."""

    def __init__(
        self,
        client: DeviceClient,
        on_wake: Callable[[], None],
        *,
        ca_pem: str | None,
        ping_interval: float = 30.0,
    ) -> None:
        self.client = client
        self.on_wake = on_wake
        self.url = push_url(client.base_url)
        self.ssl = pinned_context(ca_pem) if ca_pem and self.url.startswith("wss://") else None
        self.ping_interval = ping_interval
        self.connected = False
        self.wakes = 0

    def _headers(self) -> dict[str, str]:
        ts = int(time.time() + self.client.clock_offset)
        return protocol.sign_request(
            self.client.key, self.client.device_id, "GET", PUSH_PATH, b"", ts
        )

    async def run(self) -> None:
        """Connect, listen, reconnect with backoff; until cancelled."""
        from websockets.exceptions import InvalidStatus

        failures = 0
        while True:
            started = time.monotonic()
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403) and b"clock_skew" not in (exc.response.body or b""):
                    # the check-in path reports the refusal (and a retired device's exit)
                    log.warning("push refused (HTTP %d); not retrying for a while", status)
                    await asyncio.sleep(REFUSED_PAUSE_S * random.uniform(0.9, 1.1))  # noqa: S311
                    continue
                log.info("push connection refused (HTTP %d)", status)
            except Exception as exc:
                log.info("push connection failed or lost: %s: %s", type(exc).__name__, exc)
            finally:
                self.connected = False
            failures = 1 if time.monotonic() - started >= STABLE_S else failures + 1
            delay = backoff_delay(failures)
            log.debug("push: reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _listen_once(self) -> None:
        from websockets.asyncio.client import connect

        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
        async with connect(
            self.url,
            additional_headers=self._headers(),
            user_agent_header="custos-agent",
            compression=None,  # frames are a few bytes; deflate state would cost memory
            open_timeout=20,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_interval,
            close_timeout=5,
            max_size=64 * 1024,
            **kwargs,
        ) as ws:
            self.connected = True
            log.info("push connected")
            # nudges sent while we were not connected are lost: check in once to catch up
            self._wake()
            try:
                async for raw in ws:
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("type") == "wake":
                        self._wake()
            except asyncio.CancelledError:
                # the agent is stopping: say goodbye properly (1000) rather than 1011
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)
                raise

    def _wake(self) -> None:
        self.wakes += 1
        self.on_wake()
