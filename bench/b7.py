"""B7 (issue 4 §6): bytes re-sent after a cut at 50 %, and artifact download throughput to
100 concurrent clients against nginx serving the same bytes on the same machine.

    .venv/bin/python bench/b7.py [--size-mb 50] [--clients 100] [--duration 15] [--record]

A real `custos server` (SQLite, plain HTTP, its own data directory) gets a package; a device
enrolled over the real protocol is deployed to, plans its transfer and downloads the wire
body with the agent's Downloader through a TCP proxy that cuts the connection at 50 %. The
throughput part runs wrk (its own process) with 100 connections against the server's
`GET /api/device/v1/transfers/{plan}` (pre-signed device request) and against nginx
serving the same bytes as a static file (sendfile on). nginx and wrk come from Debian:
`apt-get install -y nginx-light wrk`.
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


def start_nginx(root: Path, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx.err;\n"
        "events { worker_connections 1024; }\n"
        "http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n"
        f"  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n"
        f"  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
        f"  server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n"
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf)])
    for _ in range(50):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/wire.bin", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nginx did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--record", nargs="?", const=str(RESULTS), default=None, metavar="FILE")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench: B7 needs {tool} (Debian/Ubuntu: apt-get install -y nginx-light wrk)")
            return 1
    size = int(args.size_mb * 1e6)
    custos = Path(sys.executable).parent / "custos"
    with tempfile.TemporaryDirectory(prefix="custos-b7-") as d:
        tmp = Path(d)
        port = free_port()
        srv = Server(
            name="custos x1",
            argv=[
                str(custos),
                "server",
                "--data-dir",
                str(tmp / "data"),
                "--port",
                str(port),
                "--insecure-http",
            ],
            url=f"http://127.0.0.1:{port}",
            health="/healthz",
            log=tmp / "server.log",
            env={"CUSTOS_ADMIN_PASSWORD": PASSWORD, "CUSTOS_MAX_PACKAGE_BYTES": str(2 * size)},
        )
        srv.start()
        nginx = None
        try:
            plan, cut, headers = asyncio.run(device_side(srv.url, port, tmp, size))
            print(f"B7 cut at 50%: {cut}")
            www = tmp / "www"
            www.mkdir()
            shutil.copy(tmp / "wire.bin", www / "wire.bin")
            path = f"{protocol.DEVICE_API}/transfers/{plan['id']}"
            nport = free_port()
            nginx = start_nginx(www, nport, tmp)
            results = {
                "nginx (sendfile)": wrk(
                    f"http://127.0.0.1:{nport}/wire.bin", {}, args.clients, args.duration
                ),
                "custos x1": wrk(srv.url + path, headers, args.clients, args.duration),
            }
        finally:
            srv.stop()
            if nginx is not None:
                nginx.terminate()
                nginx.wait(10)
    base = results["nginx (sendfile)"]["bytes_s"]
    rows = [
        [name, f"{r['bytes_s'] / 2**20:.0f}", f"{r['req_s']:.2f}", f"{int(r['non2xx'])}",
         f"{r['bytes_s'] / base:.0%}" if base else "-"]
        for name, r in results.items()
    ]  # fmt: skip
    ok_cut = cut["link_resent"] <= 64 * 1024
    ok_tp = base > 0 and results["custos x1"]["bytes_s"] >= 0.7 * base
    title = (
        f"B7 transfer: {plan['wire_size']:,}-byte wire body (a {args.size_mb:g} MB package, no "
        f"base); cut at 50%: {cut['link_resent']:,} B re-sent on the link, "
        f"{cut['server_resent']:,} B read again from the server (socket buffers), "
        f"target <= 64 KiB: {'meets' if ok_cut else 'misses'}; {args.clients} concurrent "
        f"downloads for {args.duration} s, load generator wrk (own process), plain HTTP: "
        f"target >= 70% of nginx: {'meets' if ok_tp else 'misses'}"
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
            f"{args.clients}`\n\n- machine: {info['cpus']} cpus, {info['cpu model']}\n\n"
            f"{title}\n\n{fmt_table(header, rows, markdown=True)}\n",
        )
        print(f"recorded in {args.record}")
    return 0 if ok_cut and ok_tp else 2


if __name__ == "__main__":
    raise SystemExit(main())
