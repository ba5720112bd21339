"""reports: installed_software (from inventory), software summary, list indexes, v_ views

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 12:00:00

The view definitions are frozen here on purpose: a later migration that changes a view
drops and re-creates it with its own SQL. On SQLite, a later migration that rebuilds a table
a view reads (Alembic batch mode: copy, drop, rename) fails on the rename ("error in view
v_devices: no such table") unless the views are dropped first or the migration runs with
`PRAGMA legacy_alter_table=ON`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import custos.db.base

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

REPORTING_ROLE = "custos_reporting"

# the copy of custos.reports.service's key rule as it was when this migration was written
_SW_KEY = re.compile(r"^sw\.([^.]+)\.(.+)$", re.DOTALL)
_MAX_SOURCE, _MAX_NAME, _MAX_VERSION = 20, 255, 255


def _fact(dialect: str, key: str, alias: str = "d") -> str:
    col = f"{alias}.facts" if alias else "facts"  # index expressions take no table names
    if dialect == "postgresql":
        return f"({col} ->> '{key}')"
    return f"json_extract({col}, '$.\"{key}\"')"


def _views(dialect: str) -> dict[str, str]:
    """name -> SELECT; the column names are the documented interface (docs/reporting.md)."""
    f = _fact
    inventory = "SELECT d.id AS device_id, e.key AS key, e.value AS value " + (
        "FROM devices d CROSS JOIN LATERAL jsonb_each_text(d.inventory) e"
        if dialect == "postgresql"
        else "FROM devices d, json_each(d.inventory) e"
    )
    # the SQL is built from constants only (no input reaches it)
    return {
        "v_devices": f"""
            SELECT d.id AS device_id, d.name AS name, d.status AS status,
                   {f(dialect, "os.name")} AS os_name, {f(dialect, "os.version")} AS os_version,
                   {f(dialect, "hw.manufacturer")} AS manufacturer,
                   {f(dialect, "hw.model")} AS model, {f(dialect, "hw.serial")} AS serial,
                   d.agent_version AS agent_version, d.enrolled_at AS enrolled_at,
                   d.last_seen AS last_seen, d.retired_at AS retired_at,
                   d.inventory_version AS inventory_version,
                   d.inventory_updated_at AS inventory_updated_at,
                   d.cert_serial AS cert_serial, d.cert_not_after AS cert_not_after
            FROM devices d""",  # noqa: S608
        "v_groups": """
            SELECT g.id AS group_id, g.name AS name, g.description AS description,
                   g.created_at AS created_at
            FROM groups g""",
        "v_device_groups": """
            SELECT dg.device_id AS device_id, dg.group_id AS group_id, g.name AS group_name
            FROM device_groups dg JOIN groups g ON g.id = dg.group_id""",
        "v_installed_software": """
            SELECT s.device_id AS device_id, s.source AS source, s.name AS name,
                   s.version AS version
            FROM installed_software s""",
        "v_inventory": inventory,
        "v_command_runs": """
            SELECT r.id AS run_id, r.command_id AS command_id, r.device_id AS device_id,
                   c.kind AS kind, c.target AS target, c.created_by AS created_by,
                   r.state AS state, r.deliveries AS deliveries, r.created_at AS created_at,
                   r.delivered_at AS delivered_at, r.started_at AS started_at,
                   r.finished_at AS finished_at, r.exit_code AS exit_code, r.error AS error,
                   r.truncated AS output_truncated
            FROM command_runs r JOIN commands c ON c.id = r.command_id""",
        "v_packages": """
            SELECT p.id AS package_id, p.name AS name, p.version AS version,
                   p.format AS format, p.size AS size, p.sha256 AS sha256,
                   p.created_by AS created_by, p.created_at AS created_at
            FROM packages p""",
        "v_deployments": """
            SELECT x.id AS deployment_id, x.name AS name, x.package_id AS package_id,
                   x.package_name AS package_name, x.action AS action, x.mode AS mode,
                   x.state AS state, x.current_wave AS current_wave,
                   x.created_by AS created_by, x.created_at AS created_at,
                   x.updated_at AS updated_at
            FROM deployments x""",
        "v_deployment_results": """
            SELECT dd.deployment_id AS deployment_id, x.name AS deployment_name,
                   x.package_name AS package_name, p.version AS package_version,
                   x.action AS action, dd.device_id AS device_id, dd.wave AS wave,
                   dd.state AS state, dd.progress AS progress, dd.detail AS detail,
                   dd.attempts AS attempts, dd.updated_at AS updated_at
            FROM deployment_devices dd
            JOIN deployments x ON x.id = dd.deployment_id
            LEFT JOIN packages p ON p.id = COALESCE(dd.package_id, x.package_id)""",
    }


def _backfill_sqlite(conn: sa.Connection) -> None:
    """Software rows from every device's inventory, 500 devices at a time."""
    devices = sa.table(
        "devices", sa.column("id", sa.String), sa.column("inventory", custos.db.base.JSONDoc())
    )
    target = sa.table(
        "installed_software",
        sa.column("device_id"),
        sa.column("source"),
        sa.column("name"),
        sa.column("version"),
    )
    after = ""
    while True:
        batch = conn.execute(
            sa.select(devices.c.id, devices.c.inventory)
            .where(devices.c.id > after)
            .order_by(devices.c.id)
            .limit(500)
        ).all()
        if not batch:
            return
        rows = []
        for device_id, inventory in batch:
            for key, value in (inventory or {}).items():
                m = _SW_KEY.match(key)
                if m and len(m[1]) <= _MAX_SOURCE and len(m[2]) <= _MAX_NAME:
                    rows.append(
                        {
                            "device_id": device_id,
                            "source": m[1],
                            "name": m[2],
                            "version": str(value)[:_MAX_VERSION],
                        }
                    )
        if rows:
            conn.execute(target.insert(), rows)
        after = batch[-1][0]


