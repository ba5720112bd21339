"""Simulated devices that enrol and check in over the real agent protocol, thousands per process.

Every device has its own Ed25519 key and signs its requests exactly as the agent does; all of
them share one pooled HTTP client. With push on, every device also holds its own WebSocket
(the `websockets` asyncio client, as the agent uses) and checks in at once when woken.
Commands are executed in simulation only: nothing is run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import itertools
import logging
import os
import random
import resource
import ssl
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from custos import __version__, protocol
from custos.agent.client import SESSION_ERRORS, pinned_context, retry_after_of
from custos.agent.identity import ca_fingerprint, fetch_pinned_ca
from custos.agent.inventory import FACT_KEYS, inventory_delta
from custos.agent.push import PUSH_PATH, STABLE_S, backoff_delay, push_url
from custos.sim.inventory import fake_inventory, mutate_inventory

log = logging.getLogger("custos.sim")

AGENT_VERSION = f"{__version__}+sim"
STATE_FORMAT = 1
MAX_BACKOFF_S = 300.0
ENROLL_ATTEMPTS = 5
FOLLOW_UPS = 5  # immediate extra check-ins to report results, per cycle
STOP_GRACE_S = 3.0  # how long in-flight check-ins may finish after stop
NO_FILE_SYSTEM = "simulated device: no file system"
PUSH_REFUSED_PAUSE_S = 600.0  # like the agent: a refused push socket is not retried soon
# what the server sends to wake a device (the agent parses JSON; a byte compare is enough here)
WAKE_MESSAGES = frozenset({'{"type":"wake"}', '{"type": "wake"}'})

# called after every successful check-in: (device, request payload, response, seconds)
CheckinObserver = Callable[["SimDevice", dict[str, Any], dict[str, Any], float], None]


def raise_fd_limit(want: int | None = None) -> int:
    """Raise this process's open-file limit towards the hard limit; returns the new soft limit.

    Every push connection is a socket: 10,000 devices need more than the usual 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else want
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


class FleetError(Exception):
    """The fleet cannot go on (e.g. the server refused the enrolment token)."""


