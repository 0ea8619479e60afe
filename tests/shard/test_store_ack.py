"""A shard with a message store: a message is stored before anyone sees it or its ack.

Real parts: an in-process shard, real WebSocket clients, a real SQLite file
and a real PostgreSQL that is stopped and started under the shard.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import delete
from websockets.asyncio.client import ClientConnection, connect

from roomshard.store.messages import MessageStore, StoredMessage
from roomshard.store.tables import messages
from roomshard.testing.pg import PgServer
from roomshard.testing.timing import await_until
from tests.shard.conftest import Harness, close_code, recv_json, recv_until, start_shard
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
    batches = h.server.commit.batches
    assert f'roomshard_shard_store_write_seconds_count{{instance="i1"}} {batches}.0' in metrics
    assert f'roomshard_shard_store_batch_size_sum{{instance="i1"}} 31.0' in metrics
    assert f'roomshard_shard_store_batch_size_bucket{{instance="i1",le="+Inf"}} {batches}.0' \
        in metrics
    assert 'roomshard_shard_store_waiting_messages{instance="i1"} 0.0' in metrics
    async with httpx.AsyncClient(base_url=h.server.url) as http:
        ready = (await http.get("/readyz")).json()
    assert ready["store"] == {"state": "ok", "waiting_messages": 0, "oldest_wait_s": 0.0}


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
    async with httpx.AsyncClient(base_url=h.server.url) as http:
        ready = await http.get("/readyz")
    assert ready.status_code == 200  # still serving its rooms: every shard shares the store
    assert ready.json()["store"]["state"] == "failing"
    assert ready.json()["store"]["waiting_messages"] == 1
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


def stored_message(room: str, seq: int, user: str = "alice",
                   ts: float | None = None) -> StoredMessage:
    ts = 1000.0 + seq if ts is None else ts
    payload = orjson.dumps({"type": "message", "seq": seq, "id": f"m{seq}", "user": user,
                            "text": f"text {seq}", "ts": ts}).decode()
    return StoredMessage(room=room, seq=seq, id=f"m{seq}", user=user, ts=ts, payload=payload)


async def fill_store(url: str, room: str, seqs: range | list[int]) -> None:
    store = MessageStore(url)
    await store.open()
    try:
        await store.write([stored_message(room, s) for s in seqs])
    finally:
        await store.close()


async def read_messages(ws: ClientConnection, upto: int, timeout: float = 10) -> list[int]:
    """The seqs of the message frames ``ws`` gets until seq ``upto``."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < upto:
        frame = await recv_json(ws, timeout)
        if frame["type"] == "message":
            seqs.append(frame["seq"])
    return seqs


