"""A closed client keeps every frame it was sent: lingering close, end to end.

Real directory and shard processes. A client that floods the shard is
closed with 4008, and it still reads its welcome, every ack and every error
the shard wrote, then the close frame: the shard never resets a connection
whose peer is still sending (docs/PROTOCOL.md, "Closing"). What the client
read is checked against what the shard counted (its metrics) and what a
well-behaved member of the same room saw, who meanwhile keeps its acks fast
and is never disconnected. The same for a 20 MiB request body refused with
413 (431 for a head) by the shard and by the directory, and for 500 peers
that ignore everything after their close: gone after the linger bounds,
their descriptors and memory back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import orjson
import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from roomshard.testing.procs import Proc, Procs
from roomshard.testing.timing import await_until, t
from tests.shard.e2e import metric, room_url

pytestmark = pytest.mark.e2e

RUNS = 20
ROOM = "flooded"


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, tuple[Proc, Proc]]]:
    """A directory and a shard with the default limits ("rate": the message rate limit
    closes a flooder); another pair whose message rate is unbounded ("wire": the wire
    budget does)."""
    with Procs() as p:
        rate_dir = p.directory("dir-rate")
        rate = p.shard("i1", rate_dir.url)
        wire_dir = p.directory("dir-wire")
        wire = p.shard("i2", wire_dir.url, extra=["--rate", "1000000", "--rate-burst", "1000000"])
        yield {"rate": (rate_dir, rate), "wire": (wire_dir, wire)}


@dataclass
class Member:
    """A well-behaved member: one message every 50 ms, ack latency recorded."""

    ws: ClientConnection
    latencies: list[float] = field(default_factory=list)
    from_flooders: dict[str, int] = field(default_factory=dict)  # user -> messages seen
    closed: bool = False
    error: str = ""  # what stopped the reader, if not a close
    sent_at: dict[str, float] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        reader = asyncio.create_task(self._read())
        n = 0
        try:
            while not stop.is_set():
                n += 1
                self.sent_at[f"g{n}"] = time.monotonic()
                await self.ws.send(orjson.dumps({"type": "send", "id": f"g{n}", "text": "ok"}).decode())
                await asyncio.sleep(0.05)
        finally:
            reader.cancel()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = orjson.loads(raw)
                if msg["type"] == "ack":
                    self.latencies.append(time.monotonic() - self.sent_at.pop(msg["id"]))
                elif msg["type"] == "message" and msg["user"] != "good":
                    self.from_flooders[msg["user"]] = self.from_flooders.get(msg["user"], 0) + 1
        except ConnectionClosed:
            self.closed = True
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a task
            self.error = repr(exc)


async def flood(url: str, n: int) -> dict:
    """Send ``n`` sends back to back while reading; what arrived, and the close code."""
    got: dict = {"welcome": 0, "ack": 0, "message": 0, "presence": 0, "rate_limited": 0,
                 "other": 0}
    async with connect(url, open_timeout=t(10), max_queue=None) as ws:

        async def read() -> None:
            try:
                async for raw in ws:
                    msg = orjson.loads(raw)
                    kind = msg["type"] if msg["type"] != "error" else msg["code"]
                    got[kind if kind in got else "other"] += 1
            except ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        try:
            for i in range(n):
                await ws.send(orjson.dumps({"type": "send", "id": f"m{i}", "text": "x"}).decode())
        except ConnectionClosed:
            pass
        await asyncio.wait_for(reader, t(20))
        rcvd = ws.protocol.close_rcvd
        got["close"] = rcvd.code if rcvd is not None else None
    return got


@pytest.mark.parametrize("limit", ["rate", "wire"])
@pytest.mark.parametrize("frames", [2000, 10_000])
async def test_a_flooder_reads_every_frame_written_before_its_4008(cluster, limit, frames):
    directory, shard = cluster[limit]
    room = f"{ROOM}-{limit}-{frames}"
    good_ws = await connect(await room_url(directory, room, "good"), open_timeout=t(10))
    # Joined before any flooder (the room's first open is asynchronous on the shard: a
    # flooder admitted meanwhile could otherwise join, and send, before the member).
    assert orjson.loads(await asyncio.wait_for(good_ws.recv(), t(10)))["type"] == "welcome"
    good = Member(good_ws)
    stop = asyncio.Event()
    chatting = asyncio.create_task(good.run(stop))
    try:
        for run in range(RUNS):
            user = f"flooder{run}"
            hits_before = await metric(shard, "roomshard_shard_rate_limit_hits_total")
            got = await flood(await room_url(directory, room, user), frames)
            hits = await metric(shard, "roomshard_shard_rate_limit_hits_total") - hits_before
            assert got["close"] == 4008, (run, got)
            assert got["welcome"] == 1, (run, got)
            assert got["other"] == 0, (run, got)
            # Every message the room sequenced for the flooder was acked to it...
            await await_until(lambda u=user, n=got["ack"]: good.from_flooders.get(u, 0) >= n,
                              5, f"the member to see {user}'s {got['ack']} messages "
                                 f"(run {run}: {got}; member: {good.error or 'reading'})")
            assert good.from_flooders.get(user, 0) == got["ack"] > 0, (run, got)
            assert got["message"] >= got["ack"], (run, got)  # its own, and the member's
            # ...and every refusal the shard counted reached it (a rate close counts once).
            if limit == "rate":
                assert got["rate_limited"] == hits - 1 > 0, (run, got, hits)
            else:
                assert got["rate_limited"] == hits == 0, (run, got, hits)
    finally:
        stop.set()
        await chatting
        await good_ws.close()
    assert not good.closed, "the well-behaved member was disconnected"
    assert not good.error, good.error
    assert len(good.latencies) >= 10
    p99 = statistics.quantiles(good.latencies, n=100)[98]
    assert p99 < t(0.5), f"the member's ack p99 was {p99:.3f}s during the floods"


# -- refused HTTP requests: the answer arrives, never a reset ------------------
def _post_huge(url: str, path: str, *, body: int = 20 << 20, head_pad: int = 0) -> bytes:
    """Send a request with a ``body``-byte body (or a ``head_pad``-byte header), then read
    the whole answer; a reset fails the test."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=t(20))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {body}\r\n"
    sock.sendall(head.encode())
    chunk = b"p" * 65536
    try:
        if head_pad:
            sock.sendall(b"X-Pad: ")
            for i in range(0, head_pad, len(chunk)):
                sock.sendall(chunk)
        else:
            sock.sendall(b"\r\n")
            for i in range(0, body, len(chunk)):
                sock.sendall(chunk[: body - i])
        data = b""
        while piece := sock.recv(65536):  # the server's FIN ends the answer
            data += piece
        return data
    finally:
        sock.close()


