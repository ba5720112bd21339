"""accounts: roles, scoped grants, named API tokens, console sessions, TOTP, lockout

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 17:50:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import custos.db.base
from custos.accounts.permissions import BUILTIN_DESCRIPTIONS, BUILTIN_ROLES

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = custos.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    roles = op.create_table(
        "roles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("permissions", custos.db.base.JSONDoc(), nullable=False),
        sa.Column("builtin", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_roles")),
        sa.UniqueConstraint("name", name=op.f("uq_roles_name")),
    )
    op.create_table(
        "role_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role_id", sa.Integer(), nullable=False),
        sa.Column("scoped", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_role_grants_user_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["role_id"], ["roles.id"], name=op.f("fk_role_grants_role_id_roles"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_role_grants")),
    )
    with op.batch_alter_table("role_grants") as b:
        b.create_index(b.f("ix_role_grants_user_id"), ["user_id"], unique=False)
        b.create_index(b.f("ix_role_grants_role_id"), ["role_id"], unique=False)
    op.create_table(
        "role_grant_groups",
        sa.Column("grant_id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["grant_id"],
            ["role_grants.id"],
            name=op.f("fk_role_grant_groups_grant_id_role_grants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_role_grant_groups_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("grant_id", "group_id", name=op.f("pk_role_grant_groups")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("remote", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_console_sessions_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_console_sessions_secret_hash")),
    )
    with op.batch_alter_table("console_sessions") as b:
        b.create_index(b.f("ix_console_sessions_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("api_tokens") as b:
        b.add_column(
            sa.Column("kind", sa.String(length=10), nullable=False, server_default="login")
        )
        b.add_column(sa.Column("name", sa.String(length=100), nullable=False, server_default=""))
        b.add_column(sa.Column("prefix", sa.String(length=16), nullable=False, server_default=""))

    with op.batch_alter_table("users") as b:
        b.add_column(
            sa.Column("display_name", sa.String(length=255), nullable=False, server_default="")
        )
        b.add_column(sa.Column("email", sa.String(length=255), nullable=False, server_default=""))
        b.add_column(
            sa.Column("source", sa.String(length=10), nullable=False, server_default="local")
        )
        b.add_column(sa.Column("external_dn", sa.String(length=1024), nullable=True))
        b.add_column(sa.Column("totp_secret", sa.String(length=255), nullable=True))
        b.add_column(sa.Column("failed_logins", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("locked_until", TS, nullable=True))
        b.add_column(sa.Column("last_login_at", TS, nullable=True))

    # the built-in roles, then one grant per existing user from the old single role column
    now = datetime.now(UTC)
    op.bulk_insert(
        roles,
        [
            {
                "name": name,
                "description": BUILTIN_DESCRIPTIONS[name],
                "permissions": sorted(perms),
                "builtin": True,
                "created_at": now,
            }
            for name, perms in BUILTIN_ROLES.items()
        ],
    )
    conn = op.get_bind()
    role_ids: dict[str, int] = dict(conn.execute(sa.text("SELECT name, id FROM roles")).all())
    for user_id, role in conn.execute(sa.text("SELECT id, role FROM users")).all():
        conn.execute(
            sa.text(
                "INSERT INTO role_grants (user_id, role_id, scoped, source, created_at) "
                "VALUES (:u, :r, :s, 'local', :t)"
            ),
            {"u": user_id, "r": role_ids.get(role, role_ids["admin"]), "s": False, "t": now},
        )
    with op.batch_alter_table("users") as b:
        b.drop_column("role")


def downgrade() -> None:
    with op.batch_alter_table("users") as b:
        b.add_column(
            sa.Column("role", sa.String(length=50), nullable=False, server_default="admin")
        )
        for col in (
            "last_login_at",
            "locked_until",
            "failed_logins",
            "totp_secret",
            "external_dn",
            "source",
            "email",
            "display_name",
        ):
            b.drop_column(col)
    with op.batch_alter_table("api_tokens") as b:
        for col in ("prefix", "name", "kind"):
            b.drop_column(col)
    op.drop_table("console_sessions")
    op.drop_table("role_grant_groups")
    op.drop_table("role_grants")
    op.drop_table("roles")
