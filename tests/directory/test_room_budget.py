"""Room floods: the room-creation budget (429) and the removal of rooms nobody joined.

Real directory and shard processes. One user creating rooms as fast as it
can gets 429 ``rate_limited`` with ``Retry-After`` once its budget (60 new
rooms a minute by default) is spent, while it can still join existing rooms
and other users still create theirs; an optional per-address budget does the
same for self-declared open-mode users. A room no member ever joined is
removed after ``ROOMSHARD_ROOM_UNUSED_TTL`` (also by two replicas sweeping
one PostgreSQL database at once), and its instance's room count with it; a
joined room and an admin's private room stay.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from roomshard.testing.procs import TEST_ADMIN_TOKEN, Proc, Procs
from roomshard.testing.timing import await_until, t
from tests.shard.conftest import recv_until

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


async def _connect(http: httpx.AsyncClient, directory: Proc, room: str, user: str) -> httpx.Response:
    return await http.post(f"{directory.url}/v1/rooms/{room}/connect", json={"user": user},
                           timeout=t(10))


async def _rooms(http: httpx.AsyncClient, directory: Proc) -> set[str]:
    resp = await http.get(f"{directory.url}/v1/admin/rooms", headers=ADMIN, timeout=t(10))
    assert resp.status_code == 200, resp.text
    return {r["room"] for r in resp.json()["rooms"]}


async def _instance(http: httpx.AsyncClient, directory: Proc, iid: str) -> dict[str, Any]:
    resp = await http.get(f"{directory.url}/v1/admin/instances", headers=ADMIN, timeout=t(10))
    return next(i for i in resp.json()["instances"] if i["id"] == iid)


def _assert_429(resp: httpx.Response) -> None:
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == "rate_limited"
    assert int(resp.headers["retry-after"]) >= 1


async def test_a_room_flooder_gets_429_while_others_and_existing_rooms_are_untouched():
    with Procs() as p:
        directory = p.directory()
        p.shard("i1", directory.url)
        async with httpx.AsyncClient() as http:
            statuses = [(await _connect(http, directory, f"junk{n}", "flooder")).status_code
                        for n in range(60)]
            assert statuses == [200] * 60
            _assert_429(await _connect(http, directory, "junk60", "flooder"))
            # Joining an existing room is never counted, for the flooder too.
            assert (await _connect(http, directory, "junk3", "flooder")).status_code == 200
            # Another user creates rooms and joins them as usual, quickly.
            started = time.monotonic()
            for n in range(5):
                assert (await _connect(http, directory, f"mine{n}", "alice")).status_code == 200
            assert time.monotonic() - started < t(2)
            assert "junk60" not in await _rooms(http, directory)
            metrics = (await http.get(f"{directory.url}/metrics")).text
            assert 'roomshard_directory_room_creates_refused_total{budget="user"} 1.0' in metrics


async def test_the_budget_is_a_setting_and_an_optional_per_address_budget():
    with Procs() as p:
        off = p.directory("dir-off", env={"ROOMSHARD_ROOM_CREATE_RATE": "0"})
        p.shard("i1", off.url)
        per_address = p.directory("dir-addr", env={"ROOMSHARD_ROOM_CREATE_RATE_PER_ADDRESS": "5"})
        p.shard("i2", per_address.url)
        async with httpx.AsyncClient() as http:
            for n in range(80):  # no budget: as many as asked
                assert (await _connect(http, off, f"r{n}", "bulk")).status_code == 200
            # Five self-declared users from one address share its budget of 5.
            for n in range(5):
                assert (await _connect(http, per_address, f"a{n}", f"u{n}")).status_code == 200
            _assert_429(await _connect(http, per_address, "a5", "u5"))
            assert (await _connect(http, per_address, "a0", "u9")).status_code == 200


async def test_rooms_nobody_joined_are_removed_after_the_ttl():
    with Procs() as p:
        directory = p.directory(env={"ROOMSHARD_ROOM_UNUSED_TTL": "1"})
        p.shard("i1", directory.url)
        async with httpx.AsyncClient() as http:
            resp = await http.put(f"{directory.url}/v1/admin/rooms/vip/access", headers=ADMIN,
                                  json={"private": True, "members": ["alice"]}, timeout=t(10))
            assert resp.status_code == 200, resp.text
            for n in range(5):
                assert (await _connect(http, directory, f"idle{n}", f"u{n}")).status_code == 200
            used = (await _connect(http, directory, "used", "alice")).json()["url"]
            async with connect(used, open_timeout=t(10)) as ws:
                await recv_until(ws, "welcome")
            assert (await _instance(http, directory, "i1"))["rooms_assigned"] == 6

            async def idle_gone() -> bool:
                return not any(r.startswith("idle") for r in await _rooms(http, directory))

            await await_until(idle_gone, 10, "the unused rooms to be removed")
            assert {"used", "vip"} <= await _rooms(http, directory)
            assert (await _instance(http, directory, "i1"))["rooms_assigned"] == 1
            # A removed room is created again on the next connect, as new.
            assert (await _connect(http, directory, "idle0", "u0")).status_code == 200
            # With only the joined room assigned, the instance could be removed after a drain.
            metrics = (await http.get(f"{directory.url}/metrics")).text
            assert "roomshard_directory_rooms_removed_total 5.0" in metrics


@pytest.mark.postgres
async def test_two_replicas_sweep_one_database_without_conflict(pg_url):
    with Procs() as p:
        env = {"ROOMSHARD_ROOM_UNUSED_TTL": "1", "ROOMSHARD_ROOM_CREATE_RATE": "0"}
        first = p.directory("dir-a", database_url=pg_url, env=env)
        second = p.directory("dir-b", database_url=pg_url, env=env)
        p.shard("i1", first.url)
        async with httpx.AsyncClient() as http:
            for start in range(0, 700, 50):  # more rooms than one sweep batch (500)
                answers = await asyncio.gather(*(
                    _connect(http, first if n % 2 else second, f"idle{n}", "u")
                    for n in range(start, start + 50)))
                assert {a.status_code for a in answers} == {200}

            async def all_gone() -> bool:
                return not await _rooms(http, first)

            await await_until(all_gone, 20, "every unused room to be removed")
            assert (await _instance(http, second, "i1"))["rooms_assigned"] == 0
            # Each room was removed once: the replicas' counts add up to exactly 700.
            removed = 0.0
            for proc in (first, second):
                for line in (await http.get(f"{proc.url}/metrics")).text.splitlines():
                    if line.startswith("roomshard_directory_rooms_removed_total "):
                        removed += float(line.split()[1])
            assert removed == 700
        for proc in (first, second):
            assert "Traceback" not in proc.output()
