"""Randomized faults under chat: no message acked by two owners, nothing acked lost.

Real processes on one real PostgreSQL (the directory's database and the message
store): two directory replicas, three shards (i1 and i2 report to the first, i3
to the second), members chatting in every room, each asking one replica and the
other when it does not answer. A seeded schedule takes every fault once, in a
random order, with random victims and durations: a live move, a drain (then the
shard enabled again), SIGKILL of a shard (started again), SIGSTOP of a shard past
``down_after`` (then SIGCONT), SIGKILL of a directory replica (started again on
its address), SIGSTOP of a directory replica. After each, every member has new
acks before the next. At the end the history checker reads every member's log:
no seq acked for two messages (two owners), every acked message in every log
once, in order, without a gap; and the store holds each acked message once under
its seq. ``ROOMSHARD_CHAOS_SEED`` replays a schedule (the seed is in the failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable

import httpx
import pytest

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.pg import PgServer
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Proc, Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import DIRECTORY_ENV
from tests.e2e_store.test_shard_sigkill import (
    assert_nothing_acked_is_lost,
    durable_pg,  # noqa: F401 - the fixture, shared
    keep_sending,
    store_env,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
ROOMS = 6
MEMBERS = 3
FAULTS = ("move", "drain", "kill_shard", "stop_shard", "kill_directory", "stop_directory")
SEED = int(os.environ.get("ROOMSHARD_CHAOS_SEED", random.SystemRandom().randrange(1 << 30)))


class Chaos:
    """The cluster, its members, and one method per fault."""

    def __init__(self, procs: Procs, directories: list[Proc], shards: dict[str, Proc],
                 rooms: dict[str, list[Chatter]], http: httpx.AsyncClient,
                 rng: random.Random) -> None:
        self.procs = procs
        self.directories = directories
        self.shards = shards
        self.rooms = rooms
        self.everyone = [c for cs in rooms.values() for c in cs]
        self.http = http
        self.rng = rng
        self.done: list[str] = []

    async def admin(self, method: str, path: str, body: object = None) -> httpx.Response:
        """An admin call to the first replica that answers."""
        for d in self.rng.sample(self.directories, len(self.directories)):
            try:
                return await self.http.request(method, f"{d.url}{path}", json=body, headers=ADMIN)
            except httpx.HTTPError:
                continue
        raise AssertionError(f"no directory answered {method} {path}")

    async def states(self) -> dict[str, str]:
        listed = (await self.admin("GET", "/v1/admin/instances")).json()["instances"]
        return {i["id"]: i["state"] for i in listed}

    async def steady(self, what: str) -> None:
        """Every shard active again and new acks for every member."""
        async def all_active() -> bool:
            return set((await self.states()).values()) == {"active"}
        await await_until(all_active, 30, f"every shard active after {what}")
        before = {id(c): len(c.acks) for c in self.everyone}
        await await_until(lambda: all(len(c.acks) >= before[id(c)] + 3 for c in self.everyone),
                          40, f"traffic in every room after {what}")

    async def move(self) -> str:
        room = self.rng.choice(sorted(self.rooms))
        src = (await self.admin("GET", f"/v1/admin/rooms/{room}")).json()["instance"]
        to = self.rng.choice(sorted(set(self.shards) - {src}))
        r = await self.admin("POST", f"/v1/admin/rooms/{room}/move", {"to": to})
        assert r.status_code == 200, r.text
        return f"move {room} {src} -> {to}"

    async def drain(self) -> str:
        victim = self.rng.choice(sorted(self.shards))
        r = await self.admin("POST", f"/v1/admin/instances/{victim}/drain")
        assert r.status_code == 200, r.text
        report = r.json()
        assert (report["state"], report["failed"], report["complete"]) == ("disabled", [], True)
        r = await self.admin("PUT", f"/v1/admin/instances/{victim}", {"state": "active"})
        assert r.status_code == 200, r.text
        return f"drain {victim} ({report['moved']} rooms), enabled again"

    async def _kill_and_restart(self, proc: Proc, *, same_port: bool) -> tuple[Proc, float]:
        """SIGKILL ``proc``, wait the schedule's random pause, start it again."""
        pause = self.rng.uniform(0, 1)
        self.procs.kill(proc)
        await asyncio.sleep(pause)  # the schedule's delay before the restart
        return await asyncio.to_thread(self.procs.restart, proc, same_port=same_port), pause

    async def kill_shard(self) -> str:
        victim = self.rng.choice(sorted(self.shards))
        self.shards[victim], pause = await self._kill_and_restart(self.shards[victim],
                                                                  same_port=False)
        return f"SIGKILL {victim}, started again after {pause:.2f} s"

    async def stop_shard(self) -> str:
        victim = self.rng.choice(sorted(self.shards))
        pid = self.shards[victim].popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            async def down() -> bool:
                return (await self.states())[victim] == "down"
            await await_until(down, 20, f"{victim} down (silent past down_after)")
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP {victim} past down_after, then SIGCONT"

    async def kill_directory(self) -> str:
        n = self.rng.randrange(len(self.directories))
        # On its address: the shards that report to it, and its members, know that one.
        self.directories[n], pause = await self._kill_and_restart(self.directories[n],
                                                                  same_port=True)
        return f"SIGKILL directory {n + 1}, started again after {pause:.2f} s"

    async def stop_directory(self) -> str:
        n = self.rng.randrange(len(self.directories))
        pause = self.rng.uniform(0.5, 2)
        pid = self.directories[n].popen.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(pause)  # the schedule's length of the silence
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP directory {n + 1} for {pause:.2f} s"

    async def run(self, schedule: list[str]) -> None:
        for kind in schedule:
            fault: Callable[[], Awaitable[str]] = getattr(self, kind)
            self.done.append(await fault())
            await self.steady(self.done[-1])


