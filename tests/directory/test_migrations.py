"""Alembic migrations: they build exactly the tables the code uses, and re-running them is a no-op."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from directory.db.engine import metadata, migrate
from roomshard.sql import make_engine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An EMPTY database (the other directory tests' PostgreSQL databases start migrated)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'directory.db'}"
    return str(request.getfixturevalue("pg_url"))


async def test_migrations_match_metadata_and_are_idempotent(db_url: str) -> None:
    """Upgrading twice works, and the migrated schema equals directory.db's tables."""
    engine = make_engine(db_url)
    try:
        def diff(sync_conn: Any) -> list[Any]:
            ctx = MigrationContext.configure(sync_conn, opts={"compare_server_default": False})
            return list(compare_metadata(ctx, metadata))

        def tables(sync_conn: Any) -> set[str]:
            return set(inspect(sync_conn).get_table_names())

        async with engine.connect() as conn:
            assert await conn.run_sync(tables) == set()  # empty: the migrations build it all
        await migrate(engine)
        await migrate(engine)  # a second replica starting later finds head

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
            assert {"instances", "rooms", "alembic_version"} <= await conn.run_sync(tables)
    finally:
        await engine.dispose()
