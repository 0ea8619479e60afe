"""A shard with a message store: a message is stored before anyone sees it or its ack.

Real parts: an in-process shard, real WebSocket clients, a real SQLite file
and a real PostgreSQL that is stopped and started under the shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from roomshard.store.messages import MessageStore
from roomshard.testing.pg import PgServer
from roomshard.testing.timing import await_until
from tests.shard.conftest import Harness, recv_json, recv_until, start_shard
from tests.shard.fakedir import FakeDirectory


async def started(store_url: str, **overrides) -> Harness:
    fake = FakeDirectory()
    server = await start_shard(fake, store=MessageStore(store_url), **overrides)
    return Harness(server, fake)


@pytest.fixture
async def sqlite_shard(tmp_path: Path) -> AsyncIterator[tuple[Harness, str]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    h = await started(url)
    try:
        yield h, url
    finally:
        await h.server.shutdown()


async def stored_rows(url: str, room: str) -> list[tuple[int, str, str]]:
    store = MessageStore(url)
    try:
        return [(m.seq, m.id, m.user) for m in await store.tail(room, 10_000)]
    finally:
        await store.close()


async def send(ws: ClientConnection, msg_id: str, text: str = "hi") -> None:
    await ws.send(orjson.dumps({"type": "send", "id": msg_id, "text": text}).decode())


async def test_every_acked_message_is_in_the_store_once_and_members_see_it_in_order(
        sqlite_shard: tuple[Harness, str]) -> None:
    h, url = sqlite_shard
    alice, _ = await h.join("r", "alice")
    bob, _ = await h.join("r", "bob")
    await recv_until(alice, "presence")
    for i in range(30):
        await send(alice, f"m{i}", f"text {i}")
    acks = [await recv_until(alice, "ack") for _ in range(30)]
    assert [a["id"] for a in acks] == [f"m{i}" for i in range(30)]
    assert [a["seq"] for a in acks] == list(range(1, 31))
    # Every acked message is in the store: the ack came after the write.
    assert await stored_rows(url, "r") == [(i + 1, f"m{i}", "alice") for i in range(30)]
    seen = [await recv_until(bob, "message") for _ in range(30)]
    assert [(m["seq"], m["id"], m["text"]) for m in seen] == [
        (i + 1, f"m{i}", f"text {i}") for i in range(30)]
    # A resend of a stored id: its ack again, nothing broadcast, nothing stored twice.
    await send(alice, "m3")
    assert await recv_until(alice, "ack") == {"type": "ack", "id": "m3", "seq": 4}
    await send(alice, "last")
    assert (await recv_until(bob, "message"))["id"] == "last"
    assert len(await stored_rows(url, "r")) == 31
    assert h.server.commit is not None and h.server.commit.batches < 31  # grouped
    metrics = h.server.metrics.render().decode()
    assert 'roomshard_shard_store_messages_total{instance="i1"} 31.0' in metrics
    assert 'roomshard_shard_store_refused_total{instance="i1"} 0.0' in metrics
    assert f'roomshard_shard_store_batches_total{{instance="i1"}} {h.server.commit.batches}.0' \
        in metrics


@pytest.mark.postgres
async def test_a_store_outage_refuses_new_sends_loses_no_acked_one_and_heals() -> None:
    pg = PgServer(durable=True)  # the outage is a crash of the server (an immediate stop)
    pg.start()
    try:
        url = pg.create_database()
        h = await started(url, store_wait=0.5)
        try:
            await _outage(h, pg, url)
        finally:
            await h.server.shutdown()
    finally:
        pg.destroy()


async def _outage(h: Harness, pg: PgServer, url: str) -> None:
    commit = h.server.commit
    assert commit is not None
    alice, _ = await h.join("r", "alice")
    bob, _ = await h.join("r", "bob")
    await recv_until(alice, "presence")
    await send(alice, "before")
    assert (await recv_until(alice, "ack"))["seq"] == 1
    await asyncio.to_thread(pg.stop, "immediate")
    await send(alice, "during")  # admitted: it waits for the store, unacked, unseen
    await await_until(lambda: commit.failing, 10, "the write to fail")
    await send(alice, "during")  # a resend while it waits: acked once it is stored
    await await_until(lambda: commit.oldest_age() >= 0.5, 10, "the store_wait bound")
    await send(alice, "refused")
    error = await recv_json(alice)
    assert error["type"] == "error" and error["code"] == "unavailable" and error["id"] == "refused"
    assert h.server.stats.store_refused == 1
    metrics = h.server.metrics.render().decode()
    assert 'roomshard_shard_store_refused_total{instance="i1"} 1.0' in metrics
    assert 'roomshard_shard_store_failures_total{instance="i1"} 0.0' not in metrics
    await asyncio.to_thread(pg.start)
    acks = [await recv_until(alice, "ack", timeout=10) for _ in range(2)]
    assert acks == [{"type": "ack", "id": "during", "seq": 2}] * 2
    await send(alice, "refused")  # sent again once the store is back: taken now
    assert await recv_until(alice, "ack") == {"type": "ack", "id": "refused", "seq": 3}
    seen = [await recv_until(bob, "message") for _ in range(3)]
    assert [(m["seq"], m["id"]) for m in seen] == [(1, "before"), (2, "during"), (3, "refused")]
    assert not commit.failing and commit.rejections == 0
    store = MessageStore(url)
    try:
        assert [(m.seq, m.id) for m in await store.tail("r", 10)] == [
            (1, "before"), (2, "during"), (3, "refused")]
    finally:
        await store.close()


async def test_a_room_that_opens_again_takes_its_state_from_the_store(tmp_path: Path) -> None:
    """A new shard process (here: a second server on the same store) opens the room with
    its stored messages: seq continues, a resume is recovered, a stored id is not resent."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    fake = FakeDirectory()
    first = await started(url)
    fake = first.fake
    try:
        alice, _ = await first.join("r", "alice")
        for i in range(10):
            await send(alice, f"m{i}", f"text {i}")
        assert [(await recv_until(alice, "ack"))["seq"] for _ in range(10)] == list(range(1, 11))
    finally:
        await first.server.shutdown()
    second = Harness(await start_shard(fake, store=MessageStore(url)), fake)
    try:
        bob, welcome = await second.join("r", "bob", since=5)
        assert welcome["seq"] == 10 and welcome["recovered"] is True
        replayed = [await recv_until(bob, "message") for _ in range(5)]
        assert [(m["seq"], m["id"], m["text"]) for m in replayed] == [
            (s, f"m{s - 1}", f"text {s - 1}") for s in range(6, 11)]
        alice, welcome = await second.join("r", "alice")
        assert welcome["seq"] == 10
        await send(alice, "m9")  # acked before the restart: the original ack, not sent again
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "m9", "seq": 10}
        await send(alice, "after")
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "after", "seq": 11}
        nxt = await recv_until(bob, "message")
        assert (nxt["seq"], nxt["id"]) == (11, "after")
        assert [m[0] for m in await stored_rows(url, "r")] == list(range(1, 12))
    finally:
        await second.server.shutdown()
