"""Devices for the check-in benchmark: enrol many, then pre-sign one empty check-in each.

A check-in's signature covers a timestamp that the server accepts within ±300 s
(`signature_skew_s`), so a request signed just before a load phase can be replayed by the
load generator for the whole phase. `write_requests` writes them as the Lua data file
that bench/checkin.lua reads.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from custos import __version__, protocol

CHECKIN_PATH = protocol.DEVICE_API + "/checkin"
EMPTY_CHECKIN = b'{"results":[],"acks":[]}'


@dataclass
class BenchDevice:
    """An enrolled device: its id and private key."""

    device_id: str
    key: ed25519.Ed25519PrivateKey


async def admin_token(http: httpx.AsyncClient, password: str) -> str:
    """Log in as admin; the API token."""
    resp = await http.post("/api/v1/auth/login", json={"username": "admin", "password": password})
    resp.raise_for_status()
    return str(resp.json()["token"])


async def enrol_devices(
    base_url: str, admin_password: str, count: int, *, concurrency: int = 8
) -> list[BenchDevice]:
    """Enrol `count` devices with one unlimited enrolment token, as the agent would."""
    # the bench talks to its own server on 127.0.0.1; the CA is self-signed, so no verify
    async with httpx.AsyncClient(base_url=base_url, verify=False, timeout=60) as http:
        token = await admin_token(http, admin_password)
        resp = await http.post(
            "/api/v1/enrollment-tokens",
            json={"uses": None, "note": "bench"},
            headers={"Authorization": f"Bearer {token}"},
        )
        resp.raise_for_status()
        secret = resp.json()["token"]
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> BenchDevice:
            key = ed25519.Ed25519PrivateKey.generate()
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{i}")]))
                .sign(key, None)
            )
            body = {
                "token": secret,
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "facts": {"os.hostname": f"bench-{i:06d}", "os.family": "linux"},
                "name": f"bench-{i:06d}",
                "agent_version": __version__,
            }
            async with sem:
                r = await http.post(protocol.DEVICE_API + "/enroll", json=body)
            if r.status_code != 201:
                raise RuntimeError(f"enrolment {i} failed: HTTP {r.status_code} {r.text[:200]}")
            return BenchDevice(r.json()["device_id"], key)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def signed_headers(dev: BenchDevice, timestamp: int) -> dict[str, str]:
    """The signature headers of an empty check-in at `timestamp`."""
    return protocol.sign_request(
        dev.key, dev.device_id, "POST", CHECKIN_PATH, EMPTY_CHECKIN, timestamp
    )


async def check_one(base_url: str, dev: BenchDevice) -> dict[str, object]:
    """Send one signed empty check-in and return the response; raises unless it is a 200."""
    headers = signed_headers(dev, int(time.time()))
    headers["content-type"] = "application/json"
    async with httpx.AsyncClient(base_url=base_url, verify=False, timeout=30) as http:
        r = await http.post(CHECKIN_PATH, content=EMPTY_CHECKIN, headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"a signed check-in got HTTP {r.status_code}: {r.text[:300]}")
    data: dict[str, object] = r.json()
    return data


def _lua_str(s: str) -> str:
    # ids, timestamps and base64url signatures: nothing that needs escaping, but be safe
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_requests(path: Path, devices: list[BenchDevice], timestamp: int | None = None) -> int:
    """Sign one empty check-in per device now and write the Lua data file; the timestamp."""
    ts = int(time.time()) if timestamp is None else timestamp
    lines = [
        "return {",
        f"  path = {_lua_str(CHECKIN_PATH)},",
        f"  body = {_lua_str(EMPTY_CHECKIN.decode())},",
        "  requests = {",
    ]
    for dev in devices:
        h = signed_headers(dev, ts)
        lines.append(
            "    {"
            + ", ".join(
                _lua_str(h[k]) for k in (protocol.H_DEVICE, protocol.H_TIME, protocol.H_SIGNATURE)
            )
            + "},"
        )
    lines += ["  },", "}", ""]
    path.write_text("\n".join(lines))
    return ts
