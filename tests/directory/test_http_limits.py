"""The directory's HTTP edge under abuse: huge and never-ending request heads, slow heads.

A real directory process and a real shard: one client streaming an endless
header must get a 431 (contract JSON body) after at most ``MAX_HEAD_BYTES``
plus one read, while ``/healthz`` stays fast and the shard keeps its lease.
The slow-head (slowloris) case runs uvicorn in process with a short head
timeout, through the same protocol class ``roomshard directory`` uses.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from directory.app import create_app
from directory.http import server as http_server
from directory.http.server import MAX_HEAD_BYTES, uvicorn_options
from roomshard.linger import LingerLimits
from roomshard.testing.procs import Procs
from roomshard.testing.timing import t, wait_until
from tests.directory.conftest import make_cfg

CHUNK = b"a" * 65536
#: What the endless header sends at most before the test gives up: a 431 must come long before.
ATTACK_BYTES = 64 << 20
#: A /healthz answer slower than this means the loop was stalled (a stall is seconds).
HEALTHZ_MAX_S = 1.0


def _read_response(sock: socket.socket, timeout: float,
                   reader: Any = None) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with Content-Length (``reader``: a ``makefile`` to reuse)."""
    sock.settimeout(timeout)
    f = reader or sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline().decode("latin-1").strip()):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))


def _endless_header(host: str, port: int, path: str = "/healthz") -> tuple[int, dict[str, str], bytes, int]:
    """Send a request head whose one header never ends, until an answer arrives.

    Returns the answer and how many header bytes had been sent when it came.
    """
    sock = socket.create_connection((host, port), timeout=t(30))
    sent = 0
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode())
        try:
            while sent < ATTACK_BYTES and not select.select([sock], [], [], 0)[0]:
                sock.sendall(CHUNK)
                sent += len(CHUNK)
        except OSError:
            pass  # the directory closed: its answer is waiting
        return (*_read_response(sock, t(30)), sent)
    finally:
        sock.close()


@pytest.mark.e2e
def test_endless_header_is_431_healthz_stays_fast_and_no_shard_loses_its_lease(procs: Procs) -> None:
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "3"})
    # A short lease: a directory stall of a couple of seconds would fence the shard.
    shard = procs.shard("i1", d.url, env={"ROOMSHARD_HEARTBEAT_INTERVAL": "0.3",
                                          "ROOMSHARD_LEASE": "1.5"})
    host, port = d.url.removeprefix("http://").rsplit(":", 1)
    with httpx.Client(timeout=t(10)) as client:
        wait_until(lambda: client.get(f"{shard.url}/readyz").status_code == 200, 30,
                   "the shard to be ready")
        results: dict[str, Any] = {}

        def attack() -> None:
            results["answer"] = _endless_header(host, int(port))

        attacker = threading.Thread(target=attack, daemon=True)
        started = time.monotonic()
        attacker.start()
        slowest = 0.0
        shard_ready = True
        # Probe both while the attack runs, and for two leases after it.
        while attacker.is_alive() or time.monotonic() - started < 2 * 1.5:
            t0 = time.monotonic()
            assert client.get(f"{d.url}/healthz").status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
            shard_ready = shard_ready and client.get(f"{shard.url}/readyz").status_code == 200
            assert time.monotonic() - started < t(60), "the attack was never refused"
        attacker.join(t(30))
    status, headers, body, sent = results["answer"]
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_header_too_large"
    assert sent < ATTACK_BYTES  # answered while the header was still coming
    assert slowest < t(HEALTHZ_MAX_S), f"/healthz took {slowest:.2f}s during the attack"
    assert shard_ready, "the shard's /readyz failed during the attack"
    assert "lease lost" not in shard.output()


# -- in process: exact limits and the head timeout -----------------------------
class _Served:
    def __init__(self, tmp_path: Path) -> None:
        cfg = make_cfg(f"sqlite+aiosqlite:///{tmp_path / 'directory.db'}")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        # The options `roomshard directory` runs with (directory.main).
        config = uvicorn.Config(create_app(cfg), lifespan="on", log_level="warning",
                                **uvicorn_options(LingerLimits(time=2, timeout=0.2, max=50)))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve([self.sock])),
                                       daemon=True)

    def __enter__(self) -> _Served:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(t(10))
        self.sock.close()

    def raw(self, data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=t(10))
        sock.sendall(data)
        return sock


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_S", 0.5)
    with _Served(tmp_path) as s:
        yield s


def test_head_just_under_the_limit_is_served_and_just_over_is_431(served: _Served) -> None:
    def head(size: int) -> bytes:
        start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    # Sent in small pieces so that the head spans many reads.
    for size, expected in ((MAX_HEAD_BYTES - 512, 200), (MAX_HEAD_BYTES + 70_000, 431)):
        sock = served.raw(b"")
        data = head(size)
        try:
            for i in range(0, len(data), 4096):
                sock.sendall(data[i:i + 4096])
        except OSError:
            assert expected == 431
        status, headers, body = _read_response(sock, t(10))
        sock.close()
        assert status == expected, (size, body)
        if expected == 431:
            assert json.loads(body)["error"]["code"] == "request_header_too_large"


