"""Tables for packages, labels (saved inventory queries), deployments and per-device status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from custos.db.base import Base, JSONDoc, UTCDateTime, new_id, utcnow


class Package(Base):
    """One version of a package: its signed descriptor and the artifact's content address."""

    __tablename__ = "packages"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_packages_name_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(100))
    format: Mapped[str] = mapped_column(String(10))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255))
    platforms: Mapped[list[str]] = mapped_column(JSONDoc, default=list)
    descriptor: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    signature: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONDoc, default=dict)
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Label(Base):
    """A dynamic set of devices: a saved query over inventory, re-evaluated as it changes."""

    __tablename__ = "labels"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    query: Mapped[list[dict[str, Any]]] = mapped_column(JSONDoc, default=list)
    description: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Deployment(Base):
    """Put a package on (or remove it from) a set of devices, in waves, on a schedule."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.id", ondelete="RESTRICT"))
    package_name: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(10))  # install | uninstall
    mode: Mapped[str] = mapped_column(String(10))  # required | available
    # {"devices": [...], "groups": [...], "labels": [...]}
    targets: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    download_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    activate_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    window: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    # cumulative percentages, e.g. [10, 50, 100]
    waves: Mapped[list[int]] = mapped_column(JSONDoc, default=list)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    success_threshold: Mapped[float] = mapped_column(Float, default=90.0)
    failure_threshold: Mapped[float] = mapped_column(Float, default=20.0)
    auto_upgrade: Mapped[bool] = mapped_column(Boolean, default=False)
    limit_bps: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    state: Mapped[str] = mapped_column(String(12), default="active")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeploymentDevice(Base):
    """One device's part in a deployment: its wave and what it last reported."""

    __tablename__ = "deployment_devices"
    __table_args__ = (
        Index("ix_deployment_devices_device_id", "device_id"),
        Index("ix_deployment_devices_state", "deployment_id", "state"),
    )

    deployment_id: Mapped[str] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    wave: Mapped[int] = mapped_column(Integer, default=0)
    # pending (not sent) | queued | downloading | downloaded | installing | installed |
    # removed | failed | cancelled
    state: Mapped[str] = mapped_column(String(12), default="pending")
    package_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")
    log: Mapped[str] = mapped_column(Text, default="")
    command_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
