"""OMA DM 1.2 credentials: syncml:auth-basic, syncml:auth-md5, HMAC-MD5, the package #0 digest.

DM 1.2 digests are built on B64(MD5(name ":" password)), which is therefore all that needs to
be stored for a client's credentials (`ha1`). Nonces travel base64-encoded and are used raw.
No I/O; every comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

AUTH_BASIC = "syncml:auth-basic"
AUTH_MD5 = "syncml:auth-md5"
AUTH_HMAC = "syncml:auth-MAC"


class AuthError(ValueError):
    """Malformed credentials (as opposed to wrong ones, which just do not verify)."""


def md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthError("not valid base64") from None


def ha1(name: str, password: str) -> str:
    """B64(MD5(name:password)): what the md5 and HMAC digests are built on."""
    return b64(md5(f"{name}:{password}".encode()))


def new_nonce() -> str:
    """12 random bytes: base64 without padding (libdmclient misreads a nonce ending in one '=')."""
    return b64(secrets.token_bytes(12))


def basic(name: str, password: str) -> str:
    return b64(f"{name}:{password}".encode())


def parse_basic(data: str) -> tuple[str, str]:
    raw = unb64(data)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise AuthError("basic credentials are not UTF-8") from None
    name, sep, password = text.partition(":")
    if not sep:
        raise AuthError("basic credentials need name:password")
    return name, password


def md5_digest(ha1_b64: str, nonce: bytes) -> str:
    """B64(MD5(B64(MD5(name:password)) ":" nonce))."""
    return b64(md5(ha1_b64.encode() + b":" + nonce))


def check_basic(data: str, name: str, ha1_b64: str) -> bool:
    """Whether basic credentials carry this name and the password behind `ha1_b64`.

    The name is matched as a prefix: DM account names (a DevId such as IMEI:…) contain colons.
    """
    try:
        text = unb64(data).decode()
    except UnicodeDecodeError:
        raise AuthError("basic credentials are not UTF-8") from None
    prefix = name + ":"
    if not hmac.compare_digest(text[: len(prefix)].encode(), prefix.encode()):
        return False
    return hmac.compare_digest(ha1(name, text[len(prefix) :]).encode(), ha1_b64.encode())


def check_md5(data: str, ha1_b64: str, nonce: bytes) -> bool:
    return hmac.compare_digest(data.strip().encode(), md5_digest(ha1_b64, nonce).encode())


def hmac_mac(ha1_b64: str, nonce: bytes, body: bytes) -> str:
    """The x-syncml-hmac mac: B64(MD5(B64(MD5(name:pw)) ":" nonce ":" B64(MD5(body))))."""
    return b64(md5(ha1_b64.encode() + b":" + nonce + b":" + b64(md5(body)).encode()))


_HMAC_PART = re.compile(r'\s*([A-Za-z]+)\s*=\s*("([^"]*)"|[^,\s]*)\s*(?:,|$)')


def parse_hmac_header(value: str) -> dict[str, str]:
    """`algorithm=MD5, username="name", mac=...` → its parts (lower-cased keys)."""
    if len(value) > 1024:
        raise AuthError("x-syncml-hmac header too long")
    parts: dict[str, str] = {}
    pos = 0
    while pos < len(value):
        m = _HMAC_PART.match(value, pos)
        if not m or m.end() == pos:
            raise AuthError("malformed x-syncml-hmac header")
        parts[m.group(1).lower()] = m.group(3) if m.group(3) is not None else m.group(2)
        pos = m.end()
    if "username" not in parts or "mac" not in parts:
        raise AuthError("x-syncml-hmac needs username and mac")
    if parts.get("algorithm", "MD5").upper() != "MD5":
        raise AuthError("only algorithm=MD5 is defined for x-syncml-hmac")
    return parts


def hmac_header(name: str, mac: str) -> str:
    if '"' in name or "," in name:
        raise AuthError("an x-syncml-hmac username cannot hold quotes or commas")
    return f'algorithm=MD5, username="{name}", mac={mac}'


def check_hmac(header: str, name: str, ha1_b64: str, nonce: bytes, body: bytes) -> bool:
    parts = parse_hmac_header(header)
    ok_name = hmac.compare_digest(parts["username"].encode(), name.encode())
    ok_mac = hmac.compare_digest(parts["mac"].encode(), hmac_mac(ha1_b64, nonce, body).encode())
    return ok_name & ok_mac
