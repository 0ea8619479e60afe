"""The directory opens its PostgreSQL pool's connections at start
(``ROOMSHARD_DATABASE_POOL_WARM``): the first connect storm after a start finds them
open instead of paying for a backend process and authentication per connection."""

from __future__ import annotations

import asyncpg
import pytest

from roomshard.testing.procs import Procs

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def _directory_connections(pg_url: str) -> int:
    conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'roomshard-directory' "
            "AND datname = current_database()"))
    finally:
        await conn.close()


async def test_the_pool_is_opened_at_start_as_configured(procs: Procs, pg_url: str) -> None:
    procs.directory("lazy", database_url=pg_url, env={"ROOMSHARD_DATABASE_POOL_WARM": "0"})
    lazy = await _directory_connections(pg_url)
    assert lazy < 6  # opened as needed: the migration's and the background tasks' few
    procs.directory("warm", database_url=pg_url, env={"ROOMSHARD_DATABASE_POOL_WARM": "12"})
    # Ready means started: its 12 were open before it served its first request.
    assert await _directory_connections(pg_url) - lazy >= 12
