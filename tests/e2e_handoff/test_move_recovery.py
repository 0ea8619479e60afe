"""A directory SIGKILLed mid-move: its restart recovers the move within seconds (R3).

The driver holds a short lease on its moves and renews it every second, so a
restarted replica does not wait out a long reservation: the frozen room serves
again (held sends acked on the same connections) a few seconds after the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import httpx

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import ADMIN, directory_auth

# Shards outlive the directory's absence (lease) and are not called down meanwhile.
SHARD_ENV = {"ROOMSHARD_HEARTBEAT_INTERVAL": "0.5", "ROOMSHARD_LEASE": "15"}
DIRECTORY_ENV = {"ROOMSHARD_DOWN_AFTER": "20"}
# From the kill to the held sends being acked: the driver's lease (4 s) plus a recovery pass
# and the rollback's calls. The lease this replaced held a room frozen for 15 s.
RECOVERED_WITHIN_S = 8.0


def _frozen(shard_url: str) -> dict:
    r = httpx.get(f"{shard_url}/internal/handoffs", timeout=t(5), headers=directory_auth(shard_url))
    assert r.status_code == 200, r.text
    return r.json()["frozen"]


async def test_directory_killed_mid_move_room_serves_again_within_seconds(procs: Procs) -> None:
    """SIGKILL the directory while a room is frozen mid-move, restart it: the held sends are
    acked within a few seconds, nothing acked is lost, the reserved epoch is burnt."""
    directory = procs.directory(env=DIRECTORY_ENV)
    shards = {i: procs.shard(i, directory.url, env=SHARD_ENV) for i in ("i1", "i2")}
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = await start_chatting([Chatter(directory.url, "slow", f"u{k}", http)
                                         for k in range(3)])
        before = (await http.get(f"{directory.url}/v1/admin/rooms/slow", headers=ADMIN)).json()
        src = before["instance"]
        to = "i2" if src == "i1" else "i1"
        # The test hook: a stopped target never answers the adopt, so the move stays frozen.
        os.kill(shards[to].popen.pid, signal.SIGSTOP)
        try:
            def move() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its directory gets killed
                    httpx.post(f"{directory.url}/v1/admin/rooms/slow/move", json={"to": to},
                               headers=ADMIN, timeout=t(60))

            mover = threading.Thread(target=move)
            mover.start()
            await await_until(lambda: "slow" in _frozen(shards[src].url), 10, "the source frozen")
            for c in chatters:
                await c.send()  # held by the frozen source: not acked yet
            killed_at = time.monotonic()
            procs.kill(directory)
        finally:
            os.kill(shards[to].popen.pid, signal.SIGCONT)
        mover.join(t(10))
        assert all(c.unacked for c in chatters)  # still held: nobody thawed the room
        procs.procs.remove(directory)
        # On its old port: the shards keep heartbeating to the URL they were given.
        directory = await asyncio.to_thread(
            procs.start, "directory", ["directory", "--port", str(directory.port)],
            env=directory.env)
        await await_until(lambda: all(not c.unacked for c in chatters), RECOVERED_WITHIN_S + 20,
                          "held sends acked")
        took = time.monotonic() - killed_at
        for c in chatters:
            await c.send()
        await await_until(lambda: all(not c.unacked for c in chatters), 5, "later sends acked")
        top = max(s for c in chatters for s in c.acks.values())
        await await_until(lambda: all((c.last_seq or 0) >= top for c in chatters), 10, "caught up")
        for c in chatters:
            await c.stop()
    assert took < t(RECOVERED_WITHIN_S), f"the room stayed frozen {took:.1f}s after the kill"
    assert check_logs(chatters) == []
    assert all(len(c.welcomes) == 1 for c in chatters)  # served on, never closed
    room = httpx.get(f"{directory.url}/v1/admin/rooms/slow", headers=ADMIN, timeout=t(5)).json()
    # Rolled back: still the source's, the reserved epoch burnt, the owner epoch unchanged.
    assert (room["instance"], room["state"]) == (src, "active")
    assert room["epoch"] == before["epoch"] + 1 and room["owner_epoch"] == before["owner_epoch"]
    assert _frozen(shards[src].url) == {}
