"""Tables for policy profiles, their assignments, device compliance and lost-device orders."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from custos.db.base import Base, JSONDoc, UTCDateTime, new_id, utcnow


class Policy(Base):
    """A named profile; its current version's document is kept beside the version history."""

    __tablename__ = "policies"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(String(1000), default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    doc: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    digest: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PolicyVersion(Base):
    """One version of a profile as written (the source text) and as validated (the document)."""

    __tablename__ = "policy_versions"

    policy_id: Mapped[str] = mapped_column(
        ForeignKey("policies.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    doc: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    source: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PolicyAssignment(Base):
    """A profile assigned to every device, a group or a label, with a priority."""

    __tablename__ = "policy_assignments"
    __table_args__ = (UniqueConstraint("policy_id", "kind", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy_id: Mapped[str] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(10))  # all | group | label
    target: Mapped[str] = mapped_column(String(100), default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(150), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DevicePolicy(Base):
    """A device's bundle as last sent, its compliance, and the actions taken on it."""

    __tablename__ = "device_policies"
    __table_args__ = (Index("ix_device_policies_status", "status"),)

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    bundle_sha: Mapped[str] = mapped_column(String(64), default="")
    bundle: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    # names of the policies in the bundle (lists and counts read this, not the bundle)
    policies: Mapped[list[str]] = mapped_column(JSONDoc, default=list)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # compliant | noncompliant | pending (no report on this bundle yet) | none (no rules)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    status_since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    noncompliant_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    failing: Mapped[list[str]] = mapped_column(JSONDoc, default=list)  # rule ids
    report_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    reported_sha: Mapped[str] = mapped_column(String(64), default="")
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    inventory_seen: Mapped[int] = mapped_column(Integer, default=-1)
    actions_done: Mapped[list[str]] = mapped_column(JSONDoc, default=list)
    held: Mapped[bool] = mapped_column(Boolean, default=False)
    quarantine_group: Mapped[str | None] = mapped_column(String(100), nullable=True)


class RuleStatus(Base):
    """The current status of one rule on one device (from its report or the server's check)."""

    __tablename__ = "compliance_rules"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    rule_id: Mapped[str] = mapped_column(String(1200), primary_key=True)
    policy: Mapped[str] = mapped_column(String(100), default="")
    status: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str] = mapped_column(String(1000), default="")
    source: Mapped[str] = mapped_column(String(10), default="agent")  # agent | server
    since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ComplianceEvent(Base):
    """History: a rule's status change, or a drift/repair the agent reported, with its time."""

    __tablename__ = "compliance_events"
    __table_args__ = (
        Index("ix_compliance_events_device_at", "device_id", "at"),
        Index("ix_compliance_events_rule_at", "rule_id", "at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    rule_id: Mapped[str] = mapped_column(String(1200))
    policy: Mapped[str] = mapped_column(String(100), default="")
    kind: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str] = mapped_column(String(1000), default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PolicyPackage(Base):
    """A package a device may download because a policy requires it (transfer entitlement)."""

    __tablename__ = "policy_packages"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    package_id: Mapped[str] = mapped_column(String(32), primary_key=True)


class LostDevice(Base):
    """A device marked lost: what to do at its next contact, and what was done."""

    __tablename__ = "lost_devices"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[str] = mapped_column(String(20), default="lost")  # lost | found
    message: Mapped[str] = mapped_column(String(500), default="")
    lock: Mapped[bool] = mapped_column(Boolean, default=True)
    wipe: Mapped[str] = mapped_column(String(10), default="none")  # none | selective | full
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_wipe_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lock_run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    marked_by: Mapped[str] = mapped_column(String(150), default="")
    marked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    found_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WipeOrder(Base):
    """One wipe sent to a device (by an admin, a lost-device rule or a policy action)."""

    __tablename__ = "wipe_orders"
    __table_args__ = (Index("ix_wipe_orders_state", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(String(32))
    mode: Mapped[str] = mapped_column(String(10))  # selective | full
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(String(200), default="")
    requested_by: Mapped[str] = mapped_column(String(150), default="")
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # sent | confirmed | failed | cancelled
    state: Mapped[str] = mapped_column(String(20), default="sent")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
