"""The write scheduler on its own: the dirty set, one flush per loop turn, the fan-out."""

from __future__ import annotations

import asyncio

from shard.writer import Writer


class Queue:
    """A send queue that records its flushes."""

    def __init__(self, log: list[str], name: str) -> None:
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.written: list[bytes] = []
        self.log, self.name = log, name

    def flush(self) -> None:
        self.log.append(self.name)
        self.written.extend(self.pending)
        self.pending.clear()
        self.pending_bytes = 0


async def next_turn() -> None:
    await asyncio.sleep(0)  # the flush scheduled with call_soon runs first


async def test_fan_out_appends_one_frame_object_to_every_queue_and_flushes_once_per_turn():
    log: list[str] = []
    a, b, c = Queue(log, "a"), Queue(log, "b"), Queue(log, "c")
    w = Writer()
    frame = b"\x81\x02hi"
    assert w.fan_out([a, b, c], frame) == 3
    assert w.fan_out([a, b], b"\x81\x01!") == 2  # same turn: nobody is marked dirty twice
    assert w.dirty == [a, b, c] and log == []  # nothing written before the turn ends
    await next_turn()
    assert log == ["a", "b", "c"]  # each queue flushed once, in the order it became dirty
    assert a.written == [frame, b"\x81\x01!"] and c.written == [frame]
    assert a.written[0] is frame and b.written[0] is frame  # the same bytes, not copies
    assert w.dirty == []


async def test_mark_dirty_schedules_one_flush_and_the_next_turn_starts_over():
    log: list[str] = []
    a = Queue(log, "a")
    w = Writer()
    a.pending.append(b"x")
    w.mark_dirty(a)
    await next_turn()
    assert log == ["a"] and a.written == [b"x"]
    assert w.fan_out([a], b"y") == 1  # a new turn: a is dirty again
    await next_turn()
    assert log == ["a", "a"] and a.written == [b"x", b"y"]


async def test_fan_out_to_nobody_schedules_nothing():
    w = Writer()
    assert w.fan_out([], b"x") == 0
    assert w.dirty == []
    assert not w._scheduled  # no flush was scheduled
