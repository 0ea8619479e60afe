"""A real directory process under a storm of connects: every request is answered, the
control plane gets through, and overload is a 503 with Retry-After, never a failure."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from typing import Any
from urllib.parse import unquote

import h11
import httpx
import pytest
import websockets

from directory.db import store as store_module
from directory.http.server import _connect_of, connect_room
from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET, Proc, Procs
from roomshard.testing.timing import await_until, t
from roomshard.wire.tickets import Signer
from tests.directory.conftest import Harness
from tests.directory.test_processes import register

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
pytestmark = pytest.mark.e2e
N = 200


async def test_two_hundred_concurrent_first_connects_on_sqlite_all_succeed(procs: Procs) -> None:
    """200 connects at once, each creating a room, on embedded SQLite: every one is placed
    (SQLite's write lock is waited for, never reported as database_unavailable)."""
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600", "ROOMSHARD_ROOM_CREATE_RATE": "0"})
    limits = httpx.Limits(max_connections=N + 50)
    async with httpx.AsyncClient(timeout=t(30), limits=limits) as client:
        await register(client, d.url, "i1", "i2")
        replies = await asyncio.gather(*(
            client.post(f"{d.url}/v1/rooms/storm-{n}/connect", json={"user": f"u{n}"})
            for n in range(N)))
        statuses = [r.status_code for r in replies]
        assert statuses == [200] * N, [r.text for r in replies if r.status_code != 200][:3]
        instances = (await client.get(f"{d.url}/v1/admin/instances", headers=ADMIN)).json()
        assert sum(i["rooms_assigned"] for i in instances["instances"]) == N
    assert "database_unavailable" not in d.output()


async def test_a_write_that_cannot_get_its_turn_is_503_overloaded(h: Harness,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite, writes take turns; one that waits past the bound is answered 503
    ``overloaded`` with Retry-After (the database is there, only busy), and the next one,
    once the turn is free, succeeds."""
    store = h.app.state.ctx.store
    if store.dialect != "sqlite":
        pytest.skip("the write turn is SQLite's")
    monkeypatch.setattr(store_module, "SQLITE_WRITE_WAIT_S", 0.05)
    await h.heartbeat("i1")
    async with store.write():  # a long write holds the turn
        r = await h.connect("new-room")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "overloaded")
    assert int(r.headers["retry-after"]) >= 1
    assert (await h.connect("new-room")).status_code == 200


async def test_a_new_room_waits_for_another_process_holding_sqlites_lock(h: Harness) -> None:
    """The in-loop new-room write does not wait for SQLite's lock (busy_timeout 0): while
    another process holds it, the connect takes the general path, which waits for the lock
    off the loop, and succeeds once it is free; the loop keeps serving meanwhile."""
    store = h.app.state.ctx.store
    if store.dialect != "sqlite":
        pytest.skip("SQLite's write lock")
    await h.heartbeat("i1")
    assert (await h.connect("known")).status_code == 200
    other = sqlite3.connect(h.cfg.database_url.split("///", 1)[1], isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        pending = asyncio.ensure_future(h.connect("fresh"))
        # Existing rooms are still answered (a read), while the new room waits.
        assert (await h.connect("known")).status_code == 200
        await asyncio.sleep(0)
        assert not pending.done()
        other.execute("COMMIT")
        r = await asyncio.wait_for(pending, t(10))
    finally:
        other.close()
    assert r.status_code == 200, r.text
    assert r.json()["instance"] == "i1" and r.json()["epoch"] == 1


async def test_a_room_placed_meanwhile_is_joined_not_placed_twice(h: Harness) -> None:
    """Two first connects of one room at once: one places it, the other joins that room
    (same instance and epoch, counted once)."""
    await h.heartbeat("i1")
    await h.heartbeat("i2")
    a, b = await asyncio.gather(h.connect("twice", "alice"), h.connect("twice", "bob"))
    assert (a.status_code, b.status_code) == (200, 200)
    assert (a.json()["instance"], a.json()["epoch"]) == (b.json()["instance"], b.json()["epoch"])
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    assert sum(i["rooms_assigned"] for i in listed) == 1


@pytest.mark.parametrize("bound", [
    # Past 100 connects read and not answered, the HTTP edge answers the rest at once.
    {"ROOMSHARD_CONNECTS_IN_FLIGHT": "100"},
    # A connect that waited over 50 ms for its turn (1,000 of them are more work than that).
    {"ROOMSHARD_CONNECT_QUEUE_WAIT": "0.05"},
], ids=["in flight", "queue wait"])
async def test_a_burst_past_the_bound_is_shed_and_the_control_plane_is_not(
        procs: Procs, bound: dict[str, str]) -> None:
    """1,000 first connects (each a new room: work for the database, not answered at
    once by the HTTP edge) that reach the directory at once (written while its process is
    paused) go past its bound: each is answered 200 or 503 ``overloaded`` with Retry-After,
    never anything else, and some of each; a shard's heartbeat written into the same burst
    is served, and so is the next connect."""
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600", **bound})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
        assert (await client.post(f"{d.url}/v1/rooms/hot/connect", json={"user": "u"})).status_code == 200
    token = Signer([TEST_CLUSTER_SECRET]).cluster_token("i1", to="directory", now=time.time())
    *replies, beat = await paused_burst(d, [
        *(_post(f"/v1/rooms/hot-{n}/connect", {"user": f"u{n}"}) for n in range(1_000)),
        _put("/v1/internal/instances/i1/heartbeat",
             {"internal_url": "http://127.0.0.1:9/i1", "boot_id": "b1"}, token)])
    assert beat[0] == 200, beat
    outcomes = {(status, body.get("error", {}).get("code")) for status, _, body in replies}
    assert outcomes <= {(200, None), (503, "overloaded")}, outcomes
    shed = [headers for status, headers, _ in replies if status == 503]
    assert shed and all(int(h["retry-after"]) >= 1 for h in shed)
    if "ROOMSHARD_CONNECTS_IN_FLIGHT" in bound:
        assert len(shed) < len(replies)  # the first 100 were taken
    async with httpx.AsyncClient(timeout=t(30)) as client:
        assert (await client.post(f"{d.url}/v1/rooms/hot/connect", json={"user": "u"})).status_code == 200
        metrics = (await client.get(f"{d.url}/metrics")).text
    # Shed by the HTTP edge or by the handler, every one is counted; none is left in flight.
    assert f'roomshard_directory_connects_total{{result="overloaded"}} {float(len(shed))}' in metrics
    assert "roomshard_directory_connects_in_flight 0.0" in metrics


async def await_until_active(client: httpx.AsyncClient, base: str, iid: str) -> None:
    async def active() -> bool:
        listed = (await client.get(f"{base}/v1/admin/instances", headers=ADMIN)).json()
        return any(i["id"] == iid and i["state"] == "active" for i in listed["instances"])

    await await_until(active, t(30), f"{iid} active")


async def paused_burst(d: Proc, requests: list[bytes]) -> list[tuple[int, dict[str, str], Any]]:
    """Each request on its own connection, all written while ``d`` is paused (SIGSTOP), so
    that they reach it at once; the answers, in order."""
    host, port = d.url.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in requests]
    os.kill(d.popen.pid, signal.SIGSTOP)
    try:
        for request, (_, writer) in zip(requests, conns, strict=True):
            writer.write(request)
        # Every request is in the paused process's socket buffers once its write drained.
        await asyncio.gather(*(w.drain() for _, w in conns))
    finally:
        os.kill(d.popen.pid, signal.SIGCONT)
    try:
        return await asyncio.gather(*(_answer(r) for r, _ in conns))
    finally:
        for _, writer in conns:
            writer.close()


def _post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: d\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


def _put(path: str, body: dict[str, Any], token: str) -> bytes:
    data = json.dumps(body).encode()
    return (f"PUT {path} HTTP/1.1\r\nHost: d\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {token}\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 response: status, headers (lower-case names), JSON body."""
    return (await _answers(reader, 1))[0]


async def _answers(reader: asyncio.StreamReader, n: int) -> list[tuple[int, dict[str, str], Any]]:
    """``n`` pipelined HTTP/1.1 responses from one connection, in order. One parser for
    all: one read may carry the end of an answer and the start of the next."""
    parser = h11.Connection(h11.CLIENT)
    out: list[tuple[int, dict[str, str], Any]] = []
    while len(out) < n:
        if out:
            parser.start_next_cycle()
        parser.send(h11.Request(method="GET", target="/", headers=[("Host", "d")]))  # its state
        parser.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(await asyncio.wait_for(reader.read(65536), t(30)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((status, headers, json.loads(body)))
                break
    return out


async def test_a_shards_opens_succeed_while_the_directory_serves_a_connect_storm(
        procs: Procs) -> None:
    """While 200 keep-alive connections send connects back to back, 40 clients join 40 new
    rooms on a real shard: every one gets its welcome (the shard's opens to the directory
    got through: no 1013), and the storm's connects are all answered 200 or 503."""
    d = procs.directory(env={"ROOMSHARD_ROOM_CREATE_RATE": "0"})
    procs.shard("i1", d.url)
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await await_until_active(client, d.url, "i1")
        assert (await client.post(f"{d.url}/v1/rooms/hot/connect", json={"user": "u"})).status_code == 200
    host, port = d.url.removeprefix("http://").split(":")
    stop = asyncio.Event()
    statuses: dict[int, int] = {}

    async def storm(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not stop.is_set():
                writer.write(_post("/v1/rooms/hot/connect", {"user": f"s{n}"}))
                status, _, _ = await _answer(reader)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    async def join(n: int) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=t(30)) as client:
            r = await client.post(f"{d.url}/v1/rooms/new-{n}/connect", json={"user": f"j{n}"})
            assert r.status_code == 200, r.text
        async with websockets.connect(r.json()["url"], open_timeout=t(30)) as ws:
            return dict(json.loads(await asyncio.wait_for(ws.recv(), t(30))))

    storms = [asyncio.ensure_future(storm(n)) for n in range(200)]
    try:
        await await_until(lambda: sum(statuses.values()) >= 2_000, t(30), "the storm under way")
        frames = await asyncio.gather(*(join(n) for n in range(40)))
    finally:
        stop.set()
        await asyncio.gather(*storms)
    assert [f["type"] for f in frames] == ["welcome"] * 40, frames
    assert set(statuses) <= {200, 503} and statuses.get(200, 0) > 0, statuses


@pytest.mark.parametrize(("method", "url", "room"), [
    (b"POST", b"/v1/rooms/r-1/connect", "r-1"),
    (b"POST", b"/v1/rooms/r-1/connect?x=1", "r-1"),
    (b"POST", b"/v1/rooms/a/connect/connect", "a/connect"),  # greedy, as the route's pattern
    (b"POST", b"/v1/rooms//connect", ""),
    (b"POST", b"/v1/rooms/r/%63onnect", "r"),  # decoded as uvicorn decodes it
    (b"POST", b"/v1/rooms/connect", None),
    (b"POST", b"/v1/rooms/r/messages", None),
    (b"GET", b"/v1/rooms/r/connect", None),
])
def test_the_edge_and_the_app_see_the_same_connects(method: bytes, url: bytes,
                                                     room: str | None) -> None:
    """The HTTP edge counts (and answers at once) exactly the requests the app dispatches
    to the connect route, with the same room."""
    path = unquote(url.partition(b"?")[0].decode())
    assert _connect_of(method, url) == room
    if method == b"POST":
        assert connect_room(path) == room
