"""scheduled tasks: definitions, target devices and reported runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scheduled_tasks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("action", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("schedule", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("window", custos.db.base.JSONDoc(), nullable=True),
        sa.Column("misfire_grace_s", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=150), nullable=False),
        sa.Column("created_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_tasks")),
        sa.UniqueConstraint("name", name=op.f("uq_scheduled_tasks_name")),
    )
    op.create_table(
        "task_targets",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_task_targets_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["scheduled_tasks.id"],
            name=op.f("fk_task_targets_task_id_scheduled_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", "device_id", name=op.f("pk_task_targets")),
    )
    with op.batch_alter_table("task_targets", schema=None) as batch_op:
        batch_op.create_index("ix_task_targets_device_id", ["device_id"], unique=False)

    op.create_table(
        "task_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("scheduled_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("missed_count", sa.BigInteger(), nullable=False),
        sa.Column("first_missed_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("agent_started_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("agent_finished_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("clock_offset_s", sa.Float(), nullable=True),
        sa.Column("started_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("exit_code", sa.BigInteger(), nullable=True),
        sa.Column("stdout", sa.Text(), nullable=False),
        sa.Column("stderr", sa.Text(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_task_runs_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["scheduled_tasks.id"],
            name=op.f("fk_task_runs_task_id_scheduled_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_runs")),
        sa.UniqueConstraint(
            "task_id", "device_id", "seq", name=op.f("uq_task_runs_task_device_seq")
        ),
    )
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.create_index("ix_task_runs_device_id", ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_task_runs_device_id")
    op.drop_table("task_runs")
    with op.batch_alter_table("task_targets", schema=None) as batch_op:
        batch_op.drop_index("ix_task_targets_device_id")
    op.drop_table("task_targets")
    op.drop_table("scheduled_tasks")
