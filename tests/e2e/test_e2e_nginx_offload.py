"""Downloads behind a real nginx with X-Accel-Redirect (CUSTOS_TRANSFER_OFFLOAD=x-accel): a
real `custos server` authorises the device, nginx sends the stored wire file, with Range and
If-Range, byte-identical to the plan. The nginx configuration is docs/deploy-nginx.md's.
And the same downloads from the server alone on plain HTTP, where it sends them with
sendfile (from the chunk frames, then from the wire file once it is written)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import CUSTOS, clean_env, free_port, wait_for

from custos import protocol
from custos.agent.client import DeviceClient
from custos.agent.identity import enroll
from custos.agent.state import AgentState
from custos.agent.transfer import Downloader

pytestmark = [pytest.mark.e2e]

PASSWORD = "nginx-offload-password"
PREFIX = "/_custos_blobs/"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def nginx_conf(tmp: Path, port: int, upstream: int, blobs: Path) -> str:
    """docs/deploy-nginx.md on plain HTTP, with its paths and ports filled in."""
    # the test may run as root: nginx's workers would be `nobody`, and the wire files are
    # the server user's, mode 0640 (in production nginx's user is in the server's group)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
error_log {tmp}/nginx.err;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  sendfile on;
  tcp_nopush on;
  upstream custos {{ server 127.0.0.1:{upstream}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_pass http://custos;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_request_buffering off;
    }}
    location {PREFIX} {{
      internal;
      alias {blobs}/;
      types {{ }}
      default_type application/octet-stream;
      etag off;
      max_ranges 1;
      add_header ETag $upstream_http_etag always;
      add_header X-Custos-Sha256 $upstream_http_x_custos_sha256 always;
    }}
  }}
}}
"""


