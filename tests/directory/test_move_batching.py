"""A drain's moves reach each shard as batched handoff calls, or room by room for older shards."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.directory.conftest import ADMIN, Harness


class HandoffShards:
    """Shard doubles answering the handoff calls (``batch=False``: a version without the batch route)."""

    def __init__(self, *, batch: bool) -> None:
        self.batch = batch
        self.requests: Counter[str] = Counter()  # "host kind" -> HTTP requests
        self.items: Counter[str] = Counter()  # "host kind" -> room calls

    def answer(self, kind: str, room: str) -> dict[str, Any]:
        snapshot = {"room": room, "seq": 3, "history": [], "members": []}  # the room is loaded
        return {"freeze": {"snapshot": snapshot}, "adopt": {}, "release": {"closed": 0},
                "commit": {"activated": False}, "abort": {"unfrozen": True},
                "discard": {"discarded": True}}[kind]

    def handler(self, request: httpx.Request) -> httpx.Response:
        host, parts = request.url.host, request.url.path.strip("/").split("/")
        if request.method == "GET" and parts == ["internal", "rooms"]:
            return httpx.Response(200, json={"rooms": {}})
        if parts[:2] == ["internal", "handoffs"] and len(parts) == 3 and self.batch:
            items = json.loads(request.content)["items"]
            self.requests[f"{host} {parts[2]}"] += 1
            self.items[f"{host} {parts[2]}"] += len(items)
            return httpx.Response(200, json={"results": [
                {"status": 200, "body": self.answer(parts[2], i["room"])} for i in items]})
        if parts[:2] == ["internal", "rooms"] and len(parts) == 4 and request.method == "POST":
            self.requests[f"{host} {parts[3]}"] += 1
            self.items[f"{host} {parts[3]}"] += 1
            return httpx.Response(200, json=self.answer(parts[3], parts[2]))
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no route"}})


async def drain_six_rooms(harness_factory: Any, shards: HandoffShards) -> tuple[Harness, dict]:
    async with harness_factory(shard_transport=httpx.MockTransport(shards.handler)) as h:
        await h.heartbeat("i1")
        rooms = [f"r{n}" for n in range(6)]
        for room in rooms:
            assert (await h.connect(room)).json()["instance"] == "i1"
        await h.heartbeat("i2")
        r = await h.client.post("/v1/admin/instances/i1/drain", headers=ADMIN)
        assert r.status_code == 200, r.text
        for room in rooms:
            view = (await h.client.get(f"/v1/admin/rooms/{room}", headers=ADMIN)).json()
            assert (view["instance"], view["epoch"], view["state"]) == ("i2", 2, "active")
        metrics = (await h.client.get("/metrics")).text
        assert 'roomshard_directory_moves_total{outcome="released"} 6.0' in metrics
        assert "roomshard_directory_move_pause_seconds_count 6.0" in metrics
        assert 'roomshard_directory_handoff_batch_items_total{step="db_commit"} 6.0' in metrics
        if shards.batch:  # six rooms in step: one commit transaction, one freeze request
            assert 'roomshard_directory_handoff_batches_total{step="db_commit"} 1.0' in metrics
            assert 'roomshard_directory_handoff_batches_total{step="freeze"} 1.0' in metrics
        return h, r.json()


@pytest.mark.parametrize("batch", [True, False], ids=["batch-route", "room-by-room"])
async def test_drain_moves_every_room_with_batched_or_per_room_calls(harness_factory: Any,
                                                                    batch: bool) -> None:
    """Six rooms drained at once: one request per step and shard, or six for an older shard."""
    shards = HandoffShards(batch=batch)
    _, report = await drain_six_rooms(harness_factory, shards)
    assert (report["moved"], report["state"], report["failed"]) == (6, "disabled", [])
    assert shards.items == {"shard-i1.test freeze": 6, "shard-i2.test adopt": 6,
                            "shard-i1.test release": 6}
    if batch:
        assert shards.requests == {"shard-i1.test freeze": 1, "shard-i2.test adopt": 1,
                                   "shard-i1.test release": 1}
    else:
        assert shards.requests == shards.items


def test_a_malformed_batch_answer_fails_every_item() -> None:
    """Only one well-formed result per item counts; anything else fails each item, never succeeds."""
    from directory.shards import _batch_outcomes

    ok = {"results": [{"status": 200, "body": {"closed": 1}},
                      {"status": 409, "error": {"code": "moving", "message": "m"}}]}
    assert _batch_outcomes(ok, 2) == [(200, {"closed": 1}), (409, {"code": "moving", "message": "m"})]
    for bad in ({"results": ok["results"][:1]}, {"results": [{"body": {}}, {"status": "200"}]},
                {"nope": 1}, ["results"], "text"):
        assert _batch_outcomes(bad, 2) == [(0, "malformed batch answer")] * 2
