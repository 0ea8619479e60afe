"""The moves SQL on real SQLite and PostgreSQL: commit and rollback settle one way, leases are exclusive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from directory.db import move_store
from directory.db.engine import instances, migrate, rooms
from directory.db.store import Store
from directory.domain.errors import Conflict
from directory.domain.moves import begin
from roomshard.sql import make_engine

NOW = 1_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = (f"sqlite+aiosqlite:///{tmp_path / 'd.db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    engine = make_engine(url)
    await migrate(engine)
    s = Store(engine)
    async with s.write() as conn:
        for n in (1, 2):
            await conn.execute(insert(instances).values(
                id=f"i{n}", number=n, internal_url=f"http://i{n}", capacity=100, state="active",
                registered_at=NOW, rooms_assigned=1 if n == 1 else 0))
        await conn.execute(insert(rooms).values(room="r", instance="i1", epoch=4, owner_epoch=3,
                                                opened_epoch=4, created_at=NOW, updated_at=NOW))
    yield s
    s.close()
    await engine.dispose()


async def _reserve(store: Store, owner: str = "a"):  # type: ignore[no-untyped-def]
    return (await move_store.reserve(
        store, room="r", source="i1", to="i2", owner=owner, now=NOW, lease_s=15,
        make=lambda e: begin(move_id=f"m{e}", room="r", source="i1", target="i2",
                             from_epoch=e, now=NOW)))[0]


async def _room(store: Store) -> tuple:  # type: ignore[type-arg]
    async with store.read() as conn:
        return tuple((await conn.execute(
            select(rooms.c.instance, rooms.c.epoch, rooms.c.owner_epoch, rooms.c.opened_epoch,
                   rooms.c.state).where(rooms.c.room == "r"))).one())


async def test_reserve_then_second_reserve_is_already_moving(store: Store) -> None:
    """Reserving marks the room moving at its epoch; a second reservation is 409 already_moving."""
    move = await _reserve(store)
    assert (move.from_epoch, move.epoch) == (4, 5)
    assert (await _room(store))[-1] == "moving"
    with pytest.raises(Conflict) as err:
        await _reserve(store)
    assert err.value.code == "already_moving"


async def test_commit_and_rollback_race_settles_one_way(store: Store) -> None:
    """A concurrent commit and rollback of one move: exactly one wins and a late retry agrees."""
    move = await _reserve(store)
    committed, rolled_back = await asyncio.gather(move_store.commit(store, move, NOW),
                                                  move_store.rollback(store, move, NOW))
    assert committed != rolled_back
    room = await _room(store)
    if committed:
        assert room == ("i2", 5, 5, 5, "active")
    else:
        assert room == ("i1", 5, 3, 5, "active")  # the reserved epoch is burnt
    assert await move_store.commit(store, move, NOW) is committed  # a late retry agrees
    row = await move_store.get(store, move.move_id)
    assert row is not None and row["state"] == ("committed" if committed else "rolled_back")


async def test_lease_is_claimed_by_one_replica_only(store: Store) -> None:
    """Once a move's lease ran out, two replicas claiming it at once: one gets it."""
    await _reserve(store, owner="dead")
    assert await move_store.claim_orphans(store, owner="x", now=NOW + 1, lease_s=15) == []
    got = await asyncio.gather(*(move_store.claim_orphans(store, owner=o, now=NOW + 16,
                                                          lease_s=15) for o in ("x", "y")))
    assert sorted(len(g) for g in got) == [0, 1]
    assert next(g for g in got if g)[0].state.value == "reserved"