async def _post_reusing(
    http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """POST, sent once more on a fresh connection when a kept-alive one turns out closed.

    A server that restarts closes its idle keep-alive connections; one the pool hands out
    just then fails before any answer. A check-in may be repeated (results and acks are
    recorded idempotently), so, as an agent would, the simulator retries it at once instead
    of counting an error.
    """
    try:
        return await http.post(url, content=body, headers=headers)
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        return await http.post(url, content=body, headers=headers)


class _Refused(Exception):
    """The server refused this device (401/403): it stops."""


class _Transient(Exception):
    """A failure worth retrying later (network, 5xx, 429, an unexpected answer)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class FleetStats:
    """A snapshot of the fleet's counters, for a status line."""

    devices: int
    enrolled: int
    active: int
    checkins: int
    checkins_per_s: float
    commands_done: int
    errors: int
    refused: int
    last_error: str = ""
    push_connected: int = 0
    push_connects: int = 0
    push_failures: int = 0
    wakes: int = 0

    def summary(self) -> str:
        """One line: enrolled x/N, active, push-connected, check-ins/s, commands, errors."""
        return (
            f"enrolled {self.enrolled}/{self.devices} · active {self.active} · "
            f"push-connected {self.push_connected} · "
            f"{self.checkins_per_s:.1f} check-ins/s ({self.checkins} total) · "
            f"{self.commands_done} commands done · {self.errors} errors · "
            f"{self.refused} refused"
        )


class _Rate:
    """Events per second over the last few whole seconds (fixed buckets, O(1) per event)."""

    def __init__(self, window: int = 5) -> None:
        self.window = window
        self._counts = [0] * (window + 1)
        self._secs = [-1] * (window + 1)

    def add(self, n: int = 1) -> None:
        sec = int(time.monotonic())
        i = sec % len(self._counts)
        if self._secs[i] != sec:
            self._secs[i] = sec
            self._counts[i] = 0
        self._counts[i] += n

    def per_second(self) -> float:
        now = int(time.monotonic())
        total = sum(
            c
            for c, s in zip(self._counts, self._secs, strict=True)
            if now - s in range(1, self.window + 1)
        )
        return total / self.window


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).isoformat()


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        data = orjson.loads(resp.content)
        return str(data.get("error", "error")), str(data.get("detail", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return "error", resp.text[:200] or resp.reason_phrase


class SimDevice:
    """One simulated device: key, identity, inventory, and what it still has to tell the server."""

    __slots__ = (
        "_inv",
        "acks",
        "busy",
        "device_id",
        "done",
        "failures",
        "hostname",
        "index",
        "interval_override",
        "inventory_version",
        "key",
        "ok",
        "pending_remove",
        "pending_set",
        "policy_report",
        "policy_seq",
        "push_up",
        "refused",
        "results",
        "rewake",
        "sched",
        "seed",
        "session",
        "woken",
    )

    def __init__(self, index: int, seed: int) -> None:
        self.index = index
        self.seed = seed
        self.key: ed25519.Ed25519PrivateKey | None = None
        self.device_id = ""
        self.hostname = ""
        self._inv = b""  # the current inventory as zlib-compressed JSON: ~2 KB a device
        self.inventory_version = 0  # the version the server acknowledged; 0: send it all
        self.pending_set: dict[str, str] = {}
        self.pending_remove: set[str] = set()
        self.acks: list[str] = []
        self.results: list[dict[str, Any]] = []
        self.done: deque[str] = deque(maxlen=64)  # recent run ids, so none runs twice
        self.interval_override: float | None = None
        self.ok = False
        self.refused = False
        self.failures = 0
        self.push_up = False  # holds a push connection now
        self.busy = False  # a check-in cycle is running
        self.rewake = False  # woken during a cycle: one more cycle right after it
        self.sched = 0  # the heap entry that is current (>0), or queued now (-1)
        self.session: tuple[str, bytes, float] | None = None  # token, key, monotonic expiry
        self.woken = False  # the next check-in was triggered by a push nudge
        self.policy_report: dict[str, Any] | None = None  # to send after the check-in
        self.policy_seq = 0

    @property
    def enrolled(self) -> bool:
        """Whether the device has an identity on the server."""
        return bool(self.device_id) and self.key is not None

    def inventory(self) -> dict[str, str]:
        """The device's current inventory (made up from its seed and index on first use)."""
        if not self._inv:
            rng = random.Random(f"custos-sim:{self.seed}:{self.index}")  # noqa: S311 - fake data
            inv = fake_inventory(rng, self.index, now=datetime.now(UTC))
            self._store(inv)
            return inv
        data: dict[str, str] = orjson.loads(zlib.decompress(self._inv))
        return data

    def _store(self, inv: Mapping[str, str]) -> None:
        self._inv = zlib.compress(orjson.dumps(inv), 1)
        self.hostname = inv.get("os.hostname") or self.hostname or f"sim-{self.index:05d}"

    def change(self, new: Mapping[str, str]) -> None:
        """Adopt a new inventory; the difference goes to the server at the next check-in."""
        changed, removed = inventory_delta(self.inventory(), new)
        for k in removed:
            self.pending_set.pop(k, None)
            self.pending_remove.add(k)
        for k, v in changed.items():
            self.pending_remove.discard(k)
            self.pending_set[k] = v
        self._store(new)

    def to_dict(self) -> dict[str, Any]:
        """What is persisted: index, seed, id, name and the private key."""
        assert self.key is not None
        return {
            "index": self.index,
            "seed": self.seed,
            "device_id": self.device_id,
            "name": self.hostname,
            "key": base64.b64encode(self.key.private_bytes_raw()).decode(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimDevice:
        """A device saved by to_dict (its inventory is made again and sent in full)."""
        dev = cls(int(data["index"]), int(data["seed"]))
        dev.device_id = str(data["device_id"])
        dev.hostname = str(data.get("name") or "")
        dev.key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data["key"]))
        return dev


class SimFleet:
    """Many simulated agents against one server, sharing one pooled HTTP client."""

    def __init__(
        self,
        server_url: str,
        token: str,
        *,
        count: int,
        ca_fingerprint: str | None = None,
        seed: int = 0,
        interval: float | None = None,
        concurrency: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
        inventory_change_rate: float = 0.02,
        timeout: float = 30.0,
        push: bool = False,
        push_connect_concurrency: int = 256,
        observer: CheckinObserver | None = None,
    ) -> None:
        if count < 0:
            raise ValueError("count must not be negative")
        if interval is not None and interval <= 0:
            raise ValueError("interval must be positive")
        self.server_url = server_url.rstrip("/")
        self.token = token
        self.count = count
        self.ca_fingerprint = ca_fingerprint
        self.seed = seed
        self.interval = interval  # None: the interval the server asks for
        self.concurrency = max(1, concurrency)
        self.transport = transport
        self.inventory_change_rate = inventory_change_rate
        self.timeout = timeout
        self.push = push
        # opening handshakes (TCP + TLS + upgrade) in flight at once; connections held: all
        self.push_connect_concurrency = max(1, push_connect_concurrency)
        self.observer = observer
        self._rng = random.Random(f"custos-sim-fleet:{seed}")  # noqa: S311 - jitter, fake data
        self._all: dict[int, SimDevice] = {}
        self._loaded_ca: str | None = None
        self._http: httpx.AsyncClient | None = None
        self._server_interval = 60.0
        self._clock_offset = 0.0
        url = httpx.URL(self.server_url + protocol.DEVICE_API + "/checkin")
        self._checkin_url = str(url)
        self._checkin_path = url.raw_path.decode("ascii")
        self._enroll_url = self.server_url + protocol.DEVICE_API + "/enroll"
        self._session_url = self.server_url + protocol.SESSION_PATH
        # work comes down the socket and is acknowledged up it (the agent's way too)
        self._push_path = PUSH_PATH + "?deliver=1"
        self._push_url = push_url(self.server_url) + "?deliver=1"
        self._ssl: ssl.SSLContext | None = None
        self._queue: asyncio.Queue[SimDevice | None] | None = None
        self._seq = itertools.count()
        self._enrolled = 0
        self._active = 0
        self._checkins = 0
        self._commands_done = 0
        self._errors = 0
        self._refused = 0
        self._last_error = ""
        self._rate = _Rate()
        self._push_connected = 0
        self._push_connects = 0
        self._push_failures = 0
        self._wakes = 0

    # --- devices and their persistence ---

    @property
    def devices(self) -> list[SimDevice]:
        """The fleet's devices, numbered 1..count (made on first access)."""
        out = []
        for i in range(1, self.count + 1):
            dev = self._all.get(i)
            if dev is None:
                dev = self._all[i] = SimDevice(i, self.seed)
            out.append(dev)
        return out

    def load(self, path: Path) -> int:
        """Reuse identities saved by save(); returns how many were read (0 if no file)."""
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return 0
        except (OSError, orjson.JSONDecodeError) as exc:
            raise FleetError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise FleetError(f"{path} is not a simulated fleet file")
        self._loaded_ca = data.get("ca_fingerprint")
        n = 0
        for item in data.get("devices", []):
            try:
                dev = SimDevice.from_dict(item)
            except (KeyError, ValueError, TypeError) as exc:
                raise FleetError(f"{path}: bad device entry: {exc}") from exc
            self._all[dev.index] = dev
            n += 1
        self._enrolled = sum(1 for d in self.devices if d.enrolled)
        return n

    def save(self, path: Path) -> None:
        """Write every enrolled identity (keys included: the file is private, mode 0600)."""
        data = {
            "format": STATE_FORMAT,
            "server_url": self.server_url,
            "ca_fingerprint": self._loaded_ca,
            "devices": [d.to_dict() for _, d in sorted(self._all.items()) if d.enrolled],
        }
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)

    # --- counters ---

    def stats(self) -> FleetStats:
        """The current counters."""
        return FleetStats(
            devices=self.count,
            enrolled=self._enrolled,
            active=self._active,
            checkins=self._checkins,
            checkins_per_s=self._rate.per_second(),
            commands_done=self._commands_done,
            errors=self._errors,
            refused=self._refused,
            last_error=self._last_error,
            push_connected=self._push_connected,
            push_connects=self._push_connects,
            push_failures=self._push_failures,
            wakes=self._wakes,
        )

    def _error(self, message: str) -> None:
        self._errors += 1
        self._last_error = message
        log.debug("sim: %s", message)

    def _set_ok(self, dev: SimDevice, ok: bool) -> None:
        if dev.ok != ok:
            dev.ok = ok
            self._active += 1 if ok else -1

    # --- enrolment ---

    def _client(self, ca_pem: str) -> httpx.AsyncClient:
        verify = pinned_context(ca_pem) if self.server_url.startswith("https://") else False
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        return httpx.AsyncClient(
            verify=verify,
            transport=self.transport,
            timeout=self.timeout,
            limits=limits,
            headers={"user-agent": f"custos-sim/{__version__}"},
        )

    @property
    def saved_ca_fingerprint(self) -> str | None:
        """The CA fingerprint recorded in the fleet file that load() read (None: none read)."""
        return self._loaded_ca

    def use_ca(self, ca_pem: str) -> None:
        """Trust only this CA from now on (enroll_all pins it from the server itself).

        If the fleet's saved identities belong to another CA, they are forgotten.
        """
        fingerprint = ca_fingerprint(ca_pem)
        if self._loaded_ca and self._loaded_ca != fingerprint:
            log.warning("sim: the server has another CA now; enrolling the fleet afresh")
            self._all.clear()
            self._enrolled = 0
        self._loaded_ca = fingerprint
        if self._http is None:
            self._http = self._client(ca_pem)
        if self.server_url.startswith("https://"):
            self._ssl = pinned_context(ca_pem)

    async def enroll_all(self) -> int:
        """Pin the CA, then enrol every device that has no identity yet; returns how many."""
        ca_pem = await fetch_pinned_ca(self.server_url, self.ca_fingerprint, self.transport)
        self.use_ca(ca_pem)
        todo = [d for d in self.devices if not d.enrolled]
        if not todo:
            return 0
        before = self._enrolled
        queue: Iterator[SimDevice] = iter(todo)
        failures: list[BaseException] = []

        async def worker() -> None:
            for dev in queue:
                if failures:
                    return
                try:
                    await self._enroll_one(dev)
                except Exception as exc:  # the first failure stops the others
                    failures.append(exc)
                    return

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(todo)))))
        if failures:
            raise failures[0]
        return self._enrolled - before

    async def _enroll_one(self, dev: SimDevice) -> None:
        assert self._http is not None
        inv = dev.inventory()
        facts = {k: inv[k] for k in FACT_KEYS if inv.get(k)}
        key = ed25519.Ed25519PrivateKey.generate()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dev.hostname)]))
            .sign(key, None)
        )
        body = orjson.dumps(
            {
                "token": self.token,
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "name": dev.hostname,
                "facts": facts,
                "agent_version": AGENT_VERSION,
            }
        )
        for attempt in range(ENROLL_ATTEMPTS):
            try:
                resp = await self._http.post(
                    self._enroll_url, content=body, headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as exc:
                self._error(f"enrolment of {dev.hostname}: {type(exc).__name__}: {exc}")
            else:
                if resp.status_code == 201:
                    data = orjson.loads(resp.content)
                    dev.key = key
                    dev.device_id = str(data["device_id"])
                    self._server_interval = float(data.get("checkin_interval") or 60)
                    self._enrolled += 1
                    return
                code, detail = _error_of(resp)
                if resp.status_code < 500 and resp.status_code != 429:
                    raise FleetError(f"the server refused enrolment: {detail} ({code})")
                self._error(f"enrolment of {dev.hostname}: HTTP {resp.status_code}: {detail}")
            await asyncio.sleep(min(10.0, 0.5 * 2**attempt) * self._rng.uniform(0.5, 1.0))
        log.warning("sim: gave up enrolling %s", dev.hostname)

    # --- check-ins ---

    def _interval_of(self, dev: SimDevice) -> float:
        return dev.interval_override or self.interval or self._server_interval

    async def run(self, stop: asyncio.Event) -> None:
        """Check every enrolled device in at its interval (with jitter) until stop is set.

        With push on, every device also holds its push connection, and a wake (or a
        (re)connect) makes it check in at once.
        """
        if self._http is None:
            raise FleetError("enroll_all() must run first")
        live = [d for d in self.devices if d.enrolled and not d.refused]
        now = time.monotonic()
        # the first check-ins are spread over one interval: no thundering herd
        heap: list[tuple[float, int, SimDevice]] = []
        for d in live:
            d.sched = next(self._seq) + 1
            heap.append((now + self._rng.uniform(0, self._interval_of(d)), d.sched, d))
        heapq.heapify(heap)
        queue: asyncio.Queue[SimDevice | None] = asyncio.Queue()
        self._queue = queue
        workers = [
            asyncio.create_task(self._worker(queue, heap, stop))
            for _ in range(max(1, min(self.concurrency, len(live))))
        ]
        pusher = asyncio.create_task(self.hold_push(stop, live)) if self.push else None
        waiter = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                now = time.monotonic()
                while heap and heap[0][0] <= now:
                    _, seq, dev = heapq.heappop(heap)
                    if dev.sched == seq:  # else: woken since, and rescheduled by that cycle
                        dev.sched = -1
                        queue.put_nowait(dev)
                delay = min(0.25, heap[0][0] - now) if heap else 0.25
                await asyncio.wait((waiter,), timeout=max(0.001, delay))
        finally:
            self._queue = None
            waiter.cancel()
            for _ in workers:
                queue.put_nowait(None)
            _, pending = await asyncio.wait(workers, timeout=STOP_GRACE_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if pusher is not None:
                await asyncio.gather(pusher, return_exceptions=True)

    async def _worker(
        self,
        queue: asyncio.Queue[SimDevice | None],
        heap: list[tuple[float, int, SimDevice]],
        stop: asyncio.Event,
    ) -> None:
        while True:
            dev = await queue.get()
            if dev is None or stop.is_set():
                return
            dev.busy = True
            try:
                delay = await self._cycle(dev)
            finally:
                dev.busy = False
            if delay is None:
                dev.sched = 0
            elif dev.rewake:
                dev.rewake = False
                dev.sched = -1
                queue.put_nowait(dev)
            else:
                dev.sched = next(self._seq) + 1
                heapq.heappush(heap, (time.monotonic() + delay, dev.sched, dev))

    @property
    def running(self) -> bool:
        """Whether run() is checking devices in (wake() does nothing before)."""
        return self._queue is not None

    def wake(self, dev: SimDevice) -> None:
        """Check this device in as soon as a worker is free (what a push nudge does)."""
        self._wakes += 1
        queue = self._queue
        if queue is None or dev.refused:
            return  # not running (push held alone, e.g. to measure connections)
        if dev.busy:
            dev.rewake = True  # nudged during a check-in: the work may be newer than it
        elif dev.sched != -1:  # not queued yet; its heap entry becomes stale
            dev.sched = -1
            queue.put_nowait(dev)

    # --- push ---

    async def hold_push(self, stop: asyncio.Event, devices: list[SimDevice] | None = None) -> None:
        """Hold one push connection per enrolled device until stop is set (reconnecting)."""
        if self._http is None:
            raise FleetError("enroll_all() must run first")
        pool = self.devices if devices is None else devices
        todo = [d for d in pool if d.enrolled and not d.refused]
        sem = asyncio.Semaphore(self.push_connect_concurrency)
        tasks = [asyncio.create_task(self._push_loop(d, sem)) for d in todo]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _push_loop(self, dev: SimDevice, sem: asyncio.Semaphore) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        failures = 0
        while not dev.refused:
            started = time.monotonic()
            try:
                async with sem:
                    # once per connection, as the agent does: the device key, no session
                    # (a reconnect storm must not first open thousands of sessions)
                    headers = await self.auth_headers(
                        dev, "GET", self._push_path, b"", session=False
                    )
                    ws = await connect(
                        self._push_url,
                        additional_headers=headers,
                        user_agent_header=f"custos-sim/{__version__}",
                        compression=None,
                        proxy=None,
                        # the server pings every 20 s and we answer; our own pings would cost a
                        # task per connection, and a dead server shows as a closed socket
                        ping_interval=None,
                        open_timeout=self.timeout,
                        close_timeout=2,
                        max_size=4096,
                        max_queue=4,
                        ssl=self._ssl,
                    )
                started = time.monotonic()
                async with ws:
                    self._push_state(dev, True)
                    dev.woken = True
                    self.wake(dev)  # nudges sent while we were away are lost: catch up
                    async for msg in ws:
                        if msg in WAKE_MESSAGES:
                            dev.woken = True
                            self.wake(dev)
                        elif isinstance(msg, str) and msg.startswith('{"type":"checkin"'):
                            await self._delivered(dev, ws, msg)
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                self._push_failures += 1
                resp = exc.response
                if resp.status_code == 401 and b"clock_skew" in (resp.body or b""):
                    server_time = resp.headers.get(protocol.H_SERVER_TIME)
                    if server_time:
                        self._clock_offset = float(server_time) - time.time()
                elif resp.status_code in (401, 403):
                    self._error(f"{dev.hostname}: push refused (HTTP {resp.status_code})")
                    await asyncio.sleep(PUSH_REFUSED_PAUSE_S * self._rng.uniform(0.9, 1.1))
                    continue
                else:
                    self._error(f"{dev.hostname}: push upgrade got HTTP {resp.status_code}")
            except (OSError, TimeoutError, WebSocketException) as exc:
                # refused while a server restarts, or the server closed the socket (1012)
                self._push_failures += 1
                log.debug("sim: %s push: %s: %s", dev.hostname, type(exc).__name__, exc)
            finally:
                self._push_state(dev, False)
            failures = 1 if time.monotonic() - started >= STABLE_S else failures + 1
            await asyncio.sleep(backoff_delay(failures))

    def _push_state(self, dev: SimDevice, up: bool) -> None:
        if dev.push_up != up:
            dev.push_up = up
            self._push_connected += 1 if up else -1
            if up:
                self._push_connects += 1

    async def checkin_once(self, dev: SimDevice) -> float | None:
        """One cycle for one device (with follow-ups); the delay until its next, None if refused."""
        if self._http is None:
            raise FleetError("enroll_all() must run first")
        return await self._cycle(dev)

    async def _cycle(self, dev: SimDevice) -> float | None:
        for _ in range(1 + FOLLOW_UPS):
            payload = self._payload(dev)
            try:
                resp, took = await self._send(dev, orjson.dumps(payload))
            except _Refused as exc:
                dev.refused = True
                self._refused += 1
                self._set_ok(dev, False)
                log.info("sim: %s was refused: %s", dev.hostname, exc)
                return None
            except _Transient as exc:
                dev.failures += 1
                self._set_ok(dev, False)
                self._error(f"{dev.hostname}: {exc}")
                backoff = min(MAX_BACKOFF_S, 2.0 ** min(dev.failures, 10))
                if exc.retry_after:  # an overloaded server says when: spread over twice that
                    return max(backoff * 0.5, exc.retry_after) * self._rng.uniform(1.0, 2.0)
                return backoff * self._rng.uniform(0.5, 1.0)
            dev.failures = 0
            self._set_ok(dev, True)
            self._checkins += 1
            self._rate.add()
            self._absorb(dev, payload, resp)
            if self.observer is not None:
                self.observer(dev, payload, resp, took)
            if dev.policy_report is not None:
                await self._send_policy_report(dev)
            if not (dev.results or dev.acks or dev.inventory_version <= 0):
                break
        return self._interval_of(dev) * self._rng.uniform(0.9, 1.1)

    async def _send_policy_report(self, dev: SimDevice) -> None:
        """The simulated evaluation of a policy bundle; kept for the next cycle on failure."""
        assert self._http is not None and dev.policy_report is not None
        body = orjson.dumps(dev.policy_report)
        path = protocol.DEVICE_API + "/policy/report"
        try:
            headers = await self.auth_headers(dev, "POST", path, body)
            headers["content-type"] = "application/json"
            resp = await self._http.post(
                self._checkin_url.replace("/checkin", "/policy/report"),
                content=body,
                headers=headers,
            )
        except (httpx.HTTPError, _Transient, _Refused) as exc:
            self._error(f"{dev.hostname}: policy report: {exc}")
            return
        if resp.status_code < 500:
            dev.policy_report = None  # stored, or refused for good: never re-sent as it was

    def _payload(self, dev: SimDevice) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "agent_version": AGENT_VERSION,
            "results": dev.results[:100],
            "acks": dev.acks[:500],
        }
        if dev.woken:
            payload["wake"] = True  # the server then asks its database, whatever its index says
            dev.woken = False
        if dev.inventory_version <= 0:
            dev.pending_set.clear()
            dev.pending_remove.clear()
            payload["inventory"] = {"base": 0, "full": True, "set": dev.inventory(), "remove": []}
            return payload
        if self.inventory_change_rate > 0 and self._rng.random() < self.inventory_change_rate:
            dev.change(mutate_inventory(self._rng, dev.inventory()))
        if dev.pending_set or dev.pending_remove:
            payload["inventory"] = {
                "base": dev.inventory_version,
                "full": False,
                "set": dict(dev.pending_set),
                "remove": sorted(dev.pending_remove),
            }
        return payload

    async def _delivered(self, dev: SimDevice, ws: Any, msg: str) -> None:
        """Work handed down the push socket: run it, acknowledge it there, report later."""
        received = time.perf_counter()
        try:
            resp = orjson.loads(msg)["response"]
            commands = list(resp.get("commands") or ())
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            self._error(f"{dev.hostname}: malformed work frame")
            return
        for cmd in commands:
            self._execute(dev, cmd)
        run_ids = [str(c["run_id"]) for c in commands]
        if not run_ids:
            return
        await ws.send(orjson.dumps({"type": "ack", "run_ids": run_ids}).decode())
        acked = set(run_ids)
        dev.acks = [r for r in dev.acks if r not in acked]
        if self.observer is not None:
            # took: from the frame's arrival to the acknowledgement sent
            self.observer(
                dev, {"acks": run_ids, "results": []}, resp, time.perf_counter() - received
            )
        self.wake(dev)  # the results go with a check-in

    async def auth_headers(
        self, dev: SimDevice, method: str, path_qs: str, body: bytes, *, session: bool = True
    ) -> dict[str, str]:
        """The headers that prove the device's identity for one request.

        The only place the simulator signs anything (check-ins and push upgrades alike), so
        a change of the request-proof scheme in custos.protocol is a change here alone. It is
        async so that a scheme needing a round trip (e.g. fetching a session key) fits in.
        """
        assert dev.key is not None
        if not session:
            ts = int(time.time() + self._clock_offset)
            return protocol.sign_request(dev.key, dev.device_id, method, path_qs, body, ts)
        session_key = await self._session_of(dev)
        ts = int(time.time() + self._clock_offset)
        return protocol.sign_with_session(
            session_key[1], session_key[0], dev.device_id, method, path_qs, body, ts
        )

    async def open_sessions(
        self, devices: Iterable[SimDevice], base_url: str, *, concurrency: int = 64
    ) -> None:
        """Open a session for each device on the server at `base_url` (TLS not verified).

        For benchmarks that pre-sign requests for a server the fleet does not otherwise talk
        to; the fleet's own traffic opens sessions as it goes.
        """
        # several small clients: httpcore's pool does work per request that grows with its
        # number of connections, which makes one big pool the bottleneck of a large fleet
        todo = list(devices)
        url = base_url.rstrip("/") + protocol.SESSION_PATH
        per_client = 4
        clients = max(1, concurrency // per_client)
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)

        async def lane(http: httpx.AsyncClient, share: list[SimDevice]) -> None:
            for dev in share:
                await self._session_of(dev, http, url)

        async def client(k: int) -> None:
            async with httpx.AsyncClient(verify=False, timeout=self.timeout, limits=limits) as http:  # noqa: S501 - bench only
                share = todo[k::clients]
                await asyncio.gather(*(lane(http, share[j::per_client]) for j in range(per_client)))

        await asyncio.gather(*(client(k) for k in range(clients)))

    async def _session_of(
        self, dev: SimDevice, http: httpx.AsyncClient | None = None, url: str | None = None
    ) -> tuple[str, bytes, float]:
        """The device's session key, opened with one Ed25519-signed request when needed."""
        if dev.session is not None and dev.session[2] - time.monotonic() > 60:
            return dev.session
        http = http or self._http
        assert http is not None and dev.key is not None
        for attempt in (0, 1):
            ts = int(time.time() + self._clock_offset)
            headers = protocol.sign_request(
                dev.key, dev.device_id, "POST", protocol.SESSION_PATH, b"", ts
            )
            try:
                resp = await http.post(url or self._session_url, headers=headers)
            except httpx.HTTPError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code == 200:
                data = orjson.loads(resp.content)
                lifetime = float(data["expires_at"]) - float(data["server_time"])
                dev.session = (
                    str(data["token"]),
                    protocol.decode_key(str(data["key"])),
                    time.monotonic() + lifetime,
                )
                return dev.session
            code, detail = _error_of(resp)
            server_time = resp.headers.get(protocol.H_SERVER_TIME)
            if resp.status_code == 401 and code == "clock_skew" and attempt == 0 and server_time:
                self._clock_offset = float(server_time) - time.time()
                continue
            if resp.status_code in (401, 403):
                raise _Refused(f"{detail} ({code})")
            raise _Transient(f"session: HTTP {resp.status_code}: {detail} ({code})")
        raise _Transient("clock correction did not help")

    async def _send(self, dev: SimDevice, body: bytes) -> tuple[dict[str, Any], float]:
        """One check-in: the server's answer and the round trip in seconds."""
        assert self._http is not None and dev.key is not None
        for attempt in (0, 1):
            headers = await self.auth_headers(dev, "POST", self._checkin_path, body)
            headers["content-type"] = "application/json"
            sent = time.perf_counter()
            try:
                resp = await _post_reusing(self._http, self._checkin_url, body, headers)
            except httpx.HTTPError as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from exc
            took = time.perf_counter() - sent
            if resp.status_code == 200:
                try:
                    data: dict[str, Any] = orjson.loads(resp.content)
                except orjson.JSONDecodeError as exc:
                    raise _Transient("the server's answer is not JSON") from exc
                return data, took
            code, detail = _error_of(resp)
            server_time = resp.headers.get(protocol.H_SERVER_TIME)
            if resp.status_code == 401 and code == "clock_skew" and attempt == 0 and server_time:
                self._clock_offset = float(server_time) - time.time()
                continue
            if resp.status_code == 401 and code in SESSION_ERRORS and attempt == 0:
                dev.session = None  # expired, or the server's secret changed: open a new one
                continue
            if resp.status_code in (401, 403):
                raise _Refused(f"{detail} ({code})")
            raise _Transient(f"HTTP {resp.status_code}: {detail} ({code})", retry_after_of(resp))
        raise _Transient("clock or session correction did not help")

    def _absorb(self, dev: SimDevice, payload: dict[str, Any], resp: dict[str, Any]) -> None:
        accepted = set(resp.get("accepted_results") or ())
        if accepted:
            dev.results = [r for r in dev.results if r["run_id"] not in accepted]
        del dev.acks[: len(payload["acks"])]
        if "inventory" in payload:
            if resp.get("inventory_resync"):
                dev.inventory_version = 0
            else:
                dev.inventory_version = int(resp.get("inventory_version", 0))
                dev.pending_set.clear()
                dev.pending_remove.clear()
        if resp.get("checkin_interval"):
            self._server_interval = float(resp["checkin_interval"])
        for cmd in resp.get("commands") or ():
            self._execute(dev, cmd)

    def _execute(self, dev: SimDevice, cmd: Mapping[str, Any]) -> None:
        run_id = str(cmd["run_id"])
        dev.acks.append(run_id)
        if run_id in dev.done:
            return  # delivered again before our result arrived: never run twice
        dev.done.append(run_id)
        started = time.time()
        try:
            result = simulate(
                dev, str(cmd.get("kind")), cmd.get("payload") or {}, cmd.get("expires_at")
            )
        except Exception as exc:  # a malformed payload must not stop the device
            result = {"state": "failed", "error": f"simulated agent error: {exc}"}
        result.setdefault("state", "succeeded")
        result.update(run_id=run_id, started_at=_iso(started), finished_at=_iso())
        dev.results.append(result)
        self._commands_done += 1

    async def aclose(self) -> None:
        """Close the shared HTTP client."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> SimFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --- what a simulated device does with a command ---


def simulate(
    dev: SimDevice, kind: str, payload: Mapping[str, Any], expires_at: Any = None
) -> dict[str, Any]:
    """The result a simulated device reports for one command (nothing is executed)."""
    result = _simulate(dev, kind, payload, expires_at)
    result.setdefault("state", "succeeded")
    return result


def _simulate(
    dev: SimDevice, kind: str, payload: Mapping[str, Any], expires_at: Any
) -> dict[str, Any]:
    if expires_at and datetime.fromisoformat(str(expires_at)).timestamp() <= time.time():
        return {"state": "expired", "error": "the command expired before it could run"}
    if kind == "ping":
        return {"result": {"pong": True, "agent_time": time.time(), "agent_version": AGENT_VERSION}}
    if kind == "exec":
        argv = [str(a) for a in payload.get("argv") or ()]
        return _ok(fake_output(dev, argv), {"duration_s": 0.0, "timed_out": False})
    if kind == "script":
        script = str(payload.get("script") or "")
        args = [str(a) for a in payload.get("args") or ()]
        out = (
            f"simulated: would run a {payload.get('interpreter')} script "
            f"({len(script.encode())} bytes) with arguments {args!r}\n"
        )
        return _ok(out, {"duration_s": 0.0, "timed_out": False})
    if kind == "settings":
        interval = int(payload["checkin_interval"])
        dev.interval_override = float(interval)
        return {"result": {"checkin_interval": interval}}
    if kind == "reboot":
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        inv = dev.inventory()
        if "os.boot_time" in inv:
            dev.change({**inv, "os.boot_time": now})
        return {"result": {"reboot": "simulated", "argv": []}}
    if kind == "collect_file":
        return {"state": "failed", "error": NO_FILE_SYSTEM}
    if kind == "diagnose":
        return {"result": {"snapshot": simulated_snapshot(dev), "simulated": True}}
    if kind == "policy":
        dev.policy_seq += 1
        dev.policy_report = simulated_policy_report(dev, payload, dev.policy_seq)
        return {"result": {"bundle_sha": payload.get("bundle_sha"), "applied": True}}
    if kind in ("lock", "unlock"):
        return {"result": {"locked": kind == "lock", "method": "simulated", "accounts": {}}}
    if kind == "wipe":
        paths = [str(x) for x in payload.get("paths") or ()]
        return {
            "result": {
                "mode": payload.get("mode"),
                "dry_run": bool(payload.get("dry_run")),
                "removed": paths,
                "missing": [],
                "failed": [],
                "applications": [],
                "simulated": True,
            }
        }
    return {"state": "rejected", "error": f"this agent does not know the command kind {kind!r}"}


def simulated_snapshot(dev: SimDevice) -> dict[str, Any]:
    """A plausible health snapshot (the shape of custos.agent.diagnose.snapshot) made up from
    the device's inventory: steady per device, drifting a little from one call to the next."""
    inv = dev.inventory()
    rng = random.Random(f"{dev.seed}:{dev.index}:{int(time.time() // 60)}")  # noqa: S311
    steady = random.Random(f"{dev.seed}:{dev.index}")  # noqa: S311
    try:
        mem_total = int(inv.get("hw.memory.total_bytes", "0")) or 8 * 1024**3
    except ValueError:
        mem_total = 8 * 1024**3
    used_share = min(0.97, steady.uniform(0.25, 0.8) + rng.uniform(-0.05, 0.05))
    available = int(mem_total * (1 - used_share))
    disks = []
    for mount, _device, total in _disks(inv):
        share = random.Random(f"{dev.device_id}:{mount}").uniform(0.08, 0.86)  # noqa: S311
        used = int(total * share)
        disks.append(
            {
                "mount": mount,
                "fstype": inv.get(f"hw.disk.{mount}.fstype", ""),
                "total": total,
                "used": used,
                "free": total - used,
                "percent": round(share * 100, 1),
                "system": mount in ("/", "C:\\"),
            }
        )
    try:
        booted = datetime.strptime(inv["os.boot_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        uptime = max(60, int((datetime.now(UTC) - booted).total_seconds()))
    except (KeyError, ValueError):
        uptime = steady.randint(3600, 30 * 86400)
    battery = None
    if "hw.battery.percent" in inv:
        battery = {
            "percent": float(inv["hw.battery.percent"]),
            "plugged": inv.get("hw.battery.plugged") == "true",
            "secs_left": None,
        }
    names = ("systemd", "custos-agent", "sshd", "chrome", "code", "python3", "postgres", "dockerd")
    sizes = sorted(
        (
            (int(steady.uniform(5, 900) * 1024**2), 100 + i * 37, name)
            for i, name in enumerate(names)
        ),
        reverse=True,
    )
    processes = [{"pid": pid, "name": name, "rss": rss} for rss, pid, name in sizes]
    swap_total = mem_total // 4
    swap_used = int(swap_total * rng.uniform(0, 0.2))
    return {
        "collected_at": _iso(),
        "memory": {
            "total": mem_total,
            "available": available,
            "used": mem_total - available,
            "percent": round(used_share * 100, 1),
        },
        "swap": {
            "total": swap_total,
            "used": swap_used,
            "free": swap_total - swap_used,
            "percent": round(100 * swap_used / swap_total, 1) if swap_total else 0.0,
        },
        "disks": disks,
        "load": [round(rng.uniform(0.02, 1.5), 2) for _ in range(3)],
        "cpu": {"count": int(inv.get("hw.cpu.threads", "4") or 4), "percent": rng.uniform(1, 40)},
        "uptime_s": uptime,
        "boot_time": inv.get("os.boot_time", ""),
        "battery": battery,
        "process_count": steady.randint(80, 400),
        "processes": processes,
    }


def simulated_policy_report(dev: SimDevice, bundle: Mapping[str, Any], seq: int) -> dict[str, Any]:
    """A plausible evaluation: most rules hold, a few drifted and were repaired, and about
    one device in twelve has a rule it could not fix (the same device and rule every time)."""
    rules, events = [], []
    now = _iso()
    for rule in bundle.get("rules") or ():
        rid = str(rule.get("id"))
        h = int.from_bytes(hashlib.blake2b(f"{dev.seed}:{rid}".encode(), digest_size=4).digest())
        if h % 97 < 8 and rule.get("type") in ("service", "file", "setting", "software_required"):
            rules.append(
                {"id": rid, "status": "noncompliant", "detail": "simulated: drift remains"}
            )
            events.append(
                {"rule_id": rid, "kind": "repair_failed", "detail": "simulated", "at": now}
            )
        elif h % 97 < 20:
            rules.append({"id": rid, "status": "repaired", "detail": "simulated: drift repaired"})
            events.append({"rule_id": rid, "kind": "drift", "detail": "simulated", "at": now})
            events.append({"rule_id": rid, "kind": "repaired", "detail": "simulated", "at": now})
        else:
            rules.append({"id": rid, "status": "compliant", "detail": ""})
    return {
        "seq": seq,
        "bundle_sha": str(bundle.get("bundle_sha") or ""),
        "evaluated_at": now,
        "rules": rules,
        "events": events,
    }


def _ok(stdout: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": "succeeded",
        "exit_code": 0,
        "stdout": stdout,
        "stderr": "",
        "truncated": False,
        "result": {**result, "simulated": True},
    }


def fake_output(dev: SimDevice, argv: list[str]) -> str:
    """Plausible stdout for a few well-known command lines; a note for anything else."""
    if not argv:
        return ""
    name = argv[0].replace("\\", "/").rsplit("/", 1)[-1].lower().removesuffix(".exe")
    args = argv[1:]
    if name == "echo":
        return " ".join(args) + "\n"
    if name == "true" and not args:
        return ""
    if name in ("hostname", "whoami", "uname", "uptime", "df", "id"):
        inv = dev.inventory()
        host = inv.get("os.hostname") or dev.hostname
        family = _family(inv)
        if name == "hostname" and not args:
            return host + "\n"
        if name == "whoami" and not args:
            return ("nt authority\\system" if family == "windows" else "root") + "\n"
        if name == "id" and not args:
            return "uid=0(root) gid=0(root) groups=0(root)\n"
        if name == "uname" and args in ([], ["-s"]):
            return {"linux": "Linux", "macos": "Darwin"}.get(family, "MINGW64_NT-10.0") + "\n"
        if name == "uname" and args == ["-a"]:
            return _uname_a(inv, host, family) + "\n"
        if name == "uptime" and not args:
            return _uptime(inv) + "\n"
        if name == "df" and args in (["-h"], ["-hT"], ["-Th"]):
            return _df_h(dev, inv)
    return f"simulated: would run {argv!r}\n"


def _family(inv: Mapping[str, str]) -> str:
    os_name = inv.get("os.name", "")
    if os_name.startswith("Windows"):
        return "windows"
    if os_name == "macOS":
        return "macos"
    return "linux"


def _uname_a(inv: Mapping[str, str], host: str, family: str) -> str:
    kernel = inv.get("os.kernel", "6.1.0")
    arch = inv.get("os.arch", "x86_64")
    if family == "macos":
        return (
            f"Darwin {host}.local {kernel} Darwin Kernel Version {kernel}: "
            f"Thu Jun 13 20:21:29 PDT 2024; root:xnu-10063.141.1~2/RELEASE_ARM64_T6000 {arch}"
        )
    if family == "windows":
        pretty = inv.get("os.pretty", "")
        build = pretty.rsplit("build ", 1)[-1].split(".", 1)[0] if "build " in pretty else "19045"
        return (
            f"MINGW64_NT-10.0-{build} {host} 3.5.4-0bc1222b.x86_64 2024-09-04 18:28 UTC x86_64 Msys"
        )
    if inv.get("os.name") == "Ubuntu":
        abi = kernel.split("-")[1] if "-" in kernel else "1"
        build = f"#{abi}-Ubuntu SMP PREEMPT_DYNAMIC Fri Aug  2 20:41:06 UTC 2024"
    else:
        build = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.112-1 (2024-09-30)"
    return f"Linux {host} {kernel} {build} {arch} GNU/Linux"


def _uptime(inv: Mapping[str, str]) -> str:
    now = datetime.now(UTC)
    try:
        booted = datetime.strptime(inv["os.boot_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        up = max(60, int((now - booted).total_seconds()))
    except (KeyError, ValueError):
        up = 3600
    days, rest = divmod(up, 86400)
    hours, minutes = rest // 3600, rest % 3600 // 60
    parts = []
    if days:
        parts.append(f"{days} day{'s' if days != 1 else ''}")
    parts.append(f"{hours:2d}:{minutes:02d}" if hours else f"{minutes} min")
    rng = random.Random(inv.get("hw.serial", "") + str(up // 60))  # noqa: S311 - fake data
    load = ", ".join(f"{rng.uniform(0.02, 1.5):.2f}" for _ in range(3))
    return f" {now:%H:%M:%S} up {',  '.join(parts)},  1 user,  load average: {load}"


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.1f}{unit}" if n < 10 and unit != "B" else f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}T"


def _disks(inv: Mapping[str, str]) -> Iterable[tuple[str, str, int]]:
    mounts: dict[str, dict[str, str]] = {}
    for key, value in inv.items():
        if key.startswith("hw.disk."):
            mount, _, field = key[len("hw.disk.") :].rpartition(".")
            mounts.setdefault(mount, {})[field] = value
    for mount, info in sorted(mounts.items()):
        try:
            total = int(info.get("total_bytes", "0"))
        except ValueError:
            continue
        yield mount, info.get("device", mount), total


def _df_h(dev: SimDevice, inv: Mapping[str, str]) -> str:
    rows = [("Filesystem", "Size", "Used", "Avail", "Use%", "Mounted on")]
    for mount, device, total in _disks(inv):
        used_share = random.Random(f"{dev.device_id}:{mount}").uniform(0.08, 0.86)  # noqa: S311
        used = int(total * used_share)
        rows.append(
            (
                device,
                _human(total),
                _human(used),
                _human(total - used),
                f"{round(used_share * 100)}%",
                mount,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:5], widths[1:], strict=True)]
        lines.append(" ".join(cells) + " " + r[5])
    return "\n".join(lines) + "\n"
