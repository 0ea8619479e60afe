"""The shard's control calls to the directory, over httpx.MockTransport."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec
import pytest

from roomshard.wire.internal import InstanceLoad, OpenGrant
from roomshard.wire.tickets import Signer
from shard.directory_client import DirectoryClient, DirectoryRefused, DirectoryUnavailable

SECRET = "s3cret"


def client(handler) -> DirectoryClient:
    return DirectoryClient("http://dir.test/", "i3", Signer([SECRET]),
                           transport=httpx.MockTransport(handler), clock=lambda: 1_000.0)


def _grant(room: str, epoch: int = 4) -> dict:
    return {"room": room, "instance": "i3", "epoch": epoch, "owner_epoch": 3,
            "seq_base": epoch << 32, "lost": True, "private": False, "members": None}


async def test_open_sends_instance_epoch_and_cluster_token():
    """open posts {instance, rooms: [{room, ticket_epoch}]} with a cluster token for this
    instance, and reads the room's grant from the batch answer."""
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["body"] = request.content
        token = request.headers["authorization"].removeprefix("Bearer ")
        seen["sub"] = Signer([SECRET]).verify_cluster_token(token, receiver="directory", now=1_000.0)
        return httpx.Response(200, json={"results": [{"room": "r", "grant": _grant("r")}]})

    dc = client(handler)
    grant = await dc.open_room("r", 3)
    await dc.aclose()
    assert grant == OpenGrant(room="r", instance="i3", epoch=4, owner_epoch=3, seq_base=4 << 32,
                              lost=True, private=False, members=None)
    assert seen == {"path": "/v1/internal/opens",
                    "body": b'{"instance":"i3","rooms":[{"room":"r","ticket_epoch":3}]}',
                    "sub": "i3"}


async def test_concurrent_opens_share_calls_and_each_gets_its_own_answer():
    """300 opens at once: a few calls of at most 500 rooms; a refused room's caller alone
    hears its refusal."""
    batches: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        rooms = [item["room"] for item in json.loads(request.content)["rooms"]]
        batches.append(rooms)
        return httpx.Response(200, json={"results": [
            {"room": r, "error": {"code": "not_owner", "message": "no"}} if r == "r7"
            else {"room": r, "grant": _grant(r)} for r in rooms]})

    dc = client(handler)
    answers = await asyncio.gather(*(dc.open_room(f"r{i}", 1, open_id=f"o{i}") for i in range(300)),
                                   return_exceptions=True)
    await dc.aclose()
    assert len(batches) <= 2 and sorted(r for b in batches for r in b) == sorted(f"r{i}" for i in range(300))
    assert dc.open_calls == len(batches)
    for i, answer in enumerate(answers):
        if i == 7:
            assert isinstance(answer, DirectoryRefused) and answer.code == "not_owner"
        else:
            assert isinstance(answer, OpenGrant) and answer.room == f"r{i}"


async def test_a_directory_without_the_batch_route_gets_single_opens():
    """A 404 with the directory's error body for the batch route: single opens from then on."""
    paths = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/internal/opens":
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no route"}})
        room = request.url.path.split("/")[4]
        return httpx.Response(200, json=_grant(room))

    dc = client(handler)
    first = await asyncio.gather(dc.open_room("a", 1), dc.open_room("b", 1))
    later = await dc.open_room("c", 1)
    await dc.aclose()
    assert [g.room for g in first] == ["a", "b"] and later.room == "c"
    assert paths == ["/v1/internal/opens", "/v1/internal/rooms/a/open",
                     "/v1/internal/rooms/b/open", "/v1/internal/rooms/c/open"]


async def test_refusals_and_failures_are_translated():
    """A room's error -> DirectoryRefused with the code; 5xx, network errors, junk, a 4xx of
    the whole call, an answer for other rooms -> DirectoryUnavailable or DirectoryRefused."""
    answers = iter([
        httpx.Response(200, json={"results": [{"room": "r", "error": {"code": "moving",
                                                                      "message": "m"}}]}),
        httpx.Response(503, json={"error": {"code": "unavailable", "message": "db"}}),
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, json={"room": "r"}),
        httpx.Response(404, content=b"<html>not found</html>"),  # a proxy's page, not ours
        httpx.Response(200, json={"results": [{"room": "other", "grant": _grant("other")}]}),
        httpx.Response(200, json={"results": [{"room": "r"}]}),  # neither grant nor error
    ])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers, None)
        if answer is None:
            raise httpx.ConnectError("refused", request=request)
        return answer

    dc = client(handler)
    with pytest.raises(DirectoryRefused) as refused:
        await dc.open_room("r", 1)
    assert (refused.value.status, refused.value.code) == (409, "moving")
    for _ in range(7):  # 503, non-JSON, malformed, a proxy's 404, other rooms, empty, refused
        with pytest.raises(DirectoryUnavailable):
            await dc.open_room("r", 1)
    assert dc.open_calls == 8
    await dc.aclose()


async def test_heartbeat_and_leave_bodies():
    """heartbeat and leave hit the instance's routes with the wire package's bodies; the
    heartbeat's answer is read as its typed body, and one that is not is a failure."""
    calls = []
    view = {"id": "i3", "state": "active", "state_reason": None, "capacity": 5,
            "internal_url": "http://h:1", "public_base": None, "last_heartbeat": None,
            "registered_at": "2026-12-06T00:00:00Z", "rooms_assigned": 1,
            "load": {"rooms": 1, "connections": 2, "messages_per_s": 0.5}}
    answers = iter([{"instance": view, "down_after": 10, "owned": ["r"]}, {"ok": True}])

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, request.content))
        return httpx.Response(200, json=next(answers, {}))

    dc = client(handler)
    load = InstanceLoad(rooms=1, connections=2, messages_per_s=0.5)
    answer = await dc.heartbeat(internal_url="http://h:1", public_base=None, capacity=5,
                                boot_id="b", load=load, confirm={"r": 4})
    assert answer.down_after == 10 and answer.owned == ["r"] and answer.instance.capacity == 5
    with pytest.raises(DirectoryUnavailable):  # {"ok": true} is no heartbeat answer
        await dc.heartbeat(internal_url="http://h:1", public_base=None, capacity=5,
                           boot_id="b", load=load)
    await dc.leave(drain=False)
    await dc.aclose()
    assert calls[0][:2] == ("PUT", "/v1/internal/instances/i3/heartbeat")
    assert msgspec.json.decode(calls[0][2]) == {
        "internal_url": "http://h:1", "boot_id": "b", "public_base": None, "capacity": 5,
        "load": {"rooms": 1, "connections": 2, "messages_per_s": 0.5}, "confirm": {"r": 4}}
    assert calls[2] == ("POST", "/v1/internal/instances/i3/leave", b'{"drain":false,"remove":false}')
