"""A shard that is alive but silent (SIGSTOP) past ``down_after``, then woken (SIGCONT).

Real processes, two shards sharing a message store, members chatting in every
room. The stopped shard's sockets stay open: nothing closes, nothing is
proven, the directory waits for ``down_after`` (the lease, shorter, has run
out on the shard's side by then). A newcomer's connect then re-places each
of its rooms, once, on the other shard, where chat goes on; the old members
keep writing into the stopped shard's sockets. When it wakes it must serve
nothing more: it reads those buffered sends before its timers run, and
sequencing one would make a second owner of the room. Its members are
closed (1001) and resume on the new owner; the history checker finds no seq
acked twice, no regression, no acked message lost.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from roomshard.testing.chatter import Chatter
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import DIRECTORY_ENV
from tests.e2e_store.test_shard_sigkill import (
    assert_nothing_acked_is_lost,
    chatting,
    outage_under_traffic,
    store_env,
)

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


async def test_a_stopped_shard_woken_after_down_after_serves_nothing_more(procs: Procs) -> None:
    store_url = f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}"
    directory = procs.directory(env=DIRECTORY_ENV)
    shards = {i: procs.shard(i, directory.url, env=store_env(store_url)) for i in ("i1", "i2")}
    victim, woke = "", 0.0
    epochs: dict[str, int] = {}
    async with chatting(directory.url) as rooms, httpx.AsyncClient(timeout=t(5)) as http:
        async def room_row(room: str) -> dict:
            return (await http.get(f"{directory.url}/v1/admin/rooms/{room}", headers=ADMIN)).json()

        def hit() -> set[str]:
            return {r for r, cs in rooms.items() if cs[0].welcomes[0].instance == victim}

        async def stop_then_wake() -> None:
            nonlocal victim, woke
            victim = rooms["r0"][0].welcomes[0].instance
            for room in hit():
                epochs[room] = (await room_row(room))["epoch"]
            pid = shards[victim].popen.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                async def down() -> bool:
                    listed = (await http.get(f"{directory.url}/v1/admin/instances",
                                             headers=ADMIN)).json()["instances"]
                    return next(i for i in listed if i["id"] == victim)["state"] == "down"

                await await_until(down, 20, f"{victim} down (silent past down_after)")
                # A newcomer in each of its rooms: its connect re-places the room.
                late = {room: Chatter(directory.url, room, "late", http) for room in hit()}
                for room, c in late.items():
                    rooms[room].append(c)
                    c.start()
                await await_until(lambda: all(c.opened.is_set() for c in late.values()), 20,
                                  "the newcomers in, on the other shard")
                for c in late.values():
                    await c.send()
                await await_until(lambda: all(not c.unacked for c in late.values()), 10,
                                  "the newcomers' sends acked by the new owner")
            finally:
                woke = time.monotonic()
                os.kill(pid, signal.SIGCONT)

        await outage_under_traffic(rooms, stop_then_wake, hit)
        for room in hit():
            row = await room_row(room)
            assert row["instance"] != victim and row["epoch"] == epochs[room] + 1, row
    assert hit(), "the victim held no room"
    for room in hit():
        for c in rooms[room]:
            after = [(instance, kind) for at, instance, kind in c.served
                     if at > woke and instance == victim]
            assert after == [], (room, c.user, after[:5])  # nothing served after the wake
            if c.user != "late":
                assert 1001 in c.closes, (room, c.user, c.closes)  # fenced: told to go
                assert c.welcomes[-1].instance != victim and c.welcomes[-1].recovered is True
    await assert_nothing_acked_is_lost(rooms, store_url)
