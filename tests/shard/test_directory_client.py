"""The shard's control calls to the directory, over httpx.MockTransport."""

from __future__ import annotations

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


async def test_open_sends_instance_epoch_and_cluster_token():
    """open posts {instance, ticket_epoch} with a cluster token for this instance."""
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"] = request.url.path
        seen["body"] = request.content
        token = request.headers["authorization"].removeprefix("Bearer ")
        seen["sub"] = Signer([SECRET]).verify_cluster_token(token, receiver="directory", now=1_000.0)
        return httpx.Response(200, json={"room": "r", "instance": "i3", "epoch": 4,
                                         "owner_epoch": 3, "seq_base": 4 << 32, "lost": True,
                                         "private": False, "members": None})

    dc = client(handler)
    grant = await dc.open_room("r", 3)
    await dc.aclose()
    assert grant == OpenGrant(room="r", instance="i3", epoch=4, owner_epoch=3, seq_base=4 << 32,
                              lost=True, private=False, members=None)
    assert seen == {"path": "/v1/internal/rooms/r/open",
                    "body": b'{"instance":"i3","ticket_epoch":3}', "sub": "i3"}


async def test_refusals_and_failures_are_translated():
    """4xx -> DirectoryRefused with the code; 5xx, network errors, junk -> DirectoryUnavailable."""
    answers = iter([
        httpx.Response(409, json={"error": {"code": "moving", "message": "m"}}),
        httpx.Response(503, json={"error": {"code": "unavailable", "message": "db"}}),
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, json={"room": "r"}),
        httpx.Response(404, content=b"<html>not found</html>"),  # a proxy's page, not ours
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
    for _ in range(5):  # 503, non-JSON, malformed answer, a proxy's 404, connection error
        with pytest.raises(DirectoryUnavailable):
            await dc.open_room("r", 1)
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
    assert calls[2] == ("POST", "/v1/internal/instances/i3/leave", b'{"drain":false}')
