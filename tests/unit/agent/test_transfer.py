"""The agent's downloader against a real uvicorn server, through a real TCP proxy that cuts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from transfer_harness import CutProxy, FileServer, serve, sha

from custos import protocol
from custos.agent.client import DeviceClient
from custos.agent.transfer import AdaptiveRate, Downloader, RateLimiter, TransferError

KiB = 1024
MiB = 1024 * KiB
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05}


def body_of(size: int, seed: int = 1) -> bytes:
    """Deterministic incompressible bytes."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64  # 2 KiB per round keeps generation quick
    return bytes(out[:size])


@pytest.fixture
async def files() -> AsyncIterator[tuple[FileServer, int]]:
    fs = FileServer()
    async with serve(fs.app(), sndbuf=32 * KiB) as port:
        yield fs, port


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


async def test_download_is_byte_identical_and_reports_progress(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["a"] = body_of(3 * MiB)
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "a.bin"
    dl = Downloader(http, progress_interval_s=0.05)
    got = await dl.fetch(
        f"http://127.0.0.1:{port}/files/a",
        dest,
        size=len(data),
        sha256=sha(data),
        etag=None,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert got == dest and dest.read_bytes() == data
    assert leftovers(dest) == ["a.bin"]  # no .part, no sidecar
    assert fs.starts() == [None]
    assert seen[-1] == (len(data), len(data))
    assert all(t == len(data) for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # rate-limited callbacks: far fewer than the ~50+ chunks read
    assert len(seen) < 20


async def test_an_empty_body_needs_no_request(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    dest = tmp_path / "empty"
    await Downloader(http).fetch(
        f"http://127.0.0.1:{port}/files/none", dest, size=0, sha256=sha(b""), etag=None
    )
    assert dest.read_bytes() == b"" and fs.log == []


async def test_cuts_resume_at_the_exact_byte_and_resend_little(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 8 * MiB
    data = fs.bodies["big"] = body_of(size, seed=2)
    # the first cut comes at 50%, then two more on the following connections
    async with CutProxy(port, cuts=[size // 2, 1 * MiB, 1 * MiB]) as proxy:
        dest = tmp_path / "big.bin"
        await Downloader(http, **FAST).fetch(
            proxy.url + "/files/big", dest, size=size, sha256=sha(data), etag=fs.etag("big")
        )
    assert dest.read_bytes() == data
    assert leftovers(dest) == ["big.bin"]
    assert [c.cut for c in proxy.conns] == [True, True, True, False]
    starts = fs.starts()
    assert starts[0] is None and len(starts) == 4
    # every resume asks for exactly the byte after the last one the client was given
    assert all(c.body_delivered > 0 for c in proxy.conns)
    assert [e.start for e in fs.log[1:]] == [
        sum(c.body_delivered for c in proxy.conns[: i + 1]) for i in range(3)
    ]
    assert all(e.if_range == fs.etag("big") for e in fs.log[1:])
    assert [e.status for e in fs.log] == [200, 206, 206, 206]
    # bytes that crossed the link (server to proxy) and were lost at each cut
    lost = [c.upstream - c.downstream for c in proxy.conns[:3]]
    assert all(0 <= n <= 64 * KiB for n in lost), lost
    wire_body = sum(c.upstream - (c.header_len or 0) for c in proxy.conns)
    assert wire_body - size <= 3 * 64 * KiB
    # what the server process wrote into its sockets also includes what sat in socket
    # buffers when the cut came (32 KiB buffers here)
    resent = [e.sent - c.body_delivered for e, c in zip(fs.log, proxy.conns, strict=True)][:3]
    assert all(0 <= n <= 256 * KiB for n in resent), resent


async def test_a_restarted_agent_resumes_the_partial_download(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 4 * MiB
    data = fs.bodies["r"] = body_of(size, seed=3)
    dest = tmp_path / "r.bin"
    # the link breaks at 40% and stays down: the first run gives up
    async with CutProxy(port, cuts=[int(size * 0.4), 0, 0, 0]) as proxy:
        first = Downloader(http, max_attempts=3, **FAST)
        with pytest.raises(TransferError, match="without progress"):
            await first.fetch(proxy.url + "/files/r", dest, size=size, sha256=sha(data), etag=None)
    del first  # the agent exits
    part = tmp_path / "r.bin.part"
    kept = part.stat().st_size
    delivered = proxy.conns[0].body_delivered
    assert kept == delivered > 0
    meta = json.loads((tmp_path / "r.bin.part.json").read_text())
    assert meta["sha256"] == sha(data) and meta["size"] == size
    assert meta["etag"] == fs.etag("r")  # learnt from the first response
    fs.log.clear()
    async with httpx.AsyncClient(timeout=10) as fresh:
        await Downloader(fresh).fetch(
            f"http://127.0.0.1:{port}/files/r", dest, size=size, sha256=sha(data), etag=None
        )
    assert dest.read_bytes() == data
    assert fs.starts() == [kept]
    assert fs.log[0].if_range == fs.etag("r") and fs.log[0].status == 206
    assert fs.log[0].sent == size - kept
    assert leftovers(dest) == ["r.bin"]


async def test_a_cancelled_download_resumes_where_it_stopped(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 2 * MiB
    data = fs.bodies["c"] = body_of(size, seed=4)
    dest = tmp_path / "c.bin"
    url = f"http://127.0.0.1:{port}/files/c"
    task = asyncio.create_task(
        Downloader(http).fetch(
            url, dest, size=size, sha256=sha(data), etag=None, limit_bps=2 * MiB, adaptive=False
        )
    )
    await asyncio.sleep(0.4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kept = (tmp_path / "c.bin.part").stat().st_size
    assert 0 < kept < size
    await Downloader(http).fetch(url, dest, size=size, sha256=sha(data), etag=None)
    assert dest.read_bytes() == data
    assert fs.starts() == [None, kept]


async def test_a_partial_of_another_body_is_discarded(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["d"] = body_of(256 * KiB, seed=5)
    dest = tmp_path / "d.bin"
    (tmp_path / "d.bin.part").write_bytes(b"x" * 1000)
    (tmp_path / "d.bin.part.json").write_text(
        json.dumps({"version": 1, "path": "/files/d", "size": len(data), "sha256": "0" * 64})
    )
    await Downloader(http).fetch(
        f"http://127.0.0.1:{port}/files/d", dest, size=len(data), sha256=sha(data), etag=None
    )
    assert dest.read_bytes() == data
    assert fs.starts() == [None]  # no Range: the old partial was not trusted


async def test_a_tampered_body_is_refused_and_nothing_is_left(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["t"] = body_of(1 * MiB, seed=6)
    fs.mode = "tamper"
    dest = tmp_path / "t.bin"
    with pytest.raises(TransferError, match="sha256 mismatch"):
        await Downloader(http).fetch(
            f"http://127.0.0.1:{port}/files/t", dest, size=len(data), sha256=sha(data), etag=None
        )
    assert leftovers(dest) == []


async def test_a_tampered_resume_is_refused(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 2 * MiB
    data = fs.bodies["tr"] = body_of(size, seed=7)
    dest = tmp_path / "tr.bin"
    async with CutProxy(port, cuts=[size // 4, 0]) as proxy:
        with pytest.raises(TransferError):
            await Downloader(http, max_attempts=1, **FAST).fetch(
                proxy.url + "/files/tr", dest, size=size, sha256=sha(data), etag=None
            )
    fs.mode = "tamper"  # the changed byte lies in the part still to come
    with pytest.raises(TransferError, match="resumed at byte"):
        await Downloader(http).fetch(
            f"http://127.0.0.1:{port}/files/tr", dest, size=size, sha256=sha(data), etag=None
        )
    assert leftovers(dest) == []


async def test_a_server_that_ignores_range_still_gives_the_same_bytes(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 2 * MiB
    data = fs.bodies["n"] = body_of(size, seed=8)
    fs.mode = "ignore_range"
    dest = tmp_path / "n.bin"
    async with CutProxy(port, cuts=[size // 2]) as proxy:
        await Downloader(http, **FAST).fetch(
            proxy.url + "/files/n", dest, size=size, sha256=sha(data), etag=None
        )
    assert dest.read_bytes() == data
    assert fs.starts()[1] is not None  # it asked for a range …
    assert [e.status for e in fs.log] == [200, 200]  # … and got the whole body again


async def test_a_changed_etag_restarts_from_the_first_byte(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["e"] = body_of(512 * KiB, seed=9)
    dest = tmp_path / "e.bin"
    # a partial from an earlier run whose entity tag the server no longer has
    (tmp_path / "e.bin.part").write_bytes(data[:1000])
    (tmp_path / "e.bin.part.json").write_text(
        json.dumps(
            {"version": 1, "path": "/files/e", "size": len(data), "sha256": sha(data), "etag": None}
        )
    )
    await Downloader(http).fetch(
        f"http://127.0.0.1:{port}/files/e", dest, size=len(data), sha256=sha(data), etag='"old"'
    )
    assert dest.read_bytes() == data
    assert fs.log[0].if_range == '"old"' and fs.log[0].status == 200


async def test_416_starts_over(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 1 * MiB
    data = fs.bodies["f"] = body_of(size, seed=10)
    fs.mode = "refuse_range"
    dest = tmp_path / "f.bin"
    async with CutProxy(port, cuts=[size // 2]) as proxy:
        await Downloader(http, **FAST).fetch(
            proxy.url + "/files/f", dest, size=size, sha256=sha(data), etag=None
        )
    assert dest.read_bytes() == data
    assert [e.status for e in fs.log] == [200, 416, 200]
    assert fs.starts()[2] is None


async def test_more_bytes_than_announced_are_refused(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["o"] = body_of(300 * KiB, seed=11)
    fs.mode = "overrun"
    dest = tmp_path / "o.bin"
    with pytest.raises(TransferError, match="more than"):
        await Downloader(http).fetch(
            f"http://127.0.0.1:{port}/files/o", dest, size=len(data), sha256=sha(data), etag=None
        )
    assert leftovers(dest) == []


async def test_a_body_of_another_size_is_refused(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["s"] = body_of(100 * KiB, seed=12)
    dest = tmp_path / "s.bin"
    with pytest.raises(TransferError, match="announced"):
        await Downloader(http).fetch(
            f"http://127.0.0.1:{port}/files/s", dest, size=len(data) + 1, sha256="a" * 64, etag=None
        )
    assert leftovers(dest) == []


async def test_transient_server_errors_are_retried_then_given_up(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    data = fs.bodies["g"] = body_of(64 * KiB, seed=13)
    url = f"http://127.0.0.1:{port}/files/g"
    fs.fail_first = 2
    await Downloader(http, **FAST).fetch(
        url, tmp_path / "g1", size=len(data), sha256=sha(data), etag=None
    )
    assert (tmp_path / "g1").read_bytes() == data
    assert [e.status for e in fs.log] == [503, 503, 200]
    fs.log.clear()
    fs.fail_first = 100
    with pytest.raises(TransferError, match="503"):
        await Downloader(http, max_attempts=3, **FAST).fetch(
            url, tmp_path / "g2", size=len(data), sha256=sha(data), etag=None
        )
    assert len(fs.log) == 3


async def test_a_missing_body_fails_at_once(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    with pytest.raises(TransferError) as err:
        await Downloader(http, **FAST).fetch(
            f"http://127.0.0.1:{port}/files/missing",
            tmp_path / "m",
            size=10,
            sha256="b" * 64,
            etag=None,
        )
    assert err.value.status == 404 and len(fs.log) == 1


async def test_bad_arguments_are_refused(http: httpx.AsyncClient, tmp_path: Path) -> None:
    dl = Downloader(http)
    with pytest.raises(ValueError, match="sha256"):
        await dl.fetch("/x", tmp_path / "x", size=1, sha256="nothex", etag=None)
    with pytest.raises(ValueError, match="size"):
        await dl.fetch("/x", tmp_path / "x", size=-1, sha256="a" * 64, etag=None)
    with pytest.raises(ValueError, match="limit"):
        await dl.fetch("/x", tmp_path / "x", size=1, sha256="a" * 64, etag=None, limit_bps=0)
    assert leftovers(tmp_path / "x") == []


async def test_memory_stays_flat_for_a_large_body(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size = 8 * MiB
    data = fs.bodies["big"] = body_of(size, seed=14)
    digest = sha(data)
    tracemalloc.start()
    try:
        await Downloader(http).fetch(
            f"http://127.0.0.1:{port}/files/big",
            tmp_path / "big",
            size=size,
            sha256=digest,
            etag=None,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(tmp_path / "big") == size
    assert peak < 2 * MiB, peak  # server and client together, for an 8 MiB body


async def test_the_set_limit_holds_the_average_rate(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size, limit = 6 * MiB, 2 * MiB
    data = fs.bodies["l"] = body_of(size, seed=15)
    dl = Downloader(http)
    began = time.monotonic()
    await dl.fetch(
        f"http://127.0.0.1:{port}/files/l",
        tmp_path / "l",
        size=size,
        sha256=sha(data),
        etag=None,
        limit_bps=limit,
        adaptive=False,
    )
    rate = size / (time.monotonic() - began)
    assert 0.8 * limit <= rate <= 1.2 * limit, rate
    assert dl.rate_bps == limit


async def test_adaptive_mode_backs_off_when_the_link_slows(
    files: tuple[FileServer, int], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    fs, port = files
    size, limit = 3 * MiB, 4 * MiB
    data = fs.bodies["s"] = body_of(size, seed=16)
    rates: list[float | None] = []
    # fast for the first MiB, then 16 KiB per 20 ms (about 800 KiB/s)
    async with CutProxy(port, slow_after=1 * MiB, slow_delay_s=0.02) as proxy:
        dl = Downloader(http, progress_interval_s=0.1)
        await dl.fetch(
            proxy.url + "/files/s",
            tmp_path / "s",
            size=size,
            sha256=sha(data),
            etag=None,
            limit_bps=limit,
            progress=lambda done, total: rates.append(dl.rate_bps),
        )
    assert (tmp_path / "s").read_bytes() == data
    assert dl.adaptive is not None and dl.adaptive.decreases >= 1
    assert rates[0] == limit
    lowest = min(r for r in rates if r is not None)
    assert lowest < limit / 2, rates  # it settled near what the slow link gives
    assert dl.throughput_bps is not None and dl.throughput_bps < limit / 2


async def test_rate_limiter_keeps_the_long_run_average() -> None:
    limiter = RateLimiter(1 * MiB, burst=16 * KiB)
    began = time.monotonic()
    for _ in range(24):
        await limiter.acquire(16 * KiB)
    elapsed = time.monotonic() - began
    # 384 KiB with a 16 KiB burst at 1 MiB/s: 0.36 s
    assert 0.33 <= elapsed <= 0.8, elapsed
    limiter.set_rate(None)
    began = time.monotonic()
    assert await limiter.acquire(10 * MiB) == 0.0
    assert time.monotonic() - began < 0.05
    with pytest.raises(ValueError, match="positive"):
        limiter.set_rate(0)


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(ctl: AdaptiveRate, clock: FakeClock, bps: float, wait_s: float, windows: int) -> None:
    """`windows` half-second windows of 8 reads each at `bps`, each read waiting `wait_s`."""
    for _ in range(windows):
        for _ in range(8):
            clock.now += 0.5 / 8
            ctl.observe(int(bps * 0.5 / 8), wait_s)


def test_adaptive_rate_is_aimd() -> None:
    clock = FakeClock()
    limiter = RateLimiter(None, clock=clock)
    ctl = AdaptiveRate(limiter, None, clock=clock)
    feed(ctl, clock, 10 * MiB, 0.0001, 6)
    assert limiter.rate is None and ctl.decreases == 0  # a steady link is left alone
    feed(ctl, clock, 2 * MiB, 0.0001, 1)  # throughput collapses
    assert ctl.decreases == 1 and limiter.rate == pytest.approx(0.7 * 2 * MiB, rel=0.01)
    cut_to = limiter.rate
    assert cut_to is not None
    feed(ctl, clock, cut_to, 0.0001, 2)  # cooldown: not judged
    assert ctl.increases == 0
    feed(ctl, clock, cut_to, 0.0001, 5)  # good windows: a constant step up each time
    assert ctl.increases == 5
    assert limiter.rate == pytest.approx(cut_to * 1.25, rel=0.01)
    before = limiter.rate
    assert before is not None
    feed(ctl, clock, before, 0.05, 1)  # reads now wait far longer: queueing
    assert ctl.decreases == 2 and limiter.rate == pytest.approx(0.7 * before, rel=0.01)


def test_adaptive_rate_stays_under_the_set_limit() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1 * MiB, clock=clock)
    ctl = AdaptiveRate(limiter, 1 * MiB, clock=clock)
    feed(ctl, clock, 1 * MiB, 0.0001, 10)
    assert limiter.rate == 1 * MiB and ctl.decreases == 0
    feed(ctl, clock, 100 * KiB, 0.0001, 1)  # the link gives a tenth of the limit
    assert limiter.rate == pytest.approx(70 * KiB, rel=0.01)
    feed(ctl, clock, 10 * MiB, 0.0001, 200)
    assert limiter.rate == 1 * MiB  # climbs back, never past the limit


async def test_signed_device_download(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    fs = FileServer(device_key=public)
    data = fs.bodies["plan1"] = body_of(512 * KiB, seed=17)
    async with serve(fs.app()) as port:
        client = DeviceClient(f"http://127.0.0.1:{port}", "d" * 32, key, ca_pem=None)
        try:
            headers = await client.signed_headers("GET", protocol.DEVICE_API + "/transfers/x")
            assert headers[protocol.H_DEVICE] == "d" * 32
            assert protocol.H_SESSION not in headers  # this server has no sessions (404)
            dl = Downloader(client.http, client.signed_headers)
            dest = tmp_path / "plan1"
            await dl.fetch(
                protocol.DEVICE_API + "/transfers/plan1",
                dest,
                size=len(data),
                sha256=sha(data),
                etag=fs.etag("plan1"),
            )
            assert dest.read_bytes() == data
            assert fs.log[-1].status == 200
            # a forger's signature is refused, and that is not retried
            forged = DeviceClient(
                f"http://127.0.0.1:{port}",
                "d" * 32,
                ed25519.Ed25519PrivateKey.generate(),
                ca_pem=None,
            )
            try:
                with pytest.raises(TransferError) as err:
                    await Downloader(forged.http, forged.signed_headers).fetch(
                        protocol.DEVICE_API + "/transfers/plan1",
                        tmp_path / "forged",
                        size=len(data),
                        sha256=sha(data),
                        etag=None,
                    )
                assert err.value.status == 401
            finally:
                await forged.aclose()
        finally:
            await client.aclose()
