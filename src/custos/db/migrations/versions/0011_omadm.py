"""omadm: OMA DM accounts and stored session state

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "omadm_accounts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("dev_id", sa.String(length=255), nullable=False),
        sa.Column("auth", sa.String(length=10), nullable=False),
        sa.Column("client_name", sa.String(length=100), nullable=False),
        sa.Column("client_ha1_sealed", sa.String(length=200), nullable=False),
        sa.Column("server_id", sa.String(length=100), nullable=False),
        sa.Column("server_password_sealed", sa.String(length=300), nullable=False),
        sa.Column("client_nonce", sa.String(length=100), nullable=False),
        sa.Column("server_nonce", sa.String(length=100), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("notify_url", sa.String(length=500), nullable=False),
        sa.Column("notified_session", sa.Integer(), nullable=True),
        sa.Column("notified_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("inventory_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_session_at", custos.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_omadm_accounts_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_omadm_accounts")),
        sa.UniqueConstraint("device_id", name=op.f("uq_omadm_accounts_device_id")),
        sa.UniqueConstraint("dev_id", name=op.f("uq_omadm_accounts_dev_id")),
    )
    op.create_table(
        "omadm_sessions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("client_msg_id", sa.Integer(), nullable=False),
        sa.Column("server_msg_id", sa.Integer(), nullable=False),
        sa.Column("authenticated", sa.Boolean(), nullable=False),
        sa.Column("auth_method", sa.String(length=10), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("state", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("last_request_sha", sa.String(length=64), nullable=False),
        sa.Column("last_response", sa.LargeBinary(), nullable=False),
        sa.Column("last_response_type", sa.String(length=60), nullable=False),
        sa.Column("last_response_hmac", sa.String(length=300), nullable=False),
        sa.Column("ended", sa.Boolean(), nullable=False),
        sa.Column("started_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["omadm_accounts.id"],
            name=op.f("fk_omadm_sessions_account_id_omadm_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_omadm_sessions")),
        sa.UniqueConstraint("account_id", "session_id", name=op.f("uq_omadm_sessions_account_id")),
    )
    with op.batch_alter_table("omadm_sessions", schema=None) as batch_op:
        batch_op.create_index("ix_omadm_sessions_updated", ["updated_at"], unique=False)


def downgrade() -> None:
    op.drop_table("omadm_sessions")
    op.drop_table("omadm_accounts")
