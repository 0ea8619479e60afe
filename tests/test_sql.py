"""roomshard.sql: databases opened and upgraded at once, by many connections, tasks and threads."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from directory.db.engine import migrate as migrate_directory
from roomshard.sql import make_engine
from roomshard.store.tables import VERSION_TABLE
from roomshard.store.tables import migrate as migrate_store


async def _journal_mode(url: str) -> str:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return str(await conn.scalar(text("PRAGMA journal_mode")))
    finally:
        await engine.dispose()


async def test_connections_that_open_a_new_sqlite_file_at_once_all_find_it_in_wal(
        tmp_path: Path) -> None:
    """Turning a new file to WAL needs it to itself: SQLite refuses all but one of the
    connections that try at once ("database is locked", no busy timeout), and those wait
    their turn instead of failing (without it, 1 file in 10 here failed a connection)."""
    for n in range(30):
        url = f"sqlite+aiosqlite:///{tmp_path / f'new-{n}.db'}"
        modes = await asyncio.gather(*(_journal_mode(url) for _ in range(6)))
        assert modes == ["wal"] * 6, (n, modes)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    return str(request.getfixturevalue("pg_url"))


async def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_a_store_and_a_directory_sharing_a_database_migrate_at_once(empty_url: str) -> None:
    """The store may live in the directory's database, and ``roomshard dev`` opens both in
    one process: their upgrades (Alembic's module-level ``context`` and ``op``) take turns
    instead of running one's steps on the other's proxies (``'NoneType' object has no
    attribute 'create_table'``, ``KeyError: 'config'``)."""
    engines = [make_engine(empty_url) for _ in range(4)]
    try:
        await asyncio.gather(migrate_directory(engines[0]), migrate_store(engines[1]),
                             migrate_directory(engines[2]), migrate_store(engines[3]))
    finally:
        for engine in engines:
            await engine.dispose()
    tables = await _tables(empty_url)
    assert {"instances", "rooms", "alembic_version", "messages", VERSION_TABLE} <= tables


def test_upgrades_in_two_threads_take_turns(tmp_path: Path) -> None:
    """Each thread with its own event loop (the tests' template databases are migrated so):
    the proxies are the process's, so the runs take turns across threads too."""

    def upgrade(n: int) -> set[str]:
        async def run() -> set[str]:
            url = f"sqlite+aiosqlite:///{tmp_path / f'thread-{n}.db'}"
            engine = make_engine(url)
            try:
                await (migrate_directory if n % 2 else migrate_store)(engine)
            finally:
                await engine.dispose()
            return await _tables(url)
        return asyncio.run(run())

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(upgrade, range(8)))
    for n, tables in enumerate(results):
        assert ("rooms" in tables) if n % 2 else ("messages" in tables), (n, tables)
