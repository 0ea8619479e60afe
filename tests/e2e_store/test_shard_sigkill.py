"""With a message store, SIGKILL of a shard under live traffic loses no acked message.

Real processes: one directory and two shards sharing a SQLite message store;
real WebSocket clients chatting in every room while the shard that holds
half the rooms is killed. The killed shard's rooms open on the other shard
from the store: their members resume with ``recovered: true``, and every
acked message is stored once and in every member's log, in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from roomshard.store.messages import MessageStore
from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import DIRECTORY_ENV, SHARD_ENV

pytestmark = pytest.mark.e2e

ROOMS = 6
MEMBERS = 3


async def keep_sending(chatters: list[Chatter], stop: asyncio.Event) -> None:
    """Every member sends a message every 100 ms (half its rate limit) until ``stop``."""
    while not stop.is_set():
        for c in chatters:
            await c.send()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def test_sigkill_of_a_shard_loses_no_acked_message(procs: Procs) -> None:
    store_url = f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}"
    # The members of the killed shard resend everything they sent during the outage at once:
    # a burst above the default rate burst (this test is about the store, not the limits).
    env = {**SHARD_ENV, "ROOMSHARD_HISTORY_URL": store_url, "ROOMSHARD_RATE_BURST": "1000"}
    directory = procs.directory(env=DIRECTORY_ENV)
    shards = {i: procs.shard(i, directory.url, env=env) for i in ("i1", "i2")}
    async with httpx.AsyncClient(timeout=t(5)) as http:
        rooms = {f"r{n}": [Chatter(directory.url, f"r{n}", f"u{k}", http) for k in range(MEMBERS)]
                 for n in range(ROOMS)}
        everyone = [c for cs in rooms.values() for c in cs]
        await start_chatting(everyone)
        victim = rooms["r0"][0].welcomes[0].instance
        hit = {r: cs for r, cs in rooms.items() if cs[0].welcomes[0].instance == victim}
        stop = asyncio.Event()
        sender = asyncio.get_running_loop().create_task(keep_sending(everyone, stop))
        await await_until(lambda: all(len(c.acks) >= 5 for c in everyone), 20,
                          "live traffic in every room")
        acked_before_kill = {c.user + c.room: dict(c.acks) for c in everyone}
        procs.kill(shards[victim])
        await await_until(lambda: all(len(c.welcomes) > 1 for cs in hit.values() for c in cs),
                          30, "the killed shard's members back in their rooms")
        await await_until(lambda: all(len(c.acks) >= 5 + len(acked_before_kill[c.user + c.room])
                                      for cs in hit.values() for c in cs), 20,
                          "traffic after the kill")
        stop.set()
        await sender
        await await_until(lambda: all(not c.unacked for c in everyone), 20, "every send acked")
        # Let every member read the last messages, then stop.
        await await_until(lambda: all(c.last_seq == max(x.last_seq or 0 for x in cs)
                                      for cs in rooms.values() for c in cs), 10,
                          "every member at its room's latest seq")
        for c in everyone:
            await c.stop()
    for room, cs in hit.items():
        for c in cs:
            back = c.welcomes[-1]
            assert back.instance != victim and back.recovered is True, (room, c.user, back)
    problems = [p for cs in rooms.values() for p in check_logs(cs)]
    assert problems == []
    store = MessageStore(store_url)
    try:
        for room, cs in rooms.items():
            stored = {m.seq: m.id for m in await store.tail(room, 100_000)}
            acked = {seq: msg_id for c in cs for msg_id, seq in c.acks.items()}
            assert len(acked) > 10
            assert {s: stored.get(s) for s in acked} == acked, room  # every acked one, stored
            assert len(set(stored.values())) == len(stored)  # and stored once
    finally:
        await store.close()
