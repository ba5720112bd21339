"""policies: profiles, versions, assignments, device compliance, lost devices, wipe orders

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 21:17:14.392341
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("doc", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=150), nullable=False),
        sa.Column("created_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policies")),
        sa.UniqueConstraint("name", name=op.f("uq_policies_name")),
    )
    op.create_table(
        "policy_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("target", sa.String(length=100), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=150), nullable=False),
        sa.Column("created_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policies.id"],
            name=op.f("fk_policy_assignments_policy_id_policies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_assignments")),
        sa.UniqueConstraint(
            "policy_id", "kind", "target", name=op.f("uq_policy_assignments_policy_id")
        ),
    )
    op.create_table(
        "policy_versions",
        sa.Column("policy_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("doc", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=150), nullable=False),
        sa.Column("created_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["policies.id"],
            name=op.f("fk_policy_versions_policy_id_policies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("policy_id", "version", name=op.f("pk_policy_versions")),
    )
    op.create_table(
        "compliance_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("rule_id", sa.String(length=1200), nullable=False),
        sa.Column("policy", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.String(length=1000), nullable=False),
        sa.Column("at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_compliance_events_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compliance_events")),
    )
    with op.batch_alter_table("compliance_events", schema=None) as batch_op:
        batch_op.create_index("ix_compliance_events_device_at", ["device_id", "at"], unique=False)
        batch_op.create_index("ix_compliance_events_rule_at", ["rule_id", "at"], unique=False)

    op.create_table(
        "compliance_rules",
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("rule_id", sa.String(length=1200), nullable=False),
        sa.Column("policy", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.String(length=1000), nullable=False),
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column("since", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("checked_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_compliance_rules_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "rule_id", name=op.f("pk_compliance_rules")),
    )
    op.create_table(
        "device_policies",
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("bundle_sha", sa.String(length=64), nullable=False),
        sa.Column("bundle", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("policies", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("sent_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("status_since", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("noncompliant_since", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("failing", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("report_seq", sa.BigInteger(), nullable=False),
        sa.Column("reported_sha", sa.String(length=64), nullable=False),
        sa.Column("reported_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("inventory_seen", sa.Integer(), nullable=False),
        sa.Column("actions_done", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("quarantine_group", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_policies_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_policies")),
    )
    with op.batch_alter_table("device_policies", schema=None) as batch_op:
        batch_op.create_index("ix_device_policies_status", ["status"], unique=False)

    op.create_table(
        "lost_devices",
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("message", sa.String(length=500), nullable=False),
        sa.Column("lock", sa.Boolean(), nullable=False),
        sa.Column("wipe", sa.String(length=10), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("auto_wipe_days", sa.Integer(), nullable=True),
        sa.Column("lock_run_id", sa.String(length=32), nullable=True),
        sa.Column("marked_by", sa.String(length=150), nullable=False),
        sa.Column("marked_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("found_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_lost_devices_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_lost_devices")),
    )
    op.create_table(
        "policy_packages",
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("package_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_policy_packages_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "package_id", name=op.f("pk_policy_packages")),
    )
    op.create_table(
        "wipe_orders",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("mode", sa.String(length=10), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("requested_by", sa.String(length=150), nullable=False),
        sa.Column("requested_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("result", custos.db.base.JSONDoc(), nullable=True),
        sa.Column("finished_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_wipe_orders_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wipe_orders")),
    )
    with op.batch_alter_table("wipe_orders", schema=None) as batch_op:
        batch_op.create_index("ix_wipe_orders_state", ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("wipe_orders", schema=None) as batch_op:
        batch_op.drop_index("ix_wipe_orders_state")

    op.drop_table("wipe_orders")
    op.drop_table("policy_packages")
    op.drop_table("lost_devices")
    with op.batch_alter_table("device_policies", schema=None) as batch_op:
        batch_op.drop_index("ix_device_policies_status")

    op.drop_table("device_policies")
    op.drop_table("compliance_rules")
    with op.batch_alter_table("compliance_events", schema=None) as batch_op:
        batch_op.drop_index("ix_compliance_events_rule_at")
        batch_op.drop_index("ix_compliance_events_device_at")

    op.drop_table("compliance_events")
    op.drop_table("policy_versions")
    op.drop_table("policy_assignments")
    op.drop_table("policies")
