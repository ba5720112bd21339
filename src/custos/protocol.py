"""The native agent protocol's shared pieces: request signing and header names.

Both sides import this module; it does no I/O. See docs/agent-protocol.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

PROTOCOL_VERSION = "1"
DEVICE_API = "/api/device/v1"

H_DEVICE = "x-custos-device"
H_TIME = "x-custos-time"
H_SIGNATURE = "x-custos-signature"
H_SERVER_TIME = "x-custos-server-time"
H_SESSION = "x-custos-session"

SESSION_PATH = DEVICE_API + "/session"
# a session token is "<device id>.<expiry, epoch seconds>.<nonce>"; its key is derived from it
MAX_TOKEN_LEN = 100


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
    return {H_DEVICE: device_id, H_TIME: ts, H_SIGNATURE: _b64(sig)}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_key(secret: bytes, token: str) -> bytes:
    """The HMAC key of a session: any server process holding `secret` derives it again."""
    return hmac.new(secret, b"custos-session-v1\n" + token.encode(), hashlib.sha256).digest()


def encode_key(key: bytes) -> str:
    """A session key as it travels in the session response."""
    return _b64(key)


def decode_key(text: str) -> bytes:
    """The session key from the session response."""
    return _unb64(text)


def sign_with_session(
    key: bytes,
    token: str,
    device_id: str,
    method: str,
    path_qs: str,
    body: bytes,
    timestamp: int,
) -> dict[str, str]:
    """Headers of a request signed with the session key (HMAC-SHA256) instead of Ed25519."""
    ts = str(timestamp)
    mac = hmac.new(key, signing_input(method, path_qs, ts, device_id, body), hashlib.sha256)
    return {H_DEVICE: device_id, H_TIME: ts, H_SESSION: token, H_SIGNATURE: _b64(mac.digest())}


def verify_session_mac(
    key: bytes,
    signature_b64: str,
    method: str,
    path_qs: str,
    timestamp: str,
    device_id: str,
    body: bytes,
) -> bool:
    """Whether the HMAC was made with the session key over this exact request."""
    try:
        given = _unb64(signature_b64)
    except ValueError:
        return False
    mac = hmac.new(key, signing_input(method, path_qs, timestamp, device_id, body), hashlib.sha256)
    return hmac.compare_digest(given, mac.digest())


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
        sig = _unb64(signature_b64)
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            sig, signing_input(method, path_qs, timestamp, device_id, body)
        )
    except (InvalidSignature, ValueError):
        return False
    return True
