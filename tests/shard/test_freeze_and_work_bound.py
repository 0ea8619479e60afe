"""A move's freeze holds a connection's input even when the per-turn work bound deferred it.

The work bound handles 64 frames of one connection per loop turn and keeps
the rest for the next turn; a room frozen in between (a move took its
snapshot) must not sequence those frames: they would be acked on the old
owner after the snapshot and lost by the move.
"""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from roomshard.testing.timing import await_until
from tests.shard.conftest import recv_until


def masked_send(i: int) -> bytes:
    payload = orjson.dumps({"type": "send", "id": f"m{i}", "text": "x"})
    mask = os.urandom(4)
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[k % 4] for k, b in enumerate(payload)))


@pytest.fixture
def shard_overrides() -> dict:
    return {"rate": 10_000.0, "rate_burst": 10_000}


async def test_deferred_input_is_not_sequenced_while_frozen(shard):
    ws, _ = await shard.join("frz", "alice")
    live = shard.server.live_rooms.get("frz")
    (conn,) = live.conns.values()
    conn.data_received(b"".join(masked_send(i) for i in range(200)))  # one read, 200 frames
    assert live.room.seq == 64  # the bound: the rest waits for the next turn
    live.freeze()  # a move took the snapshot in between
    await asyncio.sleep(0.05)  # several loop turns: nothing may be sequenced now
    assert live.room.seq == 64
    live.thaw()  # the move rolled back: the held input goes on, in order
    await await_until(lambda: live.room.seq == 200, 5, "the held frames after the thaw")
    acks = [await recv_until(ws, "ack") for _ in range(200)]
    assert [a["id"] for a in acks] == [f"m{i}" for i in range(200)]
    await ws.close()
