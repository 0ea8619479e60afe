"""A shard that crashes or is stopped: its rooms go elsewhere (crash: recovered false; SIGTERM: a live drain)."""

from __future__ import annotations

import asyncio
import time

import httpx

from roomshard.testing.chatter import Chatter, check_logs
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import Cluster, start_cluster

ROOMS = 6
CLIENTS = 3


async def _open_chatters(cluster: Cluster, http: httpx.AsyncClient) -> dict[str, list[Chatter]]:
    chatters = {f"r{n}": [Chatter(cluster.url, f"r{n}", f"u{k}", http) for k in range(CLIENTS)]
                for n in range(ROOMS)}
    for cs in chatters.values():
        for c in cs:
            c.start()
    await await_until(lambda: all(c.opened.is_set() for cs in chatters.values() for c in cs),
                      30, "clients open")
    for cs in chatters.values():
        for c in cs:
            await c.send()
    await await_until(lambda: all(not c.unacked for cs in chatters.values() for c in cs), 10,
                      "first messages acked")
    return chatters


async def test_sigkill_shard_rooms_chat_again_elsewhere_recovered_false(cluster: Cluster) -> None:
    """After SIGKILL of a shard its clients chat on another shard within 10 s, recovered: false, at a higher epoch and seq."""
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = await _open_chatters(cluster, http)
        victim = chatters["r0"][0].welcomes[0].instance
        hit = {r: cs for r, cs in chatters.items() if cs[0].welcomes[0].instance == victim}
        before = {r: max(c.last_seq or 0 for c in cs) for r, cs in hit.items()}
        killed_at = time.monotonic()
        cluster.procs.kill(cluster.shards[victim])
        for cs in hit.values():
            for c in cs:
                await c.send()

        def all_back() -> bool:
            return all(len(c.welcomes) > 1 and not c.unacked for cs in hit.values() for c in cs)

        await await_until(all_back, 10, "the crashed shard's clients chatting elsewhere")
        took = time.monotonic() - killed_at
        for room, cs in hit.items():
            for c in cs:
                back = c.welcomes[-1]
                assert back.instance != victim and back.recovered is False
                assert back.epoch > c.welcomes[0].epoch
                assert min(c.acks.values()) <= before[room] < max(c.acks.values())
        for c in (c for cs in chatters.values() for c in cs):
            await c.stop()
    assert took < t(10)
    assert cluster.states()[victim] == "down"


async def test_sigterm_drains_the_shard_before_it_exits(cluster: Cluster) -> None:
    """SIGTERM live-moves the shard's rooms away first: recovered: true elsewhere, nothing acked lost, instance disabled."""
    async with httpx.AsyncClient(timeout=t(5)) as http:
        chatters = await _open_chatters(cluster, http)
        victim = chatters["r0"][0].welcomes[0].instance
        hit = {r: cs for r, cs in chatters.items() if cs[0].welcomes[0].instance == victim}
        code = await asyncio.to_thread(cluster.procs.terminate, cluster.shards[victim])
        assert code == 0
        for cs in hit.values():
            for c in cs:
                await c.send()
        await await_until(lambda: all(not c.unacked for cs in hit.values() for c in cs), 15,
                          "sends after the drain acked")
        for room, cs in hit.items():
            top = max(s for c in cs for s in c.acks.values())
            await await_until(lambda cs=cs, top=top: all((c.last_seq or 0) >= top for c in cs),
                              10, f"members of {room} caught up")
        for c in (c for cs in chatters.values() for c in cs):
            await c.stop()
    for room, cs in hit.items():
        assert check_logs(cs) == []
        for c in cs:
            assert c.closes[0] == 4010  # moved live, not 1001
            assert [w.recovered for w in c.welcomes[1:]][:1] == [True]
            assert c.welcomes[1].instance != victim
    assert cluster.states()[victim] == "disabled"


def test_sigterm_of_the_only_shard_parks_it_disabled(procs: Procs) -> None:
    """SIGTERM of the only shard (nowhere to drain to) still exits 0 and leaves it disabled."""
    cluster = start_cluster(procs, 1)
    r = httpx.post(f"{cluster.url}/v1/rooms/solo/connect", json={"user": "u"}, timeout=t(5))
    assert r.status_code == 200
    assert procs.terminate(cluster.shards["i1"]) == 0
    assert cluster.states()["i1"] == "disabled"
    assert "drained before stopping: 0 of 0 rooms moved, state disabled" in cluster.shards["i1"].output()
