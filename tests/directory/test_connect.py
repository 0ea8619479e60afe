"""Client connect: placement, re-placement, tickets, private rooms, concurrency."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from sqlalchemy import exc as sa_exc

from directory.domain.schemas import ConnectResponse
from roomshard.testing.procs import TEST_CLUSTER_SECRET
from roomshard.wire.tickets import Signer
from tests.directory.conftest import ADMIN, Harness


def ticket_of(body: dict[str, Any], now: float) -> Any:
    token = body["url"].split("?ticket=", 1)[1]
    return Signer([TEST_CLUSTER_SECRET]).verify_ticket(token, now=now)


async def test_connect_places_new_room_and_returns_signed_url(h: Harness) -> None:
    """A first connect assigns the room, answers the contract body and a verifiable ticket."""
    await h.heartbeat("i1")
    r = await h.connect("room-1", "alice")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    msgspec.convert(body, ConnectResponse)
    assert (body["room"], body["instance"], body["epoch"], body["expires_in"]) == ("room-1", "i1", 1, 60)
    assert body["url"].startswith("ws://shard-i1.test/i1/room/room-1?ticket=")
    t = ticket_of(body, h.clock.now)
    assert (t.room, t.instance, t.epoch, t.user) == ("room-1", "i1", 1, "alice")
    assert t.exp - t.iat == 60


async def test_connect_existing_room_keeps_instance_and_fresh_ticket(h: Harness) -> None:
    """Later connects get the same instance and epoch, each with a new single-use ticket id."""
    await h.heartbeat("i1")
    await h.heartbeat("i2")
    first = (await h.connect("r")).json()
    second = (await h.connect("r", "bob")).json()
    assert (first["instance"], first["epoch"]) == (second["instance"], second["epoch"])
    assert ticket_of(first, h.clock.now).jti != ticket_of(second, h.clock.now).jti


async def test_url_prefers_public_base_then_public_url(harness_factory: Any) -> None:
    """The room URL base is the instance's public_base, else ROOMSHARD_PUBLIC_URL, else its own address."""
    async with harness_factory(public_url="wss://chat.example.com/") as h:
        await h.heartbeat("i1")
        assert (await h.connect("a")).json()["url"].startswith("wss://chat.example.com/i1/room/a?ticket=")
        await h.put_instance("i1", public_base="wss://lb2.example.com")
        assert (await h.connect("a")).json()["url"].startswith("wss://lb2.example.com/i1/room/a?ticket=")


async def test_new_rooms_spread_to_least_loaded(h: Harness) -> None:
    """New rooms go to the least (rooms + connections)/capacity active instance."""
    await h.heartbeat("i1", capacity=100)
    await h.heartbeat("i2", capacity=300)
    await h.placement_sees("i1", "i2")
    placed = [(await h.connect(f"room{n}")).json()["instance"] for n in range(8)]
    assert placed.count("i2") == 6 and placed.count("i1") == 2
    inst = {i["id"]: i for i in (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]}
    assert (inst["i1"]["rooms_assigned"], inst["i2"]["rooms_assigned"]) == (2, 6)


async def test_no_active_instance_is_503_with_retry_after(h: Harness) -> None:
    """Without an active instance a connect is 503 no_instance_available with Retry-After."""
    r = await h.connect("lonely")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_instance_available"
    assert int(r.headers["retry-after"]) >= 1
    await h.heartbeat("i1")
    await h.put_instance("i1", state="draining")
    assert (await h.connect("lonely")).status_code == 503


async def test_room_on_down_instance_is_replaced_with_higher_epoch(h: Harness) -> None:
    """When the owner misses heartbeats past down_after, the next connect re-places the room (epoch +1)."""
    await h.heartbeat("i1")
    first = (await h.connect("r")).json()
    assert first["instance"] == "i1"
    h.clock.advance(5)
    await h.heartbeat("i2")
    h.clock.advance(6)  # i1 silent for 11 s > down_after 10 s; i2 fresh
    r = (await h.connect("r")).json()
    assert (r["instance"], r["epoch"]) == ("i2", 2)
    room = (await h.client.get("/v1/admin/rooms/r", headers=ADMIN)).json()
    assert (room["instance"], room["epoch"], room["owner_epoch"]) == ("i2", 2, 2)
    inst = {i["id"]: i for i in (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]}
    assert inst["i1"]["state"] == "down" and inst["i1"]["rooms_assigned"] == 0
    assert inst["i2"]["rooms_assigned"] == 1


async def test_every_member_of_a_dead_owner_s_room_at_once_shares_one_replacement(
        h: Harness) -> None:
    """50 connects at once to a room whose owner is down (its clients after a crash):
    one re-placement (one write, epoch + 1), every answer names it."""
    await h.heartbeat("i1")
    assert (await h.connect("crowd")).json()["instance"] == "i1"
    h.clock.advance(5)
    await h.heartbeat("i2")
    h.clock.advance(6)
    store = h.app.state.ctx.store
    attempts = []
    reassign = store._reassign

    async def counted(*args, **kw):
        attempts.append(kw["old_epoch"])
        return await reassign(*args, **kw)

    store._reassign = counted
    answers = await asyncio.gather(*(h.connect("crowd", f"u{n}") for n in range(50)))
    assert attempts == [1]  # one write for all of them (each would have failed its CAS)
    assert {(r.status_code, r.json()["instance"], r.json()["epoch"]) for r in answers} == {
        (200, "i2", 2)}
    metrics = (await h.client.get("/metrics")).text
    assert 'roomshard_directory_placements_total{kind="replaced"} 1.0' in metrics
    room = (await h.client.get("/v1/admin/rooms/crowd", headers=ADMIN)).json()
    assert (room["instance"], room["epoch"]) == ("i2", 2)