def _status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]["code"]


@pytest.mark.parametrize("target", ["directory", "shard"])
async def test_a_20_mib_body_gets_its_413_every_time(cluster, target):
    proc = cluster["rate"][0 if target == "directory" else 1]
    path = "/v1/rooms/big/connect" if target == "directory" else "/internal/handoffs/freeze"
    for _ in range(5):
        answer = await asyncio.to_thread(_post_huge, proc.url, path)
        status, code = _status_and_error(answer)
        assert status == 413, answer[:200]
        assert code in ("payload_too_large", "too_large")


@pytest.mark.parametrize("target", ["directory", "shard"])
async def test_a_20_mib_head_gets_its_431_every_time(cluster, target):
    proc = cluster["rate"][0 if target == "directory" else 1]
    for _ in range(3):
        answer = await asyncio.to_thread(_post_huge, proc.url, "/healthz", body=0,
                                         head_pad=20 << 20)
        status, code = _status_and_error(answer)
        assert status == 431, answer[:200]
        assert code == "request_header_too_large"


# -- peers that ignore their close: bounded, then gone ------------------------
def _open_and_break(url: str) -> socket.socket:
    """A WebSocket that sends one invalid frame (1007) and then never reads nor closes."""
    rest = url.split("://", 1)[1]
    hostport, path = rest.split("/", 1)
    host, port = hostport.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    payload = b"\xff\xfe"  # not UTF-8
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
    return sock


async def _labelled(proc: Proc, sample: str) -> float:
    """One labelled sample of /metrics, e.g. ``name{how="quiet",instance="i1"}`` (0 if absent)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{proc.url}/metrics", timeout=t(10))).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_peers_that_ignore_their_close_are_gone_after_the_linger_bounds():
    with Procs() as p:
        directory = p.directory()
        shard = p.shard("i1", directory.url, env={"ROOMSHARD_CLOSE_LINGER_TIMEOUT": "1",
                                                 "ROOMSHARD_CLOSE_LINGER_TIME": "3"})
        proc = psutil.Process(shard.popen.pid)
        urls = [await room_url(directory, "ignored", f"u{i}") for i in range(500)]
        quiet = 'roomshard_shard_linger_ends_total{how="quiet",instance="i1"}'
        fds_before, rss_before = proc.num_fds(), proc.memory_info().rss
        socks = await asyncio.to_thread(lambda: [_open_and_break(u) for u in urls])
        try:
            async def gone() -> bool:
                return (await _labelled(shard, quiet) == 500
                        and await metric(shard, "roomshard_shard_sockets") == 0
                        and await metric(shard, "roomshard_shard_lingering_connections") == 0)

            await await_until(gone, 15, "every ignoring peer to be closed after the quiet period")
            fds_after, rss_after = proc.num_fds(), proc.memory_info().rss
        finally:
            for sock in socks:
                sock.close()
        assert fds_after <= fds_before + 2, (fds_before, fds_after)
        assert rss_after < rss_before + 16 * 1024 * 1024, (rss_before, rss_after)
