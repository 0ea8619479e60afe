"""The client library against real `roomshard directory` + `roomshard shard` processes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from roomshard import client
from roomshard.client import Gap, Message, Session, State
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import await_until, t

pytestmark = pytest.mark.e2e


def _admin(directory_url: str, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, directory_url + path, timeout=t(30),
                         headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}, **kw)  # type: ignore[arg-type]


async def _collect(session: Session, into: list[Message | Gap]) -> None:
    async for item in session:
        into.append(item)


def _messages(items: list[Message | Gap]) -> list[Message]:
    return [m for m in items if isinstance(m, Message)]


async def test_two_clients_exchange_messages(procs: Procs) -> None:
    """Two sessions in one room see each other, and every message once, in seq order, acked with its seq."""
    d = procs.directory()
    procs.shard("i1", d.url)
    async with client.connect(d.url, "lobby", "alice") as a, client.connect(d.url, "lobby", "bob") as b:
        await await_until(lambda: sorted(a.members) == ["alice", "bob"], 10, "alice to see bob")
        assert sorted(b.members) == ["alice", "bob"]
        got_a: list[Message | Gap] = []
        got_b: list[Message | Gap] = []
        readers = [asyncio.create_task(_collect(a, got_a)), asyncio.create_task(_collect(b, got_b))]
        seqs = [await a.send(f"a{i}") for i in range(5)] + [await b.send(f"b{i}") for i in range(5)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 10
        await await_until(lambda: len(got_a) >= 10 and len(got_b) >= 10, 10, "both to get 10 messages")
        for got in (got_a, got_b):
            assert [m.seq for m in _messages(got)] == seqs
            assert [m.text for m in _messages(got)] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
        assert a.state is State.OPEN and a.instance == "i1"
        for r in readers:
            r.cancel()


async def test_unknown_room_id_is_refused_cleanly(procs: Procs) -> None:
    """A room id the contract refuses ends connect() with ConnectRefused (400), not a retry loop."""
    d = procs.directory()
    procs.shard("i1", d.url)
    with pytest.raises(client.ConnectRefused) as err:
        await client.connect(d.url, "bad room!", "alice", timeout=t(10))
    assert err.value.status == 400


async def test_acked_messages_survive_a_shard_restart(procs: Procs) -> None:
    """Across a shard crash and restart both clients reconnect on their own; sends made while the
    shard was down are resent and acked once; everything acked once both are back reaches the
    receiver once, in order; what the receiver cannot get back is reported as a Gap, never skipped."""
    d = procs.directory()
    shard = procs.shard("i1", d.url)
    async with client.connect(d.url, "crash", "alice") as a, client.connect(d.url, "crash", "bob") as b:
        got: list[Message | Gap] = []
        reader = asyncio.create_task(_collect(b, got))
        before = [await a.send(f"before{i}") for i in range(5)]
        await await_until(lambda: len(_messages(got)) == 5, 10, "bob to get the first 5")

        procs.kill(shard)
        # Sends made while the shard is down wait in the outbox, unacked.
        during = [a.send(f"during{i}") for i in range(5)]
        await await_until(lambda: a.state is not State.OPEN and b.state is not State.OPEN, 10,
                          "both to notice the crash")
        assert not any(f.done() for f in during)
        procs.restart(shard)

        during_seqs = await asyncio.wait_for(asyncio.gather(*during), t(30))
        await await_until(lambda: b.state is State.OPEN, 30, "bob to be back")
        after = [await a.send(f"after{i}") for i in range(5)]
        await await_until(lambda: [m.text for m in _messages(got)][-5:] == [f"after{i}" for i in range(5)],
                          30, "bob to get the messages sent after both were back")
        reader.cancel()

        msgs = _messages(got)
        texts = [m.text for m in msgs]
        # Each message at most once, in seq order; the room restarted above every seq issued before.
        assert [m.seq for m in msgs] == sorted({m.seq for m in msgs})
        assert len(texts) == len(set(texts))
        assert texts[:5] == [f"before{i}" for i in range(5)] and [m.seq for m in msgs[:5]] == before
        assert min(during_seqs) > max(before) and during_seqs == sorted(during_seqs)
        assert [m.seq for m in msgs if m.text.startswith("after")] == after
        # The crash lost the room's history: bob is told so, after what he had seen.
        gaps = [g for g in got if isinstance(g, Gap)]
        assert gaps and gaps[0].after_seq == before[-1]
        # Sends made while the shard was down reach bob unless he came back after they were
        # sequenced (the shard does not replay a lost room's new history; the Gap covers that).
        seen_during = [m.seq for m in msgs if m.text.startswith("during")]
        assert seen_during == during_seqs[len(during_seqs) - len(seen_during):]
        assert a.connections >= 2 and b.connections >= 2 and len(a.outbox) == 0


async def test_a_burst_over_the_rate_limit_is_delivered_in_full(procs: Procs) -> None:
    """120 sends at once exceed the shard's burst; refused ones are paced and resent until all are
    acked, each reaches the receiver once, in the order they were sent (the shard holds the
    ordered sends behind a refused one), and the sender is never closed (4008)."""
    d = procs.directory()
    procs.shard("i1", d.url)
    async with client.connect(d.url, "burst", "alice") as a, client.connect(d.url, "burst", "bob") as b:
        got: list[Message | Gap] = []
        reader = asyncio.create_task(_collect(b, got))
        seqs = await asyncio.wait_for(asyncio.gather(*(a.send(f"m{i}") for i in range(120))), t(60))
        await await_until(lambda: len(got) == 120, 20, "bob to get all 120")
        reader.cancel()
        assert [m.seq for m in _messages(got)] == sorted(seqs)
        assert [m.text for m in _messages(got)] == [f"m{i}" for i in range(120)]
        assert a.connections == 1 and len(a.outbox) == 0


async def test_sends_that_cross_their_refusals_keep_their_order(
        procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client far from its shard hears of a refusal late (its error frames reach it 200 ms
    after they are read here) and writes on meanwhile, faster than the rate limit: what it
    wrote after a refused send is held by the shard until that one comes again, so the
    messages are sequenced in the order they were sent (without the hold, sends written
    after the refusal are taken once the bucket refills and overtake it)."""
    heard = Session._on_error

    def heard_late(self: Session, frame: dict) -> None:
        asyncio.get_running_loop().call_later(0.2, heard, self, frame)

    monkeypatch.setattr(Session, "_on_error", heard_late)
    d = procs.directory()
    procs.shard("i1", d.url)
    async with client.connect(d.url, "far", "alice") as a, client.connect(d.url, "far", "bob") as b:
        got: list[Message | Gap] = []
        reader = asyncio.create_task(_collect(b, got))
        sends = []
        for i in range(100):  # typed at 200/s, 10x the rate: the burst, then refusals
            sends.append(asyncio.ensure_future(a.send(f"m{i}")))
            await asyncio.sleep(0.005)
        await asyncio.wait_for(asyncio.gather(*sends), t(60))
        await await_until(lambda: len(got) == 100, 20, "bob to get all 100")
        reader.cancel()
        assert [m.text for m in _messages(got)] == [f"m{i}" for i in range(100)]
        assert a.connections == 1


