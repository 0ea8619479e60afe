"""Alembic migrations: they build exactly the tables the code uses, and re-running them is a no-op."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from directory.db.engine import metadata, migrate
from roomshard.sql import make_engine


async def test_migrations_match_metadata_and_are_idempotent(db_url: str) -> None:
    """Upgrading twice works, and the migrated schema equals directory.db's tables."""
    engine = make_engine(db_url)
    try:
        await migrate(engine)
        await migrate(engine)  # a second replica starting later finds head

        def diff(sync_conn: Any) -> list[Any]:
            ctx = MigrationContext.configure(sync_conn, opts={"compare_server_default": False})
            return list(compare_metadata(ctx, metadata))

        def tables(sync_conn: Any) -> set[str]:
            return set(inspect(sync_conn).get_table_names())

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
            assert {"instances", "rooms", "alembic_version"} <= await conn.run_sync(tables)
    finally:
        await engine.dispose()
