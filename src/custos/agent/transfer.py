"""The agent's downloader: resumable at the exact byte, verified by hash, throttled.

A transfer plan's wire body is opaque bytes of known size and SHA-256. `Downloader.fetch`
streams it into `<dest>.part` beside a small sidecar (`<dest>.part.json`) that names what is
being downloaded, so a cut connection, a timeout or an agent restart resumes with
`Range: bytes=N-` (and `If-Range` when the entity tag is known) instead of starting over.
The file is hashed while it is written; only a body whose hash matches is renamed to `dest`.

Bandwidth is limited by a token bucket (`RateLimiter`); in adaptive mode `AdaptiveRate`
lowers and raises that limit from what it measures, so a download stays in the background
of a slow link instead of filling it. The server side is
`GET /api/device/v1/transfers/{plan_id}`: strong ETag, Accept-Ranges, 206 with Content-Range.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import httpx

from custos.agent.client import ServerError

log = logging.getLogger("custos.agent.transfer")

KiB = 1024
MiB = 1024 * KiB

HeadersFor = Callable[[str, str], Awaitable[dict[str, str]]]
Progress = Callable[[int, int], None]
Clock = Callable[[], float]

SIDECAR_VERSION = 1
MAX_SIDECAR_BYTES = 64 * KiB
MAX_BODY_BYTES = 1 << 50  # a plan larger than this is a bug, not a download
HASH_BLOCK = 1 * MiB

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# bounded digit runs: a hostile header cannot make int() chew on megabytes of digits
_CONTENT_RANGE = re.compile(r"bytes\s+(\d{1,20})-(\d{1,20})/(\d{1,20}|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d{1,20})")
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# Backoff jitter only spreads reconnects out; it needs no cryptographic randomness.
_jitter = random.Random()  # noqa: S311


class TransferError(Exception):
    """A download that cannot complete: bad response, hash mismatch, or retries exhausted."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _Retry(Exception):
    """One attempt failed in a way another attempt may not (cut, timeout, 5xx, 429)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class RateLimiter:
    """A token bucket in bytes: callers spend what they read and wait when it runs dry.

    The bucket refills at `rate` bytes/s up to `burst` bytes. Spending more than is in the
    bucket leaves it in debt and sleeps until the debt is repaid, so chunks of any size
    keep the long-run average at the rate, and one limiter can be shared by several
    downloads. A rate of None means no limit.
    """

    def __init__(
        self,
        rate_bps: float | None = None,
        *,
        burst: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate must be positive, not {rate_bps}")
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be positive, not {burst}")
        self._clock = clock
        self._rate = rate_bps
        self._fixed_burst = burst
        self._stamp = clock()
        self._tokens = float(self.burst)

    @property
    def rate(self) -> float | None:
        """The current limit in bytes/s (None: unlimited)."""
        return self._rate

    @property
    def burst(self) -> int:
        """How many bytes may pass at once after an idle spell."""
        if self._fixed_burst is not None:
            return self._fixed_burst
        if self._rate is None:
            return 64 * KiB
        # a tenth of a second of traffic: smooth, yet not a wake-up per packet
        return int(min(max(self._rate / 10, 16 * KiB), 1 * MiB))

    def set_rate(self, rate_bps: float | None) -> None:
        """Change the limit; tokens earned so far are kept (up to the new burst)."""
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate must be positive, not {rate_bps}")
        self._refill()
        self._rate = rate_bps
        self._tokens = min(self._tokens, float(self.burst))

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def acquire(self, nbytes: int) -> float:
        """Spend `nbytes`; sleeps while the bucket is in debt. Returns the seconds slept."""
        if nbytes <= 0:
            return 0.0
        self._refill()
        if self._rate is None:
            return 0.0
        self._tokens -= nbytes
        if self._tokens >= 0:
            return 0.0
        delay = -self._tokens / self._rate
        await asyncio.sleep(delay)
        return delay


class AdaptiveRate:
    """Steers a RateLimiter from measured throughput and read delay (AIMD).

    The stream is observed in windows of about `window_s` seconds. Each window yields the
    throughput (bytes over wall time, including our own throttling) and the mean time a
    read waited for the network. Two things count as congestion:

    - throughput fell below `drop_ratio` of what we expected: the best throughput seen in
      recent windows (a maximum that decays each window, so an old peak is forgotten),
      or the current limit if that is lower (we cannot blame the link for our own limit);
    - the mean read wait grew past `delay_factor` times its recent minimum plus
      `delay_slack_s`. While we are the bottleneck, data piles up in the socket buffer
      and reads return at once; waits grow when the link cannot keep up with us, the
      sign that we are filling it.

    On congestion the limit becomes `decrease` times the lower of the measured throughput
    and the current limit (never below `floor_bps`), and the next `cooldown_windows`
    windows are not judged, so the new limit settles before it is judged. Otherwise
    the limit grows by a constant step (a twentieth of the limit just after the last
    decrease, at least `min_step_bps`), up to `ceiling_bps` (the set limit) or, with no
    set limit, to twice the best recent throughput. With no set limit and no congestion
    yet, nothing is throttled.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        ceiling_bps: float | None,
        *,
        window_s: float = 0.5,
        min_reads: int = 4,
        drop_ratio: float = 0.5,
        delay_factor: float = 2.0,
        delay_slack_s: float = 0.01,
        decrease: float = 0.7,
        min_step_bps: float = 16 * KiB,
        floor_bps: float = 16 * KiB,
        best_decay: float = 0.9,
        delay_history: int = 20,
        cooldown_windows: int = 2,
        clock: Clock = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.ceiling_bps = ceiling_bps
        self.window_s = window_s
        self.min_reads = min_reads
        self.drop_ratio = drop_ratio
        self.delay_factor = delay_factor
        self.delay_slack_s = delay_slack_s
        self.decrease = decrease
        self.min_step_bps = min_step_bps
        self.floor_bps = floor_bps
        self.best_decay = best_decay
        self.cooldown_windows = cooldown_windows
        self._clock = clock
        self._delays: collections.deque[float] = collections.deque(maxlen=delay_history)
        self._best: float | None = None
        self._step = min_step_bps
        self._cooldown = 0
        self.measured_bps: float | None = None
        self.decreases = 0
        self.increases = 0
        self.restart()

    def restart(self) -> None:
        """Begin a fresh window (a new connection: its set-up time is not link throughput)."""
        self._start = self._clock()
        self._bytes = 0
        self._reads = 0
        self._wait = 0.0

    def observe(self, nbytes: int, read_wait_s: float) -> None:
        """Account one read of `nbytes` that waited `read_wait_s` for the network."""
        self._bytes += nbytes
        self._reads += 1
        self._wait += read_wait_s
        elapsed = self._clock() - self._start
        if elapsed >= self.window_s and self._reads >= self.min_reads:
            self._judge(self._bytes / elapsed, self._wait / self._reads)
            self.restart()

    def _judge(self, throughput: float, delay: float) -> None:
        self.measured_bps = throughput
        rate = self.limiter.rate
        expected = self._best
        if rate is not None:
            expected = rate if expected is None else min(expected, rate)
        slow = expected is not None and throughput < self.drop_ratio * expected
        base = min(self._delays) if self._delays else None
        queued = base is not None and delay > self.delay_factor * base + self.delay_slack_s
        if self._cooldown > 0:
            self._cooldown -= 1
        elif slow or queued:
            basis = throughput if rate is None else min(throughput, rate)
            new = max(self.floor_bps, basis * self.decrease)
            self._step = max(self.min_step_bps, new / 20)
            self._cooldown = self.cooldown_windows
            self.decreases += 1
            log.debug(
                "congestion (%.0f B/s, %.1f ms/read): limit %s -> %.0f B/s",
                throughput,
                delay * 1000,
                rate,
                new,
            )
            self.limiter.set_rate(new)
        elif rate is not None:
            cap = self.ceiling_bps
            if cap is None:  # a limit far above what the link gives limits nothing
                cap = 2 * max(self._best or 0.0, throughput)
            new = min(cap, rate + self._step)
            if new > rate:
                self.increases += 1
                self.limiter.set_rate(new)
        self._best = (
            throughput if self._best is None else max(throughput, self._best * self.best_decay)
        )
        self._delays.append(delay)


