"""The native agent protocol's shared pieces: request signing and header names.

Both sides import this module; it does no I/O. See docs/agent-protocol.md.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

PROTOCOL_VERSION = "1"
DEVICE_API = "/api/device/v1"

H_DEVICE = "x-custos-device"
H_TIME = "x-custos-time"
H_SIGNATURE = "x-custos-signature"
H_SERVER_TIME = "x-custos-server-time"


def signing_input(method: str, path_qs: str, timestamp: str, device_id: str, body: bytes) -> bytes:
    """The bytes a device signs: method, path with query, time, device id and body digest."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join(("custos-v1", method.upper(), path_qs, timestamp, device_id, digest)).encode()


def sign_request(
    key: ed25519.Ed25519PrivateKey,
    device_id: str,
    method: str,
    path_qs: str,
    body: bytes,
    timestamp: int,
) -> dict[str, str]:
    """Headers that prove possession of the device key for one request."""
    ts = str(timestamp)
    sig = key.sign(signing_input(method, path_qs, ts, device_id, body))
    return {
        H_DEVICE: device_id,
        H_TIME: ts,
        H_SIGNATURE: base64.urlsafe_b64encode(sig).decode().rstrip("="),
    }


def verify_signature(
    public_key: bytes,
    signature_b64: str,
    method: str,
    path_qs: str,
    timestamp: str,
    device_id: str,
    body: bytes,
) -> bool:
    """Whether the signature was made by the device key over this exact request."""
    try:
        sig = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            sig, signing_input(method, path_qs, timestamp, device_id, body)
        )
    except (InvalidSignature, ValueError):
        return False
    return True
