"""The shard server in-process with real WebSocket clients and the directory double."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from websockets.asyncio.client import connect

from roomshard.testing.timing import await_until, t
from tests.shard.conftest import close_code, recv_json, recv_until


async def test_welcome_presence_and_broadcast(shard):
    """Welcome lists members; presence join/leave; every member gets the message, sender an ack."""
    a, wa = await shard.join("lobby", "alice")
    assert wa == {"type": "welcome", "room": "lobby", "instance": "i1", "epoch": 1,
                  "user": "alice", "seq": 0, "members": ["alice"]}
    b, wb = await shard.join("lobby", "bob")
    assert wb["members"] == ["alice", "bob"]
    assert await recv_json(a) == {"type": "presence", "event": "join", "user": "bob"}
    await b.send('{"type": "send", "id": "m1", "text": "hello"}')
    for ws in (a, b):
        msg = await recv_json(ws)
        assert {k: msg[k] for k in ("type", "seq", "id", "user", "text")} == {
            "type": "message", "seq": 1, "id": "m1", "user": "bob", "text": "hello"}
        assert isinstance(msg["ts"], float)
    assert await recv_json(b) == {"type": "ack", "id": "m1", "seq": 1}
    await b.close()
    assert await recv_json(a) == {"type": "presence", "event": "leave", "user": "bob"}
    await a.close()


async def test_lease_loss_closes_rooms_with_1001_and_refuses_with_1013(shard):
    """Without heartbeat acks for the lease, clients are closed 1001 and joins get 1013.

    The room's state stays, unconfirmed; the directory confirms it still owns
    it at that epoch, so the resume after the lease is back is lossless.
    """
    a, _ = await shard.join("r", "alice")
    b, _ = await shard.join("r", "bob")
    assert (await recv_json(a))["event"] == "join"
    await a.send('{"type": "send", "id": "m1", "text": "before"}')
    assert (await recv_until(a, "ack"))["seq"] == 1
    shard.fake.reachable = False
    # Both closed with 1001, and nobody got a presence leave for the others first.
    frames_a, code_a = await frames_until_close(a)
    assert code_a == 1001 and all(f["type"] != "presence" for f in frames_a)
    assert (await frames_until_close(b))[1] == 1001
    assert not shard.server.ready()
    assert shard.server.live_rooms.unconfirmed() == {"r": 1}  # kept, not served
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{shard.server.url}/readyz")).status_code == 503
    ws = await connect(shard.url("r", "bob"))
    assert await close_code(ws) == 1013
    shard.fake.reachable = True
    await await_until(shard.server.ready, 5, "the lease to come back")
    assert any(hb.get("confirm") == {"r": 1} for hb in shard.fake.heartbeats)
    again, welcome = await shard.join("r", "carol", since=0)
    assert welcome["type"] == "welcome" and welcome["recovered"] is True
    assert (await recv_until(again, "message"))["text"] == "before"
    assert shard.fake.opens == ["r"]  # no second open: the state was never lost
    await again.close()


async def test_lease_loss_drops_a_room_the_directory_placed_elsewhere(shard):
    a, _ = await shard.join("moved", "alice")
    shard.fake.reachable = False
    assert (await frames_until_close(a))[1] == 1001
    # Meanwhile the directory re-placed the room on another instance.
    shard.fake.rooms["moved"].instance, shard.fake.rooms["moved"].epoch = "i2", 2
    shard.fake.reachable = True
    await await_until(shard.server.ready, 5, "the lease to come back")
    assert shard.server.live_rooms.get("moved") is None


async def test_a_frame_read_past_the_lease_is_not_sequenced_and_fences_at_once(shard):
    """A loop that stalled past its lease (a stopped process, a frozen machine) reads
    what waited in its sockets before its timers run. A send read then is not
    sequenced (the room may have another owner by now): the shard fences itself in
    that call, the members get 1001, nobody gets an ack or the message."""
    a, _ = await shard.join("r", "alice")
    b, _ = await shard.join("r", "bob")
    assert (await recv_json(a))["event"] == "join"
    await a.send('{"type": "send", "id": "m1", "text": "before"}')
    assert (await recv_until(a, "ack"))["seq"] == 1
    server = shard.server
    shard.fake.reachable = False  # no heartbeat renews it meanwhile
    server._timers["tick"].cancel()  # the tick, which fences, has not run yet
    server.lease_until = server.monotonic() - 0.01
    await a.send('{"type": "send", "id": "m2", "text": "after the lease"}')
    frames_a, code_a = await frames_until_close(a)
    frames_b, code_b = await frames_until_close(b)
    assert (code_a, code_b) == (1001, 1001)
    assert [f for f in frames_a + frames_b if f.get("id") == "m2"] == []  # no ack, no message
    assert server.fenced and server.live_rooms.unconfirmed() == {"r": 1}  # seq 1, kept
    assert server.stats.messages_out == 1


async def frames_until_close(ws) -> tuple[list[dict], int | None]:
    """Every frame received until the server closed, and its close code."""
    import orjson
    import websockets

    out = []
    try:
        while True:
            out.append(orjson.loads(await asyncio.wait_for(ws.recv(), t(10))))
    except websockets.ConnectionClosed:
        pass
    return out, ws.close_code


async def test_moving_room_refused_1013_and_not_owner_4004(shard):
    """The directory's 'moving' answer closes 1013, 'not_owner' closes 4004."""
    shard.fake.ticket("mv", "x")
    shard.fake.rooms["mv"].state = "moving"
    assert await close_code(await connect(shard.url("mv", "alice"))) == 1013
    shard.fake.ticket("gone", "x")
    shard.fake.rooms["gone"].instance = "i2"
    assert await close_code(await connect(shard.url("gone", "alice"))) == 4004