class _Job:
    """The state of one fetch: paths, the open part file, the running hash."""

    def __init__(self, path: str, dest: Path, size: int, sha256: str, etag: str | None) -> None:
        self.path = path
        self.dest = dest
        self.size = size
        self.sha256 = sha256
        self.etag = etag
        self.part = dest.with_name(dest.name + ".part")
        self.sidecar = dest.with_name(dest.name + ".part.json")
        self.file: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self.offset = 0
        self.synced = 0
        self.high_water = 0  # furthest offset reached: progress means passing it
        self.resumed_from = 0
        self.limiter = RateLimiter(None)
        self.adaptive: AdaptiveRate | None = None

    def sidecar_data(self) -> dict[str, Any]:
        return {
            "version": SIDECAR_VERSION,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "etag": self.etag,
        }

    def write_sidecar(self) -> None:
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(self.sidecar_data()).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.sidecar)

    def read_sidecar(self) -> dict[str, Any] | None:
        try:
            with open(self.sidecar, "rb") as f:
                raw = f.read(MAX_SIDECAR_BYTES + 1)
        except OSError:
            return None
        if len(raw) > MAX_SIDECAR_BYTES:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def discard(self) -> None:
        """Delete the partial file and its sidecar."""
        self.close()
        for p in (self.part, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def open(self) -> None:
        """Open the part file, keeping a partial download only if its sidecar matches."""
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        meta = self.read_sidecar()
        keep = (
            meta is not None
            and meta.get("version") == SIDECAR_VERSION
            and meta.get("size") == self.size
            and meta.get("sha256") == self.sha256
            and self.part.exists()
        )
        if keep and meta is not None and self.etag is None and isinstance(meta.get("etag"), str):
            self.etag = meta["etag"]
        if not keep:
            self.discard()
        self.write_sidecar()
        self.file = open(self.part, "ab")  # noqa: SIM115 - closed by close()
        have = self.file.tell()
        if have > self.size:
            log.warning("partial %s is longer than the body; starting over", self.part)
            have = 0
        if have:
            self.hasher = _hash_prefix(self.part, have)
        self.file.truncate(have)
        self.offset = self.synced = self.high_water = self.resumed_from = have

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.flush()
            self.file.close()
            self.file = None

    def truncate(self, offset: int) -> None:
        """Forget everything after `offset` (only 0 is used: the hash cannot be rewound)."""
        assert self.file is not None and offset == 0
        self.file.flush()
        self.file.truncate(0)
        self.hasher = hashlib.sha256()
        self.offset = self.synced = 0

    def write(self, chunk: bytes) -> None:
        assert self.file is not None
        self.file.write(chunk)
        self.hasher.update(chunk)
        self.offset += len(chunk)
        self.high_water = max(self.high_water, self.offset)

    async def sync(self) -> None:
        """Make the bytes written so far survive a crash."""
        if self.file is None or self.synced == self.offset:
            return
        self.file.flush()
        await asyncio.to_thread(os.fsync, self.file.fileno())
        self.synced = self.offset


class Downloader:
    """Fetches transfer bodies over HTTP with Range: resumable, hash-verified, throttled.

    `headers_for(method, path_qs)` supplies per-request headers (the device's signature, or
    nothing for a plain server); it is called once per attempt, with the path and query as
    they go on the wire. A failed attempt (cut, timeout, 5xx, 429) that moved the download
    forward is retried after a short jittered pause; failures that did not back off
    exponentially, and `max_attempts` of them in a row end the fetch, as does
    `give_up_after_s` in total. Failures raise TransferError; an exception other than
    ServerError from `headers_for` (e.g. ServerRefused) propagates unchanged. One fetch per
    destination at a time: nothing locks the part file against a second writer.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        headers_for: HeadersFor | None = None,
        *,
        max_attempts: int = 8,
        backoff_s: float = 0.5,
        backoff_max_s: float = 60.0,
        give_up_after_s: float | None = None,
        read_timeout_s: float = 60.0,
        sync_every: int = 4 * MiB,
        progress_interval_s: float = 0.25,
        adaptive_options: dict[str, Any] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._http = http
        self._headers_for = headers_for or _no_headers
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.give_up_after_s = give_up_after_s
        self.read_timeout_s = read_timeout_s
        self.sync_every = sync_every
        self.progress_interval_s = progress_interval_s
        self.adaptive_options = dict(adaptive_options or {})
        self._current: _Job | None = None  # the latest fetch, for status

    @property
    def rate_bps(self) -> float | None:
        """The limit in force for the current (or last) fetch, in bytes/s; None: unlimited."""
        return self._current.limiter.rate if self._current is not None else None

    @property
    def throughput_bps(self) -> float | None:
        """The throughput measured in the last adaptive window, in bytes/s."""
        job = self._current
        return job.adaptive.measured_bps if job is not None and job.adaptive is not None else None

    @property
    def adaptive(self) -> AdaptiveRate | None:
        """The adaptive controller of the current (or last) fetch, if it is adaptive."""
        return self._current.adaptive if self._current is not None else None

    async def fetch(
        self,
        path: str,
        dest: Path,
        *,
        size: int,
        sha256: str,
        etag: str | None,
        limit_bps: int | None = None,
        adaptive: bool = True,
        progress: Progress | None = None,
    ) -> Path:
        """Download `path` into `dest` (resuming a partial one), verify it, return `dest`."""
        sha256 = sha256.lower()
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"sha256 must be 64 hex digits, not {sha256!r}")
        if not 0 <= size <= MAX_BODY_BYTES:
            raise ValueError(f"size out of range: {size}")
        if limit_bps is not None and limit_bps <= 0:
            raise ValueError(f"limit_bps must be positive, not {limit_bps}")
        dest = Path(dest)
        job = _Job(path, dest, size, sha256, etag)
        if await asyncio.to_thread(_matches, dest, size, sha256):
            job.discard()  # a leftover of a run that died between rename and clean-up
            if progress is not None:
                progress(size, size)
            return dest
        job.limiter = RateLimiter(limit_bps)
        if adaptive:
            job.adaptive = AdaptiveRate(job.limiter, limit_bps, **self.adaptive_options)
        self._current = job
        await self._open(job)
        try:
            await self._run(job, progress)
            await self._finish(job)
        finally:
            job.close()
        if progress is not None:
            progress(size, size)
        return dest

    async def _open(self, job: _Job) -> None:
        """Open the part file (off the event loop: it may re-hash a large prefix)."""
        await asyncio.to_thread(job.open)
        if job.offset:
            log.info("resuming %s at byte %d of %d", job.path, job.offset, job.size)

    async def _run(self, job: _Job, progress: Progress | None) -> None:
        """Attempt until every byte is in, retrying transient failures."""
        started = time.monotonic()
        failures = 0
        reporter = _Reporter(progress, job.size, self.progress_interval_s)
        while job.offset < job.size:
            before = job.high_water
            retry_after: float | None = None
            try:
                await self._attempt(job, reporter)
            except _Retry as exc:
                reason, retry_after = exc.reason, exc.retry_after
            else:
                if job.high_water > before:
                    failures = 0
                    continue  # a server that serves the body in pieces: ask for the next one
                reason = f"the body ended at byte {job.offset} of {job.size}"
            if job.offset >= job.size:
                break
            await job.sync()
            failures = 0 if job.high_water > before else failures + 1
            if failures >= self.max_attempts:
                raise TransferError(f"gave up after {failures} attempts without progress: {reason}")
            delay = min(self.backoff_max_s, self.backoff_s * 2**failures)
            delay = _jitter.uniform(delay / 2, delay)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max_s))
            total = time.monotonic() - started
            if self.give_up_after_s is not None and total + delay > self.give_up_after_s:
                raise TransferError(f"gave up after {total:.0f} s: {reason}")
            log.info("transfer %s: %s; retrying in %.1f s", job.path, reason, delay)
            await asyncio.sleep(delay)

    async def _attempt(self, job: _Job, reporter: _Reporter) -> None:
        """One request: stream the response into the part file."""
        url = self._http.build_request("GET", job.path).url
        try:
            headers = dict(await self._headers_for("GET", url.raw_path.decode("ascii")))
        except ServerError as exc:  # opening a device session can fail like any request
            raise _Retry(f"could not sign the request: {exc}") from exc
        headers["accept-encoding"] = "identity"  # the hash is over the bytes as sent
        ranged = job.offset > 0
        if ranged:
            headers["range"] = f"bytes={job.offset}-"
            if_range = _strong_etag(job.etag)
            if if_range is not None:
                headers["if-range"] = if_range
        request = self._http.build_request("GET", url, headers=headers)
        try:
            resp = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        try:
            await self._consume(job, resp, ranged, reporter)
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        finally:
            with contextlib.suppress(httpx.HTTPError):
                await resp.aclose()

    async def _consume(
        self, job: _Job, resp: httpx.Response, ranged: bool, reporter: _Reporter
    ) -> None:
        """Check the response's status and headers, then write its body."""
        status = resp.status_code
        if status in _RETRYABLE_STATUS:
            raise _Retry(f"server answered {status}", _retry_after(resp))
        if status == 416:
            total = _unsatisfied_total(resp)
            if total is not None and total != job.size:
                job.discard()
                raise TransferError(
                    f"server's body is {total} bytes, the plan says {job.size}", status=status
                )
            log.warning("server refused range from byte %d; starting over", job.offset)
            job.truncate(0)
            raise _Retry("server refused the range (416)")
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise TransferError(f"unexpected content-encoding {encoding!r}", status=status)
        if status == 206:
            start, end, total = _content_range(resp)
            if total != job.size:
                job.discard()
                raise TransferError(
                    f"server's body is {total} bytes, the plan says {job.size}", status=status
                )
            if start != job.offset or end < start or end >= job.size:
                raise TransferError(
                    f"server sent bytes {start}-{end}, asked for {job.offset}-", status=status
                )
            limit = end - start + 1
        elif status == 200:
            if ranged:
                log.info("server sent the whole body instead of a range; starting over")
                job.truncate(0)
            limit = job.size
        else:
            raise TransferError(f"server answered {status}", status=status)
        length = _content_length(resp)
        if length is not None and length != limit:
            job.discard()
            raise TransferError(
                f"server announced {length} bytes where {limit} were expected", status=status
            )
        if job.etag is None and _strong_etag(resp.headers.get("etag")) is not None:
            job.etag = resp.headers["etag"]
            # so a resume after an agent restart can send If-Range too
            await asyncio.to_thread(job.write_sidecar)
        await self._stream(job, resp, limit, reporter)

    async def _stream(
        self, job: _Job, resp: httpx.Response, limit: int, reporter: _Reporter
    ) -> None:
        """Copy at most `limit` bytes of the body to the part file, hashing and throttling."""
        if job.adaptive is not None:
            job.adaptive.restart()
        received = 0
        chunks = resp.aiter_raw()
        clock = time.monotonic
        while True:
            began = clock()
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise _Retry(f"no data for {self.read_timeout_s:.0f} s") from None
            waited = clock() - began
            if received + len(chunk) > limit:
                job.discard()
                raise TransferError(f"server sent more than the {limit} bytes it announced")
            received += len(chunk)
            job.write(chunk)
            if job.offset - job.synced >= self.sync_every:
                await job.sync()
            reporter.report(job.offset)
            if job.adaptive is not None:
                job.adaptive.observe(len(chunk), waited)
            await job.limiter.acquire(len(chunk))
        if received < limit:
            raise _Retry(f"the body ended after {received} of {limit} bytes")

    async def _finish(self, job: _Job) -> None:
        """Verify the whole body's hash, then move it into place."""
        assert job.file is not None
        await job.sync()
        digest = job.hasher.hexdigest()
        if job.offset != job.size or digest != job.sha256:
            job.discard()
            raise TransferError(
                f"sha256 mismatch for {job.path}: expected {job.sha256}, got {digest}"
                + (
                    f" (the download resumed at byte {job.resumed_from})"
                    if job.resumed_from
                    else ""
                )
            )
        job.close()
        os.replace(job.part, job.dest)
        _sync_dir(job.dest.parent)
        with contextlib.suppress(FileNotFoundError):
            job.sidecar.unlink()


class _Reporter:
    """Calls the progress callback at most once per interval."""

    def __init__(self, callback: Progress | None, total: int, interval_s: float) -> None:
        self.callback = callback
        self.total = total
        self.interval_s = interval_s
        self._last = 0.0

    def report(self, done: int) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.callback(done, self.total)


async def _no_headers(method: str, path_qs: str) -> dict[str, str]:
    return {}


def _strong_etag(value: str | None) -> str | None:
    """The entity tag as If-Range wants it; None for a weak one (If-Range needs strong)."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/") or len(value) > 1024:
        return None
    if not value.startswith('"'):
        value = f'"{value}"'  # a bare plan id given by the caller
    return value


def _content_range(resp: httpx.Response) -> tuple[int, int, int]:
    raw = resp.headers.get("content-range", "")
    m = _CONTENT_RANGE.fullmatch(raw.strip())
    if m is None or m.group(3) == "*":
        raise TransferError(f"206 with an unusable Content-Range {raw[:100]!r}", status=206)
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _unsatisfied_total(resp: httpx.Response) -> int | None:
    m = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("content-range", "").strip())
    return int(m.group(1)) if m else None


def _content_length(resp: httpx.Response) -> int | None:
    raw = resp.headers.get("content-length")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 20:
        raise TransferError(f"bad Content-Length {raw[:40]!r}", status=resp.status_code)
    return int(raw)


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after", "").strip()
    if raw.isdigit() and len(raw) < 10:
        return float(raw)
    return None  # an HTTP date is rare for this; the backoff covers it


def _hash_prefix(path: Path, length: int) -> Any:
    """SHA-256 state over the first `length` bytes of `path`, read in bounded blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left:
            block = f.read(min(HASH_BLOCK, left))
            if not block:
                raise TransferError(f"{path} shrank while it was being read")
            hasher.update(block)
            left -= len(block)
    return hasher


def _matches(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` already holds exactly the expected body."""
    try:
        if not path.is_file() or path.stat().st_size != size:
            return False
    except OSError:
        return False
    return bool(_hash_prefix(path, size).hexdigest() == sha256)


def _sync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
