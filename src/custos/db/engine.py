"""Engine and session factory, built in the app's lifespan from Settings (never at import)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql.base import Executable

from custos.errors import Unavailable

# how long a request waits for a pooled connection before it is answered 503 (retry later):
# a device waiting longer would have given up anyway, and its retry comes with backoff
POOL_TIMEOUT_S = 10


def make_engine(
    url: str, *, pool_size: int = 20, pool_timeout: float = POOL_TIMEOUT_S
) -> AsyncEngine:
    """An async engine; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # no pre-ping: it costs a round trip per checkout on the hot path; a connection found dead
    # fails one request (the agent retries) and SQLAlchemy then invalidates the pool
    # a steady pool and a small overflow: overflow connections are closed when returned, and
    # opening PostgreSQL connections under load (TLS negotiation included) is expensive
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size // 4,
        pool_timeout=pool_timeout,
        pool_recycle=1800,
        hide_parameters=True,  # parameters carry command output and tokens: keep them out of logs
    )


class UnitOfWork:
    """One transaction; callbacks registered with after_commit run only once it has committed."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._after_commit: list[Callable[[], Any]] = []

    def after_commit(self, fn: Callable[[], Any]) -> None:
        """Run fn after a successful commit (push wake-ups, cache invalidation)."""
        self._after_commit.append(fn)

    def run_after_commit(self) -> None:
        """Fire the registered callbacks; failures in one do not stop the others."""
        for fn in self._after_commit:
            try:
                fn()
            except Exception:
                import logging

                logging.getLogger(__name__).exception("after-commit hook failed")
        self._after_commit.clear()


class Database:
    """Holds the engine and hands out units of work."""

    def __init__(
        self, url: str, *, pool_size: int = 20, pool_timeout: float = POOL_TIMEOUT_S
    ) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size, pool_timeout=pool_timeout)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        # single-statement reads need no BEGIN/ROLLBACK around them
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite has one writer: serialising our own write transactions avoids lock-upgrade
        # failures ("database is locked") and busy-waiting inside the database
        self._write_lock = asyncio.Lock() if url.startswith("sqlite") else None

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """A unit of work that commits on success, rolls back on error, then fires hooks.

        No free connection within the pool timeout is `Unavailable` (503, retry later), not
        an internal error: that is overload, and the caller's client backs off.
        """
        with _pool_exhaustion_is_overload():
            if self._write_lock is None:
                async with self.sessionmaker() as session:
                    uow = UnitOfWork(session)
                    async with session.begin():
                        yield uow
                    uow.run_after_commit()
                return
            async with self._write_lock, self.sessionmaker() as session:
                uow = UnitOfWork(session)
                async with session.begin():
                    yield uow
            uow.run_after_commit()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only."""
        with _pool_exhaustion_is_overload():
            async with self.sessionmaker() as session:
                yield session

    async def fetch_one(self, stmt: Executable, params: dict[str, Any]) -> Any:
        """One row from a read-only statement, without a session or a transaction (hot paths)."""
        with _pool_exhaustion_is_overload():
            async with self._autocommit.connect() as conn:
                return (await conn.execute(stmt, params)).first()

    async def scalar(self, stmt: Executable, params: dict[str, Any]) -> Any:
        """The first column of the first row of a read-only statement, or None."""
        row = await self.fetch_one(stmt, params)
        return None if row is None else row[0]

    async def ping(self) -> None:
        """Round-trip to the database."""
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


@contextmanager
def _pool_exhaustion_is_overload() -> Iterator[None]:
    try:
        yield
    except sa_exc.TimeoutError:
        # QueuePool's "limit of size N overflow M reached": every connection is busy
        raise Unavailable(
            "the server is busy (no database connection free); retry shortly",
            retry_after=2,
        ) from None
