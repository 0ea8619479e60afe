"""The PostgreSQL hot path's connections (``Store._raw``, ``directory.db.reserve``) on a real server.

A connection the hot path used is kept at hand for the next statement (no
checkout from the pool, no greenlet), up to a third of the pool; a dead one
is invalidated with every kept one and the statement retried on a fresh
connection; kept connections go back to the pool when idle and when the store
closes; a database that is not there is ``OperationalError`` (the edge's 503),
never a driver error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, text

from directory.db import reserve as reserve_module
from directory.db.engine import instances, migrate, rooms
from directory.db.store import Store
from roomshard.sql import make_engine, warm_pool

pytestmark = pytest.mark.postgres

NOW = 1_000_000.0


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[Store]:
    engine = make_engine(pg_url, pool_size=2)  # 6 pooled connections, 2 kept at hand
    await migrate(engine)
    s = Store(engine)
    async with s.write() as conn:
        await conn.execute(insert(instances).values(
            id="i1", number=1, internal_url="http://i1", capacity=100, state="active",
            registered_at=NOW, last_heartbeat=NOW, rooms_assigned=0))
        await conn.execute(insert(rooms).values(room="r", instance="i1", epoch=3, owner_epoch=3,
                                                created_at=NOW, updated_at=NOW))
    yield s
    s.close()
    assert engine.pool.checkedout() == 0, "the store kept connections after it closed"
    await engine.dispose()


@pytest.fixture
def checkouts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every checkout from the pool (each one runs in a greenlet)."""
    seen: list[Any] = []
    real = reserve_module.greenlet_spawn

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(reserve_module, "greenlet_spawn", counting)
    return seen


def _kept(store: Store) -> int:
    assert store._reserve is not None
    assert store.engine.pool.checkedout() == len(store._reserve)  # nothing else is out
    return len(store._reserve)


async def _lookups(store: Store, n: int) -> None:
    rows = await asyncio.gather(*(store.room_target("r") for _ in range(n)))
    assert [(row["instance"], row["epoch"]) for row in rows if row] == [("i1", 3)] * n


async def test_a_used_connection_is_at_hand_for_the_next_statement(store: Store,
                                                                   checkouts: list[Any]) -> None:
    await _lookups(store, 1)
    assert len(checkouts) == 1 and _kept(store) == 1
    for _ in range(50):
        await _lookups(store, 1)
    assert len(checkouts) == 1, "a kept connection was not used"
    await _lookups(store, 6)  # 1 kept + 5 from the pool; 2 kept afterwards, 4 back
    assert len(checkouts) == 6 and _kept(store) == 2


async def test_more_at_once_than_the_pool_holds_wait_their_turn(store: Store) -> None:
    await _lookups(store, 40)
    assert _kept(store) == 2
    assert store.engine.pool.checkedin() == 4


async def test_dead_connections_are_replaced_and_the_statement_retried(
        store: Store, pg_url: str, checkouts: list[Any]) -> None:
    await _lookups(store, 6)
    assert _kept(store) == 2
    admin = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await admin.close()
    assert killed >= 6
    before = len(checkouts)
    await _lookups(store, 1)  # a kept one is dead: every kept one goes, the retry gets a new one
    assert len(checkouts) >= before + 2  # the invalidation, the fresh checkout
    assert _kept(store) == 1
    await _lookups(store, 6)  # no older pooled connection is handed out again
    assert _kept(store) == 2


async def test_idle_kept_connections_go_back_to_the_pool(store: Store,
                                                         checkouts: list[Any]) -> None:
    assert store._reserve is not None
    await _lookups(store, 3)
    assert _kept(store) == 2
    store._reserve.idle_s = 0.0  # every kept connection has waited too long
    await _lookups(store, 1)
    assert len(checkouts) == 4 and _kept(store) == 1  # both went back, one checked out anew


async def test_a_database_that_is_not_there_is_operational_error(pg_url: str) -> None:
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    for url in (missing, "postgresql+asyncpg://roomshard@127.0.0.1:1/roomshard"):
        engine = make_engine(url)
        s = Store(engine)
        try:
            with pytest.raises(sa_exc.OperationalError):
                await s.room_target("r")
            with pytest.raises(sa_exc.OperationalError):
                await s.place("r2", None, now=NOW, down_after=10)
        finally:
            s.close()
            await engine.dispose()


async def test_a_failed_statement_gives_its_connection_back(store: Store) -> None:
    await _lookups(store, 1)
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await store._raw(lambda c: c.fetchrow("SELEC 1"))
    assert _kept(store) == 0  # back to the pool, not kept
    await _lookups(store, 1)


async def test_a_closed_store_keeps_no_connection(store: Store) -> None:
    started, go = asyncio.Event(), asyncio.Event()

    async def running_at_close(c: Any) -> Any:
        started.set()
        await go.wait()
        return await c.fetchval("SELECT 1")

    running = asyncio.ensure_future(store._raw(running_at_close))
    await started.wait()
    store.close()
    go.set()
    assert await running == 1
    assert store.engine.pool.checkedout() == 0


async def test_warm_connections_are_primed_and_nothing_is_written(store: Store) -> None:
    primed: list[Any] = []

    async def prime(c: Any) -> None:
        await store.prime(c)
        assert not c.is_in_transaction()
        primed.append(c)

    await store.engine.dispose()  # the fixture's connections: open them again, primed
    assert await warm_pool(store.engine, 4, prime) == 4
    assert len(primed) == 4 and all(isinstance(c, asyncpg.Connection) for c in primed)
    async with store.read() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM rooms"))).scalar() == 1
        assert (await conn.execute(text("SELECT count(*) FROM room_counts"))).scalar() == 0
    await _lookups(store, 4)
