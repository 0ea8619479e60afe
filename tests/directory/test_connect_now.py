"""A connect answered at once by the HTTP edge (``directory.http.connect.connect_now``).

A connect to a room whose owner serves, that arrived whole, is answered before it
becomes an ASGI task; everything else goes the general way. These tests run the
real ``roomshard directory`` process and speak raw HTTP/1.1 to it, so that they
see exactly what a client sees: the same answer as the general way's, in order
on kept-alive and pipelined connections, errors as the contract's bodies, and a
burst of them answered without queueing (none shed).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from roomshard.testing.metrics import sample
from roomshard.testing.procs import TEST_CLUSTER_SECRET, Procs
from roomshard.testing.timing import await_until, t
from roomshard.wire.tickets import Signer
from tests.directory.test_connect_storm import _answers, _post, paused_burst
from tests.directory.test_processes import register

pytestmark = pytest.mark.e2e


async def _ask(url: str, *requests: bytes, pieces: int = 1) -> list[tuple[int, dict[str, str], Any]]:
    """Write ``requests`` on one connection (in ``pieces`` writes, 50 ms apart, like a
    slow client), then read one answer each."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        data = b"".join(requests)
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            if i:
                await asyncio.sleep(0.05)  # the client is slow: the server reads a part
            writer.write(data[i:i + step])
            await writer.drain()
        return await _answers(reader, len(requests))
    finally:
        writer.close()


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: d\r\n\r\n".encode()