async def test_clean_shard_stop_sends_clients_to_another_shard(procs: Procs) -> None:
    """A shard stopping (SIGTERM, close 1001) sends its clients back to the directory and on to a
    live shard; messages acked after the stop reach the other member."""
    d = procs.directory()
    shards = {"i1": procs.shard("i1", d.url), "i2": procs.shard("i2", d.url)}
    async with client.connect(d.url, "hop", "alice") as a, client.connect(d.url, "hop", "bob") as b:
        got: list[Message | Gap] = []
        reader = asyncio.create_task(_collect(b, got))
        first = a.instance
        assert first is not None
        await a.send("before")
        procs.terminate(shards[first])
        await await_until(lambda: a.state is State.OPEN and a.instance != first
                          and b.state is State.OPEN and b.instance != first, 30, "both on the other shard")
        after = [await a.send(f"after{i}") for i in range(3)]
        await await_until(lambda: [m.text for m in _messages(got)][-3:] == ["after0", "after1", "after2"],
                          10, "bob to get the messages sent after the stop")
        reader.cancel()
        msgs = _messages(got)
        assert [m.seq for m in msgs][-3:] == after
        assert [m.text for m in msgs].count("before") == 1
        assert [m.seq for m in msgs] == sorted({m.seq for m in msgs})


async def test_a_member_removed_from_a_private_room_is_told_why(procs: Procs) -> None:
    """Making the room private without bob closes him (4003); the directory's 403 then ends his
    session with ConnectRefused instead of a reconnect loop, while alice stays."""
    d = procs.directory()
    procs.shard("i1", d.url)
    async with client.connect(d.url, "club", "alice") as a, client.connect(d.url, "club", "bob") as b:
        resp = await asyncio.to_thread(_admin, d.url, "PUT", "/v1/admin/rooms/club/access",
                                       json={"private": True, "members": ["alice"]})
        assert resp.status_code == 200, resp.text
        await await_until(lambda: b.state is State.CLOSED, 15, "bob's session to end")
        assert isinstance(b.error, client.ConnectRefused) and b.error.status == 403
        with pytest.raises(client.ConnectRefused):
            b.send("still here?")  # a closed session raises why it closed
        assert a.state is State.OPEN and await a.send("just us") > 0
