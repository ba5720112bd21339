"""The diagnostics reports of each device (a bounded history, newest kept)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from custos.db.base import Base, JSONDoc, UTCDateTime, utcnow


class DiagnosticsReport(Base):
    """One health report of one device: what it sent, and the numbers every source shares.

    The integer id grows with every report, so "newest" is the highest id; the history of
    a device is pruned to its newest reports in the transaction that adds one.
    """

    __tablename__ = "diagnostics"
    __table_args__ = (Index("ix_diagnostics_device", "device_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(32), ForeignKey("devices.id", ondelete="CASCADE"))
    # agent | omadm
    source: Mapped[str] = mapped_column(String(10))
    # snapshot | diagmon-result | diagmon-trap | diagmon-data | diagmon-alert
    kind: Mapped[str] = mapped_column(String(20))
    # the diagnose run it answers (None for a DiagMon alert the device sent by itself)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    # normalised health numbers (bytes, percent, seconds); None where the source gave none
    mem_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mem_available: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    storage_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    storage_free: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    battery_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    uptime_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    load1: Mapped[float | None] = mapped_column(Float, nullable=True)
