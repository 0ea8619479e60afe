"""A real directory process under a storm of connects: every request is answered, the
control plane gets through, and overload is a 503 with Retry-After, never a failure."""

from __future__ import annotations

import asyncio

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
