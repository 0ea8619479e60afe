"""The moves SQL on real SQLite and PostgreSQL: commit and rollback settle one way, leases are exclusive."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from directory.db import move_store
from directory.db.engine import instances, migrate, rooms
from directory.db.store import Store
from directory.domain.errors import Conflict
from directory.domain.moves import State, begin
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


async def test_a_batch_of_records_is_written_where_its_rows_allow_and_only_there(
        store: Store) -> None:
    """persist_many writes each record whose row is in one of its expected states and leased
    to the writer, in one transaction, and says which."""
    async with store.write() as conn:
        for n in range(6):
            await conn.execute(insert(rooms).values(room=f"b{n}", instance="i1", epoch=4,
                                                    owner_epoch=4, opened_epoch=4,
                                                    created_at=NOW, updated_at=NOW))

    def make(n: int):  # type: ignore[no-untyped-def]
        return lambda e: begin(move_id=f"b{n}-{e}", room=f"b{n}", source="i1", target="i2",
                               from_epoch=e, now=NOW)

    reserved = []
    for n in range(6):
        owner = "other" if n == 2 else "a"
        reserved.append((await move_store.reserve_many(
            store, [move_store.Reservation(f"b{n}", "i1", "i2", make(n))], owner=owner,
            now=NOW, lease_s=15))[0][0])
    for n in (3, 4):
        assert await move_store.commit(store, reserved[n], NOW)
    frozen = [dataclasses.replace(m, state=State.FROZEN) for m in reserved]
    released = [dataclasses.replace(m, state=State.RELEASED) for m in reserved]
    undecided = move_store.expected_before(State.FROZEN)
    committed = move_store.expected_before(State.RELEASED)
    records = [(frozen[0], undecided), (frozen[1], undecided),
               (frozen[2], undecided),  # another replica's lease
               (released[3], committed),
               (frozen[4], undecided),  # decided meanwhile: never overwritten
               (released[5], committed)]  # not committed
    written = await move_store.persist_many(store, records, owner="a", now=NOW + 1, lease_s=15)
    assert written == [True, True, False, True, False, False]
    states = [(await move_store.get(store, m.move_id))["state"]  # type: ignore[index]
              for m in reserved]
    assert states == ["frozen", "frozen", "reserved", "released", "committed", "reserved"]
    # A second write of the same records at a later time: the rows have moved on.
    again = await move_store.persist_many(store, records[:2], owner="a", now=NOW + 2,
                                          lease_s=15)
    assert again == [True, True]  # frozen is still undecided: a record may be written again
