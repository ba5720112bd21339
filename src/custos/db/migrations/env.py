"""Alembic environment: async engines, batch mode for SQLite, a lock against racing starts."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from custos.db.metadata import load_metadata

MIGRATION_LOCK = 0x6375_7374  # "cust": serialises concurrent server starts on PostgreSQL


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=load_metadata(),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        else:
            # batch mode rebuilds a table and renames the copy into place; with the reporting
            # views (v_*) in the schema, SQLite's modern rename checks every view and fails
            # while the old table is gone. The legacy rename leaves views alone; they refer to
            # the table by name and work again once the copy has its name.
            connection.execute(text("PRAGMA legacy_alter_table=ON"))
        context.run_migrations()


async def _main() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported")
asyncio.run(_main())
