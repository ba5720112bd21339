"""The simulator as a load generator, in its own process (bench/fleetbench.py starts it).

    python bench/loadgen.py checkin --url URL --ca-file F --fleet FILE --devices N ...
    python bench/loadgen.py fanout  --url URL --ca-file F --fleet FILE --devices N [--no-push]
    python bench/loadgen.py hold    --url URL --ca-file F --fleet FILE --devices N [--checkins]

Every device is a `custos.sim.fleet.SimDevice` speaking the real protocol through `SimFleet`
(one pooled HTTP client, one `websockets` connection per device). Output: one JSON object
per line on stdout; `hold` prints a status line every 0.1 s until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from custos.sim.fleet import SimDevice, SimFleet, raise_fd_limit


def emit(event: str, **data: Any) -> None:
    """One JSON line on stdout."""
    print(json.dumps({"event": event, "t": time.time(), **data}), flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def make_fleet(args: argparse.Namespace, **kw: Any) -> SimFleet:
    fleet = SimFleet(
        args.url,
        args.token or "",
        count=args.devices,
        concurrency=args.concurrency,
        inventory_change_rate=0.0,
        timeout=60.0,
        **kw,
    )
    if fleet.load(Path(args.fleet)) < args.devices:
        sys.exit(f"loadgen: {args.fleet} holds fewer than {args.devices} devices")
    fleet.use_ca(Path(args.ca_file).read_text())
    return fleet


class Admin:
    """The admin API, to make groups and queue commands."""

    def __init__(self, url: str, ca_file: str, password: str) -> None:
        import ssl

        verify: Any = (
            ssl.create_default_context(cafile=ca_file) if url.startswith("https") else False
        )
        self.http = httpx.AsyncClient(base_url=url, verify=verify, timeout=300)
        self.password = password
        self.auth: dict[str, str] = {}

    async def login(self) -> None:
        r = await self.http.post(
            "/api/v1/auth/login", json={"username": "admin", "password": self.password}
        )
        r.raise_for_status()
        self.auth = {"authorization": f"Bearer {r.json()['token']}"}

    async def group_of(self, name: str, devices: list[SimDevice]) -> str:
        """A group holding exactly these devices (made once; membership is idempotent)."""
        r = await self.http.post("/api/v1/groups", json={"name": name}, headers=self.auth)
        if r.status_code not in (201, 409):
            r.raise_for_status()
        if r.status_code == 201 or r.json().get("devices", -1) != len(devices):
            ids = [d.device_id for d in devices]
            for i in range(0, len(ids), 10_000):
                r = await self.http.post(
                    f"/api/v1/groups/{name}/devices",
                    json={"devices": ids[i : i + 10_000]},
                    headers=self.auth,
                )
                r.raise_for_status()
        return f"group:{name}"

    async def command(self, target: str, **body: Any) -> dict[str, Any]:
        r = await self.http.post(
            "/api/v1/commands", json={"target": target, **body}, headers=self.auth
        )
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    async def counts(self, command_id: str) -> dict[str, int]:
        r = await self.http.get("/api/v1/commands", params={"limit": 50}, headers=self.auth)
        r.raise_for_status()
        for c in r.json():
            if c["id"] == command_id:
                return dict(c["counts"])
        return {}


async def warm_up(fleet: SimFleet, devices: list[SimDevice]) -> None:
    """One check-in per device (it sends its full inventory), outside any measurement."""
    queue = iter(devices)

    async def worker() -> None:
        for dev in queue:
            await fleet.checkin_once(dev)

    await asyncio.gather(*(worker() for _ in range(fleet.concurrency)))


# --- B2: check-ins that deliver one command and return one result ---


async def checkin_main(args: argparse.Namespace) -> None:
    lat: list[float] = []
    kinds = {"work": 0, "deliver_only": 0, "result_only": 0, "empty": 0}
    measuring = False

    def observe(dev: SimDevice, payload: dict[str, Any], resp: dict[str, Any], took: float) -> None:
        if not measuring:
            return
        lat.append(took)
        has_result, has_cmd = bool(payload["results"]), bool(resp.get("commands"))
        key = (
            "work"
            if has_result and has_cmd
            else "deliver_only"
            if has_cmd
            else "result_only"
            if has_result
            else "empty"
        )
        kinds[key] += 1

    fleet = make_fleet(args, observer=observe)
    devices = fleet.devices
    await warm_up(fleet, devices)
    admin = Admin(args.url, args.ca_file, args.password)
    await admin.login()
    queued = 0
    if args.commands:
        target = await admin.group_of(f"b2-{len(devices)}", devices)
        for _ in range(args.commands):
            await admin.command(target, kind="ping")
            queued += len(devices)
    emit("measuring", runs=queued)
    measuring = True
    started = time.perf_counter()
    deadline = started + args.duration
    errors, last_error, done = 0, "", 0
    if args.raw:
        done, errors, last_error = await _raw_checkins(args, fleet, devices, deadline, observe)
    else:
        nxt = 0

        async def worker() -> None:
            nonlocal nxt
            while time.perf_counter() < deadline:
                dev = devices[nxt % len(devices)]
                nxt += 1
                await fleet.checkin_once(dev)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    measuring = False
    s = fleet.stats()
    await fleet.aclose()
    await admin.http.aclose()
    emit(
        "result",
        seconds=elapsed,
        checkins=len(lat),
        kinds=kinds,
        commands_done=done if args.raw else s.commands_done,
        p50_ms=1000 * percentile(lat, 50),
        p99_ms=1000 * percentile(lat, 99),
        errors=errors if args.raw else s.errors,
        last_error=last_error if args.raw else s.last_error,
        queued=queued,
        client="raw asyncio HTTP/1.1 (bench/rawhttp.py)" if args.raw else "SimFleet (httpx)",
    )


async def _raw_checkins(
    args: argparse.Namespace,
    fleet: SimFleet,
    devices: list[SimDevice],
    deadline: float,
    observe: Any,
) -> tuple[int, int, str]:
    """Check-ins over bare keep-alive connections, each returning the last command's result.

    Requests are HMAC-signed with each device's session key (opened during the warm-up);
    a command that comes back is "run" at once (ping) and its result and acknowledgement
    go with that device's next check-in.
    """
    import ssl

    import orjson

    from custos import protocol
    from rawhttp import RawHTTP

    ctx = ssl.create_default_context(cafile=args.ca_file) if args.url.startswith("https") else None
    missing = [d for d in devices if d.session is None]
    if missing:  # a warm-up check-in that failed opened no session
        await fleet.open_sessions(missing, args.url)
    path = protocol.DEVICE_API + "/checkin"
    held: dict[str, list[str]] = {d.device_id: [] for d in devices}
    done = errors = 0
    last_error = ""

    async def worker(k: int) -> None:
        nonlocal done, errors, last_error
        conn = RawHTTP(args.url, ctx)
        mine = devices[k :: args.concurrency]
        i = 0
        while mine and time.perf_counter() < deadline:
            dev = mine[i % len(mine)]
            i += 1
            runs = held[dev.device_id]
            payload = {
                "agent_version": "bench",
                "acks": runs,
                "results": [
                    {"run_id": r, "state": "succeeded", "exit_code": 0, "stdout": "pong"}
                    for r in runs
                ],
            }
            body = orjson.dumps(payload)
            if dev.session is None:
                errors += 1
                last_error = f"{dev.device_id}: no session"
                continue
            token, key, _ = dev.session
            headers = protocol.sign_with_session(
                key, token, dev.device_id, "POST", path, body, int(time.time())
            )
            headers["content-type"] = "application/json"
            sent = time.perf_counter()
            try:
                status, data = await conn.post(path, headers, body)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                errors += 1
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            took = time.perf_counter() - sent
            if status != 200:
                errors += 1
                last_error = f"HTTP {status}: {data[:200]!r}"
                continue
            resp = orjson.loads(data)
            done += len(runs)
            held[dev.device_id] = [c["run_id"] for c in resp.get("commands") or ()]
            observe(dev, payload, resp, took)
        await conn.close()

    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    return done, errors, last_error


# --- B3: fan-out ---


async def fanout_main(args: argparse.Namespace) -> None:
    acked: dict[str, float] = {}
    armed = False

    def observe(dev: SimDevice, payload: dict[str, Any], resp: dict[str, Any], took: float) -> None:
        if armed and payload["acks"] and dev.device_id not in acked:
            acked[dev.device_id] = time.perf_counter()

    fleet = make_fleet(args, observer=observe, push=args.push, interval=3600.0)
    devices = fleet.devices
    admin = Admin(args.url, args.ca_file, args.password)
    await admin.login()
    target = await admin.group_of(f"fan-{len(devices)}", devices)
    stop = asyncio.Event()
    runner = asyncio.create_task(fleet.run(stop))
    try:
        while not fleet.running:
            await asyncio.sleep(0.01)
        if not args.push:
            for d in devices:  # the catch-up check-in the push connection would cause
                fleet.wake(d)
        deadline = time.monotonic() + args.setup_timeout
        while fleet.stats().checkins < len(devices) or (
            args.push and fleet.stats().push_connected < len(devices)
        ):
            if time.monotonic() > deadline:
                raise SystemExit(f"loadgen: setup incomplete: {fleet.stats().summary()}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let the catch-up check-ins finish
        emit("ready", **fleet.stats().__dict__)
        armed = True
        t0 = time.perf_counter()
        cmd = await admin.command(target, kind="ping")
        queued_s = time.perf_counter() - t0
        if not args.push:
            for d in devices:  # baseline: every device polls right now
                fleet.wake(d)
        deadline = time.monotonic() + args.timeout
        while len(acked) < len(devices) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        times = [t - t0 for t in acked.values()]
        n = len(devices)
        t99 = sorted(times)[math.ceil(0.99 * n) - 1] if len(times) >= math.ceil(0.99 * n) else None
        await asyncio.sleep(0.5)
        counts = await admin.counts(cmd["id"])
    finally:
        stop.set()
        await runner
        await fleet.aclose()
        await admin.http.aclose()
    s = fleet.stats()
    emit(
        "result",
        devices=n,
        acked=len(times),
        queue_s=queued_s,
        t50_s=percentile(times, 50),
        t99_s=t99,
        t100_s=max(times) if len(times) == n else None,
        server_counts=counts,
        errors=s.errors,
        last_error=s.last_error,
        push_connected=s.push_connected,
    )


# --- B4/B5: hold push connections (and check in on wakes), reporting as we go ---


async def hold_main(args: argparse.Namespace) -> None:
    fleet = make_fleet(args, push=True, interval=3600.0, push_connect_concurrency=args.connect)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    task = asyncio.create_task(fleet.run(stop) if args.checkins else fleet.hold_push(stop))
    while not stop.is_set():
        s = fleet.stats()
        emit(
            "status",
            push_connected=s.push_connected,
            push_connects=s.push_connects,
            push_failures=s.push_failures,
            checkins=s.checkins,
            errors=s.errors,
            last_error=s.last_error,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    await task
    await fleet.aclose()
    emit("result", **fleet.stats().__dict__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["checkin", "fanout", "hold"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--ca-file", required=True)
    ap.add_argument("--fleet", required=True, help="the simulator's fleet file")
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--password", default="", help="the admin password (checkin, fanout)")
    ap.add_argument("--concurrency", type=int, default=64, help="check-ins in flight")
    ap.add_argument("--duration", type=float, default=15.0, help="checkin: measured seconds")
    ap.add_argument("--commands", type=int, default=0, help="checkin: commands per device")
    ap.add_argument(
        "--httpx", dest="raw", action="store_false", help="checkin: the simulator's httpx client"
    )
    ap.add_argument("--no-push", dest="push", action="store_false", help="fanout: baseline")
    ap.add_argument("--timeout", type=float, default=120.0, help="fanout: give up after")
    ap.add_argument("--setup-timeout", type=float, default=600.0)
    ap.add_argument("--checkins", action="store_true", help="hold: also check in when woken")
    ap.add_argument("--connect", type=int, default=256, help="hold: handshakes in flight")
    args = ap.parse_args()
    raise_fd_limit()
    import uvloop

    main_fn = {"checkin": checkin_main, "fanout": fanout_main, "hold": hold_main}[args.scenario]
    uvloop.run(main_fn(args))


if __name__ == "__main__":
    main()
