"""Frames written straight to the socket, then through the transport's buffer, keep their order."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
from websockets.asyncio.client import connect

from roomshard.testing.timing import await_until, t
from tests.shard.conftest import recv_json, recv_until

MESSAGES = 300
TEXT = "x" * 3000


@pytest.fixture
def shard_overrides() -> dict:
    """Room for a fast sender and a long backlog (no 4009, no rate limit)."""
    return {"rate": 100_000, "rate_burst": 100_000, "send_queue_bytes": 8 << 20}


async def test_stalled_reader_gets_every_frame_in_order_after_it_resumes(shard):
    """A reader that stops reading (kernel buffers full, the transport buffers) then resumes misses nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few frames
    host, port = shard.server.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    reader = await connect(shard.url("order", "reader"), sock=sock, max_queue=1, open_timeout=t(5))
    assert (await recv_json(reader))["type"] == "welcome"
    sender, _ = await shard.join("order", "sender")
    drain = asyncio.create_task(_drain(sender))
    for i in range(MESSAGES):
        await sender.send(orjson.dumps({"type": "send", "id": f"m{i}", "text": TEXT}).decode())
    conn = next(c for c in shard.server.ws_conns if c.user == "reader")
    # The backlog outgrew the kernel's buffers: the transport holds the rest.
    await await_until(lambda: conn.write_paused, 10, "the transport to buffer for the reader")
    seqs = []
    assert (await recv_until(reader, "presence"))["user"] == "sender"
    while len(seqs) < MESSAGES:
        seqs.append((await recv_until(reader, "message", timeout=10))["seq"])
    assert seqs == list(range(1, MESSAGES + 1))
    assert not conn.write_paused  # drained: direct writes again
    await reader.send('{"type":"send","id":"after","text":"still in order"}')
    assert (await recv_until(reader, "ack"))["id"] == "after"
    drain.cancel()
    await reader.close()
    await sender.close()


async def _drain(ws) -> None:
    async for _ in ws:
        pass
