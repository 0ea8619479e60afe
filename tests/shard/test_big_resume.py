"""A resume is replayed as the client reads: its size never trips the slow-consumer close.

Real directory and shard processes. 300 messages of 4,096 characters (1.2 MiB
of letters, 7 MiB of control characters once JSON-escaped) and a resume
from 0: the welcome every time, ``recovered: true``, every message once and
in order, also while new messages keep arriving. A welcome larger than
``send_queue_bytes`` (a room's member list; here 1,000 members of 64-character
ids against a 64 KiB queue, the same wall 15,600 members hit at the default
1 MiB) is exempt. A client that stops reading during its replay is still
closed with 4009 once the history window overtakes it, after every frame
queued before the close.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from roomshard.testing.procs import Proc, Procs
from roomshard.testing.timing import t
from tests.shard.conftest import recv_until
from tests.shard.e2e import RawClient, room_url

pytestmark = pytest.mark.e2e

MESSAGES = 300
TEXT_CHARS = 4096


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proc, Proc]]:
    with Procs() as p:
        directory = p.directory()
        # A fast writer (the limits are not what this tests); a history of 400.
        shard = p.shard("i1", directory.url, extra=[
            "--rate", "10000", "--rate-burst", "10000", "--byte-rate", "100000000",
            "--byte-burst", "100000000", "--frame-burst", "100000", "--history", "400"])
        yield directory, shard


async def fill(ws: ClientConnection, prefix: str, n: int, text: str) -> int:
    """Send ``n`` messages, 20 at a time, each batch acked before the next; the last seq.

    (The writer reads its own messages back: batches keep it a reader.)"""
    seq = 0
    for start in range(0, n, 20):
        batch = range(start, min(n, start + 20))
        for i in batch:
            await ws.send(orjson.dumps({"type": "send", "id": f"{prefix}{i}", "text": text}).decode())
        for _ in batch:
            seq = (await recv_until(ws, "ack", timeout=30))["seq"]
    return seq


async def read_resume(url: str, until_seq: int) -> tuple[dict, list[int]]:
    """Resume and read until ``until_seq``; the welcome and the message seqs in order."""
    async with connect(url, open_timeout=t(10), max_size=None, max_queue=None) as ws:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), t(10)))
        seqs: list[int] = []
        while not seqs or seqs[-1] < until_seq:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), t(20)))
            if msg["type"] == "message":
                seqs.append(msg["seq"])
        return welcome, seqs


@pytest.mark.parametrize("text", ["x" * TEXT_CHARS, "\x01" * TEXT_CHARS], ids=["letters", "control"])
async def test_a_resume_of_megabytes_gets_its_welcome_and_every_message(cluster, text):
    directory, _ = cluster
    room = f"big-{ord(text[0])}"
    async with httpx.AsyncClient() as http:
        async with connect(await room_url(directory, room, "alice", http=http),
                           open_timeout=t(10), max_size=None, max_queue=None) as alice:
            await recv_until(alice, "welcome")
            last = await fill(alice, "a", MESSAGES, text)
            for _ in range(3):
                welcome, seqs = await read_resume(
                    await room_url(directory, room, "bob", since=0, http=http), last)
                assert welcome["type"] == "welcome" and welcome["recovered"] is True
                assert seqs == list(range(1, last + 1))
            # Live messages during the replay come after it, never before, none twice.
            url = await room_url(directory, room, "bob", since=0, http=http)
            resume = asyncio.create_task(read_resume(url, last + 40))
            live_last = await fill(alice, "b", 40, "live")
            welcome, seqs = await resume
            assert welcome["recovered"] is True
            assert seqs == list(range(1, live_last + 1))


async def test_a_welcome_larger_than_the_send_queue_is_exempt():
    with Procs() as p:
        directory = p.directory()
        p.shard("i1", directory.url, extra=["--send-queue-bytes", str(64 * 1024)])
        async with httpx.AsyncClient() as http:
            urls = [await room_url(directory, "crowd", f"{i:04d}".ljust(64, "m"), http=http)
                    for i in range(1000)]
            members = await asyncio.to_thread(lambda: [RawClient(u, 1 << 20) for u in urls])
            try:
                for _ in range(3):
                    url = await room_url(directory, "crowd", "n" * 64, http=http)
                    async with connect(url, open_timeout=t(10), max_size=None) as ws:
                        welcome = orjson.loads(await asyncio.wait_for(ws.recv(), t(10)))
                        assert welcome["type"] == "welcome"
                        assert len(welcome["members"]) == 1001
                        assert len(orjson.dumps(welcome)) > 64 * 1024
                        await ws.send(orjson.dumps({"type": "send", "id": "hi", "text": "hi"}).decode())
                        assert (await recv_until(ws, "ack"))["id"] == "hi"
            finally:
                for m in members:
                    m.close()


async def test_a_client_that_stops_reading_its_replay_is_closed_with_4009(cluster):
    directory, _ = cluster
    text = "y" * TEXT_CHARS
    async with httpx.AsyncClient() as http:
        async with connect(await room_url(directory, "stall", "alice", http=http),
                           open_timeout=t(10), max_size=None, max_queue=None) as alice:
            await recv_until(alice, "welcome")
            await fill(alice, "a", MESSAGES, text)
            # A resume from 0 that reads nothing: its replay stalls after a chunk or two.
            stalled = await asyncio.to_thread(
                RawClient, await room_url(directory, "stall", "bob", since=0, http=http), 4096)
            stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await fill(alice, "b", 300, text)  # 600 > the history of 400: the replay is overtaken
            frames, code = await asyncio.to_thread(stalled.read_frames_until_close)
            stalled.close()
            assert code == 4009
            welcome, messages = frames[0], [f for f in frames if f["type"] == "message"]
            assert welcome["type"] == "welcome" and welcome["recovered"] is True
            # What it got before the close is a gapless prefix.
            assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
            assert len(messages) < 600
