"""Column types and the unit of work's after-commit hooks, on an in-memory SQLite database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Integer, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from custos.db.base import JSONDoc, UTCDateTime
from custos.db.engine import Database


class _Base(DeclarativeBase):
    """A base of its own, so the project's metadata stays free of test tables."""


class _Row(_Base):
    __tablename__ = "test_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    doc: Mapped[dict] = mapped_column(JSONDoc, default=dict)


@pytest.fixture
async def db(tmp_path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    async with database.engine.begin() as conn:
        await conn.run_sync(lambda c: _Row.__table__.create(c))
    yield database
    await database.dispose()


async def test_datetimes_come_back_aware_in_utc(db):
    local = datetime(2030, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with db.transaction() as uow:
        uow.session.add(_Row(id=1, at=local, doc={"a": [1, "é"]}))
    async with db.read() as s:
        row = await s.get(_Row, 1)
    assert row.at == local and row.at.tzinfo == UTC and row.doc == {"a": [1, "é"]}


async def test_naive_datetimes_are_refused(db):
    with pytest.raises(Exception, match="naive datetime"):
        async with db.transaction() as uow:
            uow.session.add(_Row(id=2, at=datetime(2030, 1, 1)))
    async with db.read() as s:
        assert (await s.scalars(select(_Row))).all() == []


async def test_after_commit_runs_only_after_commit(db):
    fired: list[str] = []
    async with db.transaction() as uow:
        uow.session.add(_Row(id=3, at=datetime.now(UTC)))
        uow.after_commit(lambda: fired.append("committed"))
        assert fired == []
    assert fired == ["committed"]
    with pytest.raises(RuntimeError):
        async with db.transaction() as uow:
            uow.after_commit(lambda: fired.append("rolled back"))
            raise RuntimeError("boom")
    assert fired == ["committed"]


async def test_a_failing_hook_does_not_undo_the_commit_or_the_other_hooks(db):
    fired: list[int] = []
    async with db.transaction() as uow:
        uow.session.add(_Row(id=4, at=datetime.now(UTC)))
        uow.after_commit(lambda: 1 / 0)
        uow.after_commit(lambda: fired.append(1))
    assert fired == [1]
    assert await db.scalar(select(_Row.id).where(_Row.id == 4), {}) == 4
