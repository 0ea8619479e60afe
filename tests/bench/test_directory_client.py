"""The Node benchmark clients' HTTP/1.1 client for the directory (bench/loadgen/directory.js)
against a loopback server that answers as scripted: kept-alive reuse, an answer in
pieces, a socket the server closed while idle (the request is sent again), `Retry-After`
and `Connection: close`, a body that is not JSON, and an answer cut short (an error, not
a second request)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from roomshard.testing.timing import t

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "bench" / "loadgen" / "directory.js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs node")

# Five calls in a row, each result (or error) printed as one JSON list.
DRIVER = """
const { postConnect, closeAll } = require(process.argv[1]);
(async () => {
  const out = [];
  for (let i = 0; i < 5; i++) {
    try {
      const r = await postConnect(process.argv[2], `room-${i}`, `user-${i}`, i === 2 ? 'i9' : undefined);
      out.push(r);
    } catch (e) { out.push({ error: String(e.message || e) }); }
  }
  closeAll();
  process.stdout.write(JSON.stringify(out));
})();
"""


def answer(status: int, body: bytes, *extra: str) -> bytes:
    reason = {200: "OK", 503: "Service Unavailable", 500: "Internal Server Error"}[status]
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_directory_client_follows_http_1_1() -> None:
    requests: list[tuple[int, str, bytes]] = []
    connections = 0

    async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode().split("\r\n")
        length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
        return lines[0], await reader.readexactly(length)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        me = connections
        try:
            while (req := await read_request(reader)) is not None:
                requests.append((me, *req))
                n = len(requests)
                if n == 1:  # in three pieces, kept alive
                    whole = answer(200, b'{"url": "ws://x/i1/room/room-0?ticket=t", "instance": "i1"}')
                    for piece in (whole[:20], whole[20:70], whole[70:]):
                        writer.write(piece)
                        await writer.drain()
                        await asyncio.sleep(0.01)
                    continue
                if n == 2:  # closed, unanswered, as a server ends an idle kept-alive socket
                    break
                if n == 3:  # the same request again on a new connection: kept alive
                    writer.write(answer(200, b'{"n": 2}'))
                elif n == 4:
                    writer.write(answer(503, b'{"error": {"code": "overloaded"}}',
                                        "retry-after: 2", "connection: close"))
                    await writer.drain()
                    break
                elif n == 5:
                    writer.write(answer(500, b"not json"))
                else:  # the head and half the body, then the connection ends
                    whole = answer(200, b'{"url": "ws://x/i1/room/room-4"}')
                    writer.write(whole[:-10])
                    await writer.drain()
                    break
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            "node", "-e", DRIVER, str(CLIENT), f"http://127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), t(20))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        server.close()
        await server.wait_closed()
    assert proc.returncode == 0, err.decode()
    results = json.loads(out)

    assert results[0] == {"status": 200, "retryAfter": 0,
                          "body": {"url": "ws://x/i1/room/room-0?ticket=t", "instance": "i1"}}
    # The second call's kept-alive socket was closed by the server before any answer:
    # the request went again on a new connection, one answer and no error.
    assert results[1] == {"status": 200, "retryAfter": 0, "body": {"n": 2}}
    assert results[2] == {"status": 503, "retryAfter": 2, "body": {"error": {"code": "overloaded"}}}
    assert results[3] == {"status": 500, "retryAfter": 0, "body": None}
    assert "error" in results[4] and "closed" in results[4]["error"]

    lines = [(conn, line) for conn, line, _ in requests]
    assert lines == [(1, "POST /v1/rooms/room-0/connect HTTP/1.1"),
                     (1, "POST /v1/rooms/room-1/connect HTTP/1.1"),  # closed unanswered
                     (2, "POST /v1/rooms/room-1/connect HTTP/1.1"),  # sent again
                     (2, "POST /v1/rooms/room-2/connect HTTP/1.1"),  # 503, connection: close
                     (3, "POST /v1/rooms/room-3/connect HTTP/1.1"),
                     (3, "POST /v1/rooms/room-4/connect HTTP/1.1")]
    assert json.loads(requests[0][2]) == {"user": "user-0"}
    assert json.loads(requests[3][2]) == {"user": "user-2", "unreachable": "i9"}
