"""The package #0 notification (OMA DM Notification Initiation Session, DM 1.2). No I/O.

Layout: a 16-byte digest, then the trigger header — version (10 bits, 12 for 1.2), ui-mode
(2 bits), initiator (1 bit, 1 = server), 27 reserved bits, a 16-bit session id, the length of
the server identifier (8 bits) and the identifier — then a vendor-specific body.
digest = MD5(B64(MD5(server-id:password)) ":" nonce ":" B64(MD5(trigger))), trigger being
everything after the digest; the password and nonce are the ones the client holds to
authenticate this server.
"""

from __future__ import annotations

from dataclasses import dataclass

from custos.omadm.auth import b64, md5

VERSION_12 = 12
UI_NOT_SPECIFIED, UI_BACKGROUND, UI_INFORMATIVE, UI_USER_INTERACTION = 0, 1, 2, 3
MAX_SERVER_ID = 255
MAX_BODY = 1024


class NotificationError(ValueError):
    """Not a package #0 this module can read or write."""


@dataclass(frozen=True)
class Notification:
    server_id: str
    session_id: int
    ui_mode: int = UI_BACKGROUND
    initiator_server: bool = True
    version: int = VERSION_12
    body: bytes = b""
    digest: bytes = b""


def _trigger(n: Notification) -> bytes:
    sid = n.server_id.encode()
    if not 0 < len(sid) <= MAX_SERVER_ID:
        raise NotificationError("server identifier must be 1 to 255 bytes")
    if not 0 <= n.session_id <= 0xFFFF:
        raise NotificationError("session id must fit 16 bits")
    if not 0 <= n.ui_mode <= 3 or not 0 <= n.version < 1024:
        raise NotificationError("ui-mode or version out of range")
    if len(n.body) > MAX_BODY:
        raise NotificationError(f"vendor body longer than {MAX_BODY} bytes")
    bits = (n.version << 30) | (n.ui_mode << 28) | (int(n.initiator_server) << 27)
    return (
        bits.to_bytes(5, "big") + n.session_id.to_bytes(2, "big") + bytes([len(sid)]) + sid + n.body
    )


def digest(server_ha1: str, nonce: bytes, trigger: bytes) -> bytes:
    return md5(server_ha1.encode() + b":" + nonce + b":" + b64(md5(trigger)).encode())


def build(n: Notification, server_ha1: str, nonce: bytes) -> bytes:
    """The package #0 bytes, signed with the server's credentials as the client knows them."""
    trigger = _trigger(n)
    return digest(server_ha1, nonce, trigger) + trigger


def parse(data: bytes) -> Notification:
    """Read a package #0 (tests, and anyone checking what a gateway will deliver)."""
    if len(data) < 16 + 8 or len(data) > 16 + 8 + MAX_SERVER_ID + MAX_BODY:
        raise NotificationError("package #0 has the wrong length")
    dig, trig = data[:16], data[16:]
    bits = int.from_bytes(trig[:5], "big")
    sid_len = trig[7]
    if sid_len == 0 or len(trig) < 8 + sid_len:
        raise NotificationError("server identifier length out of range")
    try:
        server_id = trig[8 : 8 + sid_len].decode()
    except UnicodeDecodeError:
        raise NotificationError("server identifier is not UTF-8") from None
    return Notification(
        server_id=server_id,
        session_id=int.from_bytes(trig[5:7], "big"),
        ui_mode=(bits >> 28) & 3,
        initiator_server=bool((bits >> 27) & 1),
        version=bits >> 30,
        body=trig[8 + sid_len :],
        digest=dig,
    )


def verify(data: bytes, server_ha1: str, nonce: bytes) -> bool:
    import hmac

    n = parse(data)
    return hmac.compare_digest(n.digest, digest(server_ha1, nonce, data[16:]))
