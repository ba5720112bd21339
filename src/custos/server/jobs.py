"""A small runner for periodic work inside each server process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class JobRunner:
    """Runs registered coroutines at fixed intervals until stopped."""

    def __init__(self) -> None:
        self._jobs: list[tuple[str, float, Callable[[], Awaitable[object]]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, seconds: float, name: str, fn: Callable[[], Awaitable[object]]) -> None:
        """Register fn to run every `seconds`."""
        self._jobs.append((name, seconds, fn))

    async def _loop(self, name: str, seconds: float, fn: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s failed", name)

    def start(self) -> None:
        """Start every registered job."""
        self._tasks = [
            asyncio.create_task(self._loop(n, s, f), name=f"job:{n}") for n, s, f in self._jobs
        ]

    async def stop(self) -> None:
        """Cancel the jobs and wait for them."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
