"""The PostgreSQL fixture itself: a real server that can go away and come back."""

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

pytestmark = pytest.mark.postgres


async def _select_one(url: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text("select 1"))).scalar_one())
    finally:
        await engine.dispose()


def test_pg_database_is_real_and_restartable(pg_server, pg_url):
    """A fresh database answers queries, refuses while stopped, answers again after start."""
    assert asyncio.run(_select_one(pg_url)) == 1
    pg_server.stop()
    assert not pg_server.accepting()
    pg_server.start()
    assert asyncio.run(_select_one(pg_url)) == 1
