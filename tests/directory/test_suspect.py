"""A shard that may have died is checked, and its rooms are not handed out meanwhile.

``directory.ops.failover``: while the directory checks an instance (its
control channel closed, or a client said in its connect that it could not
reach it: ``"unreachable": "iN"``), a connect for one of its rooms waits for
the verdict and answers the owner after it; past ``SUSPECT_HOLD_S`` it
answers 503 ``owner_suspected`` with Retry-After, never the URL of a shard
that may be dead. A hint is never proof: a live shard keeps its rooms, and a
hint starts at most one check per instance every ``HINT_EVERY_S``.

The shards here are stand-ins on this machine's loopback: a closed port (a
dead process: connection refused), a listener that answers ``/healthz`` with
its boot id (alive), one that accepts and never answers (stopped).
"""

from __future__ import annotations

import asyncio
import functools
import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from directory.ops.failover import HINT_EVERY_S, PROBE_TRIES, SUSPECT_HOLD_S
from directory.shards import GONE, UNKNOWN
from roomshard.testing.metrics import sample
from roomshard.testing.procs import Procs
from roomshard.testing.timing import await_until, t
from tests.directory.conftest import ADMIN, Harness, cluster_headers

# The database plays no part in what these check (probes, holds, hints): one run, on SQLite.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def closed_port_url() -> str:
    """The address of a port nothing listens on: a dead shard process's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@asynccontextmanager
async def stand_in(boot_id: str | None) -> AsyncIterator[str]:
    """A shard's address: answers ``/healthz`` with ``boot_id``; None: accepts, never answers."""
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if boot_id is None:
                await release.wait()
                return
            body = orjson.dumps({"status": "ok", "boot_id": boot_id})
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        release.set()
        server.close()
        for w in writers:
            w.close()