def test_long_request_line_is_431(served: _Served) -> None:
    sock = served.raw(b"GET /" + b"x" * (MAX_HEAD_BYTES * 8))
    status, _, body = _read_response(sock, t(10))
    sock.close()
    assert status == 431, body


def test_slow_head_is_408_and_the_connection_closes(served: _Served) -> None:
    sock = served.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    for _ in range(3):  # a byte now and then: slowloris
        try:
            sock.sendall(b"X")
        except OSError:
            break
        time.sleep(0.1)
    status, headers, body = _read_response(sock, t(10))
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < t(5)
    sock.settimeout(t(5))
    assert sock.recv(10) == b""  # closed by the directory
    sock.close()


def test_idle_connection_without_a_request_is_closed(served: _Served) -> None:
    sock = served.raw(b"")
    sock.settimeout(t(5))
    assert sock.recv(10) == b""
    sock.close()


def test_keep_alive_requests_after_a_big_body_are_still_served(served: _Served) -> None:
    # A body bigger than the head limit, in the same reads as its head and the next request.
    body = b'{"user": "' + b"u" * (MAX_HEAD_BYTES * 3) + b'"}'
    first = (b"POST /v1/rooms/r/connect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body)) + body
    sock = served.raw(first + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = sock.makefile("rb")
    status, _, answer = _read_response(sock, t(10), reader)
    assert status == 400, answer  # a user id of 49 KiB: invalid input, not a head problem
    status, _, answer = _read_response(sock, t(10), reader)
    assert status == 200 and json.loads(answer) == {"status": "ok"}
    sock.close()


def test_a_small_body_arriving_after_its_answer_keeps_the_connection(served: _Served) -> None:
    """A route that never reads its body (GET /healthz) answers with keep-alive before the
    body arrives: the body is read and dropped and the next request on the connection is
    served (it used to end the connection after an answer that said keep-alive)."""
    body = b'{"user": "a"}'
    sock = served.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
    reader = sock.makefile("rb")
    status, headers, _ = _read_response(sock, t(10), reader)
    assert status == 200 and headers.get("connection") != "close"
    sock.sendall(body + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, answer = _read_response(sock, t(10), reader)
    assert status == 200 and json.loads(answer) == {"status": "ok"}
    sock.close()


def test_a_large_unread_body_still_ends_the_connection_lingering(served: _Served) -> None:
    """Past DROP_BODY_MAX_BYTES the unread body is not waited for: the connection ends once
    the answer is out (a lingering close, so the answer is read, not reset)."""
    sock = served.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (http_server.DROP_BODY_MAX_BYTES + 1))
    reader = sock.makefile("rb")
    status, _, _ = _read_response(sock, t(10), reader)
    assert status == 200
    sock.shutdown(socket.SHUT_WR)
    assert reader.read() == b""  # the server's FIN after the answer: nothing more
    sock.close()


def test_trickled_body_is_408(served: _Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from directory.http import edge

    monkeypatch.setattr(edge, "BODY_TIMEOUT_S", 0.5)
    sock = served.raw(b"POST /v1/rooms/r/connect HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"us")
    status, _, body = _read_response(sock, t(10))
    sock.close()
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_declared_huge_body_is_413_without_reading_it(served: _Served) -> None:
    sock = served.raw(b"POST /v1/rooms/r/connect HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n")
    status, _, body = _read_response(sock, t(10))
    sock.close()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_every_response_has_nosniff_and_referrer_policy(served: _Served) -> None:
    base = f"http://127.0.0.1:{served.port}"
    with httpx.Client(timeout=t(10)) as client:
        for method, path in (("GET", "/"), ("GET", "/healthz"), ("GET", "/openapi.json"),
                             ("GET", "/nope"), ("DELETE", "/healthz"),
                             ("POST", "/v1/rooms/a%0Ab/connect"), ("GET", "/v1/admin/instances"),
                             ("GET", "/static/index.html"), ("GET", "/metrics")):
            r = client.request(method, base + path)
            assert r.headers["x-content-type-options"] == "nosniff", (method, path)
            assert r.headers["referrer-policy"] == "no-referrer", (method, path)
    sock = served.raw(b"GET /" + b"x" * (MAX_HEAD_BYTES * 2))
    status, headers, _ = _read_response(sock, t(10))
    sock.close()
    assert status == 431 and headers["x-content-type-options"] == "nosniff"


def test_keep_alive_request_trickled_after_a_first_one_is_408(served: _Served) -> None:
    sock = served.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGE")
    reader = sock.makefile("rb")
    assert _read_response(sock, t(10), reader)[0] == 200
    status, _, body = _read_response(sock, t(10), reader)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    sock.close()
