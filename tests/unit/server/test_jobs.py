"""The periodic job runner keeps going after a failing run and stops cleanly."""

from __future__ import annotations

import asyncio

from custos.server.jobs import JobRunner


async def test_jobs_repeat_survive_errors_and_stop():
    calls: list[int] = []

    async def flaky() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("one bad run")

    runner = JobRunner()
    runner.every(0.01, "flaky", flaky)
    runner.start()
    for _ in range(200):
        if len(calls) >= 4:
            break
        await asyncio.sleep(0.01)
    await runner.stop()
    assert len(calls) >= 4
    seen = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == seen