async def test_a_resume_from_before_the_history_window_replays_from_the_store(
        tmp_path: Path) -> None:
    """Memory holds the last 10 messages; the store holds 1,200: a resume from seq 0 is
    recovered and gets every message once, in order, also those sent during its replay."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    await fill_store(url, "r", range(1, 1201))
    h = await started(url, history=10, rate=1000, rate_burst=1000)
    try:
        alice, welcome = await h.join("r", "alice")
        assert welcome["seq"] == 1200
        bob, welcome = await h.join("r", "bob", since=0)
        assert welcome["seq"] == 1200 and welcome["recovered"] is True
        for i in range(30):  # the window moves on while bob's replay is read from the store
            await send(alice, f"live{i}")
        assert [(await recv_until(alice, "ack"))["seq"] for _ in range(30)] == list(
            range(1201, 1231))
        assert await read_messages(bob, 1230) == list(range(1, 1231))
        carol, welcome = await h.join("r", "carol", since=1195)  # memory serves this one
        assert welcome["recovered"] is True
        assert await read_messages(carol, 1230) == list(range(1196, 1231))
    finally:
        await h.server.shutdown()


async def test_a_resume_across_a_gap_in_the_store_is_not_recovered_and_gets_what_is_there(
        tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    await fill_store(url, "r", [*range(5, 20), *range(26, 101)])  # 1-4 expired, 20-25 gone
    h = await started(url, history=10)
    try:
        bob, welcome = await h.join("r", "bob", since=10)
        assert welcome["seq"] == 100 and welcome["recovered"] is False
        assert await read_messages(bob, 100) == [*range(11, 20), *range(26, 101)]
        carol, welcome = await h.join("r", "carol", since=2)  # before the retained window
        assert welcome["recovered"] is False
        assert (await read_messages(carol, 100))[:2] == [5, 6]
        dave, welcome = await h.join("r", "dave", since=30)
        assert welcome["recovered"] is True
        assert await read_messages(dave, 100) == list(range(31, 101))
    finally:
        await h.server.shutdown()


class ExpiringStore(MessageStore):
    """Retention expiry that strikes right after a resume was promised its messages."""

    async def span(self, room: str, after: int, before: int) -> tuple[int | None, int]:
        answer = await super().span(room, after, before)
        async with self.engine.begin() as conn:
            await conn.execute(delete(messages).where(messages.c.seq <= after + 3))
        return answer


async def test_a_resume_whose_messages_expire_before_they_are_read_is_closed_not_gapped(
        tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    await fill_store(url, "r", range(1, 101))
    fake = FakeDirectory()
    h = Harness(await start_shard(fake, store=ExpiringStore(url), history=10), fake)
    try:
        bob, welcome = await h.join("r", "bob", since=0)
        assert welcome["recovered"] is True  # 1..90 were stored when it was asked
        assert await close_code(bob) == 4009  # then 1..3 went: no silent gap
        bob, welcome = await h.join("r", "bob", since=0)
        assert welcome["recovered"] is False  # the resume again hears of the gap
        assert await read_messages(bob, 100) == list(range(4, 101))  # what is left, in order
    finally:
        await h.server.shutdown()


class UnreachableStore(MessageStore):
    async def span(self, room: str, after: int, before: int) -> tuple[int | None, int]:
        raise OSError("connection refused")


async def test_a_resume_the_store_cannot_answer_is_refused_with_1013(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    await fill_store(url, "r", range(1, 101))
    fake = FakeDirectory()
    h = Harness(await start_shard(fake, store=UnreachableStore(url), history=10), fake)
    try:
        alice, welcome = await h.join("r", "alice", since=95)  # memory serves it
        assert welcome["recovered"] is True
        bob = await connect(h.url("r", "bob", since=50), open_timeout=5)
        assert await close_code(bob) == 1013
        await send(alice, "still")  # the room is unharmed
        assert (await recv_until(alice, "ack"))["seq"] == 101
    finally:
        await h.server.shutdown()


class GatedStore(MessageStore):
    """A store whose writes wait for ``gate`` (a slow or stuck database, made precise)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()

    async def write(self, batch) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().write(batch)


def cluster_auth(h: Harness) -> dict[str, str]:
    s = h.server
    return {"authorization": "Bearer " + s.signer.cluster_token("directory", to=s.cfg.instance,
                                                                now=s.clock())}


