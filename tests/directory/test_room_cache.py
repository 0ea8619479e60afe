"""The PostgreSQL room cache (``directory.db.room_cache``): connects to served rooms
answered without a round trip, and never from what another replica has changed.

Two real directory processes on one real PostgreSQL: one (A) answers the
connects, the other (B) makes the changes a connect depends on (a room made
private, its owner disabled, and the instance that owns it re-registered), as
another replica, a move or an operator would. A must see each change within
the notification's delay, far below the cache's TTL; and when A's listening
connection is cut, A goes on answering right.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import asyncpg
import httpx
import pytest

from directory.db.room_cache import APPLICATION_NAME, MAX_NOTIFIED, TTL_S, RoomCache
from roomshard.testing.metrics import sample
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import await_until, t
from tests.directory.test_connect_now import _ask
from tests.directory.test_connect_storm import _post
from tests.directory.test_processes import register

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


async def _connect(http: httpx.AsyncClient, base: str, user: str = "bob") -> httpx.Response:
    """One connect written whole, as a browser or the Node client writes it (httpx writes
    the body apart from the headers: the HTTP edge then takes the general way)."""
    [(status, headers, body)] = await _ask(base, _post("/v1/rooms/cached/connect",
                                                       {"user": user}))
    return httpx.Response(status, headers=headers, json=body)


async def _metric(http: httpx.AsyncClient, base: str, series: str) -> float | None:
    return sample((await http.get(f"{base}/metrics")).text, series)


async def _within(what: str, check, seconds: float = 2.0) -> None:
    """``check()`` holds within ``seconds`` (a notification's delay), far below the TTL."""
    assert seconds < TTL_S
    started = time.monotonic()
    await await_until(check, seconds, what)
    assert time.monotonic() - started < seconds


async def test_connects_come_from_the_cache_and_see_every_change_made_elsewhere(
        procs: Procs, pg_url: str) -> None:
    env = {"ROOMSHARD_DOWN_AFTER": "600"}
    a = procs.directory("dir-a", database_url=pg_url, env=env)
    b = procs.directory("dir-b", database_url=pg_url, env=env)
    async with httpx.AsyncClient(timeout=t(10)) as http:
        await register(http, b.url, "i1")
        await await_until(lambda: _is(http, a.url, "roomshard_directory_room_cache_live", 1),
                          10, "A's cache listening")
        first = await _connect(http, a.url)
        assert (first.status_code, first.json()["instance"]) == (200, "i1"), first.text
        # A placed the room and kept its lookup: the next connects come from the cache.
        before = await _metric(http, a.url, "roomshard_directory_connects_answered_at_once_total")
        for _ in range(5):
            r = await _connect(http, a.url)
            assert (r.status_code, r.json()["instance"], r.json()["epoch"]) == (200, "i1", 1)
        after = await _metric(http, a.url, "roomshard_directory_connects_answered_at_once_total")
        assert after == before + 5  # every one from the cache

        # B makes the room private: A refuses a non-member at once.
        put = await http.put(f"{b.url}/v1/admin/rooms/cached/access", headers=ADMIN,
                             json={"private": True, "members": ["bob"]})
        assert put.status_code == 200, put.text

        async def refused() -> bool:
            return (await _connect(http, a.url, "mallory")).status_code == 403

        await _within("A refusing a non-member", refused)
        assert (await _connect(http, a.url, "bob")).status_code == 200

        # B disables the owner, and i2 registers: A places the room anew, on i2.
        await register(http, b.url, "i2")
        off = await http.put(f"{b.url}/v1/admin/instances/i1", headers=ADMIN,
                             json={"state": "disabled"})
        assert off.status_code == 200, off.text

        async def moved() -> bool:
            r = await _connect(http, a.url)
            return r.status_code == 200 and r.json()["instance"] == "i2"

        await _within("A answering the new owner", moved)
        assert (await _connect(http, a.url)).json()["epoch"] == 2

        # A's listening connection is cut: A answers right meanwhile, and listens again.
        async with _pg(pg_url) as conn:
            cut = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1", APPLICATION_NAME)
        assert cut >= 1
        put = await http.put(f"{b.url}/v1/admin/rooms/cached/access", headers=ADMIN,
                             json={"private": True, "members": ["carol"]})
        assert put.status_code == 200, put.text
        await _within("A refusing bob", lambda: _status(http, a.url, "bob", 403))
        await await_until(lambda: _is(http, a.url, "roomshard_directory_room_cache_live", 1),
                          10, "A's cache listening again")
        for _ in range(3):
            assert (await _connect(http, a.url, "carol")).status_code == 200
            assert (await _connect(http, a.url, "bob")).status_code == 403


async def _is(http: httpx.AsyncClient, base: str, series: str, value: float) -> bool:
    return await _metric(http, base, series) == value


async def _status(http: httpx.AsyncClient, base: str, user: str, status: int) -> bool:
    return (await _connect(http, base, user)).status_code == status


class _pg:
    """An asyncpg connection to the test database (SQLAlchemy's URL, plain)."""

    def __init__(self, url: str) -> None:
        self.dsn = url.replace("postgresql+asyncpg://", "postgresql://")

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await asyncpg.connect(self.dsn)
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


ROW = {"instance": "i1", "epoch": 1, "private": False, "members": None}


def _live(cache: RoomCache) -> RoomCache:
    """``cache`` listening, with instance i1 known (as after its first re-read)."""
    cache.live = True
    cache._instances["i1"] = {"state": "active", "internal_url": "http://s", "public_base": None,
                              "last_heartbeat": 1.0, "registered_at": 0.0}
    return cache


def test_a_lookup_read_while_a_change_was_notified_is_not_kept() -> None:
    """The fill race: a row read before a change commits, kept after its notification
    arrived, would stay stale. The token taken before the read says a notification
    came meanwhile, and the row is not kept."""
    cache, row = _live(RoomCache("postgresql://unused", "unused")), ROW
    token = cache.token()
    cache._room_changed(None, 0, "roomshard_rooms", "r")  # arrives while the read is out
    cache.put("r", row, token, now=0.0)
    assert cache.get("r", now=0.0) is None
    cache.put("r", row, cache.token(), now=0.0)
    assert cache.get("r", now=0.0)["epoch"] == 1
    assert cache.get("r", now=TTL_S + 1) is None  # expired
    cache._instance_changed(None, 0, "roomshard_instances", "i1")
    assert cache.get("r", now=0.0) is None  # its owner is being re-read
    cache._lost(None)
    assert not cache.live and len(cache) == 0


def test_a_change_to_one_room_does_not_void_the_lookups_of_others() -> None:
    """Only a notification for the room read (or a start-over) keeps its row out: a storm
    that places hundreds of rooms still fills the cache with each."""
    cache, row = _live(RoomCache("postgresql://unused", "unused")), ROW
    token = cache.token()
    cache._room_changed(None, 0, "roomshard_rooms", "other")
    cache.put("r", row, token, now=0.0)
    assert cache.get("r", now=0.0)["epoch"] == 1
    cache.put("other", row, token, now=0.0)  # its own change arrived after the read began
    assert cache.get("other", now=0.0) is None
    # Too many rooms changed to remember each: every lookup still out is not kept.
    token = cache.token()
    for n in range(MAX_NOTIFIED):
        cache._room_changed(None, 0, "roomshard_rooms", f"busy{n}")
    cache.put("quiet", row, token, now=0.0)
    assert cache.get("quiet", now=0.0) is None
    cache.put("quiet", row, cache.token(), now=0.0)
    assert cache.get("quiet", now=0.0) is not None
    # A start-over voids what was read before it.
    token = cache.token()
    cache._lost(None)
    _live(cache)
    cache.put("late", row, token, now=0.0)
    assert cache.get("late", now=0.0) is None



def _instance_row(iid: str, number: int, rooms: int) -> dict[str, object]:
    return {"id": iid, "number": number, "state": "active", "capacity": 100,
            "rooms_assigned": rooms, "load_connections": 0, "last_heartbeat": 1.0,
            "registered_at": 0.0, "internal_url": f"http://{iid}", "public_base": None}


def test_placement_view_counts_this_replicas_placements_until_the_next_read() -> None:
    """New rooms placed from the cache's view of the instances: a placement counts from
    its choice on (placements at the same moment spread), a failed one is given back,
    and the next read of the instances replaces what this replica counted."""
    cache = RoomCache("postgresql://unused", "unused")
    assert cache.placement_view() is None  # not listening
    cache.live = True
    cache._instances = {"i1": _instance_row("i1", 1, 5), "i2": _instance_row("i2", 2, 7)}

    def rooms() -> dict[str, int]:
        view = cache.placement_view()
        assert view is not None
        return {r["id"]: r["rooms_assigned"] for r in view}

    assert rooms() == {"i1": 5, "i2": 7}
    cache.placing("i1")
    cache.placing("i1")
    assert rooms() == {"i1": 7, "i2": 7}
    cache.placement_done("i1", placed=False)  # another replica placed that room first
    cache.placement_done("i1", placed=True)
    cache.count_placed("i2")  # placed from the database's view
    assert rooms() == {"i1": 6, "i2": 8}
    # The next read counts those rooms itself (the cache's loop: what was placed when
    # the read began, then the rows).
    cache._placed_read = dict(cache._placed)
    cache._instances = {"i1": _instance_row("i1", 1, 6), "i2": _instance_row("i2", 2, 8)}
    assert rooms() == {"i1": 6, "i2": 8}
    # An instance changed: no view until the instances are read again.
    cache._instance_changed(None, 0, "roomshard_instances", "i2")
    assert cache.placement_view() is None


def test_a_room_placed_here_is_kept_unless_it_changed_meanwhile() -> None:
    cache = _live(RoomCache("postgresql://unused", "unused"))
    token = cache.token()
    cache.keep_new_room("new", "i1", token, now=0.0)
    row = cache.get("new", now=0.0)
    assert row is not None and (row["instance"], row["epoch"], row["private"]) == ("i1", 1, False)
    token = cache.token()
    cache._room_changed(None, 0, "roomshard_rooms", "moved")  # moved right after its insert
    cache.keep_new_room("moved", "i1", token, now=0.0)
    assert cache.get("moved", now=0.0) is None


async def test_new_rooms_placed_from_the_cache_spread_and_skip_a_disabled_instance(
        procs: Procs, pg_url: str) -> None:
    """A burst of new rooms through one replica spreads evenly over the instances (the
    view counts each placement from its choice on), each answered from the cache next;
    an instance another replica disables gets no new room once its change is notified."""
    env = {"ROOMSHARD_DOWN_AFTER": "600"}
    a = procs.directory("dir-a", database_url=pg_url, env=env)
    b = procs.directory("dir-b", database_url=pg_url, env=env)
    async with httpx.AsyncClient(timeout=t(10)) as http:
        await register(http, b.url, "i1", "i2", "i3")
        await await_until(lambda: _is(http, a.url, "roomshard_directory_room_cache_live", 1),
                          10, "A's cache listening")
        rooms = [f"burst-{n}" for n in range(30)]
        answers = await asyncio.gather(*(_ask(a.url, _post(f"/v1/rooms/{room}/connect",
                                                           {"user": "bob"})) for room in rooms))
        assert all(status == 200 for [(status, _, _)] in answers), answers[:3]
        per_instance = Counter(body["instance"] for [(_, _, body)] in answers)
        assert sorted(per_instance) == ["i1", "i2", "i3"], per_instance
        assert max(per_instance.values()) - min(per_instance.values()) <= 2, per_instance

        before = await _metric(http, a.url, "roomshard_directory_connects_answered_at_once_total")
        again = await asyncio.gather(*(_ask(a.url, _post(f"/v1/rooms/{room}/connect",
                                                         {"user": "carol"})) for room in rooms))
        assert [body["instance"] for [(_, _, body)] in again] == \
            [body["instance"] for [(_, _, body)] in answers]
        after = await _metric(http, a.url, "roomshard_directory_connects_answered_at_once_total")
        assert after == (before or 0) + len(rooms)  # each kept when it was placed

        off = await http.put(f"{b.url}/v1/admin/instances/i3", headers=ADMIN,
                             json={"state": "disabled"})
        assert off.status_code == 200, off.text
        fresh = iter(range(1000))

        async def not_on_i3() -> bool:
            [(status, _, body)] = await _ask(a.url, _post(f"/v1/rooms/later-{next(fresh)}/connect",
                                                          {"user": "bob"}))
            return status == 200 and body["instance"] != "i3"

        await _within("A placing no new room on i3", not_on_i3)
        later = await asyncio.gather(*(_ask(a.url, _post(f"/v1/rooms/last-{n}/connect",
                                                         {"user": "bob"})) for n in range(12)))
        assert {body["instance"] for [(_, _, body)] in later} == {"i1", "i2"}
