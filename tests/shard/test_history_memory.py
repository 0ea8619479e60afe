"""History memory is bounded in bytes, per room and across the shard, under attack.

Real directory and shard processes. One connection per room, each sending
messages of 4,096 emoji (16 KiB of UTF-8 each): 12 rooms x 400 messages,
79 MiB of history offered to a shard whose `history_bytes_total` is 16 MiB.
The shard's resident memory grows by the bound plus a margin, not by what
was offered (before the bound, and with a text kept twice per message, it
grew by about 2.2x the offered bytes); the shard's history gauge never
exceeds the bound; a resume from before the kept window is
``recovered: false``, from inside it ``recovered: true``.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson
import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect

from roomshard.testing.procs import Procs
from roomshard.testing.timing import t
from tests.shard.conftest import recv_until
from tests.shard.e2e import metric, room_url

pytestmark = pytest.mark.e2e

ROOMS = 12
MESSAGES = 400
BOUND = 16 << 20
TEXT = "\U0001f600" * 4096


async def attack(ws: ClientConnection, room: str) -> int:
    """Send MESSAGES messages, 20 at a time, each batch acked; the last seq."""
    seq = 0
    for start in range(0, MESSAGES, 20):
        for i in range(start, start + 20):
            await ws.send(orjson.dumps({"type": "send", "id": f"{room}-{i}", "text": TEXT}).decode())
        for _ in range(20):
            seq = (await recv_until(ws, "ack", timeout=30))["seq"]
    return seq


async def test_history_memory_stays_within_the_shard_bound_under_attack():
    with Procs() as p:
        directory = p.directory()
        shard = p.shard("i1", directory.url, extra=[
            "--history-bytes-total", str(BOUND), "--rate", "10000", "--rate-burst", "10000",
            "--byte-rate", "100000000", "--byte-burst", "100000000", "--frame-burst", "100000"])
        proc = psutil.Process(shard.popen.pid)
        async with httpx.AsyncClient() as http:
            socks = [await connect(await room_url(directory, f"flood{i}", f"u{i}", http=http),
                                   open_timeout=t(10), max_size=None, max_queue=None)
                     for i in range(ROOMS)]
            try:
                for ws in socks:
                    await recv_until(ws, "welcome")
                rss_before = proc.memory_info().rss
                peak_history = 0.0
                for i, ws in enumerate(socks):
                    await attack(ws, f"flood{i}")
                    peak_history = max(peak_history, await metric(shard, "roomshard_shard_history_bytes"))
                rss_after = proc.memory_info().rss
                offered = ROOMS * MESSAGES * len(TEXT.encode())
                assert peak_history <= BOUND
                assert await metric(shard, "roomshard_shard_history_shed_total") > 0
                growth = rss_after - rss_before
                # The bound plus transient frames and texts; unbounded, it was about
                # 160 MiB here (each text kept twice: as a str and as its UTF-8).
                assert growth < BOUND + (24 << 20), \
                    f"RSS grew {growth / 2**20:.0f} MiB for {offered / 2**20:.0f} MiB offered"
                # Steady state: as much again offered, the memory stays where it was.
                for i, ws in enumerate(socks):
                    await attack(ws, f"again{i}")
                more = proc.memory_info().rss - rss_after
                # (shard.main.bound_allocator: without it the heap fragments and grows here)
                assert more < 8 << 20, f"RSS grew another {more / 2**20:.0f} MiB in round two"
                assert await metric(shard, "roomshard_shard_history_bytes") <= BOUND
                # The first room's early messages left memory: its resume says so.
                async with connect(await room_url(directory, "flood0", "late", since=0, http=http),
                                   open_timeout=t(10), max_size=None) as late:
                    welcome = orjson.loads(await asyncio.wait_for(late.recv(), t(10)))
                    assert welcome["recovered"] is False
                last = await attack(socks[-1], "last")
                async with connect(await room_url(directory, f"flood{ROOMS - 1}", "late",
                                                  since=last - 1, http=http),
                                   open_timeout=t(10), max_size=None) as late:
                    welcome = orjson.loads(await asyncio.wait_for(late.recv(), t(10)))
                    assert welcome["recovered"] is True
                    assert (await recv_until(late, "message"))["seq"] == last
            finally:
                for ws in socks:
                    await ws.close()
