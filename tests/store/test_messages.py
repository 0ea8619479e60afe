"""The message store against real SQLite and PostgreSQL: writes, reads, the seq fence, expiry."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from sqlalchemy import inspect

from roomshard.sql import make_engine
from roomshard.store.messages import MessageStore, SeqTaken, StoredMessage, StoreUnreachable
from roomshard.store.tables import VERSION_TABLE


def msg(room: str, seq: int, ts: float = 1000.0, user: str = "alice", text: str = "") -> StoredMessage:
    payload = orjson.dumps({"type": "message", "seq": seq, "id": f"m{seq}", "user": user,
                            "text": text or f"text {seq}", "ts": ts}).decode()
    return StoredMessage(room=room, seq=seq, id=f"m{seq}", user=user, ts=ts, payload=payload)


async def test_a_batch_is_stored_and_read_back_in_seq_order(store: MessageStore) -> None:
    await store.write([msg("r", s) for s in range(1, 6)] + [msg("other", 1)])
    assert await store.last_seq("r") == 5 and await store.oldest_seq("r") == 1
    assert await store.last_seq("never") is None and await store.oldest_seq("never") is None
    assert [m.seq for m in await store.tail("r", 3)] == [3, 4, 5]
    assert await store.tail("r", 1) == [msg("r", 5)]
    assert [m.seq for m in await store.after("r", 2, 100)] == [3, 4, 5]
    assert [m.seq for m in await store.after("r", 1, 2)] == [2, 3]
    assert [m.seq for m in await store.before("r", 4, 2)] == [2, 3]
    assert [m.seq for m in await store.before("r", None, 100)] == [1, 2, 3, 4, 5]
    assert await store.after("r", 5, 10) == [] and await store.before("r", 1, 10) == []
    assert [m.room for m in await store.tail("other", 10)] == ["other"]


async def test_span_tells_whether_a_range_of_seqs_is_whole(store: MessageStore) -> None:
    await store.write([msg("r", s) for s in (1, 2, 3, 5, 6)] + [msg("other", 4)])
    assert await store.span("r", 0, 4) == (1, 3)  # 1..3: whole
    assert await store.span("r", 2, 7) == (3, 3)  # 3..6 holds 3 of 4: 4 is missing
    assert await store.span("r", 6, 100) == (None, 0)
    assert await store.span("never", 0, 10) == (None, 0)


async def test_a_seq_is_stored_once_and_a_clashing_batch_stores_nothing(store: MessageStore) -> None:
    """(room, seq) is the key: a second writer of a seq fails, and its whole batch with it."""
    await store.write([msg("r", 1), msg("r", 2)])
    with pytest.raises(SeqTaken):
        await store.write([msg("r", 3), msg("r", 2, user="mallory")])
    assert [(m.seq, m.user) for m in await store.tail("r", 10)] == [(1, "alice"), (2, "alice")]
    await store.write([msg("r", 3)])  # the store is fine afterwards
    assert await store.last_seq("r") == 3


async def test_unicode_and_large_texts_come_back_as_written(store: MessageStore) -> None:
    texts = ["héllo wörld ✓", "\u0000 nul", "x" * 200_000, "emoji 😀", "\\ \" '"]
    batch = [msg("r", i + 1, text=t) for i, t in enumerate(texts)]
    await store.write(batch)
    assert await store.tail("r", 10) == batch
    assert [orjson.loads(m.payload)["text"] for m in await store.tail("r", 10)] == texts


async def test_expiry_deletes_the_oldest_in_bounded_batches(store: MessageStore) -> None:
    await store.write([msg("a", s, ts=float(s)) for s in range(1, 11)]
                      + [msg("b", s, ts=100.0 + s) for s in range(1, 4)])
    assert await store.expire(older_than=8.0, limit=3) == 3  # ts 1, 2, 3
    assert await store.oldest_seq("a") == 4
    assert await store.expire(older_than=8.0, limit=100) == 4  # ts 4..7
    assert await store.expire(older_than=8.0, limit=100) == 0
    assert [m.seq for m in await store.tail("a", 100)] == [8, 9, 10]
    assert await store.last_seq("b") == 3


async def test_the_schema_has_its_own_version_table_next_to_others(store_url: str) -> None:
    """The store may share the directory's database: opening it twice (or from several
    processes at once) is safe and keeps its version apart from the directory's."""
    stores = [MessageStore(store_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        await s.close()
    engine = make_engine(store_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert {"messages", VERSION_TABLE} <= tables and "alembic_version" not in tables


async def test_a_store_that_cannot_be_opened_says_so_in_one_line(tmp_path) -> None:
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'dir' / 'store.db'}",
                "postgresql+asyncpg://postgres:secret@127.0.0.1:1/none"):
        store = MessageStore(url)
        with pytest.raises(StoreUnreachable) as caught:
            await store.open()
        await store.close()
        message = str(caught.value)
        assert message.startswith("cannot open the message store ") and "\n" not in message
        assert "secret" not in message  # the password is not printed
