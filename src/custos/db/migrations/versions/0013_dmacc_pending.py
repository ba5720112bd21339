"""omadm: DM account secrets sent to a device and not yet known to be in use (DMAcc rotation)

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-24 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

COLUMNS = (
    ("rotation_client_ha1_sealed", sa.String(length=200)),
    ("rotation_server_password_sealed", sa.String(length=300)),
    ("rotation_client_nonce", sa.String(length=100)),
    ("rotation_server_nonce", sa.String(length=100)),
    ("rotation_run", sa.String(length=32)),
    ("rotation_at", custos.db.base.UTCDateTime(timezone=True)),
    ("rotation_taken", sa.Boolean()),
)


def upgrade() -> None:
    with op.batch_alter_table("omadm_accounts", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("omadm_accounts", schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