def wait_http(url: str, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{what} did not answer {url}:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def custos_server(tmp: Path, **env: str) -> Iterator[tuple[int, Path]]:
    """A `custos server` on plain HTTP (SQLite, its own data dir): its port, the data dir."""
    data, port, log = tmp / "data", free_port(), tmp / "server.log"
    argv = [CUSTOS, "server", "--data-dir", str(data), "--port", str(port), "--insecure-http"]
    with log.open("ab") as fh:
        server = subprocess.Popen(
            argv,
            env=clean_env(CUSTOS_ADMIN_PASSWORD=PASSWORD, **env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", "custos server", server, log)
        yield port, data
    finally:
        stop(server)


@pytest.fixture
def front(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A custos server (x-accel offload) behind nginx: nginx's URL, the data dir."""
    if NGINX is None:
        pytest.skip("needs nginx (Debian: nginx-light)")
    env = {"CUSTOS_TRANSFER_OFFLOAD": "x-accel", "CUSTOS_TRANSFER_OFFLOAD_PREFIX": PREFIX}
    with custos_server(tmp_path, **env) as (sport, data):
        nport, nlog = free_port(), tmp_path / "nginx.err"
        conf = tmp_path / "nginx.conf"
        nlog.touch()
        conf.write_text(nginx_conf(tmp_path, nport, sport, data / "artifacts" / "blobs"))
        nginx = subprocess.Popen([NGINX, "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{nport}/healthz", "nginx", nginx, nlog)
            yield f"http://127.0.0.1:{nport}", data
        finally:
            stop(nginx)


@contextlib.asynccontextmanager
async def deployed(url: str, tmp: Path, payload: bytes) -> AsyncIterator[tuple[DeviceClient, Any]]:
    """A package, an enrolled device deployed to, and its plan (all through `url`)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as admin:
        r = await admin.post("/api/v1/auth/login", json={"username": "admin", "password": PASSWORD})
        r.raise_for_status()
        auth = {"authorization": f"Bearer {r.json()['token']}"}
        tok = (await admin.post("/api/v1/enrollment-tokens", json={}, headers=auth)).json()
        r = await admin.post(
            "/api/v1/packages",
            params={"filename": "payload.bin", "name": "payload", "version": "1.0",
                    "destination": "/tmp/custos-nginx-payload.bin"},
            content=payload,
            headers={**auth, "content-type": "application/octet-stream"},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        ident = await enroll(
            AgentState(tmp / "agent"), url, tok["token"], tok["ca_fingerprint"],
            facts={"os.hostname": "nginx-e2e"}, name="nginx-e2e",
        )  # fmt: skip
        r = await admin.post(
            "/api/v1/deployments",
            json={"package": "payload", "targets": {"devices": [ident.device_id]}},
            headers=auth,
        )
        assert r.status_code in (200, 201), r.text
    dev = DeviceClient(url, ident.device_id, ident.key, ca_pem=None, timeout=60)
    try:
        body = json.dumps({"package_id": r.json()["package_id"]}).encode()
        plan = await dev.request("POST", protocol.DEVICE_API + "/transfers", body=body)
        yield dev, plan
    finally:
        await dev.aclose()


async def test_nginx_sends_the_wire_body_with_range_resume(
    front: tuple[str, Path], tmp_path: Path
) -> None:
    url, data = front
    text = b"".join(b"line %d of a config file\n" % i for i in range(60_000))
    payload = os.urandom(1_500_000) + text
    async with deployed(url, tmp_path, payload) as (dev, plan):
        path = f"{protocol.DEVICE_API}/transfers/{plan['id']}"
        size, etag = plan["wire_size"], f'"{plan["id"]}"'
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:

            async def get(**extra: str) -> httpx.Response:
                return await http.get(
                    path, headers={**await dev.signed_headers("GET", path), **extra}
                )

            # the first download is proxied (Custos sends it while it writes the wire file)
            r = await get()
            assert r.status_code == 200, r.text
            assert "last-modified" not in r.headers
            whole = r.content
            blob = (
                data
                / "artifacts"
                / "blobs"
                / f"wire-{hashlib.sha256(payload).hexdigest()}-{plan['id']}"
            )
            wait_for("the wire file", lambda: blob.exists() and blob.stat().st_size == size)

            # then nginx sends the file (its Last-Modified shows it), with Custos's headers
            r = await get()
            assert r.status_code == 200, r.text
            assert "last-modified" in r.headers
            assert r.content == whole
            assert len(whole) == size
            assert hashlib.sha256(whole).hexdigest() == plan["wire_sha256"]
            assert r.headers["etag"] == etag
            assert r.headers["x-custos-sha256"] == plan["wire_sha256"]
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.headers["content-length"] == str(size)
            assert "x-accel-redirect" not in r.headers

            # a download cut part-way, resumed from where it stopped
            got = bytearray()
            headers = await dev.signed_headers("GET", path)
            async with http.stream("GET", path, headers=headers) as s:
                async for part in s.aiter_raw():
                    got += part
                    if len(got) >= size // 3:
                        break
            r = await get(range=f"bytes={len(got)}-", **{"if-range": etag})
            assert r.status_code == 206
            assert r.headers["content-range"] == f"bytes {len(got)}-{size - 1}/{size}"
            assert r.headers["etag"] == etag
            assert bytes(got) + r.content == whole

            # a stale If-Range gets the whole (new) body; a suffix range the tail
            r = await get(range="bytes=100-", **{"if-range": '"' + "0" * 64 + '"'})
            assert r.status_code == 200 and r.content == whole
            r = await get(range="bytes=-100")
            assert r.status_code == 206 and r.content == whole[-100:]
            r = await get(range=f"bytes={size}-")
            assert r.status_code == 416

            # only an authorised device gets it; the internal location is not reachable
            assert (await http.get(path)).status_code == 401
            assert (await http.get(PREFIX + blob.name)).status_code == 404

        # the agent's own downloader, through nginx
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            dl = Downloader(h, dev.signed_headers, backoff_s=0.05)
            out = await dl.fetch(
                path, tmp_path / "wire.bin", size=size, sha256=plan["wire_sha256"], etag=plan["id"]
            )
        assert out.read_bytes() == whole


def payload_bytes() -> bytes:
    text = b"".join(b"line %d of a script\n" % i for i in range(80_000))
    return os.urandom(1_200_000) + text


@pytest.mark.parametrize("wire_files", ["true", "false"])
async def test_the_server_alone_sends_with_sendfile(tmp_path: Path, wire_files: str) -> None:
    payload = payload_bytes()
    with custos_server(tmp_path, CUSTOS_TRANSFER_WIRE_FILES=wire_files) as (port, data):
        url = f"http://127.0.0.1:{port}"
        async with deployed(url, tmp_path, payload) as (dev, plan):
            path = f"{protocol.DEVICE_API}/transfers/{plan['id']}"
            size, etag = plan["wire_size"], f'"{plan["id"]}"'
            blobs = data / "artifacts" / "blobs"
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:

                async def get(**extra: str) -> httpx.Response:
                    signed = await dev.signed_headers("GET", path)
                    return await http.get(path, headers={**signed, **extra})

                r = await get()  # from the chunk frames
                assert r.status_code == 200
                whole = r.content
                assert hashlib.sha256(whole).hexdigest() == plan["wire_sha256"]
                if wire_files == "true":
                    wait_for("the wire file", lambda: any(blobs.glob(f"wire-*-{plan['id']}")))
                else:
                    time.sleep(0.5)
                    assert not any(blobs.glob("wire-*"))
                for _ in range(2):  # from the wire file (when kept), on one connection
                    r = await get()
                    assert r.status_code == 200 and r.content == whole
                    assert r.headers["etag"] == etag
                    assert r.headers["x-custos-sha256"] == plan["wire_sha256"]
                    assert r.headers["content-length"] == str(size)
                r = await get(range="bytes=1000-", **{"if-range": etag})
                assert r.status_code == 206 and r.content == whole[1000:]
                assert r.headers["content-range"] == f"bytes 1000-{size - 1}/{size}"
                r = await get(range="bytes=1000-", **{"if-range": '"stale"'})
                assert r.status_code == 200 and r.content == whole
                r = await get(range="bytes=-1")
                assert r.status_code == 206 and r.content == whole[-1:]
                r = await get(range=f"bytes={size}-")
                assert r.status_code == 416
                assert r.headers["content-range"] == f"bytes */{size}"
            async with httpx.AsyncClient(base_url=url, timeout=60) as h:
                dl = Downloader(h, dev.signed_headers, backoff_s=0.05)
                out = await dl.fetch(
                    path, tmp_path / "wire.bin", size=size, sha256=plan["wire_sha256"],
                    etag=plan["id"],
                )  # fmt: skip
            assert out.read_bytes() == whole
