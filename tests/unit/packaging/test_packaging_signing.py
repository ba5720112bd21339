"""Descriptor signatures: made with the CA key, checked against the pinned CA certificate."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from custos.devices.ca import CertificateAuthority
from custos.packaging.signing import (
    SignatureError,
    descriptor_bytes,
    sign_descriptor,
    verify_descriptor,
)


def _ca() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """An EC key and a self-signed certificate around it (the shape of the server's CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _self_signed(key)


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


DESCRIPTOR: dict[str, Any] = {
    "name": "hello",
    "version": "1.0.0",
    "format": "cpkg",
    "sha256": "ab" * 32,
    "size": 1234,
    "filename": "hello.cpkg",
    "manifest": {"name": "hello", "install": [{"command": ["/bin/true"], "timeout": 30.5}]},
    "detect": {"file": "/opt/hello", "sha256": None},
    "platforms": ["linux"],
}


def test_sign_and_verify() -> None:
    key, pem = _ca()
    sig = sign_descriptor(key, DESCRIPTOR)
    verify_descriptor(pem, DESCRIPTOR, sig)
    verify_descriptor(pem.encode(), json.loads(json.dumps(DESCRIPTOR)), sig)
    # key order does not matter; the canonical form is the same
    reordered = dict(reversed(list(copy.deepcopy(DESCRIPTOR).items())))
    verify_descriptor(pem, reordered, sig)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(version="1.0.1"),
        lambda d: d.update(sha256="cd" * 32),
        lambda d: d.update(size=1235),
        lambda d: d["manifest"]["install"][0]["command"].append("--evil"),
        lambda d: d.update(extra=True),
        lambda d: d.pop("detect"),
    ],
    ids=["version", "sha256", "size", "manifest", "added_key", "removed_key"],
)
def test_tampered_descriptor_is_refused(change: Any) -> None:
    key, pem = _ca()
    sig = sign_descriptor(key, DESCRIPTOR)
    tampered = copy.deepcopy(DESCRIPTOR)
    change(tampered)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_descriptor(pem, tampered, sig)


def test_wrong_key_is_refused() -> None:
    key, _ = _ca()
    _, other_pem = _ca()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_descriptor(other_pem, DESCRIPTOR, sign_descriptor(key, DESCRIPTOR))


def test_malformed_signatures_and_certificates() -> None:
    key, pem = _ca()
    good = sign_descriptor(key, DESCRIPTOR)
    for bad in ["", "not base64!!", base64.b64encode(b"\x30\x02\x01\x01").decode(), "A" * 1000]:
        with pytest.raises(SignatureError):
            verify_descriptor(pem, DESCRIPTOR, bad)
    with pytest.raises(SignatureError, match="cannot be read"):
        verify_descriptor("-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n", {}, good)
    # a signature is bound to its context label: a raw ECDSA signature over the JSON is refused
    raw = key.sign(descriptor_bytes(DESCRIPTOR), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_descriptor(pem, DESCRIPTOR, base64.b64encode(raw).decode())


def test_rsa_ca_is_refused() -> None:
    pem = _self_signed(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(SignatureError, match="EC key"):
        verify_descriptor(pem, DESCRIPTOR, "AAAA")


def test_with_the_servers_certificate_authority() -> None:
    ca = CertificateAuthority.create("Custos CA")
    sig = sign_descriptor(ca._key, DESCRIPTOR)  # the server signs with its CA key
    verify_descriptor(ca.cert_pem, DESCRIPTOR, sig)
    with pytest.raises(SignatureError):
        verify_descriptor(ca.cert_pem, {**DESCRIPTOR, "name": "other"}, sig)


def test_descriptor_bytes_is_canonical() -> None:
    assert descriptor_bytes({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == (
        '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()
    )
    with pytest.raises(ValueError, match="NaN"):
        descriptor_bytes({"x": float("nan")})
    with pytest.raises(ValueError, match="at most"):
        descriptor_bytes({"x": "a" * (2 * 1024 * 1024)})
