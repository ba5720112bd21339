"""Tables for scheduled tasks, the devices they target and the runs devices report."""

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


class ScheduledTask(Base):
    """A task agents run on their own schedule, with or without a network."""

    __tablename__ = "scheduled_tasks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    target: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(20))  # exec | script
    action: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    timeout_s: Mapped[float] = mapped_column(Float)
    schedule: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    window: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    misfire_grace_s: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # bumped by every change; agents keep the highest revision they were sent
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TaskTarget(Base):
    """One device a task was handed to (the target is resolved when the task is created)."""

    __tablename__ = "task_targets"
    __table_args__ = (Index("ix_task_targets_device_id", "device_id"),)

    task_id: Mapped[str] = mapped_column(
        ForeignKey("scheduled_tasks.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )


class TaskRun(Base):
    """One occurrence a device reports: run, missed or interrupted; (task, device, seq) is unique.

    `agent_*` times are the device's own clock; `started_at`/`finished_at` are corrected by
    the clock offset the agent had learnt from the server (agent time + offset).
    """

    __tablename__ = "task_runs"
    __table_args__ = (
        UniqueConstraint("task_id", "device_id", "seq", name="uq_task_runs_task_device_seq"),
        Index("ix_task_runs_device_id", "device_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("scheduled_tasks.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    missed_count: Mapped[int] = mapped_column(BigInteger, default=0)
    first_missed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    agent_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    agent_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    clock_offset_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    exit_code: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    stdout: Mapped[str] = mapped_column(Text, default="")
    stderr: Mapped[str] = mapped_column(Text, default="")
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
