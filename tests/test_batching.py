"""directory.ops.batching.Batcher: concurrent calls of one key go out as one batch."""

from __future__ import annotations

import asyncio

import pytest

from roomshard.batching import Batcher


class Recorder:
    """A batch function that records its batches and can be held open or made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def __call__(self, key: str, items: list[int]) -> list[object]:
        self.batches.append((key, list(items)))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def sent(rec: Recorder, n: int) -> None:
    """Let the loop run until ``n`` batches have gone out (bounded by the test timeout)."""
    while len(rec.batches) < n:
        await asyncio.sleep(0)


async def test_calls_of_one_turn_share_a_batch_and_keys_stay_apart():
    """Calls made in the same loop turn go out together; each key is its own batch."""
    rec = Recorder()
    reported: list[tuple[str, int]] = []
    b = Batcher(rec, on_batch=lambda key, n: reported.append((key, n)))
    got = await asyncio.gather(*(b.submit("k", i) for i in (0, 2, 4)), b.submit("j", 6))
    assert got == [0, 20, 40, 60]
    assert sorted(rec.batches) == [("j", [6]), ("k", [0, 2, 4])]
    assert sorted(reported) == [("j", 1), ("k", 3)]


async def test_calls_made_while_a_batch_is_in_flight_form_the_next_batch():
    """A batch in flight collects the next calls; they go out together when it answers."""
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(rec)
    first = asyncio.ensure_future(b.submit("k", 0))
    await sent(rec, 1)
    later = [asyncio.ensure_future(b.submit("k", i)) for i in (2, 4, 6)]
    rec.gate.set()
    assert await first == 0 and await asyncio.gather(*later) == [20, 40, 60]
    assert rec.batches == [("k", [0]), ("k", [2, 4, 6])]


async def test_max_batch_splits_and_item_errors_reach_only_their_caller():
    """At most max_batch items per call; an item's exception is raised to its caller only."""
    rec = Recorder()
    b = Batcher(rec, max_batch=lambda key: 2)
    got = await asyncio.gather(*(b.submit("k", i) for i in range(5)), return_exceptions=True)
    assert [g if not isinstance(g, Exception) else str(g) for g in got] == [
        0, "odd 1", 20, "odd 3", 40]
    assert [items for _, items in rec.batches] == [[0, 1], [2, 3], [4]]


async def test_a_failed_batch_fails_every_caller_in_it():
    """An exception from the batch function goes to every caller of that batch."""
    rec = Recorder()
    rec.fail = ConnectionError("database down")
    b = Batcher(rec)
    got = await asyncio.gather(b.submit("k", 0), b.submit("k", 2), return_exceptions=True)
    assert [type(g) for g in got] == [ConnectionError, ConnectionError]
    rec.fail = None
    assert await b.submit("k", 2) == 20  # the next batch goes out normally


async def test_a_cancelled_caller_is_dropped_and_aclose_cancels_the_rest():
    """A caller cancelled before its batch leaves is not sent; aclose cancels waiting callers."""
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(rec)
    first = asyncio.ensure_future(b.submit("k", 0))
    await sent(rec, 1)
    gone = asyncio.ensure_future(b.submit("k", 2))
    kept = asyncio.ensure_future(b.submit("k", 4))
    await asyncio.sleep(0)  # one loop turn: both are queued behind the batch in flight
    gone.cancel()
    rec.gate.set()
    assert await first == 0 and await kept == 40
    assert rec.batches == [("k", [0]), ("k", [4])]
    rec.gate = asyncio.Event()
    stuck = asyncio.ensure_future(b.submit("k", 6))
    await sent(rec, 3)
    await b.aclose()
    with pytest.raises(asyncio.CancelledError):
        await stuck
