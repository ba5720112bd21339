"""Tables for the CA, enrolment tokens, devices, groups and inventory history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from custos.db.base import Base, JSONDoc, UTCDateTime, new_id, utcnow


class CertificateAuthority(Base):
    """The built-in CA, shared by every server process; its key is stored encrypted."""

    __tablename__ = "certificate_authority"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    encrypted_key_pem: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


device_groups = Table(
    "device_groups",
    Base.metadata,
    Column("device_id", ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("group_id", ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class Group(Base):
    """A named set of devices that commands and (later) deployments target."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class EnrollmentToken(Base):
    """A secret that lets agents enrol; only its SHA-256 is stored."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("groups.id", ondelete="SET NULL"), nullable=True
    )
    note: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Device(Base):
    """An enrolled device: its certificate identity, facts and current inventory."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(20), default="active")  # active | retired
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    cert_serial: Mapped[str] = mapped_column(String(64), unique=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    cert_not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    facts: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enrolled_with: Mapped[int | None] = mapped_column(
        ForeignKey("enrollment_tokens.id", ondelete="SET NULL"), nullable=True
    )
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_clock_skew_s: Mapped[float | None] = mapped_column(nullable=True)
    agent_version: Mapped[str] = mapped_column(String(50), default="")
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    inventory: Mapped[dict[str, str]] = mapped_column(JSONDoc, default=dict)
    inventory_version: Mapped[int] = mapped_column(Integer, default=0)
    inventory_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    groups: Mapped[list[Group]] = relationship(secondary=device_groups, lazy="raise")


class InventoryChange(Base):
    """One key of a device's inventory changing: the history the console shows as a diff."""

    __tablename__ = "inventory_changes"
    __table_args__ = (Index("ix_inventory_changes_device_at", "device_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    key: Mapped[str] = mapped_column(String(512))
    old: Mapped[str | None] = mapped_column(Text, nullable=True)
    new: Mapped[str | None] = mapped_column(Text, nullable=True)


class RevokedCertificate(Base):
    """A revoked device certificate serial (the CRL's source)."""

    __tablename__ = "revoked_certificates"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(32))
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reason: Mapped[str] = mapped_column(String(100), default="retired")