async def test_a_freeze_waits_for_messages_on_their_way_to_the_store(tmp_path: Path) -> None:
    """The snapshot carries every seq given: a message sequenced before the freeze is stored
    (and acked) before the freeze answers, its seq in the snapshot; nothing is sequenced
    after it (the new owner goes on after the snapshot's seq without a clash)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    store = GatedStore(url)
    fake = FakeDirectory()
    h = Harness(await start_shard(fake, store=store), fake)
    try:
        alice, _ = await h.join("r", "alice")
        await send(alice, "first")
        assert (await recv_until(alice, "ack"))["seq"] == 1
        store.gate.clear()
        store.writing.clear()
        await send(alice, "in-flight")
        await asyncio.wait_for(store.writing.wait(), 5)  # sequenced (seq 2), not stored
        async with httpx.AsyncClient(base_url=h.server.url, headers=cluster_auth(h)) as http:
            freeze = asyncio.ensure_future(http.post("/internal/handoffs/freeze", json={
                "items": [{"room": "r", "move_id": "m1", "epoch": 2}]}))
            await await_until(lambda: h.server.live_rooms.get("r").frozen, 5, "the room frozen")
            await send(alice, "after-freeze")  # unread while frozen: not sequenced
            assert not freeze.done()
            store.gate.set()
            answer = (await freeze).json()["results"][0]
        assert answer["status"] == 200
        snapshot = answer["body"]["snapshot"]
        assert snapshot["seq"] == 2
        assert [m["id"] for m in snapshot["history"]] == ["first", "in-flight"]
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "in-flight", "seq": 2}
        assert [m[0] for m in await stored_rows(url, "r")] == [1, 2]
    finally:
        store.gate.set()
        await h.server.shutdown()


async def test_a_freeze_the_store_cannot_settle_is_refused_and_the_room_serves_on(
        tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    store = GatedStore(url)
    fake = FakeDirectory()
    h = Harness(await start_shard(fake, store=store, store_wait=0.3), fake)
    try:
        alice, _ = await h.join("r", "alice")
        store.gate.clear()
        await send(alice, "stuck")
        await asyncio.wait_for(store.writing.wait(), 5)
        async with httpx.AsyncClient(base_url=h.server.url, headers=cluster_auth(h)) as http:
            r = await http.post("/internal/rooms/r/freeze", json={"move_id": "m1", "epoch": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            assert not h.server.live_rooms.get("r").frozen  # thawed: it serves on
            state = (await http.get("/internal/handoffs")).json()
            assert state["frozen"] == {}
        await send(alice, "refused")  # read again (past store_wait: refused, not lost)
        error = await recv_until(alice, "error")
        assert (error["code"], error["id"]) == ("unavailable", "refused")
        store.gate.set()
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "stuck", "seq": 1}
        await send(alice, "refused")
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "refused", "seq": 2}
    finally:
        store.gate.set()
        await h.server.shutdown()


async def test_retention_deletes_old_messages_in_batches_and_from_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages older than history_retention leave the store (in transactions of
    EXPIRE_BATCH) and the room's memory; a resume from before them is not recovered."""
    import time

    import shard.server

    monkeypatch.setattr(shard.server, "EXPIRE_BATCH", 7)
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    now = time.time()
    old = [stored_message("r", s, ts=now - 7200) for s in range(1, 21)]
    new = [stored_message("r", s, ts=now - 10) for s in range(21, 26)]
    store = MessageStore(url)
    await store.open()
    try:
        await store.write(old + new)
    finally:
        await store.close()
    h = await started(url, history=100, history_retention=3600)
    try:
        alice, welcome = await h.join("r", "alice")
        assert welcome["seq"] == 25 and len(h.server.live_rooms.get("r").room.history) == 25
        assert await h.server.expire_once() == 20
        assert h.server.stats.store_expired == 20
        assert len(h.server.live_rooms.get("r").room.history) == 5
        assert [m[0] for m in await stored_rows(url, "r")] == list(range(21, 26))
        assert 'roomshard_shard_store_expired_total{instance="i1"} 20.0' in \
            h.server.metrics.render().decode()
        bob, welcome = await h.join("r", "bob", since=5)  # before the retained window
        assert welcome["recovered"] is False
        assert await read_messages(bob, 25) == list(range(21, 26))
        carol, welcome = await h.join("r", "carol", since=20)
        assert welcome["recovered"] is True
        assert await h.server.expire_once() == 0
    finally:
        await h.server.shutdown()


async def test_an_ordered_send_waits_behind_one_the_store_refused(tmp_path: Path) -> None:
    """The order hold with a store: a send refused ``unavailable`` holds the ordered sends
    written after it, even once the store takes writes again, until it is sent again."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    store = GatedStore(url)
    fake = FakeDirectory()
    h = Harness(await start_shard(fake, store=store, store_wait=0.3), fake)
    commit = h.server.commit
    assert commit is not None

    async def ordered(msg_id: str) -> None:
        await alice.send(orjson.dumps(
            {"type": "send", "id": msg_id, "text": msg_id, "ordered": True}).decode())

    try:
        alice, _ = await h.join("r", "alice")
        store.gate.clear()
        await ordered("stuck")
        await await_until(lambda: commit.oldest_age() >= 0.3, 10, "the store_wait bound")
        await ordered("first")
        error = await recv_until(alice, "error")
        assert (error["code"], error["id"]) == ("unavailable", "first")
        store.gate.set()
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "stuck", "seq": 1}
        await ordered("second")  # the store takes it now, but "first" has not come again
        error = await recv_until(alice, "error")
        assert (error["code"], error["id"]) == ("unavailable", "second")
        assert "'first'" in error["message"]
        await ordered("first")
        await ordered("second")
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "first", "seq": 2}
        assert await recv_until(alice, "ack") == {"type": "ack", "id": "second", "seq": 3}
        assert [m[1] for m in await stored_rows(url, "r")] == ["stuck", "first", "second"]
    finally:
        store.gate.set()
        await h.server.shutdown()