async def test_a_served_room_is_answered_at_once_as_the_general_way_answers(procs: Procs) -> None:
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600"})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
    [(s1, h1, first)] = await _ask(d.url, _post("/v1/rooms/now/connect", {"user": "alice"}))
    [(s2, h2, again)] = await _ask(d.url, _post("/v1/rooms/now/connect", {"user": "bob"}))
    assert (s1, s2) == (200, 200), (first, again)
    # The first placed the room (the general way); the second was answered at once.
    assert set(h1) == set(h2), (h1, h2)
    for name, value in (("content-type", "application/json"), ("cache-control", "no-store"),
                        ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer")):
        assert h2[name] == value, h2
    assert int(h2["content-length"]) == len(json.dumps(again, separators=(",", ":")))
    assert set(first) == set(again) == {"room", "instance", "epoch", "url", "expires_in"}
    assert (again["room"], again["instance"], again["epoch"]) == ("now", "i1", 1)
    assert again["expires_in"] == first["expires_in"]
    token = again["url"].partition("?ticket=")[2]
    assert again["url"].partition("?")[0] == first["url"].partition("?")[0]
    assert again["url"].partition("?")[0].endswith("/i1/room/now")
    ticket = Signer([TEST_CLUSTER_SECRET]).verify_ticket(token, now=time.time())
    assert (ticket.room, ticket.instance, ticket.epoch, ticket.user) == ("now", "i1", 1, "bob")
    async with httpx.AsyncClient(timeout=t(30)) as client:
        metrics = (await client.get(f"{d.url}/metrics")).text
    assert sample(metrics, 'roomshard_directory_connects_total{result="ok"}') == 2.0
    assert sample(metrics, 'roomshard_directory_requests_total{route="connect",status="200"}') == 2.0


async def test_kept_alive_pipelined_and_slow_requests_are_answered_in_order(procs: Procs) -> None:
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600"})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
        assert (await client.post(f"{d.url}/v1/rooms/p/connect", json={"user": "u"})).status_code == 200
    # Pipelined in one write: answered at once, the general way, at once, in order.
    answers = await _ask(d.url, _post("/v1/rooms/p/connect", {"user": "a"}), _get("/healthz"),
                         _post("/v1/rooms/p/connect", {"user": "b"}),
                         _post("/v1/rooms/fresh/connect", {"user": "c"}),
                         _post("/v1/rooms/p/connect", {"user": "d"}))
    assert [a[0] for a in answers] == [200] * 5, answers
    assert [a[2].get("room") for a in answers] == ["p", None, "p", "fresh", "p"]
    assert [a[2]["url"].rpartition("/room/")[2].partition("?")[0]
            for a in answers if "url" in a[2]] == ["p", "p", "fresh", "p"]
    # A request in slow pieces (its body arrives in a later read): the general way.
    for pieces in (2, 5):
        [(status, _, body)] = await _ask(d.url, _post("/v1/rooms/p/connect", {"user": "e"}),
                                         pieces=pieces)
        assert status == 200 and body["room"] == "p", body
    # A chunked body, an Expect: 100-continue: the general way, same answers.
    chunked = (b"POST /v1/rooms/p/connect HTTP/1.1\r\nHost: d\r\ncontent-type: application/json\r\n"
               b"transfer-encoding: chunked\r\n\r\n" b"c\r\n{\"user\":\"f\"}\r\n0\r\n\r\n")
    expect = _post("/v1/rooms/p/connect", {"user": "g"}).replace(
        b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n", 1)
    for request in (chunked, expect):
        [(status, _, body)] = await _ask(d.url, request)
        assert status == 200 and body["room"] == "p", (request, body)


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{", 400, "invalid_json"),
    (b"{}", 400, "missing_user"),
    (b'{"user": "bad user"}', 400, "invalid_user"),
    (b'{"user": 7}', 400, "invalid_body"),
    (b"", 400, "invalid_json"),
])
async def test_bad_input_to_a_served_room_gets_the_contract_error(procs: Procs, body: bytes,
                                                                  status: int, code: str) -> None:
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600"})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
        assert (await client.post(f"{d.url}/v1/rooms/bad/connect", json={"user": "u"})).status_code == 200
    request = (f"POST /v1/rooms/bad/connect HTTP/1.1\r\nHost: d\r\ncontent-type: application/json"
               f"\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    [(got, _, answer)] = await _ask(d.url, request)
    assert got == status, answer
    assert set(answer) == {"error"} and answer["error"]["code"] == code and answer["error"]["message"]
    # An invalid room id on the same path shape.
    [(got, _, answer)] = await _ask(d.url, _post(f"/v1/rooms/{'x' * 200}/connect", {"user": "u"}))
    assert got == 400 and answer["error"]["code"] == "invalid_room", answer


async def test_a_room_whose_owner_is_down_is_placed_again_not_answered_at_once(procs: Procs) -> None:
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "1"})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
        first = await client.post(f"{d.url}/v1/rooms/orphan/connect", json={"user": "u"})
        assert first.status_code == 200 and first.json()["instance"] == "i1"

        async def moved() -> bool:
            await register(client, d.url, "i2")  # i2 keeps beating; i1 went silent
            r = await client.post(f"{d.url}/v1/rooms/orphan/connect", json={"user": "u"})
            return r.status_code == 200 and r.json()["instance"] == "i2"

        await await_until(moved, t(30), "the room placed again on i2")
        r = await client.post(f"{d.url}/v1/rooms/orphan/connect", json={"user": "v"})
    assert r.status_code == 200 and (r.json()["instance"], r.json()["epoch"]) == ("i2", 2), r.text


async def test_a_burst_to_a_served_room_is_answered_whole_not_shed(procs: Procs) -> None:
    """1,000 connects to a served room written while the directory is paused, with 100
    connects allowed in flight: all answered 200 (each at once, none queued as a task)."""
    d = procs.directory(env={"ROOMSHARD_DOWN_AFTER": "600", "ROOMSHARD_CONNECTS_IN_FLIGHT": "100"})
    async with httpx.AsyncClient(timeout=t(30)) as client:
        await register(client, d.url, "i1")
        assert (await client.post(f"{d.url}/v1/rooms/hot/connect", json={"user": "u"})).status_code == 200
    answers = await paused_burst(d, [_post("/v1/rooms/hot/connect", {"user": f"u{n}"})
                                     for n in range(1_000)])
    assert [status for status, _, _ in answers] == [200] * 1_000
    assert {body["room"] for _, _, body in answers} == {"hot"}
    async with httpx.AsyncClient(timeout=t(30)) as client:
        metrics = (await client.get(f"{d.url}/metrics")).text
    assert sample(metrics, 'roomshard_directory_connects_total{result="ok"}') == 1_001.0
    assert sample(metrics, 'roomshard_directory_connects_total{result="overloaded"}') == 0.0
    assert sample(metrics, "roomshard_directory_connects_in_flight") == 0.0