async def test_newer_ticket_epoch_replaces_stale_room(shard):
    """A ticket with a newer epoch closes the stale copy's clients with 1001 and reopens."""
    a, _ = await shard.join("st", "alice")
    rec = shard.fake.rooms["st"]
    rec.epoch = rec.owner_epoch = 5  # the room went away and came back
    b, wb = await shard.join("st", "bob")
    assert await close_code(a) == 1001
    assert wb["epoch"] == 5 and wb["members"] == ["bob"]
    await b.close()


async def test_stale_ticket_epoch_is_4004(shard):
    """A ticket older than the room's owner_epoch is a stale route: 4004."""
    a, _ = await shard.join("old", "alice")
    room = shard.server.live_rooms.get("old").room
    room.epoch = room.owner_epoch = 3  # it was moved here at epoch 3
    assert await close_code(await connect(shard.url("old", "bob", epoch=2))) == 4004
    await a.close()


async def test_concurrent_joiners_share_one_open(shard):
    """Ten clients joining a cold room cause one directory open."""
    joined = await asyncio.gather(*(shard.join("cold", f"u{i}") for i in range(10)))
    assert shard.fake.opens.count("cold") == 1
    assert {w["type"] for _, w in joined} == {"welcome"}
    for ws, _ in joined:
        await ws.close()


async def test_a_directory_unavailable_past_the_bound_is_1013(shard):
    """Opens that keep failing are retried for OPEN_RETRY_S, then the client gets 1013;
    a directory back within the bound costs a wait, not a refusal."""
    from shard.server import OPEN_RETRY_S

    loop = asyncio.get_running_loop()
    shard.fake.lose_open_answers = 10_000  # every open's answer is lost
    started = loop.time()
    assert await close_code(await connect(shard.url("flaky", "alice"))) == 1013
    assert OPEN_RETRY_S * 0.5 <= loop.time() - started < OPEN_RETRY_S + 5
    assert len(shard.fake.open_ids) >= 3 and len(set(shard.fake.open_ids)) == 1  # one open, retried
    shard.fake.lose_open_answers = 2
    a, wa = await shard.join("flaky", "bob")  # two lost answers, then the grant: no 1013
    assert wa["type"] == "welcome"
    await a.close()


