"""A connection on its own: a real socket pair, no server (events and room are recorders)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import orjson
from websockets.frames import Frame, Opcode

from roomshard.config import ShardConfig, linger_limits
from roomshard.linger import LingerPool
from roomshard.testing.timing import await_until, t
from roomshard.wire.protocol import CloseCode
from shard.connection import Connection, ConnectionContext
from shard.frames import text_frame
from shard.http import HttpRequest, HttpResponse, json_response
from shard.ratelimit import TokenBucket
from shard.stats import Stats
from shard.writer import Writer

CFG = ShardConfig(instance="i1", port=0, directory_url="http://directory.test",
                  cluster_secret="s" * 32)
HANDSHAKE = (b"GET /i1/room/r?ticket=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")


class Events:
    """The server's side of a connection, recorded."""

    def __init__(self) -> None:
        self.admitted: list[HttpRequest] = []
        self.detached: list[Connection] = []
        self.forgotten: list[Connection] = []

    def admit(self, conn: Connection, request: HttpRequest) -> None:
        self.admitted.append(request)

    async def handle_http(self, request: HttpRequest) -> HttpResponse:
        return json_response({"path": request.path})

    def detach(self, conn: Connection) -> None:
        self.detached.append(conn)

    def forget(self, conn: Connection) -> None:
        self.forgotten.append(conn)


@dataclasses.dataclass
class Link:
    """The room a joined connection is in, recorded."""

    name: str = "r"
    frozen: bool = False
    received: list[tuple[bytes, bool]] = dataclasses.field(default_factory=list)

    def receive(self, conn: Connection, payload: bytes, is_text: bool) -> None:
        self.received.append((bytes(payload), is_text))

    def refill(self, conn: Connection) -> None:
        conn.replaying = False

    def leave(self, conn: Connection) -> None:
        pass


async def open_pair(cfg: ShardConfig = CFG):
    """A Connection on one end of a socket pair, streams on the other."""
    events, stats = Events(), Stats()
    ctx = ConnectionContext(cfg, stats, Writer(), LingerPool(linger_limits(cfg)), events,
                            time.monotonic, lambda token: False)
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, conn = await loop.connect_accepted_socket(lambda: Connection(ctx), sock=ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    return conn, events, stats, reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readexactly(2), t(5))
    n = head[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(n)


async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(HANDSHAKE)
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), t(5))


def masked(opcode: Opcode, data: bytes) -> bytes:
    return Frame(opcode, data).serialize(mask=True, extensions=[])


async def test_plain_http_is_answered_through_the_events():
    _, _, _, reader, writer = await open_pair()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), t(5))
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert orjson.loads(await reader.readexactly(length)) == {"path": "/healthz"}
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), t(5))


async def test_upgrade_frames_in_frames_out_and_a_close_code_that_arrives():
    conn, events, _, reader, writer = await open_pair()
    head = await upgrade(reader, writer)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert [r.path for r in events.admitted] == ["/i1/room/r"]
    assert events.admitted[0].query == {"ticket": "abc"}
    link = Link()
    conn.joined(link, 1, "alice", TokenBucket(20, 40, time.monotonic()))  # type: ignore[arg-type]
    writer.write(masked(Opcode.TEXT, b'{"type":"send","id":"m1","text":"hi"}')
                 + masked(Opcode.BINARY, b"\x00\x01")
                 + masked(Opcode.PING, b"p")  # handled by the websockets parser from here on
                 + Frame(Opcode.TEXT, b'{"a":', fin=False).serialize(mask=True, extensions=[])
                 + masked(Opcode.CONT, b"1}"))
    conn.queue(text_frame(b'{"type":"ack","id":"m0","seq":7}'))
    assert await read_frame(reader) == (0x1, b'{"type":"ack","id":"m0","seq":7}')
    assert await read_frame(reader) == (0xA, b"p")  # the pong
    await await_until(lambda: len(link.received) == 3, 5, "the messages to reach the room")
    assert link.received == [(b'{"type":"send","id":"m1","text":"hi"}', True),
                             (b"\x00\x01", False), (b'{"a":1}', True)]  # reassembled
    conn.close(CloseCode.ROOM_MOVED, "room moved to i2")
    op, body = await read_frame(reader)
    assert op == 0x8 and int.from_bytes(body[:2], "big") == CloseCode.ROOM_MOVED
    assert body[2:] == b"room moved to i2"
    assert events.detached and len(link.received) == 3
    writer.write(masked(Opcode.CLOSE, body[:2]))  # the close handshake: then our FIN
    assert await asyncio.wait_for(reader.read(), t(5)) == b""
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), t(5))


async def test_a_send_queue_over_its_bound_is_dropped_and_closed_4009():
    cfg = dataclasses.replace(CFG, send_queue_bytes=4096)
    conn, _, stats, reader, writer = await open_pair(cfg)
    await upgrade(reader, writer)
    conn.joined(Link(), 1, "bob", TokenBucket(20, 40, time.monotonic()))  # type: ignore[arg-type]
    conn.queue(text_frame(b"a" * 3000))
    conn.queue(text_frame(b"b" * 3000))  # 6 KB queued in one turn: over the bound
    op, body = await read_frame(reader)  # the frames are dropped, the close frame is first
    assert op == 0x8 and int.from_bytes(body[:2], "big") == CloseCode.SLOW_CONSUMER
    assert stats.slow_consumer_closes == 1
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), t(5))