async def test_randomized_faults_under_chat_lose_nothing_and_never_two_owners(
        procs: Procs, durable_pg: PgServer) -> None:  # noqa: F811 - the imported fixture
    rng = random.Random(SEED)
    schedule = list(FAULTS)
    rng.shuffle(schedule)
    database_url, store_url = durable_pg.create_database(), durable_pg.create_database()
    directories = [procs.directory(f"d{n}", database_url=database_url, env=DIRECTORY_ENV)
                   for n in (1, 2)]
    shards = {i: procs.shard(i, directories[0 if i != "i3" else 1].url, env=store_env(store_url))
              for i in ("i1", "i2", "i3")}
    urls = [d.url for d in directories]
    async with httpx.AsyncClient(timeout=t(5)) as http:
        rooms = {f"r{n}": [Chatter(urls[k % 2], f"r{n}", f"u{k}", http, replicas=[urls[(k + 1) % 2]])
                           for k in range(MEMBERS)] for n in range(ROOMS)}
        everyone = [c for cs in rooms.values() for c in cs]
        chaos = Chaos(procs, directories, shards, rooms, http, rng)
        stop = asyncio.Event()
        sender: asyncio.Task[None] | None = None
        try:
            await start_chatting(everyone)
            sender = asyncio.get_running_loop().create_task(keep_sending(everyone, stop))
            await chaos.run(schedule)
        except BaseException as exc:
            exc.add_note(f"ROOMSHARD_CHAOS_SEED={SEED}; faults done: {chaos.done}")
            raise
        finally:
            stop.set()
            if sender is not None:
                await sender
        try:
            await await_until(lambda: all(not c.unacked for c in everyone), 20, "every send acked")
            await await_until(lambda: all(c.last_seq == max(x.last_seq or 0 for x in cs)
                                          for cs in rooms.values() for c in cs), 10,
                              "every member at its room's latest seq")
            # With the store nothing was lost: every member that came back resumed whole.
            again = [(c.room, c.user, w) for c in everyone for w in c.welcomes[1:]]
            bad = sorted({room for room, _, w in again if w.recovered is not True})
            assert again and not bad, {r: {c.user: c.welcomes for c in rooms[r]} for r in bad}
            problems = {room: check_logs(cs) for room, cs in rooms.items()}
            assert not any(problems.values()), {
                room: (found[:3], {c.user: c.welcomes for c in rooms[room]})
                for room, found in problems.items() if found}
            await assert_nothing_acked_is_lost(rooms, store_url)
        except BaseException as exc:
            exc.add_note(f"ROOMSHARD_CHAOS_SEED={SEED}; faults done: {chaos.done}")
            raise
        finally:
            for c in everyone:
                await c.stop()
    assert len(chaos.done) == len(FAULTS), chaos.done
