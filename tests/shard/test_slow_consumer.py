"""A stalled client is closed with 4009 and does not slow its room (real processes)."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from roomshard.testing.timing import await_until, t
from tests.shard.e2e import RawClient, metric, room_url, wait_closed_by_server
from tests.shard.test_e2e import recv_json

pytestmark = pytest.mark.e2e

MEMBERS = 49  # plus the stalled one: a room of 50
MESSAGES = 120
RATE = 100.0  # messages/s from the sender
ROUNDS = 3
PADDING = "x" * 4000  # makes the stalled peer's queue overflow within ~70 messages


async def run_room(directory, room: str) -> list[float]:
    """One sender paces MESSAGES into a room of MEMBERS readers; every delivery's latency (s)."""
    clients = []
    http = httpx.AsyncClient()
    for i in range(MEMBERS):
        # max_queue=None: presence frames nobody reads must not pause the client's reading.
        ws = await connect(await room_url(directory, room, f"u{i}", http=http), max_size=None,
                           max_queue=None, open_timeout=t(10))
        await recv_json(ws)
        clients.append(ws)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    async def reader(ws) -> None:
        got = 0
        while got < MESSAGES:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), t(30)))
            if frame["type"] == "message":
                latencies.append(time.monotonic() - sent_at[frame["id"]])
                got += 1

    readers = [asyncio.create_task(reader(ws)) for ws in clients]
    sender = clients[0]
    start = time.monotonic()
    for i in range(MESSAGES):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[str(i)] = time.monotonic()
        await sender.send(orjson.dumps({"type": "send", "id": str(i), "text": PADDING}).decode())
    await asyncio.wait_for(asyncio.gather(*readers), t(60))
    await asyncio.gather(*(ws.close() for ws in clients))
    await http.aclose()
    assert len(latencies) == MEMBERS * MESSAGES
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def test_stalled_client_is_closed_4009_and_room_keeps_its_latency(procs):
    """One of 50 stops reading: it is closed 4009; the others' p99 stays within 2x (or 15 ms) of without it."""
    d = procs.directory()
    s = procs.shard("i1", d.url, extra=["--rate", "10000", "--rate-burst", "10000",
                                         "--send-queue-bytes", str(128 * 1024)])
    # Interleaved rounds; the best p99 of each condition is compared, so
    # that load from other processes on a shared machine does not decide.
    # Both conditions run the same /metrics watcher, so it loads the test
    # process alike; only the stalled peer differs.
    baselines, stalls, closes = [], [], []
    async with httpx.AsyncClient(base_url=s.url) as http:
        for round_ in range(ROUNDS):
            watcher = asyncio.create_task(watch_slow_closes(http, round_ + 1))
            baselines.append(p99(await run_room(d, f"calm{round_}")))
            watcher.cancel()
            stalled = await asyncio.to_thread(
                RawClient, await room_url(d, f"stall{round_}", "stalled"), 2048)
            await await_until(lambda: _joined(s, 1), 10, "the stalled client to join")
            watcher = asyncio.create_task(watch_slow_closes(http, round_ + 1, stalled))
            stalls.append(p99(await run_room(d, f"stall{round_}")))
            frames, code = await asyncio.wait_for(watcher, t(30))
            stalled.close()
            closes.append((code, len(frames), frames[0]["type"]))
    base_p99, stall_p99 = min(baselines), min(stalls)
    print(f"\np99 latency of {MEMBERS} readers at {RATE:g} msg/s, per round: without a stalled "
          f"client {[round(x * 1000, 1) for x in baselines]} ms, with one "
          f"{[round(x * 1000, 1) for x in stalls]} ms; best {base_p99 * 1000:.1f} vs "
          f"{stall_p99 * 1000:.1f} ms (ratio {stall_p99 / base_p99:.2f}); the stalled client "
          f"(close code, frames it got, first frame): {closes}")
    for code, count, first in closes:
        assert code == 4009 and first == "welcome" and count < MESSAGES
    # A few ms of p99 move by ~10 ms between rounds on a loaded 2-core machine (seen in CI:
    # best of three 4.5 vs 10.6 ms); a stalled peer that held the room up would cost it
    # far more (its 128 KiB queue, then 4009, at 100 msg/s: hundreds of ms).
    assert stall_p99 <= max(2 * base_p99, base_p99 + 0.015)


async def watch_slow_closes(http: httpx.AsyncClient, closes: int, stalled: RawClient | None = None
                            ) -> tuple[list[dict], int | None]:
    """Poll the shard's 4009 counter every 50 ms; once it reaches ``closes``, read
    what the stalled peer was sent (at once: the shard aborts it after a grace)."""
    while True:
        for line in (await http.get("/metrics")).text.splitlines():
            if (line.startswith("roomshard_shard_slow_consumer_closes_total{")
                    and float(line.rsplit(" ", 1)[1]) >= closes and stalled is not None):
                return await wait_closed_by_server(stalled)
        await asyncio.sleep(0.05)


async def _joined(proc, n: int) -> bool:
    return await metric(proc, "roomshard_shard_connections") >= n
