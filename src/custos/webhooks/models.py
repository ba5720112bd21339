"""Webhook subscriptions and their delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from custos.db.base import Base, JSONDoc, UTCDateTime, new_id


class Webhook(Base):
    """An HTTP endpoint that receives signed POSTs for the events it subscribes to."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(String(2000))
    # event names, or ["*"] for every event
    events: Mapped[list[str]] = mapped_column(JSONDoc)
    # the signing secret, AES-GCM sealed with the server's derived key (never stored plain)
    secret_sealed: Mapped[str] = mapped_column(String(500))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One event for one webhook: pending until a 2xx answer (delivered) or retries run out."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # the job's "what is due" scan
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        # one webhook's log, newest first
        Index("ix_webhook_deliveries_webhook", "webhook_id", "created_at"),
        # retention
        Index("ix_webhook_deliveries_created", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    webhook_id: Mapped[int] = mapped_column(Integer, ForeignKey("webhooks.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(50))
    data: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    # pending, delivered or failed
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # when a pending delivery is next tried; while an attempt is under way, the end of its
    # lease (a process that dies mid-send leaves it to be picked up again after that)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # why the last attempt failed (connection refused, timeout, HTTP 500 …)
    error: Mapped[str] = mapped_column(String(500), default="")
    # the start of the receiver's last answer
    response: Mapped[str] = mapped_column(String(500), default="")
    # the delivery this one re-sends (an admin's redeliver)
    redelivery_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
