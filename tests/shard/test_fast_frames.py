"""The shard's fast frame reader agrees with websockets' parser, and hands it every other frame."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol, Side

from roomshard.testing.timing import t
from shard.frames import HEAD_PONG, MAX_FAST_PARTIAL, read_client_frames
from tests.shard.conftest import close_code, recv_json, recv_until


def client_frame(opcode: Opcode, data: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    raw = Frame(opcode, data, fin).serialize(mask=True)
    return bytes([raw[0] | 0x40]) + raw[1:] if rsv1 else raw  # websockets refuses to build RSV


def reference(stream: bytes, max_size: int) -> list[tuple[str, bytes]] | str:
    """What websockets' server-side parser makes of ``stream``: frames, or its failure."""
    ws = Protocol(Side.SERVER, state=OPEN, max_size=max_size)
    ws.receive_data(stream)
    out = [(f.opcode.name, f.data) for f in ws.events_received()]
    return out if ws.parser_exc is None else out + [("FAIL", type(ws.parser_exc).__name__.encode())]


def fast_then_full(chunks: list[bytes], max_size: int) -> list[tuple[str, bytes]] | str:
    """Feed chunks the way the shard does: fast reader until it says slow, then websockets."""
    names = {0x81: "TEXT", 0x82: "BINARY", HEAD_PONG: "PONG"}
    out: list[tuple[str, bytes]] = []
    rbuf, ws = b"", None
    for chunk in chunks:
        if ws is None:
            buf = rbuf + chunk
            frames, used, slow = read_client_frames(buf, max_size, 1 << 30)
            out += [(names[head], payload) for head, payload in frames]
            rbuf = buf[used:]
            if slow:
                ws = Protocol(Side.SERVER, state=OPEN, max_size=max_size)
                chunk, rbuf = rbuf, b""
            else:
                continue
        ws.receive_data(chunk)
        out += [(f.opcode.name, f.data) for f in ws.events_received()]
    if ws is not None and ws.parser_exc is not None:
        out.append(("FAIL", type(ws.parser_exc).__name__.encode()))
    return out


def random_stream(rng: random.Random) -> bytes:
    kinds = [lambda: client_frame(Opcode.TEXT, rng.randbytes(rng.choice([0, 5, 125, 126, 300, 70_000]))),
             lambda: client_frame(Opcode.BINARY, rng.randbytes(rng.randrange(200))),
             lambda: client_frame(Opcode.PONG, rng.randbytes(rng.randrange(126)))]
    rare = [lambda: client_frame(Opcode.PING, b"p"),
            lambda: client_frame(Opcode.TEXT, b"part", fin=False) + client_frame(Opcode.CONT, b"end"),
            lambda: client_frame(Opcode.TEXT, b"x", rsv1=True),
            lambda: Frame(Opcode.TEXT, b"unmasked").serialize(mask=False),
            lambda: client_frame(Opcode.CLOSE, b"\x03\xe8")]
    frames = [rng.choice(kinds)() for _ in range(rng.randrange(1, 6))]
    if rng.random() < 0.5:
        frames.insert(rng.randrange(len(frames) + 1), rng.choice(rare)())
    return b"".join(frames)


def test_fast_reader_matches_websockets_on_random_streams_split_anywhere():
    """Any stream, cut into any chunks, yields the same frames (and failure) as websockets alone."""
    rng = random.Random(7)
    for _ in range(300):
        stream = random_stream(rng)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 6))))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert fast_then_full(chunks, 65_536) == reference(stream, 65_536)


@pytest.mark.parametrize("frame", [
    client_frame(Opcode.PING, b"p"),
    client_frame(Opcode.CLOSE, b"\x03\xe8"),
    client_frame(Opcode.TEXT, b"a", fin=False),
    client_frame(Opcode.CONT, b"a"),
    client_frame(Opcode.TEXT, b"a", rsv1=True),
    Frame(Opcode.TEXT, b"a").serialize(mask=False),
    client_frame(Opcode.TEXT, b"a" * 70_000),  # 64-bit length
    client_frame(Opcode.TEXT, b"a" * 101),  # over max_size 100
], ids=["ping", "close", "unfinished", "continuation", "rsv1", "unmasked", "64-bit-length",
        "over-max-size"])  # stable ids: the masks are random
def test_other_frames_are_left_to_websockets_at_their_boundary(frame):
    """Control, fragmented, malformed and oversized frames stop the fast reader where they start."""
    head = client_frame(Opcode.TEXT, b"ok")
    frames, used, slow = read_client_frames(head + frame + head, 100, 10)
    assert (frames, used, slow) == ([(0x81, b"ok")], len(head), True)


def test_incomplete_frames_wait_and_long_ones_go_to_websockets():
    """A short partial frame waits for more bytes; a long one is handed over (no quadratic copying)."""
    small = client_frame(Opcode.TEXT, b"x" * 300)
    assert read_client_frames(small[:1], 65_536, 10) == ([], 0, False)
    assert read_client_frames(small[:3], 65_536, 10) == ([], 0, False)
    assert read_client_frames(small[:-1], 65_536, 10) == ([], 0, False)
    big = client_frame(Opcode.TEXT, b"x" * (MAX_FAST_PARTIAL + 1))
    assert read_client_frames(big[:100], 65_536, 10) == ([], 0, True)


async def test_fragments_pings_and_split_frames_are_served_after_fast_frames(shard):
    """A client mixing plain frames, a fragmented message, a ping and byte-split frames gets every ack."""
    a, _ = await shard.join("mixed", "alice")
    await a.send('{"type":"send","id":"m1","text":"plain"}')
    assert (await recv_until(a, "ack"))["id"] == "m1"
    await a.send(['{"type":"send",', '"id":"m2","text":"in two fragments"}'])
    assert (await recv_until(a, "ack"))["id"] == "m2"
    pong = await a.ping(b"are you there")
    await asyncio.wait_for(pong, t(5))
    await a.send('{"type":"send","id":"m3","text":"after the ping"}')
    assert (await recv_until(a, "ack"))["id"] == "m3"
    await a.close()


async def test_frames_split_into_single_bytes_are_reassembled(shard):
    """A frame written one byte per TCP segment is read whole (fast reader's partial buffer)."""
    host, port = shard.server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = shard.url("bytewise", "bob").removeprefix(shard.ws_base)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 .encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), t(5))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in client_frame(Opcode.TEXT, b'{"type":"send","id":"s1","text":"slowly"}'):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0)
    seen = b""
    while b'"type":"ack"' not in seen:
        seen += await asyncio.wait_for(reader.read(4096), t(5))
    assert b'"id":"s1"' in seen
    writer.close()


async def test_oversized_frame_after_fast_frames_still_closes_1009(shard):
    """Frames the fast reader does not take keep websockets' answers (1009 over max_frame)."""
    a, _ = await shard.join("big", "carol")
    await a.send('{"type":"send","id":"m1","text":"first"}')
    assert (await recv_json(a))["type"] in ("message", "ack")
    await a.send("x" * (shard.server.cfg.max_frame + 1))
    assert await close_code(a) == 1009
