"""Group commit over the real store: batching, order, retries, bounds."""

from __future__ import annotations

import asyncio

from roomshard.store.commit import GroupCommit
from roomshard.store.messages import MessageStore, SeqTaken, StoredMessage
from roomshard.testing.timing import await_until


def msg(seq: int, room: str = "r") -> StoredMessage:
    return StoredMessage(room=room, seq=seq, id=f"m{seq}", user="u", ts=1.0, payload="{}")


async def test_what_arrives_during_a_write_is_the_next_batch_in_order(store: MessageStore) -> None:
    writes: list[list[int]] = []
    done: list[int] = []
    gate = asyncio.Event()

    async def write(batch: list[StoredMessage]) -> None:
        writes.append([m.seq for m in batch])
        if len(writes) == 1:
            await gate.wait()  # the first write is slow: everything else queues behind it
        await store.write(batch)

    gc = GroupCommit(write, lambda batch: done.extend(m.seq for m in batch))
    gc.submit(msg(1), 10)
    await await_until(lambda: writes == [[1]], 5, "the first write to start")
    for seq in range(2, 102):
        gc.submit(msg(seq), 10)
    assert gc.waiting_bytes == 1010 and done == []
    gate.set()
    assert await gc.flush(5)
    assert writes == [[1], list(range(2, 102))]  # two writes for 101 messages
    assert done == list(range(1, 102))
    assert [m.seq for m in await store.tail("r", 200)] == list(range(1, 102))
    assert gc.batches == 2 and gc.items == 101 and gc.waiting_bytes == 0


async def test_a_failed_write_is_retried_first_and_nothing_overtakes_it(store: MessageStore) -> None:
    failures = 3
    done: list[int] = []

    async def write(batch: list[StoredMessage]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError("store unreachable")
        await store.write(batch)

    gc = GroupCommit(write, lambda batch: done.extend(m.seq for m in batch),
                     retry_initial=0.01, retry_max=0.02)
    gc.submit(msg(1), 1)
    await await_until(lambda: gc.failing, 5, "the first write to fail")
    gc.submit(msg(2), 1)
    gc.submit(msg(3), 1)
    assert done == []
    assert await gc.flush(5)
    assert done == [1, 2, 3] and gc.failures == 3 and not gc.failing
    assert [m.seq for m in await store.tail("r", 10)] == [1, 2, 3]


async def test_past_its_bounds_it_refuses_and_recovers_when_the_store_does() -> None:
    now = [0.0]
    stored = asyncio.Event()
    up = False
    done: list[int] = []

    async def write(batch: list[StoredMessage]) -> None:
        if not up:
            raise OSError("down")
        stored.set()

    gc = GroupCommit(write, lambda batch: done.extend(m.seq for m in batch), max_bytes=100,
                     max_age=5.0, clock=lambda: now[0], retry_initial=0.005, retry_max=0.01)
    assert gc.admit(100) and not gc.admit(101)
    gc.submit(msg(1), 60)
    assert gc.admit(40) and not gc.admit(41)  # bytes: what waits, queued or in flight
    await await_until(lambda: gc.failing, 5, "the write to fail")
    now[0] = 4.9
    assert gc.admit(1) and gc.oldest_age() == 4.9
    now[0] = 5.0
    assert not gc.admit(1)  # age: the oldest waited max_age
    up = True
    assert await gc.flush(5)
    assert done == [1] and gc.admit(100) and gc.oldest_age() == 0.0


async def test_flush_gives_up_after_its_timeout_and_close_stops_the_writer() -> None:
    async def write(batch: list[StoredMessage]) -> None:
        raise OSError("down")

    gc = GroupCommit(write, lambda batch: None, retry_initial=0.01, retry_max=0.01)
    gc.submit(msg(1), 1)
    assert not await gc.flush(0.1)
    await gc.close()
    assert gc.failures >= 1


async def test_a_batch_the_store_refuses_for_good_is_rejected_and_the_next_goes_on(
        store: MessageStore) -> None:
    """A seq another writer stored first is no outage: retrying would never end."""
    await store.write([msg(2)])
    done: list[int] = []
    rejected: list[tuple[list[int], str]] = []
    gc = GroupCommit(store.write, lambda batch: done.extend(m.seq for m in batch),
                     rejected=lambda batch, e: rejected.append(([m.seq for m in batch],
                                                                e.__class__.__name__)),
                     permanent=(SeqTaken,))
    gc.submit(msg(1), 1)
    gc.submit(msg(2), 1)  # the same batch as 1: both refused
    assert await gc.flush(5)
    gc.submit(msg(3), 1)
    assert await gc.flush(5)
    assert rejected == [([1, 2], "SeqTaken")] and done == [3]
    assert gc.rejections == 1 and gc.failures == 0
    assert [m.seq for m in await store.tail("r", 10)] == [2, 3]


def test_buckets_count_each_observation_once_and_read_cumulatively() -> None:
    from roomshard.store.commit import Buckets

    b = Buckets((1, 10))
    for v in (0.5, 1, 3, 10, 11, 500):
        b.observe(v)
    assert b.counts == [2, 2, 2] and b.count == 6 and b.sum == 525.5
    assert b.cumulative() == [("1", 2), ("10", 4), ("+Inf", 6)]


async def test_after_a_quiet_spell_a_batch_gathers_for_the_linger() -> None:
    """With ``linger`` the writer waits after the first item, so items arriving within it
    (a low rate) share one write instead of a transaction each."""
    written: list[list[int]] = []

    async def write(batch: list[int]) -> None:
        written.append(list(batch))

    gc: GroupCommit[int] = GroupCommit(write, lambda batch: None, linger=0.2)
    gc.submit(1, 1)
    await asyncio.sleep(0)  # the writer has started: it waits out the linger
    gc.submit(2, 1)  # within the linger: the same batch
    assert await gc.flush(5)
    gc.submit(3, 1)
    assert await gc.flush(5)
    assert written == [[1, 2], [3]]
    assert gc.batch_sizes.count == 2 and gc.batch_sizes.sum == 3
