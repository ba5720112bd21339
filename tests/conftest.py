"""Shared fixtures: a database per test on SQLite and on the real PostgreSQL, an app, devices."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from app_harness import Api, running_api
from custos.db.migrate import upgrade

# hundreds of apps start in this one process: objects frozen at each start would pile up
os.environ.setdefault("CUSTOS_GC_FREEZE_AT_START", "false")

# Hypothesis: `make test` and CI explore the same examples every run (seeded by each test's
# name), so a result is reproducible; HYPOTHESIS_PROFILE=explore draws new ones each run to
# search wider, and saves what fails in .hypothesis/ for replay
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

PG_DSN = os.environ.get("CUSTOS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
ADMIN_PASSWORD = "admin-test-pw-1"


def _pg_base() -> str:
    return PG_DSN.rsplit("/", 1)[0]


async def _pg_exec(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_url(name: str) -> str:
    """SQLAlchemy URL of a database on the test PostgreSQL."""
    return _pg_base().replace("postgresql://", "postgresql+asyncpg://") + "/" + name


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database; each test clones it (CREATE DATABASE … TEMPLATE)."""
    name = f"custos_tpl_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_exec(f'CREATE DATABASE "{name}"'))
    try:
        upgrade(pg_url(name))
        yield name
    finally:
        asyncio.run(_pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that tests copy."""
    path = tmp_path_factory.mktemp("tpl") / "custos.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for one test: SQLite and PostgreSQL."""
    if request.param == "sqlite":
        tpl: Path = request.getfixturevalue("sqlite_template")
        target = tmp_path / "data" / "custos.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tpl, target)
        yield f"sqlite+aiosqlite:///{target}"
        return
    yield from _fresh_pg(request)


def _fresh_pg(request: pytest.FixtureRequest) -> Iterator[str]:
    tpl_name: str = request.getfixturevalue("pg_template")
    name = f"custos_t_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_exec(f'CREATE DATABASE "{name}" TEMPLATE "{tpl_name}"'))
    try:
        yield pg_url(name)
    finally:
        asyncio.run(_pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database, for what only PostgreSQL does (SKIP LOCKED)."""
    yield from _fresh_pg(request)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Any:
    """Server settings on the test database and a temporary data directory."""
    from custos.settings import Settings

    return Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        admin_password=ADMIN_PASSWORD,
        last_seen_flush_s=0.2,
    )


@pytest.fixture
async def api(settings: Any) -> AsyncIterator[Api]:
    """The app running its lifespan, with an admin logged in."""
    async with running_api(settings) as a:
        yield a
