"""End to end on loopback: the real directory and shard processes, real WebSocket clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import connect

from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET, Proc, Procs
from roomshard.testing.timing import await_until, t
from roomshard.wire.tickets import Signer
from tests.shard.conftest import close_code, recv_json, recv_until
from tests.shard.e2e import metric, room_url

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proc, Proc]]:
    """One directory and one shard (history of 3 messages) shared by this module's tests."""
    with Procs() as p:
        directory = p.directory()
        shard = p.shard("i1", directory.url, extra=["--history", "3"])
        yield directory, shard


async def join(directory: Proc, room: str, user: str, since: int | None = None, **kw):
    ws = await connect(await room_url(directory, room, user, since), open_timeout=t(10), **kw)
    return ws, await recv_json(ws)


def send(msg_id: str, text: str = "hi") -> str:
    return orjson.dumps({"type": "send", "id": msg_id, "text": text}).decode()


async def test_welcome_presence_messages_and_acks(cluster):
    """Welcome fields, presence join/leave, every member gets each message, the sender an ack."""
    d, _ = cluster
    a, wa = await join(d, "e2e-basic", "alice")
    assert wa == {"type": "welcome", "room": "e2e-basic", "instance": "i1", "epoch": wa["epoch"],
                  "user": "alice", "seq": 0, "members": ["alice"]}
    a2, wa2 = await join(d, "e2e-basic", "alice")  # a second tab: no presence event
    b, wb = await join(d, "e2e-basic", "bob")
    assert wa2["members"] == ["alice"] and wb["members"] == ["alice", "bob"]
    for ws in (a, a2):
        assert await recv_json(ws) == {"type": "presence", "event": "join", "user": "bob"}
    for i in range(3):
        await b.send(send(f"b{i}", f"text {i}"))
    for ws in (a, a2, b):
        got = [await recv_until(ws, "message") for _ in range(3)]
        assert [(m["seq"], m["id"], m["user"], m["text"]) for m in got] == [
            (1, "b0", "bob", "text 0"), (2, "b1", "bob", "text 1"), (3, "b2", "bob", "text 2")]
    await a.close()
    await b.close()
    assert await recv_until(a2, "presence") == {"type": "presence", "event": "leave", "user": "bob"}
    await a2.close()


async def test_sender_gets_acks_in_order(cluster):
    """Each send is acked with its id and seq, in order."""
    d, _ = cluster
    a, _ = await join(d, "e2e-ack", "alice")
    for i in range(5):
        await a.send(send(f"m{i}"))
    acks = [await recv_until(a, "ack") for _ in range(5)]
    assert acks == [{"type": "ack", "id": f"m{i}", "seq": i + 1} for i in range(5)]
    await a.close()


async def test_error_frames_for_refused_frames(cluster):
    """Malformed JSON, unknown type, missing/mistyped fields, binary -> bad_request; long -> too_long."""
    d, _ = cluster
    a, _ = await join(d, "e2e-errors", "alice")
    cases = [
        ("{not json", "bad_request", None),
        ('{"type": "shout", "id": "u1", "text": "x"}', "bad_request", "u1"),
        ('{"type": "send", "text": "x"}', "bad_request", None),
        ('{"type": "send", "id": "t1", "text": 42}', "bad_request", "t1"),
        ('{"type": "send", "id": 7, "text": "x"}', "bad_request", None),
        (b'{"type": "send", "id": "bin", "text": "x"}', "bad_request", None),
        (send("long", "x" * 4097), "too_long", "long"),
    ]
    for frame, code, msg_id in cases:
        await a.send(frame)
        err = await recv_json(a)
        assert err["type"] == "error" and err["code"] == code and err.get("id") == msg_id, frame
        assert err["message"]
    await a.send(send("ok", "x" * 4096))  # exactly the limit passes; the connection is fine
    assert (await recv_until(a, "ack"))["id"] == "ok"
    await a.close()


async def test_rate_limit_errors_then_close_4008(cluster):
    """Over 20/s with a burst of 40: rate_limited errors; a sustained flood is closed 4008."""
    d, s = cluster
    a, _ = await join(d, "e2e-rate", "alice")
    before = await metric(s, "roomshard_shard_rate_limit_hits_total")
    for i in range(200):
        await a.send(send(f"f{i}"))
    frames = []
    code = None
    try:
        while True:
            frames.append(await recv_json(a))
    except websockets.ConnectionClosed:
        code = a.close_code
    acks = [f for f in frames if f["type"] == "ack"]
    limited = [f for f in frames if f["type"] == "error" and f["code"] == "rate_limited"]
    assert 40 <= len(acks) < 60 and limited and limited[0]["id"] == f"f{len(acks)}"
    assert code == 4008
    assert await metric(s, "roomshard_shard_rate_limit_hits_total") > before


async def test_frame_over_max_frame_closes_1009(cluster):
    """A frame over 1 MiB closes the connection with 1009."""
    d, _ = cluster
    a, _ = await join(d, "e2e-big", "alice", max_size=None)
    await a.send(send("big", "x" * (1 << 20)))
    assert await close_code(a) == 1009


