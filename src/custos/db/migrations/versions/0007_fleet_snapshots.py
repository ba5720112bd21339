"""reports: fleet online/offline snapshots for the dashboard's history chart

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 18:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_snapshots",
        sa.Column("at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("online", sa.Integer(), nullable=False),
        sa.Column("never_seen", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("at", name=op.f("pk_fleet_snapshots")),
        comment="active devices, and how many were online, at the start of each snapshot period",
    )


def downgrade() -> None:
    op.drop_table("fleet_snapshots")