@pytest.mark.parametrize("batch_route", [True, False])
async def test_first_joins_of_many_rooms_share_open_calls(shard, batch_route):
    """40 clients joining 40 cold rooms at once: the rooms open in a few batch calls (one
    call per room with a directory from before the batch route), each exactly once."""
    shard.fake.batch_route = batch_route
    joined = await asyncio.gather(*(shard.join(f"many-{i}", f"u{i}") for i in range(40)))
    assert {w["type"] for _, w in joined} == {"welcome"}
    assert sorted(shard.fake.opens) == sorted(f"many-{i}" for i in range(40))
    calls = shard.server.directory.open_calls
    if batch_route:
        assert calls == len(shard.fake.open_batches) and calls <= 5, shard.fake.open_batches
    else:
        assert calls == 40 + 1 and shard.fake.open_batches == []  # the first try was a 404
    for ws, _ in joined:
        await ws.close()


@pytest.mark.parametrize("shard_overrides", [{"room_linger": 0.2}])
async def test_idle_room_is_evicted_and_reopens_with_new_epoch(shard):
    """After the linger a room leaves memory; the next open gets a lost-state epoch."""
    a, _ = await shard.join("ev", "alice")
    await a.send('{"type":"send","id":"1","text":"x"}')
    await recv_until(a, "ack")
    await a.close()
    await await_until(lambda: shard.server.live_rooms.get("ev") is None, 10, "eviction")
    b, wb = await shard.join("ev", "bob", since=1)
    assert wb["epoch"] == 2 and wb["seq"] == 2 << 32 and wb["recovered"] is False
    await b.close()


@pytest.mark.parametrize("shard_overrides", [{"room_linger": 0.2}])
async def test_an_open_whose_answer_was_lost_is_retried_under_the_same_id(shard):
    """A timed-out open is retried with its open_id, within the client's connect (no 1013):
    the room opens once at epoch 1; a later reopen is new."""
    shard.fake.lose_open_answers = 1
    a, wa = await shard.join("lost", "alice")
    assert (wa["epoch"], wa["seq"]) == (1, 0)
    first, retry = shard.fake.open_ids
    assert first is not None and retry == first
    await a.send('{"type":"send","id":"1","text":"x"}')
    await recv_until(a, "ack")
    await a.close()
    await await_until(lambda: shard.server.live_rooms.get("lost") is None, 10, "eviction")
    b, wb = await shard.join("lost", "bob", since=1)  # the evicted copy is gone: a new one
    assert (wb["epoch"], wb["recovered"]) == (2, False)
    assert shard.fake.open_ids[2] not in (None, first)
    await b.close()


@pytest.mark.parametrize("shard_overrides", [{"ping_interval": 0.2, "ping_timeout": 0.3}])
async def test_dead_peer_is_closed_after_ping_timeout(shard):
    """A client that never answers pings is dropped; one that answers stays."""
    alive, _ = await shard.join("p", "alive")
    dead = await connect(shard.url("p", "dead"), ping_interval=None)
    await recv_json(dead)
    # Stop the dead client's transport from reading: its pongs never come.
    dead.transport.pause_reading()
    await await_until(lambda: shard.server.stats.ping_timeouts >= 1, 10, "a ping timeout")
    assert len(shard.server.live_rooms.get("p").conns) == 1
    await alive.send('{"type":"send","id":"k","text":"still here"}')
    assert (await recv_until(alive, "ack"))["seq"] == 1
    await alive.close()
    dead.transport.abort()


@pytest.mark.parametrize("shard_overrides", [{"ping_interval": 0.1, "ping_timeout": 0.1}])
async def test_a_lingering_connection_is_not_pinged_nor_counted_as_a_ping_timeout(shard):
    """A closed peer that neither reads nor closes lingers to its bound, not to a ping check."""
    import socket

    url = shard.url("lg", "quiet")
    hostport, path = url.split("://", 1)[1].split("/", 1)
    host, port = hostport.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    server = shard.server
    await await_until(lambda: server.live_rooms.get("lg") is not None
                      and server.live_rooms.get("lg").connection_count() == 1, 5, "the join")
    sock.sendall(bytes([0x81, 0x82]) + b"\0\0\0\0" + b"\xff\xfe")  # not UTF-8: 1007
    await await_until(lambda: server.lingering.active == 1, 5, "the connection to linger")
    rounds = server._ping_rounds
    await await_until(lambda: server._ping_rounds >= rounds + 5, 5, "five ping rounds")
    assert server.stats.ping_timeouts == 0
    assert server.lingering.active == 1  # still lingering: its bound is 5 s of silence
    sock.close()
    await await_until(lambda: server.lingering.active == 0, 5, "the linger to end")


