"""B7 (issue 4 §6): bytes re-sent after a cut at 50 %, and artifact download throughput to
100 concurrent clients against nginx serving the same bytes on the same machine.

    .venv/bin/python bench/b7.py [--size-mb 50] [--clients 100] [--duration 15] [--record]

A real `custos server` (SQLite, plain HTTP, its own data directory) gets a package; a device
enrolled over the real protocol is deployed to, plans its transfer and downloads the wire
body with the agent's Downloader through a TCP proxy that cuts the connection at 50 %. The
throughput part runs wrk (its own process) with 100 connections against the server's
`GET /api/device/v1/transfers/{plan}` (pre-signed device request) and against nginx
serving the same bytes as a static file (sendfile on), in the same run. The server is
restarted on the same data directory once per variant (--variants): sendfile of the stored
wire file (the default), sendfile of the chunk frames (CUSTOS_TRANSFER_WIRE_FILES=false),
the copying path (CUSTOS_TRANSFER_SENDFILE=false), and behind nginx with X-Accel-Redirect
(CUSTOS_TRANSFER_OFFLOAD=x-accel, the docs/deploy-nginx.md configuration). nginx and wrk
come from Debian: `apt-get install -y nginx-light wrk`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Server, fmt_table, free_port, machine, record
from custos import protocol
from custos.agent.client import DeviceClient
from custos.agent.identity import enroll
from custos.agent.state import AgentState
from custos.agent.transfer import Downloader

PASSWORD = "bench-b7-password"


class CutProxy:
    """Forwards one TCP connection at a time; cuts the first one after `cut_at` bytes."""

    def __init__(self, upstream_port: int, cut_at: int) -> None:
        self.upstream_port = upstream_port
        self.cut_at = cut_at
        self.from_server = 0  # bytes read from the server, all connections
        self.to_client = 0  # bytes passed on to the client
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cut = self.cuts == 0

        async def up() -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await cr.read(65536):
                    sw.write(data)
                    await sw.drain()

        async def down() -> None:
            while data := await sr.read(65536):
                self.from_server += len(data)
                if cut and self.to_client + len(data) >= self.cut_at:
                    self.cuts += 1
                    return  # the link drops
                self.to_client += len(data)
                cw.write(data)
                await cw.drain()

        t_up = asyncio.create_task(up())
        try:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await down()
        finally:
            t_up.cancel()
            for w in (cw, sw):
                w.transport.abort()


async def setup(url: str, tmp: Path, size: int) -> tuple[DeviceClient, dict, Path]:
    """Admin login, a package of `size` bytes, a device deployed to, its plan (no base)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as admin:
        r = await admin.post("/api/v1/auth/login", json={"username": "admin", "password": PASSWORD})
        r.raise_for_status()
        auth = {"authorization": f"Bearer {r.json()['token']}"}
        tok = (await admin.post("/api/v1/enrollment-tokens", json={}, headers=auth)).json()
        payload = tmp / "payload.bin"
        # half incompressible, half text: a realistic mix for the wire body
        text = b"".join(f"line {i} of a config or script file\n".encode() for i in range(size))
        payload.write_bytes(os.urandom(size // 2) + text[: size - size // 2])
        r = await admin.post(
            "/api/v1/packages",
            params={"filename": "payload.bin", "name": "payload", "version": "1.0",
                    "destination": "/tmp/custos-b7-payload.bin"},
            content=payload.read_bytes(),
            headers={**auth, "content-type": "application/octet-stream"},
        )  # fmt: skip
        r.raise_for_status()
        state = AgentState(tmp / "agent")
        ident = await enroll(state, url, tok["token"], tok["ca_fingerprint"],
                             facts={"os.hostname": "b7"}, name="b7")  # fmt: skip
        r = await admin.post(
            "/api/v1/deployments",
            json={"package": "payload", "targets": {"devices": [ident.device_id]}},
            headers=auth,
        )
        r.raise_for_status()
    dev = DeviceClient(url, ident.device_id, ident.key, ca_pem=None, timeout=600)
    body = json.dumps({"package_id": r.json()["package_id"]}).encode()
    plan = await dev.request("POST", protocol.DEVICE_API + "/transfers", body=body)
    return dev, plan, payload


async def cut_test(url: str, port: int, dev: DeviceClient, plan: dict, tmp: Path) -> dict:
    proxy = CutProxy(port, plan["wire_size"] // 2)
    await proxy.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", timeout=60) as h:
            dl = Downloader(h, dev.signed_headers, backoff_s=0.05)
            t = time.perf_counter()
            await dl.fetch(
                f"{protocol.DEVICE_API}/transfers/{plan['id']}",
                tmp / "wire.bin",
                size=plan["wire_size"],
                sha256=plan["wire_sha256"],
                etag=plan["id"],
                adaptive=False,
            )
            secs = time.perf_counter() - t
    finally:
        await proxy.stop()
    return {
        "cuts": proxy.cuts,
        "server_resent": proxy.from_server - plan["wire_size"],
        "link_resent": proxy.to_client - plan["wire_size"],
        "seconds": secs,
    }


async def device_side(url: str, port: int, tmp: Path, size: int) -> tuple[dict, dict, dict]:
    """Set up, download through the cutting proxy, and sign the GET that wrk will repeat."""
    dev, plan, _ = await setup(url, tmp, size)
    try:
        cut = await cut_test(url, port, dev, plan, tmp)
        path = f"{protocol.DEVICE_API}/transfers/{plan['id']}"
        headers = await dev.signed_headers("GET", path)
    finally:
        await dev.aclose()
    return plan, cut, headers


def wrk(url: str, headers: dict[str, str], clients: int, duration: int) -> dict[str, float]:
    argv = ["wrk", "-t2", f"-c{clients}", f"-d{duration}s", "--timeout", "60s"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    b = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    unit = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[b.group(2)] if b else 0
    return {
        "req_s": float(m.group(1)) if m else 0.0,
        "bytes_s": float(b.group(1)) * unit if b else 0.0,
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


NGINX_HTTP = (
    # workers as root when the bench is root: the wire file is the server user's, mode 0640
    "{user}worker_processes 1;\ndaemon off;\nerror_log {tmp}/nginx.err;\n"
    "events {{ worker_connections 1024; }}\n"
    "http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n"
    "  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n"
    "  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
    "{servers} }}\n"
)


def offload_server(port: int, upstream_port: int, blobs: Path) -> str:
    """The docs/deploy-nginx.md configuration, on plain HTTP."""
    return (
        f"  upstream custos {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}\n"
        f"  server {{ listen 127.0.0.1:{port};\n"
        "    location / { proxy_pass http://custos; proxy_http_version 1.1;\n"
        '      proxy_set_header Connection ""; proxy_set_header Host $http_host; }\n'
        f"    location /_custos_blobs/ {{ internal; alias {blobs}/;\n"
        "      types { } default_type application/octet-stream; etag off; max_ranges 1;\n"
        "      add_header ETag $upstream_http_etag always;\n"
        "      add_header X-Custos-Sha256 $upstream_http_x_custos_sha256 always; } }\n"
    )


def start_nginx(servers: str, tmp: Path, name: str, probe: str) -> subprocess.Popen[bytes]:
    conf = tmp / f"{name}.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_HTTP.format(user=user, tmp=tmp, servers=servers))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", f"pid {tmp}/{name}.pid;"])
    for _ in range(50):
        try:
            httpx.get(probe, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nginx did not start")


def stop_nginx(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def wait_wire_file(blobs: Path, plan: dict, timeout: float = 120) -> None:
    """Until the server has written the plan's wire file (in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in blobs.glob(f"wire-*-{plan['id']}"):
            if f.stat().st_size == plan["wire_size"]:
                return
        time.sleep(0.05)
    raise RuntimeError("the server did not write the wire file")


# server variants: key -> (row name, extra environment, behind the offloading nginx)
VARIANTS: dict[str, tuple[str, dict[str, str], bool]] = {
    "wirefile": ("custos x1 (sendfile, wire file)", {}, False),
    "chunks": (
        "custos x1 (sendfile, chunk frames)",
        {"CUSTOS_TRANSFER_WIRE_FILES": "false"},
        False,
    ),
    "copying": ("custos x1 (copying)", {"CUSTOS_TRANSFER_SENDFILE": "false"}, False),
    "xaccel": ("nginx -> custos x1 (x-accel)", {"CUSTOS_TRANSFER_OFFLOAD": "x-accel"}, True),
}
DEFAULT = "wirefile"  # what the target is judged on: the server as shipped, no proxy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated server variants to measure ({', '.join(VARIANTS)})",
    )
    ap.add_argument("--record", nargs="?", const=str(RESULTS), default=None, metavar="FILE")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variants: {', '.join(unknown)}")
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench: B7 needs {tool} (Debian/Ubuntu: apt-get install -y nginx-light wrk)")
            return 1
    size = int(args.size_mb * 1e6)
    custos = Path(sys.executable).parent / "custos"
    with tempfile.TemporaryDirectory(prefix="custos-b7-") as d:
        tmp = Path(d)
        port = free_port()

        def server(env: dict[str, str]) -> Server:
            return Server(
                name="custos x1",
                argv=[str(custos), "server", "--data-dir", str(tmp / "data"),
                      "--port", str(port), "--insecure-http"],
                url=f"http://127.0.0.1:{port}",
                health="/healthz",
                log=tmp / "server.log",
                env={"CUSTOS_ADMIN_PASSWORD": PASSWORD,
                     "CUSTOS_MAX_PACKAGE_BYTES": str(2 * size),
                     # wrk repeats one signed request for the whole run
                     "CUSTOS_SIGNATURE_SKEW_S": "3600", **env},
            )  # fmt: skip

        srv = server({})
        srv.start()
        try:
            plan, cut, headers = asyncio.run(device_side(srv.url, port, tmp, size))
        finally:
            srv.stop()
        print(f"B7 cut at 50%: {cut}")
        www = tmp / "www"
        www.mkdir()
        shutil.copy(tmp / "wire.bin", www / "wire.bin")
        path = f"{protocol.DEVICE_API}/transfers/{plan['id']}"
        nport = free_port()
        nginx = start_nginx(
            f"  server {{ listen 127.0.0.1:{nport}; root {www}; }}\n",
            tmp,
            "static",
            f"http://127.0.0.1:{nport}/wire.bin",
        )
        try:
            results = {
                "nginx (sendfile)": wrk(
                    f"http://127.0.0.1:{nport}/wire.bin", {}, args.clients, args.duration
                )
            }
        finally:
            stop_nginx(nginx)
        print(f"  nginx (sendfile): {results['nginx (sendfile)']}", flush=True)
        for key in variants:
            name, env, proxied = VARIANTS[key]
            srv, front = server(env), None
            srv.start()
            try:
                url = srv.url
                if proxied:
                    fport = free_port()
                    blobs = tmp / "data" / "artifacts" / "blobs"
                    front = start_nginx(
                        offload_server(fport, port, blobs), tmp, "front",
                        f"http://127.0.0.1:{fport}/healthz",
                    )  # fmt: skip
                    url = f"http://127.0.0.1:{fport}"
                # one download first: the wire file is written after it (not part of the run)
                r = httpx.get(url + path, headers=headers, timeout=120)
                if r.status_code != 200 or len(r.content) != plan["wire_size"]:
                    got = f"{r.status_code}, {len(r.content)} bytes: {r.text[:200]}"
                    raise RuntimeError(f"{name}: {got}")
                if env.get("CUSTOS_TRANSFER_WIRE_FILES") != "false":
                    wait_wire_file(tmp / "data" / "artifacts" / "blobs", plan)
                results[name] = wrk(url + path, headers, args.clients, args.duration)
                print(f"  {name}: {results[name]}", flush=True)
            finally:
                stop_nginx(front)
                srv.stop()
    base = results["nginx (sendfile)"]["bytes_s"]
    rows = [
        [name, f"{r['bytes_s'] / 2**20:.0f}", f"{r['req_s']:.2f}", f"{int(r['non2xx'])}",
         f"{r['bytes_s'] / base:.0%}" if base else "-"]
        for name, r in results.items()
    ]  # fmt: skip
    ok_cut = cut["link_resent"] <= 64 * 1024
    judged = VARIANTS[DEFAULT][0] if DEFAULT in variants else VARIANTS[variants[0]][0]
    ok_tp = base > 0 and results[judged]["bytes_s"] >= 0.7 * base
    title = (
        f"B7 transfer: {plan['wire_size']:,}-byte wire body (a {args.size_mb:g} MB package, no "
        f"base); cut at 50%: {cut['link_resent']:,} B re-sent on the link, "
        f"{cut['server_resent']:,} B read again from the server (socket buffers), "
        f"target <= 64 KiB: {'meets' if ok_cut else 'misses'}; {args.clients} concurrent "
        f"downloads for {args.duration} s, load generator wrk (own process), plain HTTP: "
        f"{judged} against nginx, target >= 70%: {'meets' if ok_tp else 'misses'}"
    )
    header = ["server", "MiB/s", "downloads/s", "non-2xx", "of nginx"]
    print(title)
    print(fmt_table(header, rows, markdown=False))
    if args.record:
        info = machine()
        record(
            Path(args.record),
            f"## B7 {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"Command: `.venv/bin/python bench/b7.py --size-mb {args.size_mb:g} --clients "
            f"{args.clients} --duration {args.duration} --variants {','.join(variants)}`\n\n"
            f"- machine: {info['cpus']} cpus, {info['cpu model']}\n\n"
            f"{title}\n\n{fmt_table(header, rows, markdown=True)}\n",
        )
        print(f"recorded in {args.record}")
    return 0 if ok_cut and ok_tp else 2


if __name__ == "__main__":
    raise SystemExit(main())
