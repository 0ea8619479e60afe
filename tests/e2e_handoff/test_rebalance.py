"""Rebalance after adding an instance: few moves, balanced load, performed for real."""

from __future__ import annotations

import asyncio

import httpx

from roomshard.testing.chatter import Chatter
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import Cluster, start_cluster

ROOMS = 40


def _check_plan(plan: dict, tolerance: float = 0.10) -> None:
    moves = plan["moves"]
    assert len(moves) <= 1.2 * plan["lower_bound"], (len(moves), plan["lower_bound"])
    assert len({m["room"] for m in moves}) == len(moves)
    after = plan["after"]
    mean = sum(v["ratio"] for v in after.values()) / len(after)
    assert max(v["ratio"] for v in after.values()) / mean <= 1 + tolerance


async def test_rebalance_after_adding_an_instance(procs: Procs) -> None:
    """After adding an instance: <= 1.2x the lower bound of moves, max/mean <= 1.1, dry run moves nothing, real run does."""
    cluster: Cluster = await asyncio.to_thread(start_cluster, procs, 2)

    async def admin(method: str, path: str, body: object = None) -> httpx.Response:
        return await asyncio.to_thread(cluster.admin, method, path, body)

    async def owners() -> dict[str, str]:
        rooms = (await admin("GET", "/v1/admin/rooms")).json()["rooms"]
        return {r["room"]: r["instance"] for r in rooms}

    async with httpx.AsyncClient(timeout=t(5)) as http:
        members = []
        for n in range(ROOMS):
            r = await http.post(f"{cluster.url}/v1/rooms/room{n}/connect", json={"user": "u"})
            assert r.status_code == 200
            # Some rooms have live members (weight 1 + connections), who follow moves.
            members += [Chatter(cluster.url, f"room{n}", f"m{k}", http) for k in range(n % 4)]
        for c in members:
            c.start()
        await await_until(lambda: all(c.opened.is_set() for c in members), 20, "members in")
        await asyncio.to_thread(cluster.add_shard, "i3")
        before = await owners()
        dry = await admin("POST", "/v1/admin/rebalance", {"dry_run": True})
        assert dry.status_code == 200, dry.text
        plan = dry.json()
        assert plan["moves"] and set(plan["before"]) == {"i1", "i2", "i3"}
        assert plan["before"]["i3"]["load"] == 0 and plan["dry_run"] is True
        _check_plan(plan)
        assert await owners() == before
        real = await admin("POST", "/v1/admin/rebalance", {"dry_run": False, "max_moves": 100})
        assert real.status_code == 200, real.text
        done = real.json()
        _check_plan(done)
        assert done["failed"] == [] and len(done["performed"]) == len(done["moves"])
        now = await owners()
        assert all(now[m["room"]] == m["to"] == "i3" for m in done["moves"])
        moved = {m["room"] for m in done["moves"]}
        followers = [c for c in members if c.room in moved]
        await await_until(lambda: all(len(c.welcomes) > 1 for c in followers), 10,
                          "members of moved rooms back")
        assert all(c.welcomes[-1].instance == "i3" for c in followers)
        again = (await admin("POST", "/v1/admin/rebalance", {})).json()
        assert (again["moves"], again["balanced"]) == ([], True), again
        for c in members:
            await c.stop()


async def test_rebalance_never_moves_rooms_to_an_instance_that_never_heartbeated(
        procs: Procs) -> None:
    """An admin-registered instance (counted active for a while, never heartbeated) gets no
    planned rebalance move: it never answered, and a move there would only fail."""
    cluster: Cluster = await asyncio.to_thread(start_cluster, procs, 1)
    async with httpx.AsyncClient(timeout=t(5)) as http:
        for n in range(8):
            r = await http.post(f"{cluster.url}/v1/rooms/room{n}/connect", json={"user": "u"})
            assert r.status_code == 200, r.text
    r = await asyncio.to_thread(cluster.admin, "PUT", "/v1/admin/instances/i9",
                                {"internal_url": "http://127.0.0.1:9"})
    assert r.status_code in (200, 201), r.text
    assert (await asyncio.to_thread(cluster.states))["i9"] == "active"
    plan = (await asyncio.to_thread(cluster.admin, "POST", "/v1/admin/rebalance",
                                    {"dry_run": True})).json()
    assert [m for m in plan["moves"] if m["to"] == "i9"] == [], plan
