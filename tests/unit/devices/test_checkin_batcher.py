"""The check-in batcher: group commit, and failures confined to the check-in they belong to."""

from __future__ import annotations

import asyncio

import pytest

from custos.devices.checkin import CheckinBatcher
from custos.devices.schemas import CheckinRequest

pytestmark = pytest.mark.asyncio


async def test_batches_grow_under_load_and_errors_stay_with_their_checkin():
    seen: list[list[str]] = []

    async def process(items: list[tuple[str, CheckinRequest]]) -> list[bytes]:
        seen.append([d for d, _ in items])
        await asyncio.sleep(0.01)  # a transaction's round trips
        if any(d == "bad" for d, _ in items):
            raise ValueError("bad device")
        return [d.encode() for d, _ in items]

    b = CheckinBatcher(process, workers=1)
    req = CheckinRequest()
    try:
        names = [f"d{i}" for i in range(30)]
        out = await asyncio.gather(
            *(b.submit(n, req) for n in names), b.submit("bad", req), return_exceptions=True
        )
        assert out[:30] == [n.encode() for n in names]
        assert isinstance(out[30], ValueError)
        assert b.largest > 1  # concurrent check-ins shared a transaction
        assert ["bad"] in seen  # the failed batch was retried one by one
        # idle: a batch of one, answered at once
        assert await b.submit("alone", req) == b"alone"
        assert seen[-1] == ["alone"]
    finally:
        await b.stop()


async def test_stop_fails_what_is_queued():
    gate = asyncio.Event()

    async def process(items: list[tuple[str, CheckinRequest]]) -> list[bytes]:
        await gate.wait()
        return [b"" for _ in items]

    b = CheckinBatcher(process, workers=1)
    first = asyncio.ensure_future(b.submit("a", CheckinRequest()))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(b.submit("b", CheckinRequest()))
    await asyncio.sleep(0.01)
    await b.stop()
    for fut in (first, second):
        with pytest.raises(RuntimeError, match="shutting down"):
            await fut
