"""The audit log table: one row per admin action, each row chained to the one before."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from custos.db.base import Base, JSONDoc, UTCDateTime

# the prev_hash of the first entry
GENESIS_HASH = "0" * 64


class AuditEntry(Base):
    """Who did what to which target, from where, and how it ended; never updated or deleted.

    `id` is the chain order. The service assigns it (last id + 1) while it holds the append
    lock, because the id is part of the hashed content; the primary key and the unique
    `prev_hash` together make a fork impossible even if two appends raced past the lock.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_at", "at"),
        Index("ix_audit_log_actor", "actor"),
        Index("ix_audit_log_action", "action"),
        Index("ix_audit_log_target", "target"),
    )

    # BIGINT on PostgreSQL; SQLite needs INTEGER for the column to be the rowid
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(150), default="")
    actor_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    via: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(300), default="")
    remote: Mapped[str] = mapped_column(String(100), default="")
    result: Mapped[str] = mapped_column(String(10))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