async def test_duplicate_id_is_acked_once_and_broadcast_once(cluster):
    """Resending an id (also from a new connection of the same user) returns the original ack only."""
    d, _ = cluster
    a, _ = await join(d, "e2e-dup", "alice")
    b, _ = await join(d, "e2e-dup", "bob")
    await a.send(send("same", "once"))
    first = await recv_until(a, "ack")
    await a.close()
    a2, _ = await join(d, "e2e-dup", "alice")  # a retry after a reconnect
    await a2.send(send("same", "once"))
    assert await recv_until(a2, "ack") == first
    await a2.send(send("next"))
    seen = [await recv_until(b, "message"), await recv_until(b, "message")]
    assert [m["id"] for m in seen] == ["same", "next"]
    assert seen[1]["seq"] == first["seq"] + 1
    await a2.close()
    await b.close()


async def test_resume_without_gap_with_gap_and_beyond(cluster):
    """since within history replays in order (recovered true); a gap or a future since says false."""
    d, _ = cluster
    a, _ = await join(d, "e2e-resume", "alice")
    for i in range(5):
        await a.send(send(f"r{i}", f"t{i}"))
    assert (await recv_until(a, "ack"))["seq"] == 1
    for _ in range(4):
        await recv_until(a, "ack")
    b, wb = await join(d, "e2e-resume", "bob", since=2)  # 3, 4, 5 are in the 3-message history
    assert wb["recovered"] is True and wb["seq"] == 5
    assert [(await recv_json(b))["seq"] for _ in range(3)] == [3, 4, 5]
    c, wc = await join(d, "e2e-resume", "carol", since=1)  # 2 is gone
    assert wc["recovered"] is False
    # After the announced gap, what history still holds follows in order.
    assert [(await recv_json(c))["seq"] for _ in range(3)] == [3, 4, 5]
    e, we = await join(d, "e2e-resume", "erin", since=99)
    assert we["recovered"] is False
    odd = await connect(await room_url(d, "e2e-resume", "odd") + "&since=%C2%B2")  # "²"
    assert (await recv_json(odd))["recovered"] is False
    await odd.close()
    f, wf = await join(d, "e2e-resume", "frank", since=5)
    assert wf["recovered"] is True
    await a.send(send("live"))
    assert (await recv_json(f))["id"] == "live"  # nothing replayed before the live message
    for ws in (a, b, c, e, f):
        await ws.close()


async def test_ticket_refusals_4001(cluster):
    """Missing, forged, expired and reused tickets are closed with 4001 after the handshake."""
    d, s = cluster
    base = s.url.replace("http://", "ws://") + "/i1/room/e2e-tickets"
    assert await close_code(await connect(base)) == 4001
    assert await close_code(await connect(base + "?ticket=garbage")) == 4001
    forged = Signer(["another-secret"])
    tk = forged.issue_ticket(room="e2e-tickets", instance="i1", epoch=1, user="x", ttl=60,
                             now=time.time())
    assert await close_code(await connect(f"{base}?ticket={forged.encode_ticket(tk)}")) == 4001
    signer = Signer([TEST_CLUSTER_SECRET])
    old = signer.issue_ticket(room="e2e-tickets", instance="i1", epoch=1, user="x", ttl=60,
                              now=time.time() - 120)
    assert await close_code(await connect(f"{base}?ticket={signer.encode_ticket(old)}")) == 4001
    url = await room_url(d, "e2e-tickets", "alice")
    first = await connect(url)
    assert (await recv_json(first))["type"] == "welcome"
    assert await close_code(await connect(url)) == 4001  # accepted once
    await first.close()


async def test_ticket_for_another_room_4003(cluster):
    """A ticket used on another room's path is closed with 4003."""
    d, _ = cluster
    url = await room_url(d, "e2e-room-a", "alice")
    assert await close_code(await connect(url.replace("/room/e2e-room-a?", "/room/e2e-room-b?"))) == 4003


async def test_wrong_instance_or_invalid_room_4004(cluster):
    """Another instance's prefix or an invalid room id is a stale route: 4004."""
    d, _ = cluster
    url = await room_url(d, "e2e-route", "alice")
    assert await close_code(await connect(url.replace("/i1/room/", "/i7/room/"))) == 4004
    assert await close_code(await connect(url.replace("/room/e2e-route?", "/room/bad.room?"))) == 4004


