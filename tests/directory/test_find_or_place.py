"""A room the replica does not know, on PostgreSQL: looked up and placed in ONE statement.

``Store.room_target_or_new`` (one round trip for a new room's first connect,
not two) on a real server, through two in-process replicas of one database:
a new room is placed once however many connects race for it on either
replica, and counted once; an existing room is found, never moved or
counted; a room record an access PUT made (no instance yet) is found and
placed the general way; and the room-creation budget still refuses only new
rooms (the charge made ahead of the lookup is refunded when the room exists).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from directory.db.store import Store
from roomshard.testing.timing import await_until
from tests.directory.conftest import ADMIN, Harness

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
async def replicas(harness_factory: Callable[..., Any]) -> AsyncIterator[list[Harness]]:
    """Two directory replicas of one database, three live instances, both caches ready."""
    async with AsyncExitStack() as stack:
        hs = [await stack.enter_async_context(harness_factory(room_create_rate=3))
              for _ in range(2)]
        for iid in ("i1", "i2", "i3"):
            assert (await hs[0].heartbeat(iid)).status_code == 200

        def ready() -> bool:
            return all(len(_store(h).cache.placement_view() or ()) == 3  # type: ignore[union-attr]
                       for h in hs)

        await await_until(ready, 10, "both replicas' placement views")
        yield hs


def _store(h: Harness) -> Store:
    return h.app.state.ctx.store  # type: ignore[no-any-return]


def _count_statements(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    store = _store(h)
    real = store._raw

    async def counting(op: Any) -> Any:
        calls.append(1)
        return await real(op)

    monkeypatch.setattr(store, "_raw", counting)
    return calls


async def _assigned(h: Harness) -> dict[str, int]:
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    return {i["id"]: i["rooms_assigned"] for i in listed}


async def test_a_new_room_is_one_statement_and_racing_connects_agree(
        replicas: list[Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = replicas
    statements = _count_statements(a, monkeypatch)
    first = await a.connect("solo", user="u0")
    assert first.status_code == 200 and first.json()["epoch"] == 1
    assert len(statements) == 1, "a new room's first connect took more than one statement"

    # 20 connects for one new room at once, half through each replica, each user's first
    answers = await asyncio.gather(*(h.connect("raced", user=f"u{n}")
                                     for n in range(10) for h in (a, b)))
    assert {r.status_code for r in answers} == {200}
    assert len({(r.json()["instance"], r.json()["epoch"]) for r in answers}) == 1
    assert answers[0].json()["epoch"] == 1
    assert sum((await _assigned(a)).values()) == 2  # solo and raced, each counted once


async def test_an_existing_room_is_found_not_moved_or_counted(replicas: list[Harness]) -> None:
    a, b = replicas
    placed = (await a.connect("known", user="u1")).json()
    before = await _assigned(a)
    row, created = await _store(b).room_target_or_new("known", now=b.clock(),
                                                      down_after=b.cfg.down_after)
    assert created is None and row is not None
    assert (row["instance"], row["epoch"]) == (placed["instance"], 1)
    joined = await b.connect("known", user="u2")
    assert (joined.json()["instance"], joined.json()["epoch"]) == (placed["instance"], 1)
    assert await _assigned(a) == before


async def test_a_room_an_access_put_made_is_found_then_placed(replicas: list[Harness]) -> None:
    a, b = replicas
    r = await a.client.put("/v1/admin/rooms/club/access", headers=ADMIN,
                           json={"private": True, "members": ["ann"]})
    assert r.status_code == 200, r.text
    row, created = await _store(b).room_target_or_new("club", now=b.clock(),
                                                      down_after=b.cfg.down_after)
    assert created is None and row is not None and row["instance"] is None
    assert (await b.connect("club", user="bob")).status_code == 403
    ok = await b.connect("club", user="ann")
    assert ok.status_code == 200 and ok.json()["instance"] in ("i1", "i2", "i3")


async def test_the_budget_refuses_only_new_rooms(replicas: list[Harness]) -> None:
    a, b = replicas
    for n in range(8):  # rooms other users made through the other replica
        assert (await b.connect(f"theirs{n}", user=f"maker{n}")).status_code == 200
    for n in range(6):  # joins through A, which does not know them: never charged
        assert (await a.connect(f"theirs{n}", user="joiner")).status_code == 200
    for n in range(3):  # the budget is 3 new rooms a minute
        assert (await a.connect(f"mine{n}", user="joiner")).status_code == 200
    over = await a.connect("mine3", user="joiner")
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    assert (await a.connect("theirs7", user="joiner")).status_code == 200  # still joins
    missing = (await a.client.get("/v1/admin/rooms/mine3", headers=ADMIN)).status_code
    assert missing == 404
    metrics = (await a.client.get("/metrics")).text
    assert 'roomshard_directory_room_creates_refused_total{budget="user"} 1.0' in metrics
