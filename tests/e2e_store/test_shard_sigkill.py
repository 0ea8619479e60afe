"""With a message store, no acked message is lost: not by SIGKILL of a shard, not by
killing every roomshard process, not by a crash of the store's database.

Real processes: one directory and two shards sharing a message store (a SQLite
file, or a real PostgreSQL); real WebSocket clients chatting in every room while
something is killed. Every member comes back by itself; every acked message is
stored once and in every member's log, contiguous, in seq order; a member that
comes back to a reopened room resumes with ``recovered: true``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

from roomshard.store.messages import MessageStore
from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.pg import PgServer
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.conftest import _have_postgres
from tests.e2e_handoff.conftest import DIRECTORY_ENV, SHARD_ENV

pytestmark = pytest.mark.e2e

ROOMS = 6
MEMBERS = 3


@pytest.fixture(scope="module")
def durable_pg() -> Iterator[PgServer]:
    """A PostgreSQL whose committed transactions survive an immediate stop (a crash)."""
    if not _have_postgres():
        pytest.skip("PostgreSQL binaries not installed")
    server = PgServer(durable=True)
    server.start()
    yield server
    server.destroy()


async def keep_sending(chatters: list[Chatter], stop: asyncio.Event) -> None:
    """Every member sends a message every 100 ms (half its rate limit) until ``stop``."""
    while not stop.is_set():
        for c in chatters:
            await c.send()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


@contextlib.asynccontextmanager
async def chatting(directory_url: str):
    async with httpx.AsyncClient(timeout=t(5)) as http:
        rooms = {f"r{n}": [Chatter(directory_url, f"r{n}", f"u{k}", http) for k in range(MEMBERS)]
                 for n in range(ROOMS)}
        try:
            yield rooms
        finally:
            for cs in rooms.values():
                for c in cs:
                    await c.stop()


async def outage_under_traffic(rooms: dict[str, list[Chatter]],
                               outage: Callable[[], Awaitable[None]],
                               hit: Callable[[], set[str]]) -> None:
    """Chat in every room, run ``outage`` under the traffic, go on until the rooms in
    ``hit()`` are back with traffic after it, then stop and let every member catch up."""
    everyone = [c for cs in rooms.values() for c in cs]
    await start_chatting(everyone)
    stop = asyncio.Event()
    sender = asyncio.get_running_loop().create_task(keep_sending(everyone, stop))
    try:
        await await_until(lambda: all(len(c.acks) >= 5 for c in everyone), 20,
                          "live traffic in every room")
        before = {id(c): len(c.acks) for c in everyone}
        await outage()
        back = [c for r in hit() for c in rooms[r] if id(c) in before]  # (not newcomers)
        await await_until(lambda: all(len(c.acks) >= before[id(c)] + 5 for c in back), 40,
                          "traffic after the outage")
    finally:
        stop.set()
        await sender
    await await_until(lambda: all(not c.unacked for c in everyone), 20, "every send acked")
    await await_until(lambda: all(c.last_seq == max(x.last_seq or 0 for x in cs)
                                  for cs in rooms.values() for c in cs), 10,
                      "every member at its room's latest seq")


async def assert_nothing_acked_is_lost(rooms: dict[str, list[Chatter]], store_url: str) -> None:
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


def store_env(store_url: str) -> dict[str, str]:
    # The members of a killed shard resend everything they sent during the outage at once:
    # a burst above the default rate burst (these tests are about the store, not the limits).
    return {**SHARD_ENV, "ROOMSHARD_HISTORY_URL": store_url, "ROOMSHARD_RATE_BURST": "1000"}


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_sigkill_of_a_shard_loses_no_acked_message(procs: Procs, store: str,
                                                         request: pytest.FixtureRequest) -> None:
    store_url = (f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}" if store == "sqlite"
                 else request.getfixturevalue("durable_pg").create_database())
    directory = procs.directory(env=DIRECTORY_ENV)
    shards = {i: procs.shard(i, directory.url, env=store_env(store_url)) for i in ("i1", "i2")}
    async with chatting(directory.url) as rooms:
        victim = ""

        async def kill_one() -> None:
            nonlocal victim
            victim = rooms["r0"][0].welcomes[0].instance
            procs.kill(shards[victim])

        def hit() -> set[str]:
            return {r for r, cs in rooms.items() if cs[0].welcomes[0].instance == victim}

        await outage_under_traffic(rooms, kill_one, hit)
        for room in hit():
            for c in rooms[room]:
                again = c.welcomes[-1]
                assert again.instance != victim and again.recovered is True, (room, c.user, again)
        await assert_nothing_acked_is_lost(rooms, store_url)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_killing_every_roomshard_process_loses_no_acked_message(
        procs: Procs, store: str, request: pytest.FixtureRequest) -> None:
    """SIGKILL of the directory and every shard at once, then all started again (the
    directory on its address): every room reopens from the store."""
    store_url = (f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}" if store == "sqlite"
                 else request.getfixturevalue("durable_pg").create_database())
    directory = procs.directory(env=DIRECTORY_ENV)
    shards = [procs.shard(i, directory.url, env=store_env(store_url)) for i in ("i1", "i2")]
    async with chatting(directory.url) as rooms:
        async def kill_everything() -> None:
            for proc in [directory, *shards]:
                procs.kill(proc)
            procs.restart(directory, same_port=True)
            for s in shards:
                procs.restart(s)

        await outage_under_traffic(rooms, kill_everything, lambda: set(rooms))
        for room, cs in rooms.items():
            for c in cs:
                assert len(c.welcomes) > 1 and c.welcomes[-1].recovered is True, (room, c.user)
        await assert_nothing_acked_is_lost(rooms, store_url)


async def metric(http: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await http.get(f"{url}/metrics")).text
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.postgres
async def test_a_crash_of_the_store_s_database_loses_nothing_and_chat_heals(
        procs: Procs, durable_pg: PgServer) -> None:
    """PostgreSQL stopped (immediately) under traffic for a few seconds: sends get
    ``unavailable``, nothing unstored is acked, what waits for the store stays within its
    bound, and chat goes on by itself once PostgreSQL is back."""
    store_url = durable_pg.create_database()
    queue_bytes = 64 * 1024
    # Members resend refused messages every 200 ms: well over the default rate limit.
    env = {**store_env(store_url), "ROOMSHARD_STORE_WAIT": "1", "ROOMSHARD_RATE": "1000",
           "ROOMSHARD_STORE_QUEUE_BYTES": str(queue_bytes)}
    directory = procs.directory(env=DIRECTORY_ENV)
    shards = [procs.shard(i, directory.url, env=env) for i in ("i1", "i2")]
    waiting: list[float] = []
    async with chatting(directory.url) as rooms, httpx.AsyncClient(timeout=t(5)) as http:
        async def crash_the_database() -> None:
            await asyncio.to_thread(durable_pg.stop, "immediate")
            try:
                await await_until(lambda: sum(c.unavailable for cs in rooms.values()
                                              for c in cs) >= 20, 20, "sends refused")
                for s in shards:  # what waits is bounded while the store is down
                    waiting.append(await metric(http, s.url, "roomshard_shard_store_waiting_bytes"))
            finally:
                await asyncio.to_thread(durable_pg.start)

        await outage_under_traffic(rooms, crash_the_database, lambda: set(rooms))
        # (The bound is checked before a message is taken: one message may go past it.)
        assert waiting and all(0 <= w <= queue_bytes + 1024 for w in waiting), waiting
        assert any(w > 0 for w in waiting), waiting  # messages did wait: the bound was in play
        for cs in rooms.values():
            for c in cs:
                assert len(c.welcomes) == 1, (c.room, c.user, c.closes)  # nobody was dropped
        await assert_nothing_acked_is_lost(rooms, store_url)
