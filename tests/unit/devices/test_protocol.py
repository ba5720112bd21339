"""Request signing: what is covered by the signature and what is not accepted."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from custos import protocol


def _pub(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_signature_verifies_and_binds_every_part():
    key = ed25519.Ed25519PrivateKey.generate()
    dev = "d" * 32
    h = protocol.sign_request(key, dev, "POST", "/api/device/v1/checkin", b"{}", 1700000000)
    sig, ts = h[protocol.H_SIGNATURE], h[protocol.H_TIME]
    ok = protocol.verify_signature(_pub(key), sig, "POST", "/api/device/v1/checkin", ts, dev, b"{}")
    assert ok
    variants = [
        ("GET", "/api/device/v1/checkin", ts, dev, b"{}"),
        ("POST", "/api/device/v1/checkin?x=1", ts, dev, b"{}"),
        ("POST", "/api/device/v1/checkin", str(int(ts) + 1), dev, b"{}"),
        ("POST", "/api/device/v1/checkin", ts, "e" * 32, b"{}"),
        ("POST", "/api/device/v1/checkin", ts, dev, b"{ }"),
    ]
    for v in variants:
        assert not protocol.verify_signature(_pub(key), sig, *v), v
    other = ed25519.Ed25519PrivateKey.generate()
    assert not protocol.verify_signature(
        _pub(other), sig, "POST", "/api/device/v1/checkin", ts, dev, b"{}"
    )


def test_garbage_signature_is_false_not_an_exception():
    key = ed25519.Ed25519PrivateKey.generate()
    for sig in ("", "!!!", "A" * 200):
        assert not protocol.verify_signature(_pub(key), sig, "POST", "/", "1", "d", b"")