async def _metrics(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


def _connect_body(unreachable: str | None = None) -> dict[str, Any]:
    return {"user": "alice"} | ({"unreachable": unreachable} if unreachable else {})


async def _place_on_i1(h: Harness, i1_url: str, rooms: list[str]) -> None:
    """``rooms`` placed on i1 (the only instance then), then i2 registered beside it."""
    assert (await h.heartbeat("i1", boot_id="b1", url=i1_url)).status_code == 200
    for room in rooms:
        r = await h.connect(room)
        assert r.json()["instance"] == "i1", r.text
    assert (await h.heartbeat("i2", boot_id="b2", url=closed_port_url())).status_code == 200


async def test_a_hint_naming_a_dead_owner_re_places_its_rooms_at_once(h: Harness) -> None:
    await _place_on_i1(h, closed_port_url(), ["s1", "s2"])
    r = await h.client.post("/v1/rooms/s1/connect", json=_connect_body("i1"))
    assert r.status_code == 200, r.text
    assert (r.json()["instance"], r.json()["epoch"]) == ("i2", 2)
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    i1 = next(i for i in listed if i["id"] == "i1")
    assert (i1["state"], i1["state_reason"]) == ("down", "died")
    # its other room too, without a connect of its own
    s2 = (await h.client.get("/v1/admin/rooms/s2", headers=ADMIN)).json()
    assert (s2["instance"], s2["epoch"]) == ("i2", 2), s2
    metrics = await _metrics(h.client)
    assert sample(metrics, 'roomshard_directory_failovers_total{evidence="client_hint"}') == 1
    assert sample(metrics, 'roomshard_directory_suspect_connects_total{outcome="checked"}') == 1
    assert sample(metrics, 'roomshard_directory_channel_checks_total{found="gone"}') == 1


@SQLITE_ONLY
async def test_a_hint_naming_a_live_owner_changes_nothing_and_is_limited(h: Harness) -> None:
    async with stand_in("b1") as url:
        await _place_on_i1(h, url, ["s1"])
        answers = [await h.client.post("/v1/rooms/s1/connect", json=_connect_body("i1"))
                   for _ in range(3)]
        # a hint naming an instance that is not the room's owner is no hint about it
        other = await h.client.post("/v1/rooms/s1/connect", json=_connect_body("i2"))
    assert [(a.status_code, a.json()["instance"], a.json()["epoch"]) for a in [*answers, other]
            ] == [(200, "i1", 1)] * 4
    metrics = await _metrics(h.client)
    assert sample(metrics, 'roomshard_directory_channel_checks_total{found="alive"}') == 1
    assert sample(metrics, 'roomshard_directory_suspect_connects_total{outcome="checked"}') == 1
    assert sample(metrics, 'roomshard_directory_suspect_connects_total{outcome="limited"}') == 2
    assert sample(metrics, 'roomshard_directory_failovers_total{evidence="client_hint"}') == 0
    assert HINT_EVERY_S >= 1  # the three hints above came within it


async def test_a_connect_waits_for_the_check_of_a_closed_channel(h: Harness) -> None:
    """A connect that arrives while the owner's closed channel is being checked gets the
    new owner once the check proves the process gone: never the dead URL."""
    dead = closed_port_url()
    await _place_on_i1(h, dead, ["s1"])
    failover = h.app.state.ctx.failover
    proceed = asyncio.Event()
    real_probe = failover.shards.probe

    async def slow_probe(url: str, boot_id: str) -> str:
        await proceed.wait()
        return await real_probe(url, boot_id)

    failover.shards.probe = slow_probe
    check = asyncio.ensure_future(failover.channel_closed("i1", "b1"))
    await await_until(lambda: "i1" in failover.suspects, 5, "the check under way")
    answer = asyncio.ensure_future(h.client.post("/v1/rooms/s1/connect", json=_connect_body()))

    async def held() -> bool:
        return sample(await _metrics(h.client),
                      'roomshard_directory_suspect_connects_total{outcome="held"}') == 1

    await await_until(held, 5, "the connect held")
    assert not answer.done()
    proceed.set()
    r = await answer
    assert await check is True
    assert r.status_code == 200, r.text
    assert (r.json()["instance"], r.json()["epoch"]) == ("i2", 2)


@SQLITE_ONLY
async def test_an_owner_that_does_not_answer_is_503_while_checked(h: Harness) -> None:
    """A stopped process accepts connections and answers nothing: while the check runs
    (up to the probe's bound), every connect for its rooms is 503 with Retry-After after
    SUSPECT_HOLD_S; after it (nothing proven) the owner is answered again."""
    async with stand_in(None) as url:
        await _place_on_i1(h, url, ["s1"])
        failover = h.app.state.ctx.failover
        # Each probe waits 0.5 s for an answer: the check (3 tries) outlasts every hold.
        failover.shards.probe = functools.partial(failover.shards.probe, timeout=0.5)
        started = time.monotonic()
        first = asyncio.ensure_future(
            h.client.post("/v1/rooms/s1/connect", json=_connect_body("i1")))
        await await_until(lambda: "i1" in failover.suspects, 5, "the hint's check under way")
        plain = await h.client.post("/v1/rooms/s1/connect", json=_connect_body())
        hinted = await first
        took = time.monotonic() - started
        for r in (hinted, plain):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "owner_suspected", r.text
            assert r.headers["retry-after"] == "1"
        assert SUSPECT_HOLD_S * 0.9 <= took < SUSPECT_HOLD_S + t(2)
        await await_until(lambda: not failover.suspects, 10, "the check ended")
        after = await h.connect("s1")
    assert (after.status_code, after.json()["instance"]) == (200, "i1"), after.text
    metrics = await _metrics(h.client)
    assert sample(metrics, 'roomshard_directory_channel_checks_total{found="unknown"}') == 1
    assert sample(metrics, 'roomshard_directory_connects_total{result="owner_suspected"}') == 2


@pytest.mark.e2e
async def test_the_answer_at_once_never_answers_a_suspect_owner(procs: Procs) -> None:
    """The directory process answers connects to served rooms inside the HTTP read
    (SQLite); a room whose owner is being checked goes the general way and waits."""
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600"})
    async with stand_in(None) as url, httpx.AsyncClient(base_url=d.url, timeout=t(10)) as http:
        beat = await http.put("/v1/internal/instances/i1/heartbeat",
                              json={"internal_url": url, "boot_id": "b1"},
                              headers=cluster_headers("i1", time.time()))
        assert beat.status_code == 200, beat.text
        first = await http.post("/v1/rooms/s1/connect", json=_connect_body())
        assert (first.status_code, first.json()["instance"]) == (200, "i1"), first.text
        served = await http.post("/v1/rooms/s1/connect", json=_connect_body())
        assert served.status_code == 200  # answered at once (the room has a serving owner)
        hinted = asyncio.ensure_future(http.post("/v1/rooms/s1/connect",
                                                 json=_connect_body("i1")))

        async def checking() -> bool:
            text = (await http.get("/metrics")).text
            return sample(text, 'roomshard_directory_suspect_connects_total'
                                '{outcome="checked"}') == 1

        await await_until(checking, 5, "the hint's check started")
        plain = await http.post("/v1/rooms/s1/connect", json=_connect_body())
        assert (await hinted).status_code == 503
        assert plain.status_code == 503, plain.text
        assert plain.json()["error"]["code"] == "owner_suspected"


@SQLITE_ONLY
async def test_an_owner_past_down_after_is_replaced_at_once_even_while_checked(
        h: Harness) -> None:
    """A silent owner past ``down_after`` no longer serves by its heartbeats: its room is
    placed elsewhere at once, whatever check of it is still running."""
    async with stand_in(None) as url:
        await _place_on_i1(h, url, ["s1"])
        failover = h.app.state.ctx.failover
        first = asyncio.ensure_future(
            h.client.post("/v1/rooms/s1/connect", json=_connect_body("i1")))
        await await_until(lambda: "i1" in failover.suspects, 5, "the hint's check under way")
        h.clock.advance(h.cfg.down_after + 1)  # i1 silent past down_after; i2 heartbeats
        assert (await h.heartbeat("i2", boot_id="b2", url=closed_port_url())).status_code == 200
        h.app.state.ctx.awake_since = -math.inf  # this replica has long been up
        started = time.monotonic()
        r = await h.client.post("/v1/rooms/s1/connect", json=_connect_body("i1"))
        assert time.monotonic() - started < SUSPECT_HOLD_S  # not held
        assert (r.status_code, r.json()["instance"], r.json()["epoch"]) == (200, "i2", 2), r.text
        assert (await first).status_code == 503  # it came while i1 still counted as serving


async def test_a_closed_channel_gets_its_own_check_when_a_hint_s_found_nothing(
        h: Harness) -> None:
    """A client's reconnect can beat the channel's close to the directory, and its hint's
    check can probe a process that is still exiting (it proves nothing): the closed
    channel then gets a check of its own, which finds the process gone."""
    await _place_on_i1(h, closed_port_url(), ["s1"])
    failover = h.app.state.ctx.failover
    found: list[str] = []
    release = asyncio.Event()

    async def probe(url: str, boot_id: str) -> str:
        if not found:
            await release.wait()
        found.append(UNKNOWN if len(found) < PROBE_TRIES else GONE)
        return found[-1]

    failover.shards.probe = probe
    hinted = asyncio.ensure_future(
        h.client.post("/v1/rooms/s1/connect", json=_connect_body("i1")))
    await await_until(lambda: "i1" in failover.suspects, 5, "the hint's check under way")
    closed = asyncio.ensure_future(failover.channel_closed("i1", "b1"))
    await asyncio.sleep(0)  # (ordering only: the channel's check joins the hint's first)
    release.set()
    assert await closed is True
    assert found == [UNKNOWN] * PROBE_TRIES + [GONE]
    assert (await hinted).status_code in (200, 503)
    metrics = await _metrics(h.client)
    assert sample(metrics, 'roomshard_directory_failovers_total{evidence="channel_closed"}') == 1
    r = await h.connect("s1")
    assert (r.json()["instance"], r.json()["epoch"]) == ("i2", 2)


@SQLITE_ONLY
async def test_a_probe_that_finds_the_listener_gone_meanwhile_says_gone(h: Harness) -> None:
    """A process that is exiting can still accept the probe's TCP check and be gone by
    its ``/healthz`` request: a refusal then is proof too (the listener closed)."""
    closing: list[asyncio.Server] = []

    async def accept_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closing[0].close()  # stop listening: the next connection is refused
        writer.close()

    server = await asyncio.start_server(accept_once, "127.0.0.1", 0)
    closing.append(server)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    assert await h.app.state.ctx.shards.probe(url, "b1") == GONE
    async with stand_in("b1") as alive, stand_in(None) as silent:
        assert await h.app.state.ctx.shards.probe(alive, "b1") == "alive"
        assert await h.app.state.ctx.shards.probe(alive, "other") == GONE
        assert await h.app.state.ctx.shards.probe(silent, "b1", timeout=0.2) == UNKNOWN


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_re_placing_all_rooms_while_connects_re_place_them_never_deadlocks(
        harness_factory: Any, db_url: str) -> None:
    """A failover re-places every room of a dead instance in one transaction while other
    replicas' connects re-place some of the same rooms one by one: the rooms first and
    the counts after, in id order, in every such transaction (it deadlocked once on
    PostgreSQL, leaving each room to its next connect). Every room ends on a live
    instance once, and the counts match the rooms."""
    async with harness_factory(room_create_rate=0) as h:
        await _deadlock_free(h, db_url)


async def _deadlock_free(h: Harness, db_url: str) -> None:
    from directory.db.store import Store
    from roomshard.sql import make_engine

    rooms = [f"d{n:03d}" for n in range(120)]
    await _place_on_i1(h, closed_port_url(), rooms)
    assert (await h.heartbeat("i3", boot_id="b3", url=closed_port_url())).status_code == 200
    ours = h.app.state.ctx.store
    assert await ours.park_dead("i1", "b1") is not None
    other = Store(make_engine(db_url))  # another replica's store
    try:
        now, down_after = h.clock(), h.cfg.down_after
        rows = {r: await other.room_target(r) for r in rooms[::3]}
        results = await asyncio.gather(
            ours.replace_all("i1", now=now, down_after=down_after),
            *(other._replace(r, row, now=now, down_after=down_after)
              for r, row in rows.items()))
    finally:
        other.close()
        await other.engine.dispose()
    by_connects = sum(1 for target, _ in results[1:] if target is not None)  # CAS won
    assert results[0] + by_connects == len(rooms)
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    counts = {i["id"]: i["rooms_assigned"] for i in listed}
    assert counts["i1"] == 0 and counts["i2"] + counts["i3"] == len(rooms), counts
    for room in rooms:
        row = (await h.client.get(f"/v1/admin/rooms/{room}", headers=ADMIN)).json()
        assert row["instance"] in ("i2", "i3") and row["epoch"] == 2, row
