"""Enrolment on the agent side: key pair, CSR, CA pinning, and the stored identity."""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from custos import __version__, protocol
from custos.agent.client import pinned_context
from custos.agent.state import AgentState


class EnrollError(Exception):
    """Enrolment failed; the message says why."""


@dataclass
class Identity:
    """What the agent needs to talk to its server."""

    server_url: str
    device_id: str
    key: ed25519.Ed25519PrivateKey
    ca_pem: str


def normalise_fingerprint(value: str) -> str:
    """'sha256:AB:CD…', 'AB:CD…' or hex → lowercase hex (same rule as the server)."""
    v = value.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise EnrollError("a CA fingerprint is 64 hex digits (SHA-256)")
    return v


def ca_fingerprint(ca_pem: str) -> str:
    """SHA-256 of the certificate's DER, hex."""
    cert = x509.load_pem_x509_certificate(ca_pem.encode())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


async def fetch_pinned_ca(
    url: str, fingerprint: str | None, transport: httpx.AsyncBaseTransport | None = None
) -> str:
    """Download the server's CA and check it against the fingerprint from the enrol command."""
    async with httpx.AsyncClient(verify=False, transport=transport, timeout=30) as http:  # noqa: S501 - checked by fingerprint below
        try:
            resp = await http.get(url.rstrip("/") + protocol.DEVICE_API + "/ca")
        except httpx.HTTPError as exc:
            raise EnrollError(f"cannot reach {url}: {exc}") from exc
    if resp.status_code != 200:
        raise EnrollError(f"{url} does not look like a Custos server (HTTP {resp.status_code})")
    ca_pem = resp.text
    try:
        got = ca_fingerprint(ca_pem)
    except ValueError as exc:
        raise EnrollError("the server sent an invalid CA certificate") from exc
    if fingerprint is not None and got != normalise_fingerprint(fingerprint):
        raise EnrollError(
            f"CA fingerprint mismatch: expected {normalise_fingerprint(fingerprint)}, "
            f"server presented {got}. Refusing to enrol."
        )
    return ca_pem


async def enroll(
    state: AgentState,
    url: str,
    token: str,
    fingerprint: str | None,
    *,
    facts: dict[str, str],
    name: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Identity:
    """Make a key pair, send a CSR with the facts, store the issued identity."""
    if state.get("device_id"):
        raise EnrollError(
            f"this state directory is already enrolled as {state.get('device_id')}; "
            "use another --state-dir or remove it"
        )
    url = url.rstrip("/")
    ca_pem = await fetch_pinned_ca(url, fingerprint, transport)
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(
                        NameOID.COMMON_NAME, facts.get("os.hostname") or platform.node() or "device"
                    )
                ]
            )
        )
        .sign(key, None)
    )
    body = {
        "token": token,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "facts": facts,
        "agent_version": __version__,
    }
    if name:
        body["name"] = name
    verify = pinned_context(ca_pem) if url.startswith("https://") else False
    async with httpx.AsyncClient(verify=verify, transport=transport, timeout=60) as http:
        try:
            resp = await http.post(url + protocol.DEVICE_API + "/enroll", json=body)
        except httpx.HTTPError as exc:
            raise EnrollError(f"enrolment request failed: {exc}") from exc
    if resp.status_code != 201:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise EnrollError(f"the server refused enrolment: {detail}")
    data = resp.json()
    _write_secret(
        state.dir / "device.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    (state.dir / "device.pem").write_text(data["certificate"])
    (state.dir / "ca.pem").write_text(ca_pem)
    state.set(
        server_url=url,
        device_id=data["device_id"],
        ca_fingerprint=ca_fingerprint(ca_pem),
        checkin_interval=str(data["checkin_interval"]),
    )
    return Identity(url, data["device_id"], key, ca_pem)


def load_identity(state: AgentState) -> Identity:
    """The stored identity, or EnrollError if this state directory is not enrolled."""
    device_id = state.get("device_id")
    url = state.get("server_url")
    if not device_id or not url:
        raise EnrollError(f"not enrolled (no identity in {state.dir}); run `custos agent enroll`")
    key = serialization.load_pem_private_key((state.dir / "device.key").read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EnrollError("device.key is not an Ed25519 key")
    return Identity(url, device_id, key, (state.dir / "ca.pem").read_text())
