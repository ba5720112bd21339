"""B2-B5: the benchmarks driven by the simulator (bench/loadgen.py, its own process).

B2 check-ins that deliver one command and return one result (baseline: empty check-ins by the
same load generator); B3 fan-out of one command to N push-connected devices (baseline: the
same devices all polling at that moment, no push); B4 server memory per idle push connection
(baseline: the bare Starlette hello-world holding the same WebSockets); B5 reconnect storm
after a server restart (baseline: the hello-world restarted under the same connections).
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import resource
import subprocess
import sys
import threading
import time
from typing import Any

from common import BENCH, Server, fmt_table, free_port
from deploy import Deployment

LOADGEN = BENCH / "loadgen.py"
LOADGEN_NAME = "custos simulator (bench/loadgen.py: SimFleet, httpx + websockets, own process)"


class LoadGen:
    """A running bench/loadgen.py and the JSON events it prints."""

    def __init__(self, dep: Deployment, url: str, scenario: str, devices: int, *extra: str) -> None:
        argv = [sys.executable, str(LOADGEN), scenario, "--url", url]
        argv += ["--ca-file", str(dep.ca_file), "--fleet", str(dep.fleet_file)]
        argv += ["--devices", str(devices), "--password", dep.state()["password"], *extra]
        self.cpu0 = _children_cpu()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.last: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                print(f"    loadgen: {line.rstrip()}", flush=True)
        self.events.put(None)

    def wait_for(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first event (from now on) for which pred(event) is true."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"timed out waiting for {what}; last: {self.last}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                raise RuntimeError(f"the load generator exited ({self.proc.wait()}) before {what}")
            self.last = ev
            if pred(ev):
                return ev

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        """Close stdin (hold stops), then the result event; the load generator's CPU seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        ev = self.wait_for(lambda e: e["event"] == "result", timeout, "the result")
        self.proc.wait(30)
        ev["loadgen_cpu_s"] = _children_cpu() - self.cpu0
        return ev


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _hello(
    dep: Deployment, transport: str, port: int | None = None, *, floor: bool = False
) -> Server:
    port = port or free_port()
    argv = [sys.executable, str(BENCH / "hello.py"), "--port", str(port)]
    if floor:
        argv.append("--floor")
    if transport == "http":
        argv.append("--insecure-http")
    else:
        tls = dep.data_dir / "tls"
        argv += ["--certfile", str(tls / "server.pem"), "--keyfile", str(tls / "server.key")]
    scheme = "http" if transport == "http" else "https"
    name = "floor (101 and hold)" if floor else "hello-world"
    return Server(name, argv, f"{scheme}://127.0.0.1:{port}", "/", dep.root / "hello.log")


