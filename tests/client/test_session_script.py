"""The session's reaction to each close code, against a scripted WebSocket peer on loopback.

The real shard cannot be made to send every close code on demand (1013 and
4009 need a move in flight or a stalled reader), so a small real
``websockets`` server plays the shard's side of the protocol from a script
and the directory call goes through httpx's MockTransport (the control-call
seam). End-to-end tests against real processes are in ``test_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from roomshard.client import Message, Session, SessionClosed, State, StateChange
from roomshard.testing.timing import await_until, t


@dataclass
class Peer:
    """Each connection runs the next script; it records what the client sent."""

    scripts: list = field(default_factory=list)
    queries: list[dict[str, list[str]]] = field(default_factory=list)
    received: list[list[dict]] = field(default_factory=list)
    url: str = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.queries.append(parse_qs(urlsplit(ws.request.path).query))
        frames: list[dict] = []
        self.received.append(frames)
        script = self.scripts.pop(0) if self.scripts else None
        if script is not None:
            await script(ws, frames)


def welcome(seq: int, members: list[str], recovered: bool | None = None, instance: str = "i1") -> str:
    frame = {"type": "welcome", "room": "r", "instance": instance, "epoch": 1, "user": "alice",
             "seq": seq, "members": members}
    if recovered is not None:
        frame["recovered"] = recovered
    return json.dumps(frame)


async def recv_send(ws: ServerConnection, frames: list[dict]) -> dict:
    frame = json.loads(await ws.recv())
    frames.append(frame)
    return frame


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    async with serve(p.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        p.url = f"ws://127.0.0.1:{port}/i1/room/r"
        yield p


def session_for(peer: Peer, calls: list[int]) -> Session:
    def directory(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, json={"room": "r", "instance": "i1", "epoch": 1,
                                         "url": f"{peer.url}?ticket=t{len(calls)}", "expires_in": 60})
    http = httpx.AsyncClient(transport=httpx.MockTransport(directory))
    return Session("http://directory.test", "r", "alice", http=http, rand=lambda: 0.0)


async def test_move_close_resends_unacked_with_the_same_id_and_resumes(peer: Peer) -> None:
    """After 4010 the session shows moving, asks the directory again, resumes with since, and
    resends the unacked message with its id; the ack resolves the send once."""
    async def first(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(4, ["alice"]))
        await recv_send(ws, frames)  # no ack: the room moves
        await ws.close(4010, "room moved")

    async def second(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(5, ["alice", "bob"], recovered=True, instance="i2"))
        frame = await recv_send(ws, frames)
        await ws.send(json.dumps({"type": "message", "seq": 5, "id": frame["id"], "user": "alice",
                                  "text": frame["text"], "ts": 0}))  # replay of the pre-move seq
        await ws.send(json.dumps({"type": "ack", "id": frame["id"], "seq": 5}))
        await ws.wait_closed()

    peer.scripts = [first, second]
    calls: list[int] = []
    s = session_for(peer, calls)
    events: list[object] = []
    await s.start(timeout=t(10))
    recorder = asyncio.create_task(_record(s, events))
    try:
        fut = s.send("hello")
        assert await asyncio.wait_for(fut, t(10)) == 5
        await await_until(lambda: any(isinstance(e, Message) for e in events), 10, "the message")
        assert peer.received[0][0]["id"] == peer.received[1][0]["id"]
        assert "since" not in peer.queries[0] and peer.queries[1]["since"] == ["4"]
        assert peer.queries[1]["ticket"] == ["t2"] and len(calls) == 2
        states = [e.state for e in events if isinstance(e, StateChange)]
        assert states[:3] == [State.OPEN, State.MOVING, State.OPEN]
        assert s.instance == "i2" and s.members == ["alice", "bob"]
        assert [e.seq for e in events if isinstance(e, Message)] == [5]
    finally:
        recorder.cancel()
        await s.close()


async def _record(s: Session, into: list[object]) -> None:
    async for ev in s.events():
        into.append(ev)


@pytest.mark.parametrize("code", [1013, 4009, 4001, 4004, 1001])
async def test_retryable_closes_reconnect_with_since(peer: Peer, code: int) -> None:
    """A retryable close code leads to a new directory call and a resume after the last seq seen."""
    async def first(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(2, ["alice"]))
        await ws.send(json.dumps({"type": "message", "seq": 3, "id": "x", "user": "bob", "text": "hi", "ts": 0}))
        await ws.close(code)

    async def second(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(3, ["alice"], recovered=True))
        await ws.wait_closed()

    peer.scripts = [first, second]
    calls: list[int] = []
    s = session_for(peer, calls)
    await s.start(timeout=t(10))
    try:
        await await_until(lambda: s.connections == 2 and s.state is State.OPEN, 10, "the second welcome")
        assert peer.queries[1]["since"] == ["3"] and len(calls) == 2
    finally:
        await s.close()


async def test_frame_too_big_ends_the_session(peer: Peer) -> None:
    """1009 is not retried: the session closes, pending sends fail, iteration raises SessionClosed."""
    async def only(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(0, ["alice"]))
        await recv_send(ws, frames)
        await ws.close(1009)

    peer.scripts = [only]
    calls: list[int] = []
    s = session_for(peer, calls)
    await s.start(timeout=t(10))
    fut = s.send("x" * 10)
    with pytest.raises(SessionClosed):
        await asyncio.wait_for(fut, t(10))
    assert s.state is State.CLOSED and len(calls) == 1
    with pytest.raises(SessionClosed):
        async for _ in s.events():
            pass
    await s.close()


async def test_too_long_refusal_fails_only_that_send(peer: Peer) -> None:
    """An error frame with the send's id fails its future with SendRefused; the session stays open."""
    from roomshard.client import SendRefused

    async def only(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(0, ["alice"]))
        frame = await recv_send(ws, frames)
        await ws.send(json.dumps({"type": "error", "id": frame["id"], "code": "too_long", "message": "over 4096"}))
        frame = await recv_send(ws, frames)
        await ws.send(json.dumps({"type": "ack", "id": frame["id"], "seq": 1}))
        await ws.wait_closed()

    peer.scripts = [only]
    calls: list[int] = []
    s = session_for(peer, calls)
    await s.start(timeout=t(10))
    try:
        with pytest.raises(SendRefused) as err:
            await asyncio.wait_for(s.send("too long"), t(10))
        assert err.value.code == "too_long"
        assert await asyncio.wait_for(s.send("fine"), t(10)) == 1
        assert s.state is State.OPEN and len(s.outbox) == 0
    finally:
        await s.close()