async def test_http_routes_and_internal_auth(shard):
    """healthz/readyz/metrics answer; internal routes need the directory's cluster token."""
    s = shard.server
    ws, _ = await shard.join("api", "alice")
    token = s.signer.cluster_token("directory", to="i1", now=s.clock())
    shard_token = s.signer.cluster_token("i1", to="i1", now=s.clock())
    async with httpx.AsyncClient(base_url=s.url) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert 'roomshard_shard_connections{instance="i1"} 1.0' in metrics
        r = await http.get("/internal/rooms")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await http.get("/internal/rooms", headers={"authorization": f"Bearer {shard_token}"})
        assert r.status_code == 403
        auth = {"authorization": f"Bearer {token}"}
        rooms = (await http.get("/internal/rooms", headers=auth)).json()["rooms"]
        assert rooms["api"]["connections"] == 1 and rooms["api"]["members"] == 1
        r = await http.get("/internal/rooms/nope", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "room_not_loaded"
        r = await http.get("/internal/rooms/bad%20id", headers=auth)
        assert r.status_code == 400
        r = await http.post("/internal/rooms/api/access", headers=auth, content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post("/internal/rooms/api/access", headers=auth, json={"privat": True})
        assert r.status_code == 400
        r = await http.get("/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.post("/healthz")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        r = await http.get("/i1/room/api")  # a room path without the upgrade
        assert r.status_code == 404
        r = await http.post("/internal/rooms/api/access", headers=auth,
                            json={"private": True, "members": ["bob"]})
        assert r.json() == {"room": "api", "closed": 1}
    assert await close_code(ws) == 4003
    # A ticket issued before the change does not get back in.
    assert await close_code(await connect(shard.url("api", "alice"))) == 4003


async def test_unreachable_directory_at_start_keeps_retrying_and_not_ready():
    """A shard whose directory is down at start serves /readyz 503 and registers once it is up."""
    import dataclasses

    from roomshard.wire.tickets import Signer
    from shard.directory_client import DirectoryClient
    from shard.server import ShardServer
    from tests.shard.conftest import BASE_CFG
    from tests.shard.fakedir import SECRET, FakeDirectory

    fake = FakeDirectory(reachable=False)
    cfg = dataclasses.replace(BASE_CFG)
    server = ShardServer(cfg, DirectoryClient(cfg.directory_url, "i1", Signer([SECRET]),
                                              transport=fake.transport()))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.get("/readyz")
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
            assert (await http.get("/healthz")).status_code == 200
            await await_until(lambda: server._hb_failures >= 2, 5, "heartbeats to fail")
            assert not server.ready()
            fake.reachable = True
            await await_until(server.ready, 5, "registration once the directory is up")
            assert (await http.get("/readyz")).status_code == 200
            assert fake.heartbeats[0]["boot_id"] == server.boot_id
            assert set(fake.heartbeats[0]["load"]) == {"rooms", "connections", "messages_per_s"}
    finally:
        await server.shutdown()
    # As every shard: ask for a live drain of its rooms first, then leave.
    assert fake.leaves == [{"drain": True, "remove": False}, {"drain": False, "remove": False}]


async def test_join_gate_can_refuse_before_the_room_is_opened(shard, monkeypatch):
    """The handoff's join gate sees the ticket first and its close code wins."""
    seen = []

    def gate(ticket):
        seen.append((ticket.room, ticket.user))
        return (4010, "room moved") if ticket.room == "gone" else None

    monkeypatch.setattr(shard.server.handoff, "gate", gate)
    assert await close_code(await connect(shard.url("gone", "alice"))) == 4010
    ws, welcome = await shard.join("here", "bob")
    assert welcome["type"] == "welcome" and seen == [("gone", "alice"), ("here", "bob")]
    assert "gone" not in shard.fake.opens
    await ws.close()


async def test_frozen_room_refuses_joins_1013_and_holds_sends_until_thaw(shard):
    """Mid-move (frozen) a room refuses joins with 1013; members' sends wait in TCP until thaw."""
    a, _ = await shard.join("mv2", "alice")
    live = shard.server.live_rooms.get("mv2")
    live.freeze()
    assert await close_code(await connect(shard.url("mv2", "bob"))) == 1013
    await a.send('{"type":"send","id":"held","text":"wait"}')
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(a.recv(), 0.3)  # not sequenced while frozen
    assert live.room.seq == 0
    live.thaw()
    assert (await recv_until(a, "ack")) == {"type": "ack", "id": "held", "seq": 1}
    await a.close()


async def test_adopted_snapshot_continues_seq_history_and_ids(shard):
    """A room adopted from a snapshot keeps seq, history and idempotency for reconnecting clients."""
    from shard.room import Room

    src = Room(name="moved", instance="i9", epoch=3, owner_epoch=3, history_limit=10)
    import time

    for i in range(3):
        src.send("alice", f"m{i}", f"t{i}", time.time())
    shard.fake.ticket("moved", "x")
    shard.fake.rooms["moved"].epoch = shard.fake.rooms["moved"].owner_epoch = 4
    shard.server.live_rooms.adopt(Room.from_snapshot(src.snapshot(), instance="i1", epoch=4,
                                                   owner_epoch=4))
    a, welcome = await shard.join("moved", "alice", since=1)
    assert (welcome["epoch"], welcome["seq"], welcome["recovered"]) == (4, 3, True)
    assert [(await recv_json(a))["id"] for _ in range(2)] == ["m1", "m2"]
    await a.send('{"type":"send","id":"m2","text":"t2"}')  # a retry of an acked id
    assert await recv_json(a) == {"type": "ack", "id": "m2", "seq": 3}
    assert "moved" not in shard.fake.opens  # adopted, never opened as lost
    await a.close()


async def test_silent_socket_is_closed_after_the_http_idle_timeout(shard, monkeypatch):
    """A TCP client that never completes a request is disconnected after the idle timeout."""
    from shard import connection

    monkeypatch.setattr(connection, "HTTP_IDLE_TIMEOUT_S", 0.2)
    host, port = shard.server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert await asyncio.wait_for(reader.read(), t(5)) == b""  # EOF from the shard
    writer.close()


async def test_ticket_for_another_instance_is_4003(shard):
    """A ticket naming another instance, presented on this instance's path, is closed 4003."""
    token = shard.fake.ticket("elsewhere", "alice", instance="i2")
    ws = await connect(f"{shard.ws_base}/i1/room/elsewhere?ticket={token}")
    assert await close_code(ws) == 4003
    assert shard.server.stats.refused == {4003: 1}


async def test_a_lease_too_close_to_the_directorys_down_after_is_reported(caplog):
    """The directory's answer carries down_after (10 s): a 9 s lease leaves no margin."""
    from tests.shard.conftest import start_shard
    from tests.shard.fakedir import FakeDirectory

    with caplog.at_level("ERROR", logger="roomshard.shard"):
        server = await start_shard(FakeDirectory(), lease=9.0)
        await server.shutdown()
    assert any("before the directory's down_after" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("ERROR", logger="roomshard.shard"):
        server = await start_shard(FakeDirectory(), lease=6.0)
        await server.shutdown()
    assert not any("down_after" in r.getMessage() for r in caplog.records)


async def test_kept_rooms_are_confirmed_in_bounded_batches(shard):
    """Each heartbeat asks about at most a bounded number of kept rooms; the rest follow."""
    socks = [(await shard.join(f"k{i}", "alice"))[0] for i in range(3)]
    shard.fake.reachable = False
    for ws in socks:
        assert (await frames_until_close(ws))[1] == 1001
    live_rooms = shard.server.live_rooms
    assert len(live_rooms.unconfirmed(limit=2)) == 2 and len(live_rooms.unconfirmed()) == 3
    kept, dropped = live_rooms.confirm(live_rooms.unconfirmed(limit=2), owned={"k0", "k1", "k2"})
    assert (kept, dropped) == (2, 0) and len(live_rooms.unconfirmed()) == 1