async def test_a_full_connection_pool_is_overloaded_not_an_outage(h: Harness) -> None:
    """The pool's timeout (no connection free: load) is 503 overloaded with Retry-After,
    not database_unavailable (the database is there)."""
    await h.heartbeat("i1")
    store = h.app.state.ctx.store

    async def pool_full(*args, **kw):
        raise sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached")

    store.room_target = pool_full
    r = await h.connect("busy")
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1


async def test_disabled_instance_loses_rooms_draining_keeps_them(h: Harness) -> None:
    """A draining owner keeps its rooms (no new ones); a disabled owner's rooms are re-placed."""
    await h.heartbeat("i1")
    await h.connect("kept")
    await h.heartbeat("i2")
    await h.put_instance("i1", state="draining")
    await h.put_instance("i2", state="draining")
    assert (await h.connect("kept")).json()["instance"] == "i1"
    await h.put_instance("i2", state="active")
    assert (await h.connect("fresh")).json()["instance"] == "i2"
    await h.put_instance("i1", state="disabled")
    moved = (await h.connect("kept")).json()
    assert (moved["instance"], moved["epoch"]) == ("i2", 2)


async def test_private_room_refuses_non_members(h: Harness) -> None:
    """A private room answers 403 to non-members and 200 to members."""
    await h.heartbeat("i1")
    r = await h.client.put("/v1/admin/rooms/club/access", json={"private": True, "members": ["alice"]},
                           headers=ADMIN)
    assert r.status_code == 200, r.text
    assert (await h.connect("club", "alice")).status_code == 200
    denied = await h.connect("club", "mallory")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "not_a_member"
    await h.client.put("/v1/admin/rooms/club/access", json={"private": False}, headers=ADMIN)
    assert (await h.connect("club", "mallory")).status_code == 200


async def test_forbidden_comes_before_unavailable(h: Harness) -> None:
    """A non-member of a private room gets 403 even when no instance is active (access before availability)."""
    await h.client.put("/v1/admin/rooms/vault/access", json={"private": True, "members": ["a"]},
                       headers=ADMIN)
    assert (await h.connect("vault", "b")).status_code == 403
    assert (await h.connect("vault", "a")).status_code == 503


async def test_concurrent_first_connects_agree(h: Harness) -> None:
    """Many concurrent first connects for one room in one app all get the same instance and epoch."""
    for n in range(1, 4):
        await h.heartbeat(f"i{n}")
    results = await asyncio.gather(*(h.connect("hot", f"u{n}") for n in range(40)))
    assert {r.status_code for r in results} == {200}
    assert len({(r.json()["instance"], r.json()["epoch"]) for r in results}) == 1
    rooms = (await h.client.get("/v1/admin/rooms", headers=ADMIN)).json()["rooms"]
    assert [r["room"] for r in rooms] == ["hot"]


async def test_an_instance_that_never_heartbeated_gets_no_rooms(h: Harness) -> None:
    """An admin's registration is no proof a shard answers there: rooms go elsewhere or 503."""
    r = await h.client.put("/v1/admin/instances/i9", headers=ADMIN,
                           json={"internal_url": "http://127.0.0.1:9", "capacity": 1000000})
    assert r.status_code in (200, 201), r.text
    lonely = await h.connect("lonely")
    assert lonely.status_code == 503 and "retry-after" in lonely.headers
    await h.heartbeat("i1")
    for k in range(5):  # i9 is far less loaded (huge capacity) yet never chosen
        r = await h.connect(f"room-{k}")
        assert r.status_code == 200 and r.json()["instance"] == "i1", r.text


async def test_a_restarted_replica_does_not_replace_rooms_before_shards_could_heartbeat(
        harness_factory: Any) -> None:
    """After an outage longer than down_after, a fresh replica waits down_after before
    it takes a room off an instance for lack of heartbeats (the shards retry within 0.25 s)."""
    from tests.directory.conftest import Clock

    clock = Clock()
    async with harness_factory(clock=clock) as first:
        await first.heartbeat("i1")
        await first.heartbeat("i2")
        owner = (await first.connect("r")).json()["instance"]
    clock.now += 30  # the directory was down for 30 s; nobody heartbeated meanwhile
    other = "i2" if owner == "i1" else "i1"
    async with harness_factory(clock=clock) as second:
        await second.heartbeat(other)  # one shard got through first
        r = await second.connect("r")
        assert r.status_code == 200 and r.json()["instance"] == owner, r.text
        assert r.json()["epoch"] == 1  # not re-placed: its state is still on its shard
        clock.now += 11  # past the grace, the owner never came back: now it is down
        await second.heartbeat(other)
        r = await second.connect("r")
        assert r.status_code == 200 and r.json()["instance"] == other, r.text