async def test_an_unavailable_refusal_is_sent_again_later_with_the_same_id(peer: Peer) -> None:
    """The shard's message store is down: the send is refused with ``unavailable``; the
    session writes it again (same id) a moment later and its future gets the seq."""
    async def only(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(0, ["alice"]))
        first = await recv_send(ws, frames)
        await ws.send(json.dumps({"type": "error", "id": first["id"], "code": "unavailable",
                                  "message": "the message store is unavailable"}))
        again = await recv_send(ws, frames)
        assert again == first
        await ws.send(json.dumps({"type": "ack", "id": again["id"], "seq": 1}))
        await ws.wait_closed()

    peer.scripts = [only]
    s = session_for(peer, [])
    await s.start(timeout=t(10))
    try:
        assert await asyncio.wait_for(s.send("stored later"), t(10)) == 1
        sent = peer.received[0]
        assert len(sent) == 2 and sent[0] == sent[1]
    finally:
        await s.close()


async def test_a_try_that_could_not_reach_its_shard_is_named_on_the_next_connect(
        peer: Peer) -> None:
    """Refused, or ended without a close frame: the next connect says ``unreachable`` with
    that instance (the directory checks it); a close with a code says nothing of the kind."""
    with socket.socket() as s:  # a port nothing listens on: a dead shard's
        s.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{s.getsockname()[1]}/i7/room/r"

    async def dropped(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(1, ["alice"]))
        ws.transport.abort()  # no close frame: the client sees 1006

    async def closed(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(1, ["alice"], recovered=True))
        await ws.close(1001)

    async def stays(ws: ServerConnection, frames: list[dict]) -> None:
        await ws.send(welcome(1, ["alice"], recovered=True))
        await ws.wait_closed()

    peer.scripts = [dropped, closed, stays]
    bodies: list[dict] = []

    def directory(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        url, instance = (dead, "i7") if len(bodies) == 1 else (peer.url, "i1")
        return httpx.Response(200, json={"room": "r", "instance": instance, "epoch": 1,
                                         "url": f"{url}?ticket=t{len(bodies)}", "expires_in": 60})

    http = httpx.AsyncClient(transport=httpx.MockTransport(directory))
    s = Session("http://directory.test", "r", "alice", http=http, rand=lambda: 0.0)
    await s.start(timeout=t(10))
    try:
        await await_until(lambda: s.connections == 3 and s.state is State.OPEN, 10,
                          "the third welcome")
    finally:
        await s.close()
    assert bodies == [{"user": "alice"}, {"user": "alice", "unreachable": "i7"},
                      {"user": "alice", "unreachable": "i1"}, {"user": "alice"}]
