"""OMA DM accounts (one per OMA DM device) and the stored state of their sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from custos.db.base import Base, JSONDoc, UTCDateTime


class OmadmAccount(Base):
    """A device managed over OMA DM: its DM identity and both sides' credentials.

    The client's credentials are kept as B64(MD5(name:password)), which is all the basic,
    md5 and HMAC checks need; the server's password is sealed (AES-GCM with the server's
    derived key) because basic authentication towards the client sends it in the clear.
    """

    __tablename__ = "omadm_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("devices.id", ondelete="CASCADE"), unique=True
    )
    # the client's LocURI in SyncHdr/Source (./DevInfo/DevId), e.g. IMEI:490154203237518
    dev_id: Mapped[str] = mapped_column(String(255), unique=True)
    # how the client must authenticate: basic | md5 | hmac | cert
    auth: Mapped[str] = mapped_column(String(10))
    client_name: Mapped[str] = mapped_column(String(100))
    client_ha1_sealed: Mapped[str] = mapped_column(String(200))
    # the identifier and password this server presents to the client
    server_id: Mapped[str] = mapped_column(String(100))
    server_password_sealed: Mapped[str] = mapped_column(String(300))
    # the nonce the client's next md5/HMAC credentials must use (base64), and the one the
    # client asked this server to use for its own credentials
    client_nonce: Mapped[str] = mapped_column(String(100))
    server_nonce: Mapped[str] = mapped_column(String(100))
    # consecutive failed authentications; a burst locks the account for a while
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # per-device package #0 delivery hook (an HTTP or SMS gateway); empty: the server default
    notify_url: Mapped[str] = mapped_column(String(500), default="")
    # the session id of the last package #0 sent and when
    notified_session: Mapped[int | None] = mapped_column(Integer, nullable=True)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    inventory_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_session_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # a DMAcc rotation's new secrets (sealed like the ones above) and nonces, from the moment
    # they are sent until the device signs in with one set (omadm/dmacc.py): both sets are
    # accepted meanwhile. rotation_run is the run that sent them, rotation_at when, and
    # rotation_taken whether the device answered the Atomic and each Replace 200.
    rotation_client_ha1_sealed: Mapped[str | None] = mapped_column(String(200), nullable=True)
    rotation_server_password_sealed: Mapped[str | None] = mapped_column(String(300), nullable=True)
    rotation_client_nonce: Mapped[str | None] = mapped_column(String(100), nullable=True)
    rotation_server_nonce: Mapped[str | None] = mapped_column(String(100), nullable=True)
    rotation_run: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rotation_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rotation_taken: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class OmadmSession(Base):
    """One DM session's state between its messages, so any server process can continue it."""

    __tablename__ = "omadm_sessions"
    __table_args__ = (
        UniqueConstraint("account_id", "session_id"),
        Index("ix_omadm_sessions_updated", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("omadm_accounts.id", ondelete="CASCADE")
    )
    session_id: Mapped[str] = mapped_column(String(64))
    # the last message ids seen from the client and sent to it
    client_msg_id: Mapped[int] = mapped_column(Integer, default=0)
    server_msg_id: Mapped[int] = mapped_column(Integer, default=0)
    authenticated: Mapped[bool] = mapped_column(Boolean, default=False)
    auth_method: Mapped[str] = mapped_column(String(10), default="")
    failures: Mapped[int] = mapped_column(Integer, default=0)
    # outstanding commands, partial results, large-object chunks (see service.SessionState)
    state: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    # the last answer, sent again when the client retransmits the same message
    last_request_sha: Mapped[str] = mapped_column(String(64), default="")
    last_response: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    last_response_type: Mapped[str] = mapped_column(String(60), default="")
    last_response_hmac: Mapped[str] = mapped_column(String(300), default="")
    ended: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
