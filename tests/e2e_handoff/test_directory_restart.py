"""A move in flight survives the directory dying: the restarted directory finishes it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import threading
from pathlib import Path

import httpx

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import ADMIN, directory_auth

# The shards must outlive the directory's restart without fencing (lease) and the
# restarted directory must not call them down meanwhile.
SHARD_ENV = {"ROOMSHARD_HEARTBEAT_INTERVAL": "0.5", "ROOMSHARD_LEASE": "15"}
DIRECTORY_ENV = {"ROOMSHARD_DOWN_AFTER": "20"}


def _move_state(db: Path) -> str | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT state FROM moves ORDER BY created_at DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return row[0] if row else None


def _handoffs(shard_url: str) -> dict:
    r = httpx.get(f"{shard_url}/internal/handoffs", timeout=t(5),
                  headers=directory_auth(shard_url))
    assert r.status_code == 200, r.text
    return r.json()


def _loaded(shard_url: str, room: str) -> bool:
    r = httpx.get(f"{shard_url}/internal/rooms/{room}", timeout=t(5),
                  headers=directory_auth(shard_url))
    assert r.status_code in (200, 404), r.text
    return r.status_code == 200


async def test_move_in_flight_survives_a_directory_restart(procs: Procs) -> None:
    """A directory killed mid-move recovers it on restart: one owner, no acked message lost."""
    directory = procs.directory(env=DIRECTORY_ENV)
    db = procs.dir / "directory.db"
    shards = {i: procs.shard(i, directory.url, env=SHARD_ENV) for i in ("i1", "i2")}
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = await start_chatting([Chatter(directory.url, "r", f"u{k}", http)
                                         for k in range(3)])
        src = chatters[0].welcomes[0].instance
        to = "i2" if src == "i1" else "i1"
        os.kill(shards[to].popen.pid, signal.SIGSTOP)  # adopt hangs: the move stays frozen
        try:
            url = f"{directory.url}/v1/admin/rooms/r/move"

            def move() -> None:
                with contextlib.suppress(httpx.HTTPError):  # its directory gets killed
                    httpx.post(url, json={"to": to}, headers=ADMIN, timeout=t(60))

            mover = threading.Thread(target=move)
            mover.start()
            await await_until(lambda: "r" in _handoffs(shards[src].url)["frozen"], 10,
                              "the source frozen")
            for c in chatters:
                await c.send()  # held by the frozen source: not acked yet
            procs.kill(directory)
        finally:
            os.kill(shards[to].popen.pid, signal.SIGCONT)
        procs.procs.remove(directory)
        mover.join(t(10))
        directory = procs.start("directory", ["directory", "--port", str(directory.port)],
                                env=directory.env)
        await await_until(lambda: _move_state(db) == "aborted", 40, "the move recovered")
        await await_until(lambda: all(not c.unacked for c in chatters), 20, "held sends acked")
        top = max(s for c in chatters for s in c.acks.values())
        await await_until(lambda: all((c.last_seq or 0) >= top for c in chatters), 10, "caught up")
        for c in chatters:
            await c.stop()
    assert check_logs(chatters) == []
    room = (await asyncio.to_thread(httpx.get, f"{directory.url}/v1/admin/rooms/r",
                                    headers=ADMIN, timeout=t(5))).json()
    assert (room["instance"], room["state"]) == (src, "active")
    assert _loaded(shards[src].url, "r") and not _loaded(shards[to].url, "r")
    assert _handoffs(shards[src].url)["frozen"] == {} and _handoffs(shards[to].url)["adopted"] == {}
    assert all(len(c.welcomes) == 1 for c in chatters)  # served on, never closed
