"""A drain whose planned target has just died moves the rooms to a live one (R2).

Three shards, every room (members, acked messages) on i1; i2 is SIGKILLed and
i1 drained right after -- by SIGTERM and by the admin drain. i2 still counts
as active (``down_after`` has not passed) so the plan sends rooms to it; their
moves fail and must be retargeted to i3: every room ends on i3, its members
resume with ``recovered: true`` and no acked message is lost.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import Cluster, start_cluster

ROOMS = 6
CLIENTS = 2


@pytest.mark.parametrize("how", ["sigterm", "admin"])
async def test_drain_retargets_moves_off_a_target_that_just_died(procs: Procs, how: str) -> None:
    cluster: Cluster = start_cluster(procs, 1)  # only i1: every room is placed there
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = {f"r{n}": [Chatter(cluster.url, f"r{n}", f"u{k}", http) for k in range(CLIENTS)]
                    for n in range(ROOMS)}
        every = [c for cs in chatters.values() for c in cs]
        await start_chatting(every, open_timeout=30)
        assert {c.welcomes[0].instance for c in every} == {"i1"}
        for i in ("i2", "i3"):
            cluster.add_shard(i)
        for i in ("i2", "i3"):
            await asyncio.to_thread(cluster.wait_state, i, "active")
        cluster.procs.kill(cluster.shards["i2"])  # still "active" for down_after
        if how == "sigterm":
            code = await asyncio.to_thread(cluster.procs.terminate, cluster.shards["i1"], 60)
            assert code == 0
        else:
            r = await asyncio.to_thread(cluster.admin, "POST", "/v1/admin/instances/i1/drain", {})
            assert r.status_code == 200, r.text
            report = r.json()
            assert report["complete"] is True and report["failed"] == [], report
        for c in every:
            await c.send()
        await await_until(lambda: all(not c.unacked for c in every), 20, "sends after the drain")
        for room, cs in chatters.items():
            top = max(s for c in cs for s in c.acks.values())
            await await_until(lambda cs=cs, top=top: all((c.last_seq or 0) >= top for c in cs),
                              10, f"members of {room} caught up")
        for c in every:
            await c.stop()
    for room, cs in chatters.items():
        assert cluster.room(room)["instance"] == "i3", room
        assert check_logs(cs) == [], room
    for c in every:
        assert [(w.instance, w.recovered) for w in c.welcomes[1:]][:1] == [("i3", True)], c.welcomes
    assert cluster.states()["i1"] == "disabled"
