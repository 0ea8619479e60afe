"""Hardening of the shard's wire layer, end to end with real processes and raw sockets.

- idle clients that answer pings are never dropped, whatever the ratio of
  ping timeout to ping interval (the default is 1:1);
- one connection flooding control frames or empty fragments is closed with
  4008 and never starves the shard: a well-behaved client on the same shard
  keeps its acks fast and the shard keeps its lease;
- a fragmented message is bounded in fragments as well as bytes (1009);
- RFC 6455: invalid UTF-8 fails the connection with 1007 (also split across
  fragments); a bad handshake gets its HTTP status, never a 101;
- an optional per-address connection cap.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from roomshard.testing.procs import Proc, Procs
from roomshard.testing.timing import t
from tests.shard.conftest import close_code, recv_json, recv_until
from tests.shard.e2e import RawClient, metric, room_url

pytestmark = pytest.mark.e2e

PING_INTERVAL = 0.5  # the default ratio: ping timeout == ping interval


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proc, Proc]]:
    with Procs() as p:
        directory = p.directory()
        shard = p.shard("i1", directory.url, extra=["--ping-interval", str(PING_INTERVAL),
                                                      "--ping-timeout", str(PING_INTERVAL)])
        yield directory, shard


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame (payload < 126 bytes)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + masked


def send_frame(msg_id: str, text: str = "hi") -> bytes:
    return frame(0x1, orjson.dumps({"type": "send", "id": msg_id, "text": text}))


async def raw_join(directory: Proc, room: str, user: str) -> tuple[RawClient, dict]:
    raw = await asyncio.to_thread(RawClient, await room_url(directory, room, user), 1 << 20)
    first = await asyncio.to_thread(raw._next_frame)
    assert first is not None and first[0] == 0x1
    return raw, orjson.loads(first[1])


async def test_idle_client_answering_pings_stays_connected(cluster):
    """Several ping rounds at timeout == interval: a client that answers every ping stays."""
    directory, shard = cluster
    before = await metric(shard, "roomshard_shard_ping_timeouts_total")
    ws = await connect(await room_url(directory, "idle", "alice"), open_timeout=t(10))
    await recv_until(ws, "welcome")
    # websockets answers every ping; the shard must not close it for 8 ping rounds.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.wait_closed(), 8 * PING_INTERVAL)
    await ws.send(orjson.dumps({"type": "send", "id": "still-here", "text": "hi"}).decode())
    assert (await recv_until(ws, "ack"))["id"] == "still-here"
    assert await metric(shard, "roomshard_shard_ping_timeouts_total") == before
    await ws.close()


async def test_client_that_never_answers_pings_is_closed(cluster):
    directory, _ = cluster
    raw, welcome = await raw_join(directory, "deaf", "bob")  # reads, never sends a pong
    assert welcome["type"] == "welcome"
    started = time.monotonic()
    _, code = await asyncio.to_thread(raw.read_frames_until_close)
    assert code in (1011, None)  # 1011 "ping timeout", then the socket is aborted
    assert time.monotonic() - started < t(6 * PING_INTERVAL + 2)
    raw.close()


class Flooder:
    """A raw WebSocket client that writes ``chunk`` as fast as it can until stopped.

    A second thread reads what the server sends, so the server's close frame
    is seen even while we write.
    """

    def __init__(self, raw: RawClient, chunk: bytes) -> None:
        self.raw, self.chunk = raw, chunk
        self.stop = threading.Event()
        self.sent = 0
        self.close_code: int | None = None
        self.done = threading.Event()
        self._threads = [threading.Thread(target=self._write, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]

    def start(self) -> None:
        self.raw.sock.settimeout(t(0.5))
        for th in self._threads:
            th.start()

    def _write(self) -> None:
        while not self.stop.is_set() and not self.done.is_set():
            try:
                self.sent += self.raw.sock.send(self.chunk)
            except TimeoutError:
                continue  # the server stopped reading us: keep trying until stopped
            except OSError:
                return

    def _read(self) -> None:
        while not self.stop.is_set():
            f = self.raw._next_frame()
            if f is None:
                if self.raw.sock.fileno() < 0:
                    break
                continue
            if f[0] == 0x8:
                self.close_code = struct.unpack("!H", f[1][:2])[0]
                break
        self.done.set()

    def join(self) -> None:
        self.stop.set()
        for th in self._threads:
            th.join(t(5))
        self.raw.close()


async def _flood_while_chatting(cluster, room: str, chunk: bytes, prefix: bytes = b"",
                                codes: tuple[int, ...] = (4008, 1008)) -> None:
    directory, shard = cluster
    good = await connect(await room_url(directory, f"{room}-good", "carol"), open_timeout=t(10))
    await recv_until(good, "welcome")
    raw, _ = await raw_join(directory, room, "mallory")
    if prefix:
        raw.sock.sendall(prefix)
    flooder = Flooder(raw, chunk)
    flooder.start()
    latencies, health = [], []
    try:
        async with httpx.AsyncClient() as http:
            for i in range(30):  # 30 sends over ~3 s of flood, as a chat client would
                sent_at = time.monotonic()
                await good.send(orjson.dumps({"type": "send", "id": f"g{i}", "text": "hi"}).decode())
                ack = await recv_until(good, "ack", timeout=5)
                assert ack["id"] == f"g{i}"
                latencies.append(time.monotonic() - sent_at)
                h0 = time.monotonic()
                assert (await http.get(f"{shard.url}/healthz", timeout=t(5))).status_code == 200
                health.append(time.monotonic() - h0)
                await asyncio.sleep(0.1)  # the chat client's pace
        assert await asyncio.to_thread(flooder.done.wait, t(10)), "the flooder was never closed"
    finally:
        flooder.join()
    assert flooder.close_code in codes, flooder.close_code
    latencies.sort()
    health.sort()
    assert latencies[-1] < t(0.5), f"ack latency under flood: {latencies}"
    assert health[-1] < t(0.5), f"/healthz latency under flood: {health}"
    # The good client was never disconnected and the shard kept its lease.
    await good.send(orjson.dumps({"type": "send", "id": "after", "text": "hi"}).decode())
    assert (await recv_until(good, "ack"))["id"] == "after"
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{shard.url}/readyz", timeout=t(5))).status_code == 200
    await good.close()


async def test_ping_flood_is_closed_4008_and_others_stay_fast(cluster):
    await _flood_while_chatting(cluster, "pingflood", frame(0x9) * 10_000)


async def test_empty_continuation_flood_is_closed_and_others_stay_fast(cluster):
    # A text frame without FIN opens a fragmented message; then empty continuations.
    # The fragment bound (1009) or the wire budget (4008) closes it, whichever first.
    await _flood_while_chatting(cluster, "contflood", frame(0x0, fin=False) * 10_000,
                                prefix=frame(0x1, b"{", fin=False), codes=(1009, 4008, 1008))


async def test_fragmented_message_over_the_fragment_bound_closes_1009(cluster):
    directory, _ = cluster
    raw, _ = await raw_join(directory, "frag", "dave")
    # 300 fragments of one byte: far under max_frame in bytes, over the 256-fragment bound.
    raw.sock.sendall(frame(0x1, b"[", fin=False) + frame(0x0, b" ", fin=False) * 299
                     + frame(0x0, b"]"))
    _, code = await asyncio.to_thread(raw.read_frames_until_close)
    assert code == 1009
    raw.close()


async def test_fragmented_message_under_the_bound_is_accepted(cluster):
    directory, _ = cluster
    raw, _ = await raw_join(directory, "frag-ok", "erin")
    body = orjson.dumps({"type": "send", "id": "f1", "text": "é" * 20})
    parts = [body[i:i + 7] for i in range(0, len(body), 7)]  # splits "é" mid-character too
    wire = frame(0x1, parts[0], fin=False)
    wire += b"".join(frame(0x0, p, fin=False) for p in parts[1:-1]) + frame(0x0, parts[-1])
    raw.sock.sendall(wire)
    while True:
        f = await asyncio.to_thread(raw._next_frame)
        assert f is not None and f[0] != 0x8
        if f[0] == 0x1 and orjson.loads(f[1])["type"] == "ack":
            assert orjson.loads(f[1])["id"] == "f1"
            break
    raw.close()


@pytest.mark.parametrize("wire", [
    frame(0x1, b'{"type":"send","id":"u","text":"\xff"}'),
    # a valid JSON start, then a fragment that makes the joined text invalid UTF-8
    frame(0x1, b'{"type":"send","id":"u","text":"\xc3', fin=False) + frame(0x0, b'("}'),
], ids=["one-frame", "split-across-fragments"])
async def test_invalid_utf8_fails_the_connection_1007(cluster, wire):
    directory, _ = cluster
    raw, _ = await raw_join(directory, "utf8", "frank")
    raw.sock.sendall(wire)
    frames, code = await asyncio.to_thread(raw.read_frames_until_close)
    assert code == 1007
    assert not any(f.get("type") == "error" for f in frames)  # no bad_request frame
    raw.close()


def _handshake(shard: Proc, path: str, *, version: str = "13", http: str = "HTTP/1.1",
               key: str | None = None) -> bytes:
    host, port = shard.url.split("://", 1)[1].rsplit(":", 1)
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, int(port)), timeout=t(5)) as sock:
        sock.sendall(f"GET {path} {http}\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                     f"Sec-WebSocket-Version: {version}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.parametrize("kw,status", [
    ({"version": "8"}, 426),
    ({"http": "HTTP/1.0"}, None),  # any 4xx/5xx, never a 101
    ({"key": "not-base64-of-16-bytes"}, 400),
    ({"key": base64.b64encode(b"short").decode()}, 400),
])
async def test_bad_handshakes_get_their_http_status(cluster, kw, status):
    directory, shard = cluster
    url = await room_url(directory, "hs", "gina")
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    head = await asyncio.to_thread(_handshake, shard, path, **kw)
    status_line = head.split(b"\r\n", 1)[0]
    code = int(status_line.split()[1])
    assert code != 101 and code >= 400, head
    if status is not None:
        assert code == status, head
    if status == 426:
        assert b"\r\nsec-websocket-version: 13\r\n" in head.lower()


async def test_per_address_connection_cap():
    with Procs() as p:
        directory = p.directory()
        p.shard("i1", directory.url, extra=["--max-connections-per-address", "2"])
        socks = []
        for i in range(2):
            ws = await connect(await room_url(directory, "cap", f"u{i}"), open_timeout=t(10))
            assert (await recv_json(ws))["type"] == "welcome"
            socks.append(ws)
        third = await connect(await room_url(directory, "cap", "u2"), open_timeout=t(10))
        assert await close_code(third) == 4008
        await socks[0].close()
        # A freed slot admits the next one.
        again = await connect(await room_url(directory, "cap", "u3"), open_timeout=t(10))
        assert (await recv_json(again))["type"] == "welcome"
        for ws in (socks[1], again):
            await ws.close()
