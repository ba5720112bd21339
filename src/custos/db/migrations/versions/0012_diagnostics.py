"""diagnostics: device health reports (agent snapshots, OMA DM DiagMon)

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "diagnostics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("received_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("data", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("mem_total", sa.BigInteger(), nullable=True),
        sa.Column("mem_available", sa.BigInteger(), nullable=True),
        sa.Column("storage_total", sa.BigInteger(), nullable=True),
        sa.Column("storage_free", sa.BigInteger(), nullable=True),
        sa.Column("battery_pct", sa.Float(), nullable=True),
        sa.Column("uptime_s", sa.BigInteger(), nullable=True),
        sa.Column("load1", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_diagnostics_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_diagnostics")),
    )
    with op.batch_alter_table("diagnostics", schema=None) as batch_op:
        batch_op.create_index("ix_diagnostics_device", ["device_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_table("diagnostics")
