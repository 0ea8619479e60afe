"""A room the replica does not know, on PostgreSQL: looked up and placed in ONE statement;
a room a shard opened: told to every replica.

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

import orjson
import pytest

from directory.db.store import Store
from roomshard.testing.metrics import sample
from roomshard.testing.timing import await_until
from tests.directory.conftest import ADMIN, Harness, cluster_headers

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


async def _open(h: Harness, instance: str, rooms: dict[str, str]) -> dict[str, Any]:
    """The shard's batch open of ``rooms`` (room -> open id) at epoch 1; room -> grant."""
    r = await h.client.post("/v1/internal/opens", headers=cluster_headers(instance, h.clock.now),
                            json={"instance": instance, "rooms": [
                                {"room": room, "ticket_epoch": 1, "open_id": open_id}
                                for room, open_id in rooms.items()]})
    assert r.status_code == 200, r.text
    return {x["room"]: x["grant"] for x in r.json()["results"]}


def _known(h: Harness, room: str) -> Any:
    return _store(h).cache.get(room, asyncio.get_running_loop().time())  # type: ignore[union-attr]


async def test_rooms_opened_through_one_replica_are_known_to_every_replica(
        replicas: list[Harness]) -> None:
    """A shard's open (its rooms' first joins) tells every replica's cache, in the open's
    own transaction: the other replica answers those rooms at once, never asking the
    database; a private room is not told (its members stay out of notifications)."""
    a, b = replicas
    by_room = {room: (await a.connect(room, user="ann")).json()
               for room in ("pub1", "pub2", "club")}
    r = await a.client.put("/v1/admin/rooms/club/access", headers=ADMIN,
                           json={"private": True, "members": ["ann"]})
    assert r.status_code == 200, r.text
    for room in ("pub1", "pub2", "club"):
        assert _known(b, room) is None
    # each shard opens its own; the private room's first: told before the others, if at all
    for instance in sorted({x["instance"] for x in by_room.values()},
                           key=lambda i: i != by_room["club"]["instance"]):
        mine = {room: f"o-{room}" for room, x in by_room.items() if x["instance"] == instance}
        grants = await _open(a, instance, mine)
        assert all(grants[room] is not None for room in mine)

    await await_until(lambda: _known(b, "pub1") is not None and _known(b, "pub2") is not None,
                      10, "B told of the opens")
    for room in ("pub1", "pub2"):
        known = _known(b, room)
        assert (known["instance"], known["epoch"]) == (by_room[room]["instance"], 1)
    assert _known(b, "club") is None, "a private room was told"
    instance = by_room["pub1"]["instance"]
    before = sample((await b.client.get("/metrics")).text,
                    "roomshard_directory_connects_answered_at_once_total") or 0
    # the at-once answer is the HTTP edge's: ask the way it does, then check its count
    answer = b.app.connect_now("pub1", None, b'{"user": "bob"}')
    assert answer is not None and orjson.loads(answer)["instance"] == instance
    after = sample((await b.client.get("/metrics")).text,
                   "roomshard_directory_connects_answered_at_once_total")
    assert after == before + 1


async def test_an_open_at_a_new_epoch_never_leaves_the_old_one_known(
        replicas: list[Harness]) -> None:
    """Opening a room again (its state was lost) moves it to a new epoch: no replica
    answers the old epoch from its cache after that commits (the open's own notice comes
    before its epoch change's within the transaction: the room is dropped, looked up
    again), and the other replica's next connect gets the new epoch."""
    a, b = replicas
    instance = (await a.connect("again", user="ann")).json()["instance"]
    await _open(a, instance, {"again": "first"})
    await await_until(lambda: _known(b, "again") is not None, 10, "B told of the first open")
    assert _known(b, "again")["epoch"] == 1
    grant = (await _open(a, instance, {"again": "second"}))["again"]
    assert grant["epoch"] == 2

    def not_at_epoch_1() -> bool:
        known = _known(b, "again")
        return known is None or known["epoch"] != 1

    await await_until(not_at_epoch_1, 10, "B to drop the room's old epoch")
    joined = (await b.connect("again", user="bob")).json()
    assert (joined["instance"], joined["epoch"]) == (instance, 2)
    assert _known(b, "again")["epoch"] == 2


async def test_a_reconnect_that_names_a_lost_owner_is_a_plain_lookup(
        replicas: list[Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that says which owner it could not reach had a room that exists: the
    replica reads it with the plain lookup, not the one-go statement (a storm's
    reconnects are thousands of them)."""
    a, b = replicas
    placed = (await a.connect("lost", user="ann")).json()

    async def not_this_way(*_: Any, **__: Any) -> Any:
        raise AssertionError("a reconnect went the one-go way")

    monkeypatch.setattr(_store(b), "room_target_or_new", not_this_way)
    r = await b.client.post("/v1/rooms/lost/connect", json={"user": "bob", "unreachable": "i9"})
    assert r.status_code == 200, r.text
    assert (r.json()["instance"], r.json()["epoch"]) == (placed["instance"], 1)
    r = await b.client.post("/v1/rooms/brand-new/connect",
                            json={"user": "bob", "unreachable": "i9"})
    assert r.status_code == 200 and r.json()["epoch"] == 1  # a new room still gets placed


async def test_a_view_that_has_not_heard_of_a_drain_places_nothing_there(
        replicas: list[Harness]) -> None:
    """A's placement view still shows instances active after B drained them (their
    notices held back): new rooms through A go to an active one on both placement
    paths, each refusal voids A's view at once, and with every instance drained a new
    room is 503, not placed."""
    from directory.db.room_cache import INSTANCES_CHANNEL

    a, b = replicas
    cache = _store(a).cache
    assert cache is not None and cache._conn is not None
    await cache._conn.remove_listener(INSTANCES_CHANNEL, cache._instance_changed)

    def states() -> dict[str, str] | None:
        view = cache.placement_view()
        return None if view is None else {i["id"]: i["state"] for i in view}

    everyone = {"i1": "active", "i2": "active", "i3": "active"}
    # The general way (Store.place: a room known to be new), the view's pick is i1.
    for iid in ("i1", "i2"):
        await b.put_instance(iid, state="draining")
    assert states() == everyone
    done = await _store(a).place("general", None, now=a.clock(), down_after=a.cfg.down_after)
    assert (done[0].instance, done[1]) == ("i3", "new")
    drained = {"i1": "draining", "i2": "draining", "i3": "active"}
    assert states() in (None, drained)  # voided at once: no view, or one read since

    # The one-go lookup-and-place: i2 back (the view sees it by its next read of the
    # instances), then drained again; the view's pick is i2, the least loaded.
    await b.put_instance("i2", state="active")
    await await_until(lambda: states() == {**drained, "i2": "active"}, 10,
                      "A's view read again, without the notices")
    await b.put_instance("i2", state="draining")
    placed = [(await a.connect("after0", user="v0")).json()["instance"]]
    assert states() in (None, drained)
    placed += [(await a.connect(f"after{n}", user=f"v{n}")).json()["instance"]
               for n in range(1, 6)]
    assert placed == ["i3"] * 6
    await await_until(lambda: states() == drained, 10, "A's view read again, without the notices")

    await b.put_instance("i3", state="draining")
    lonely = await a.connect("lonely", user="w")
    assert lonely.status_code == 503 and lonely.json()["error"]["code"] == "no_instance_available"
    assert (await a.client.get("/v1/admin/rooms/lonely", headers=ADMIN)).status_code == 404
    assert await _assigned(a) == {"i1": 0, "i2": 0, "i3": 7}
