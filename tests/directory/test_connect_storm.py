"""A real directory process under a storm of connects: every request is answered, the
control plane gets through, and overload is a 503 with Retry-After, never a failure."""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import pytest

from directory.db import store as store_module
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t
from tests.directory.conftest import Harness
from tests.directory.test_processes import register

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
pytestmark = pytest.mark.e2e
N = 200


async def test_two_hundred_concurrent_first_connects_on_sqlite_all_succeed(procs: Procs) -> None:
    """200 connects at once, each creating a room, on embedded SQLite: every one is placed
    (SQLite's write lock is waited for, never reported as database_unavailable)."""
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600", "ROOMSHARD_ROOM_CREATE_RATE": "0"})
    limits = httpx.Limits(max_connections=N + 50)
    async with httpx.AsyncClient(timeout=t(30), limits=limits) as client:
        await register(client, d.url, "i1", "i2")
        replies = await asyncio.gather(*(
            client.post(f"{d.url}/v1/rooms/storm-{n}/connect", json={"user": f"u{n}"})
            for n in range(N)))
        statuses = [r.status_code for r in replies]
        assert statuses == [200] * N, [r.text for r in replies if r.status_code != 200][:3]
        instances = (await client.get(f"{d.url}/v1/admin/instances", headers=ADMIN)).json()
        assert sum(i["rooms_assigned"] for i in instances["instances"]) == N
    assert "database_unavailable" not in d.output()


async def test_a_write_that_cannot_get_its_turn_is_503_overloaded(h: Harness,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite, writes take turns; one that waits past the bound is answered 503
    ``overloaded`` with Retry-After (the database is there, only busy), and the next one,
    once the turn is free, succeeds."""
    store = h.app.state.ctx.store
    if store.dialect != "sqlite":
        pytest.skip("the write turn is SQLite's")
    monkeypatch.setattr(store_module, "SQLITE_WRITE_WAIT_S", 0.05)
    await h.heartbeat("i1")
    async with store.write():  # a long write holds the turn
        r = await h.connect("new-room")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "overloaded")
    assert int(r.headers["retry-after"]) >= 1
    assert (await h.connect("new-room")).status_code == 200


async def test_a_new_room_waits_for_another_process_holding_sqlites_lock(h: Harness) -> None:
    """The in-loop new-room write does not wait for SQLite's lock (busy_timeout 0): while
    another process holds it, the connect takes the general path, which waits for the lock
    off the loop, and succeeds once it is free; the loop keeps serving meanwhile."""
    store = h.app.state.ctx.store
    if store.dialect != "sqlite":
        pytest.skip("SQLite's write lock")
    await h.heartbeat("i1")
    assert (await h.connect("known")).status_code == 200
    other = sqlite3.connect(h.cfg.database_url.split("///", 1)[1], isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        pending = asyncio.ensure_future(h.connect("fresh"))
        # Existing rooms are still answered (a read), while the new room waits.
        assert (await h.connect("known")).status_code == 200
        await asyncio.sleep(0)
        assert not pending.done()
        other.execute("COMMIT")
        r = await asyncio.wait_for(pending, t(10))
    finally:
        other.close()
    assert r.status_code == 200, r.text
    assert r.json()["instance"] == "i1" and r.json()["epoch"] == 1


async def test_a_room_placed_meanwhile_is_joined_not_placed_twice(h: Harness) -> None:
    """Two first connects of one room at once: one places it, the other joins that room
    (same instance and epoch, counted once)."""
    await h.heartbeat("i1")
    await h.heartbeat("i2")
    a, b = await asyncio.gather(h.connect("twice", "alice"), h.connect("twice", "bob"))
    assert (a.status_code, b.status_code) == (200, 200)
    assert (a.json()["instance"], a.json()["epoch"]) == (b.json()["instance"], b.json()["epoch"])
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    assert sum(i["rooms_assigned"] for i in listed) == 1