def upgrade() -> None:
    conn = op.get_bind()
    dialect = conn.dialect.name
    op.create_table(
        "installed_software",
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_installed_software_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "source", "name", name=op.f("pk_installed_software")),
        comment="one row per sw.<source>.<name> inventory key of a device (value: version)",
    )
    op.create_table(
        "software_summary",
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("versions", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("source", "name", name=op.f("pk_software_summary")),
    )
    op.create_table(
        "report_refreshes",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("refreshed_at", custos.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("took_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_report_refreshes")),
    )

    # backfill before the secondary indexes exist: one bulk build instead of 20M insertions
    if dialect == "postgresql":
        op.execute(
            r"""
            INSERT INTO installed_software (device_id, source, name, version)
            SELECT d.id, m[1], m[2], left(e.value, 255)
            FROM devices d
            CROSS JOIN LATERAL jsonb_each_text(d.inventory) e
            CROSS JOIN LATERAL regexp_match(e.key, '^sw\.([^.]+)\.(.+)$') m
            WHERE e.key LIKE 'sw.%' AND length(m[1]) <= 20 AND length(m[2]) <= 255
            """
        )
    else:
        _backfill_sqlite(conn)
    op.create_index(
        "ix_installed_software_name_version",
        "installed_software",
        ["name", "version", "source", "device_id"],
    )
    if dialect == "postgresql":
        # thousands of names with similar counts: the default 100 most-common values miss
        # even packages on every device, and the estimates then mislead the planner
        op.execute("ALTER TABLE installed_software ALTER COLUMN name SET STATISTICS 1000")
    op.create_index("ix_installed_software_source_name", "installed_software", ["source", "name"])
    now = datetime.now(UTC)
    op.execute(
        sa.text(
            "INSERT INTO software_summary (source, name, devices, versions) "
            "SELECT source, name, count(*), count(DISTINCT version) "
            "FROM installed_software GROUP BY source, name"
        )
    )
    refreshes = sa.table(
        "report_refreshes",
        sa.column("name", sa.String),
        sa.column("refreshed_at", custos.db.base.UTCDateTime()),
        sa.column("took_s", sa.Float),
    )
    op.bulk_insert(refreshes, [{"name": "software_summary", "refreshed_at": now, "took_s": 0.0}])

    # the device page sorts and filters on these at 100,000 devices
    op.create_index("ix_devices_lower_name_id", "devices", [sa.text("lower(name)"), "id"])
    if dialect == "postgresql":
        # "never seen" sorts as the oldest: ASC NULLS FIRST / DESC NULLS LAST, both one scan
        op.execute(
            "CREATE INDEX ix_devices_last_seen_id ON devices (last_seen DESC NULLS LAST, id DESC)"
        )
    else:
        op.create_index("ix_devices_last_seen_id", "devices", ["last_seen", "id"])
    op.create_index("ix_devices_enrolled_at_id", "devices", ["enrolled_at", "id"])
    # reports leave retired devices out with an anti-join against these few rows
    op.create_index(
        "ix_devices_not_active",
        "devices",
        ["id"],
        postgresql_where=sa.text("status <> 'active'"),
        sqlite_where=sa.text("status <> 'active'"),
    )
    for name, key in (
        ("ix_devices_os_name", "os.name"),
        ("ix_devices_hw_model", "hw.model"),
        ("ix_devices_hw_manufacturer", "hw.manufacturer"),
    ):
        op.execute(f"CREATE INDEX {name} ON devices (({_fact(dialect, key, '')}))")
    # the errors report: failed runs and failed installs since a time
    op.create_index("ix_command_runs_finished_at", "command_runs", ["finished_at"])
    op.create_index("ix_deployment_devices_state_at", "deployment_devices", ["state", "updated_at"])

    views = _views(dialect)
    for name, select in views.items():
        op.execute(f"CREATE VIEW {name} AS {select}")
    if dialect == "postgresql":
        # a cluster-wide role, so IF NOT EXISTS; without CREATEROLE the server still starts
        # (the grants follow once an operator creates the role and re-runs them: reporting.md)
        grant = f"GRANT SELECT ON {', '.join(views)} TO {REPORTING_ROLE}"
        op.execute(
            f"""
            DO $$
            BEGIN
              IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{REPORTING_ROLE}') THEN
                IF (SELECT rolcreaterole OR rolsuper FROM pg_roles
                    WHERE rolname = current_user) THEN
                  BEGIN
                    CREATE ROLE {REPORTING_ROLE} NOLOGIN;
                  EXCEPTION WHEN duplicate_object OR unique_violation THEN
                    NULL;  -- another database's migration made it just now
                  END;
                ELSE
                  RAISE NOTICE 'custos: no CREATEROLE; role {REPORTING_ROLE} not created';
                END IF;
              END IF;
              IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{REPORTING_ROLE}') THEN
                EXECUTE format('GRANT USAGE ON SCHEMA %I TO {REPORTING_ROLE}', current_schema());
                EXECUTE '{grant}';
              END IF;
            END $$;
            """  # noqa: S608
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in reversed(list(_views(dialect))):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    # the role is cluster-wide (other databases may use it): it stays
    op.drop_index("ix_deployment_devices_state_at", table_name="deployment_devices")
    op.drop_index("ix_command_runs_finished_at", table_name="command_runs")
    for name in (
        "ix_devices_hw_manufacturer",
        "ix_devices_hw_model",
        "ix_devices_os_name",
        "ix_devices_not_active",
        "ix_devices_enrolled_at_id",
        "ix_devices_last_seen_id",
        "ix_devices_lower_name_id",
    ):
        op.drop_index(name, table_name="devices")
    op.drop_table("report_refreshes")
    op.drop_table("software_summary")
    op.drop_table("installed_software")