async def test_http_surface_of_a_real_shard(cluster):
    """healthz and readyz answer 200, metrics is Prometheus text, a bad upgrade is a JSON 400."""
    _, s = cluster
    async with httpx.AsyncClient(base_url=s.url) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).json()["status"] == "ready"
        assert "roomshard_shard_deliveries_total" in (await http.get("/metrics")).text
        r = await http.get("/i1/room/x", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"


async def test_origin_not_allowed_4008(procs):
    """With allowed origins set, another Origin is closed with 4008 and a listed one joins."""
    d = procs.directory()
    procs.shard("i1", d.url, extra=["--allowed-origins", "https://chat.example.com"])
    bad = await connect(await room_url(d, "o", "alice"), origin="https://evil.example.com")
    assert await close_code(bad) == 4008
    ok = await connect(await room_url(d, "o", "alice"), origin="https://chat.example.com")
    assert (await recv_json(ok))["type"] == "welcome"
    await ok.close()


async def test_max_connections_1013(procs):
    """Past max connections a client is closed with 1013."""
    d = procs.directory()
    procs.shard("i1", d.url, extra=["--max-connections", "1"])
    first, _ = await join(d, "full", "alice")
    assert await close_code(await connect(await room_url(d, "full", "bob"))) == 1013
    await first.close()


async def test_sigterm_closes_1001_and_leaves_directory(procs):
    """SIGTERM closes clients with 1001, tells the directory, exits 0 within the timeout."""
    d = procs.directory()
    s = procs.shard("i1", d.url, extra=["--shutdown-timeout", "5"])
    a, _ = await join(d, "bye", "alice")
    started = time.monotonic()
    code = await asyncio.to_thread(procs.terminate, s, 15)
    assert code == 0 and time.monotonic() - started < t(8)
    assert await close_code(a) == 1001
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{d.url}/v1/admin/instances",
                           headers={"authorization": f"Bearer {TEST_ADMIN_TOKEN}"})
    # Told: no new placements on it (draining, or disabled once the directory parked it).
    assert next(i["state"] for i in r.json()["instances"] if i["id"] == "i1") in (
        "draining", "disabled")


async def test_restart_refuses_old_tickets_and_restarts_seq_above(procs):
    """After a crash: tickets from before are 4001, the room's epoch and seq jump, resume says false."""
    d = procs.directory()
    s = procs.shard("i1", d.url)
    a, wa = await join(d, "crash", "alice")
    await a.send(send("m1"))
    assert (await recv_until(a, "ack"))["seq"] == 1
    unused = await room_url(d, "crash", "bob")
    procs.kill(s)
    assert await close_code(a) in (1006, 1001)
    # Same address as before (the port the OS gave the first process), as a
    # restarted machine would; the directory refuses a new address for an
    # instance that still has rooms until it is marked down.
    procs.start("i1-again", ["shard", "--instance", "i1", "--port", str(s.port),
                             "--directory-url", d.url])
    assert await close_code(await connect(unused)) == 4001
    b, wb = await join(d, "crash", "bob", since=1)
    assert wb["epoch"] > wa["epoch"] and wb["seq"] == wb["epoch"] << 32
    assert wb["recovered"] is False
    await b.send(send("m2"))
    assert (await recv_until(b, "ack"))["seq"] == (wb["epoch"] << 32) + 1
    await b.close()


async def test_partitioned_shard_stops_serving_and_refuses_1013(procs):
    """When the directory is unreachable past the lease, clients get 1001 and new joins 1013."""
    d = procs.directory()
    s = procs.shard("i1", d.url, extra=["--heartbeat-interval", "0.2", "--lease", "1"])
    a, _ = await join(d, "part", "alice")
    later = await room_url(d, "part", "bob")
    procs.kill(d)
    assert await close_code(a, timeout=10) == 1001
    assert await close_code(await connect(later)) == 1013
    async with httpx.AsyncClient() as http:
        await await_until(
            lambda: _status(http, f"{s.url}/readyz", 503), 10, "readyz to say 503")


async def _status(http: httpx.AsyncClient, url: str, expected: int) -> bool:
    return (await http.get(url)).status_code == expected


@pytest.mark.parametrize("extra,expected", [
    (["--permessage-deflate", "true"], "ROOMSHARD_PERMESSAGE_DEFLATE is not supported"),
    (["--instance", "x9"], "--instance: expected i1..i9999"),
])
def test_unsupported_or_invalid_settings_stop_with_one_line(extra, expected):
    """A setting the shard cannot honour stops start-up with exit 2 and one clear line."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "roomshard", "shard", "--instance", "i1", "--port", "0",
            "--directory-url", "http://127.0.0.1:9", *extra]
    env = {"ROOMSHARD_CLUSTER_SECRET": TEST_CLUSTER_SECRET, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=t(30),
                          check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr


def test_port_in_use_stops_with_one_line():
    """Binding a port already taken stops with exit 2 and one line, not a traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = [sys.executable, "-m", "roomshard", "shard", "--instance", "i1", "--port",
                str(taken.getsockname()[1]), "--directory-url", "http://127.0.0.1:9"]
        env = {"ROOMSHARD_CLUSTER_SECRET": TEST_CLUSTER_SECRET, "PATH": "/usr/bin:/bin",
               "ROOMSHARD_LOG_LEVEL": "error"}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=t(30),
                          check=False)
    assert done.returncode == 2
    assert "cannot serve" in done.stderr and "Traceback" not in done.stderr
