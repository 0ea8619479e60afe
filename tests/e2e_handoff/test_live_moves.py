"""Live moves and a drain under continuous chat: nothing acked is lost, duplicated or reordered.

Size: ``ROOMSHARD_E2E_ROOMS`` rooms x ``ROOMSHARD_E2E_CLIENTS`` clients
(default 30 x 4 here, on 2 shared cores; ``bench/handoff.py`` runs the
issue's 200 x 10).
"""

from __future__ import annotations

import asyncio
import os
import random

import httpx
import pytest

from roomshard.store.messages import MessageStore
from roomshard.testing.chatter import Chatter, check_logs
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import Cluster, start_cluster

ROOMS = int(os.environ.get("ROOMSHARD_E2E_ROOMS", "30"))
CLIENTS = int(os.environ.get("ROOMSHARD_E2E_CLIENTS", "4"))
SEND_EVERY_S = 0.4


def _freeze_batches(cluster: Cluster) -> tuple[float, float]:
    """(freeze requests, rooms frozen) from the directory's metrics."""
    text = httpx.get(f"{cluster.url}/metrics", timeout=t(10)).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("roomshard_directory_handoff_batch")}
    return (values['roomshard_directory_handoff_batches_total{step="freeze"}'],
            values['roomshard_directory_handoff_batch_items_total{step="freeze"}'])


async def _admin(cluster: Cluster, method: str, path: str, body: object = None) -> httpx.Response:
    return await asyncio.to_thread(cluster.admin, method, path, body)


async def _chat(chatters: list[Chatter], stop: asyncio.Event) -> int:
    """Every chatter sends one message every ~SEND_EVERY_S until ``stop``; returns how many."""
    rng = random.Random(7)
    sent = 0
    while not stop.is_set():
        for c in chatters:
            if rng.random() < 0.5:
                await c.send()
                sent += 1
        await asyncio.sleep(SEND_EVERY_S / 2)
    return sent


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cluster(request: pytest.FixtureRequest, procs: Procs) -> Cluster:
    """Three shards without a message store, or sharing one (a SQLite file, a real
    PostgreSQL)."""
    if request.param == "memory":
        return start_cluster(procs, 3)
    store_url = (f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}" if request.param == "sqlite"
                 else request.getfixturevalue("pg_url"))
    return start_cluster(procs, 3, shard_env={"ROOMSHARD_HISTORY_URL": store_url})


async def test_moves_and_a_drain_under_load_lose_nothing(cluster: Cluster) -> None:
    """Moves of 20% of the rooms (with a store: 20 moves) and a drain mid-chat: every acked
    message reaches every member once, in order, gap-free, recovered: true; with a store,
    every acked message is stored once under its seq."""
    rooms = [f"room{n}" for n in range(ROOMS)]
    store_url = cluster.shard_env.get("ROOMSHARD_HISTORY_URL")
    moves = 20 if store_url else max(1, ROOMS // 5)
    gate = asyncio.Semaphore(64)
    async with httpx.AsyncClient(timeout=t(10)) as http:
        chatters = {r: [Chatter(cluster.url, r, f"u{k}", http, gate=gate) for k in range(CLIENTS)]
                    for r in rooms}
        everyone = [c for cs in chatters.values() for c in cs]
        for c in everyone:
            c.start()
        await await_until(lambda: all(c.opened.is_set() for c in everyone), 60, "all clients open")
        stop = asyncio.Event()
        chat = asyncio.create_task(_chat(everyone, stop))
        try:
            # Traffic flowing before the first move: every chatter has an ack.
            await await_until(lambda: all(c.acks for c in everyone), 30, "first acks")
            moved = []
            for room in rooms * 2:  # between i1 and i2: i3's rooms are left for the drain
                if len(moved) == moves:
                    break
                src = (await _admin(cluster, "GET", f"/v1/admin/rooms/{room}")).json()["instance"]
                if src == "i3":
                    continue
                to = "i1" if src != "i1" else "i2"
                r = await _admin(cluster, "POST", f"/v1/admin/rooms/{room}/move", {"to": to})
                assert r.status_code == 200, r.text
                rep = r.json()
                assert (rep["room"], rep["from"], rep["to"], rep["members"]) == (room, src, to,
                                                                                 CLIENTS)
                assert rep["messages_transferred"] > 0 and rep["pause_ms"] >= 0
                moved.append(rep)
            r = await _admin(cluster, "POST", "/v1/admin/instances/i3/drain")
            assert r.status_code == 200, r.text
            drain = r.json()
            assert (drain["state"], drain["failed"], drain["complete"]) == ("disabled", [], True)
            assert drain["moved"] == drain["total"] > 0
            # The drain's rooms went through each step together: fewer freeze requests than rooms.
            batches, items = await asyncio.to_thread(_freeze_batches, cluster)
            assert items >= drain["moved"] and batches < items, (batches, items)
            # Traffic after the drain too: as many new acks as there are chatters.
            acked = sum(len(c.acks) for c in everyone)
            await await_until(lambda: sum(len(c.acks) for c in everyone) >= acked + len(everyone),
                              30, "acks after the drain")
        finally:
            stop.set()
            sent = await chat
        # Let every unacked send land and every member catch up with the last acked seq.
        await await_until(lambda: all(not c.unacked for c in everyone), 30, "every send acked")

        def caught_up() -> bool:
            for cs in chatters.values():
                top = max((s for c in cs for s in c.acks.values()), default=0)
                if any((c.last_seq or 0) < top for c in cs):
                    return False
            return True

        await await_until(caught_up, 30, "every member to see every acked message")
        for c in everyone:
            await c.stop()
    problems = [p for cs in chatters.values() for p in check_logs(cs)]
    assert problems == [], problems[:10]
    assert sum(len(c.acks) for c in everyone) == sent
    reconnects = [w for c in everyone for w in c.welcomes[1:]]
    moved_rooms = {m["room"] for m in moved} | {m["room"] for m in drain["moves"]}
    assert len(moved) == moves and len(moved_rooms) > len({m["room"] for m in moved})
    assert len(reconnects) >= len(moved_rooms) * CLIENTS  # each member of a moved room came back
    assert all(w.recovered is True for w in reconnects), [w for w in reconnects if not w.recovered]
    assert {c.closes[0] for cs in (chatters[r] for r in moved_rooms) for c in cs} == {4010}
    states = cluster.states()
    assert states["i3"] == "disabled"
    owners = {r: cluster.room(r)["instance"] for r in rooms}
    assert "i3" not in owners.values()
    if store_url:
        store = MessageStore(store_url)
        try:
            for room, cs in chatters.items():
                stored = {m.seq: m.id for m in await store.tail(room, 100_000)}
                acked = {seq: msg_id for c in cs for msg_id, seq in c.acks.items()}
                assert {s: stored.get(s) for s in acked} == acked, room
                assert len(set(stored.values())) == len(stored), room
        finally:
            await store.close()
