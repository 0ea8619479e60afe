"""Live room moves seen from the client library (real directory and shards)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from roomshard import client
from roomshard.client import Gap, Message, Session, State, StateChange
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import await_until, t

pytestmark = pytest.mark.e2e


async def _record(session: Session, events: list[object]) -> None:
    async for ev in session.events():
        events.append(ev)


async def test_a_move_mid_chat_loses_and_duplicates_nothing(procs: Procs) -> None:
    """While alice keeps sending, the room moves to another shard: both clients follow it (state
    "moving", then open on the target), every send is acked, and bob sees each message once, with
    contiguous seqs and no gap."""
    d = procs.directory()
    procs.shard("i1", d.url)
    procs.shard("i2", d.url)
    async with client.connect(d.url, "moving", "alice") as a, client.connect(d.url, "moving", "bob") as b:
        src = a.instance
        dst = "i2" if src == "i1" else "i1"
        ev_a: list[object] = []
        ev_b: list[object] = []
        readers = [asyncio.create_task(_record(a, ev_a)), asyncio.create_task(_record(b, ev_b))]

        async def sender() -> list[int]:
            futs = []
            for i in range(60):
                futs.append(a.send(f"m{i}"))
                await asyncio.sleep(0.03)  # a steady chat, under the rate limit
            return list(await asyncio.gather(*futs))

        sending = asyncio.create_task(sender())
        await await_until(lambda: sum(isinstance(e, Message) for e in ev_b) >= 15, 20, "bob to get some")
        resp = await asyncio.to_thread(
            httpx.post, f"{d.url}/v1/admin/rooms/moving/move", json={"to": dst}, timeout=t(60),
            headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"})
        assert resp.status_code == 200, resp.text
        report = resp.json()
        assert (report["from"], report["to"]) == (src, dst)
        seqs = await asyncio.wait_for(sending, t(60))
        await await_until(lambda: sum(isinstance(e, Message) for e in ev_b) == 60, 20, "bob to get all 60")
        for r in readers:
            r.cancel()

        msgs = [e for e in ev_b if isinstance(e, Message)]
        assert [m.text for m in msgs] == [f"m{i}" for i in range(60)]
        assert [m.seq for m in msgs] == seqs == list(range(seqs[0], seqs[0] + 60))
        assert not any(isinstance(e, Gap) for e in ev_a + ev_b)
        for s, evs in ((a, ev_a), (b, ev_b)):
            assert s.state is State.OPEN and s.instance == dst
            assert any(isinstance(e, StateChange) and e.state is State.MOVING for e in evs)