def _ms(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _s(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


# --- B2 ---------------------------------------------------------------------------------


def b2(args: argparse.Namespace, dep: Deployment) -> tuple[str, bool]:
    """Check-ins that deliver one command and return one result, vs empty ones."""
    n = args.devices
    # a check-in hands out at most one command: in steady state each one returns the previous
    # command's result and takes the next
    srv = dep.server(
        transport=args.transport,
        workers=args.workers[0],
        env={"CUSTOS_MAX_COMMANDS_PER_CHECKIN": "1"},
    )
    per_device = args.commands or max(2, math.ceil(args.duration * 3000 * 1.2 / n))
    rows, ok = [], True
    srv.start()
    try:
        for label, commands in (
            ("empty check-ins (baseline)", 0),
            ("one command + one result", per_device),
        ):
            print(f"  B2 {label}: {n} devices, {args.concurrency} in flight", flush=True)
            lg = LoadGen(
                dep, srv.url, "checkin", n,
                "--duration", str(args.duration), "--commands", str(commands),
                "--concurrency", str(args.concurrency),
            )  # fmt: skip
            lg.wait_for(lambda e: e["event"] == "measuring", 1800, "the measured phase")
            cpu0 = srv.cpu_seconds()
            res = lg.wait_for(lambda e: e["event"] == "result", args.duration + 600, "the result")
            cpu1 = srv.cpu_seconds()
            lg.proc.wait(30)
            lcpu = _children_cpu() - lg.cpu0
            k = res["kinds"]
            total = res["checkins"]
            work = k["work"] if commands else total
            rate = work / res["seconds"]
            verdict = "-"
            if commands:
                good = rate >= 2000 and res["p99_ms"] < 100
                verdict = "meets" if good else "misses"
                verdict += " (target >= 2,000/s, p99 < 100 ms)"
            ok = ok and res["errors"] == 0
            rows.append(
                [
                    label,
                    f"{total / res['seconds']:,.0f}",
                    f"{rate:,.0f}",
                    f"{res['commands_done'] / res['seconds']:,.0f}",
                    _ms(res["p50_ms"]),
                    _ms(res["p99_ms"]),
                    f"{1000 * (cpu1 - cpu0) / max(total, 1):.3f}",
                    f"{lcpu:.1f}",
                    str(res["errors"]),
                    verdict,
                ]
            )
            print(f"    {rows[-1]}", flush=True)
    finally:
        srv.stop()
    header = ["phase", "check-ins/s", "with command + result /s", "commands done/s", "p50 ms"]
    header += ["p99 ms", "server CPU ms/check-in", "load-gen CPU s (whole run)", "errors", "target"]
    settings = (
        f"{n:,} devices, {args.concurrency} check-ins in flight, {args.duration:.0f}s each, "
        f"{args.workers[0]} server process(es), {args.transport}, "
        f"max_commands_per_checkin=1, ping commands; load generator: bench/loadgen.py in its "
        "own process (the simulator's fleet and session keys; check-ins over bare keep-alive "
        "HTTP/1.1 connections, bench/rawhttp.py, since httpx costs ~1 ms of CPU a request)"
    )
    print(f"\nB2 check-ins with work — {settings}\n" + fmt_table(header, rows, False))
    return f"### B2 check-ins with work\n\n{settings}\n\n{fmt_table(header, rows, True)}\n", ok


# --- B3 ---------------------------------------------------------------------------------


def b3(args: argparse.Namespace, dep: Deployment) -> tuple[str, bool]:
    """One command to N devices: time until 99% acknowledged, push vs everyone polling."""
    n = args.devices
    srv = dep.server(transport=args.transport, workers=args.workers[0])
    rows, ok = [], True
    srv.start()
    try:
        for label, extra in (("all poll at once (baseline, no push)", ["--no-push"]), ("push", [])):
            print(f"  B3 {label}: {n} devices", flush=True)
            lg = LoadGen(dep, srv.url, "fanout", n, "--concurrency", str(args.concurrency), *extra)
            res = lg.wait_for(lambda e: e["event"] == "result", 1800, "the result")
            lg.proc.wait(30)
            counts = res["server_counts"]
            verdict = "-"
            if not extra:
                t99 = res["t99_s"]
                verdict = "meets" if t99 is not None and t99 < 3 else "misses"
                verdict += " (target < 3 s)"
            ok = ok and res["errors"] == 0
            rows.append(
                [
                    label,
                    str(n),
                    str(res["acked"]),
                    _s(res["queue_s"]),
                    _s(res["t50_s"]),
                    _s(res["t99_s"]),
                    _s(res["t100_s"]),
                    ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                    str(res["errors"]),
                    verdict,
                ]
            )
            print(f"    {rows[-1]}", flush=True)
    finally:
        srv.stop()
    header = ["mode", "devices", "acked", "queue API s", "50% acked s", "99% acked s"]
    header += ["100% s", "server's run states", "errors", "target"]
    settings = (
        f"one `ping` command to a group of {n:,} devices, {args.transport}, "
        f"{args.workers[0]} server process(es), {args.concurrency} check-ins in flight; "
        f"times from the POST of the command; load generator: {LOADGEN_NAME}"
    )
    print(f"\nB3 fan-out — {settings}\n" + fmt_table(header, rows, False))
    return f"### B3 fan-out\n\n{settings}\n\n{fmt_table(header, rows, True)}\n", ok


# --- B4 ---------------------------------------------------------------------------------


def b4(args: argparse.Namespace, dep: Deployment) -> tuple[str, bool]:
    """Server RSS per idle push connection, Custos vs the hello-world's bare WebSocket."""
    n = args.devices
    rows, ok = [], True
    servers = (
        dep.server(transport=args.transport, workers=1),
        _hello(dep, args.transport),
        _hello(dep, args.transport, floor=True),
    )
    for srv in servers:
        print(f"  B4 {srv.name}: {n} push connections", flush=True)
        srv.start()
        try:
            time.sleep(2)
            rss0 = srv.rss_bytes()
            started = time.monotonic()
            lg = LoadGen(dep, srv.url, "hold", n, "--connect", str(args.connect))
            lg.wait_for(
                lambda e: e["event"] == "status" and e["push_connected"] >= n, 1800, "all connected"
            )
            took = time.monotonic() - started
            time.sleep(3)  # settle
            rss1 = srv.rss_bytes()
            res = lg.finish()
        finally:
            srv.stop()
        per = (rss1 - rss0) / n / 1024
        verdict = "-"
        if srv.name.startswith("custos"):
            verdict = ("meets" if per <= 20 else "misses") + " (target <= 20 KiB)"
        ok = ok and res["errors"] == 0
        rows.append(
            [
                srv.name,
                str(n),
                f"{rss0 / 2**20:.1f}",
                f"{rss1 / 2**20:.1f}",
                f"{per:.1f}",
                f"{took:.1f}",
                str(res["errors"]),
                verdict,
            ]
        )
        print(f"    {rows[-1]}", flush=True)
    header = ["server", "connections", "RSS before MiB", "RSS held MiB", "KiB/connection"]
    header += ["connect all s", "errors", "target"]
    settings = (
        f"{n:,} idle WebSockets on /api/device/v1/push, {args.transport}, one server process, "
        f"{args.connect} handshakes in flight; load generator: {LOADGEN_NAME}"
    )
    print(f"\nB4 memory per push connection — {settings}\n" + fmt_table(header, rows, False))
    return (
        f"### B4 memory per push connection\n\n{settings}\n\n{fmt_table(header, rows, True)}\n",
        ok,
    )


# --- B5 ---------------------------------------------------------------------------------


def b5(args: argparse.Namespace, dep: Deployment) -> tuple[str, bool]:
    """Restart the server under N connected devices: until all are back (and checked in)."""
    n = args.devices
    rows, ok = [], True
    port = free_port()
    for srv in (
        dep.server(transport=args.transport, workers=args.workers[0], port=port),
        _hello(dep, args.transport),
    ):
        custos = srv.name.startswith("custos")
        print(f"  B5 {srv.name}: {n} devices", flush=True)
        srv.start()
        lg = None
        try:
            extra = ["--connect", str(args.connect), "--concurrency", str(args.concurrency)]
            lg = LoadGen(dep, srv.url, "hold", n, *extra, *(["--checkins"] if custos else []))
            need = n if custos else 0  # the catch-up check-ins after the first connect

            def settled(e: dict[str, Any], need: int = need) -> bool:
                return bool(
                    e["event"] == "status" and e["push_connected"] >= n and e["checkins"] >= need
                )

            lg.wait_for(settled, 1800, "all connected")
            time.sleep(2)
            before = lg.wait_for(lambda e: e["event"] == "status", 10, "a status")
            t_kill = time.time()
            srv.stop()
            srv.start()
            t_up = time.time()
            # status lines are buffered: first the drop after the SIGTERM, then the way back
            lg.wait_for(
                lambda e, t=t_kill: (
                    e["event"] == "status" and e["t"] > t and e["push_connected"] < n
                ),
                60,
                "the connections to drop",
            )
            back = lg.wait_for(
                lambda e: e["event"] == "status" and e["push_connected"] >= n, 600, "reconnection"
            )
            caught = back
            if custos:
                caught = lg.wait_for(
                    lambda e, b=before["checkins"]: (
                        e["event"] == "status" and e["checkins"] >= b + n
                    ),
                    600,
                    "the catch-up check-ins",
                )
            res = lg.finish()
        finally:
            if lg is not None and lg.proc.poll() is None:
                lg.proc.kill()
            srv.stop()
        errors = res["errors"] - before["errors"]
        t_all = back["t"] - t_kill
        verdict = "-"
        if custos:
            verdict = (
                "meets" if t_all < 30 and errors == 0 else "misses"
            ) + " (target < 30 s, 0 errors)"
        ok = ok and errors == 0
        rows.append(
            [
                srv.name,
                str(n),
                f"{t_up - t_kill:.1f}",
                f"{t_all:.1f}",
                f"{caught['t'] - t_kill:.1f}" if custos else "-",
                str(res["push_failures"] - before["push_failures"]),
                str(errors),
                verdict,
            ]
        )
        print(f"    {rows[-1]}", flush=True)
    header = ["server", "devices", "stop+start s", "all reconnected s", "all checked in s"]
    header += ["refused connects (server down)", "errors", "target"]
    settings = (
        f"{n:,} push-connected devices, SIGTERM then start on the same port, {args.transport}; "
        "times from the SIGTERM; devices reconnect with the agent's jittered backoff "
        "(1 s doubling, x0.5-1) and check in once after reconnecting; "
        f"load generator: {LOADGEN_NAME}"
    )
    print(f"\nB5 reconnect storm — {settings}\n" + fmt_table(header, rows, False))
    return f"### B5 reconnect storm\n\n{settings}\n\n{fmt_table(header, rows, True)}\n", ok


BENCHES = {"b2": b2, "b3": b3, "b4": b4, "b5": b5}
