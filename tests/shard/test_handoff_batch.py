"""The shard's batch handoff route: many calls of one kind in one request, item by item."""

from __future__ import annotations

import httpx

from shard.handoff_routes import MAX_BATCH
from tests.shard.conftest import close_code, recv_json


async def test_batch_freeze_and_release_answer_each_item_and_close_with_4010(shard):
    """A batch freezes and releases loaded rooms; bad items fail alone with the contract's error."""
    s = shard.server
    a, _ = await shard.join("ra", "alice")
    b, _ = await shard.join("rb", "bob")
    await a.send('{"type": "send", "id": "m1", "text": "hi"}')
    assert (await recv_json(a))["type"] == "message"
    assert await recv_json(a) == {"type": "ack", "id": "m1", "seq": 1}
    auth = {"authorization": "Bearer " + s.signer.cluster_token("directory", to=s.cfg.instance, now=s.clock())}
    async with httpx.AsyncClient(base_url=s.url, headers=auth) as http:
        r = await http.post("/internal/handoffs/freeze", json={"items": [
            {"room": "ra", "move_id": "m-a", "epoch": 2},
            {"room": "bad id", "move_id": "m-x", "epoch": 2},
            {"room": "rb", "move_id": "m-b"},
            {"room": "rb", "move_id": "m-b", "epoch": 2},
        ]})
        assert r.status_code == 200
        res = r.json()["results"]
        assert [x["status"] for x in res] == [200, 400, 400, 200]
        assert res[0]["body"]["snapshot"]["seq"] == 1
        assert [m["id"] for m in res[0]["body"]["snapshot"]["history"]] == ["m1"]
        assert res[1]["error"]["code"] == "invalid_room"
        assert res[2]["error"] == {"code": "bad_request",
                                   "message": "Object missing required field `epoch`"}
        state = (await http.get("/internal/handoffs")).json()
        assert set(state["frozen"]) == {"ra", "rb"}
        r = await http.post("/internal/handoffs/release", json={"items": [
            {"room": "ra", "move_id": "m-a", "to": "i2", "epoch": 2},
            {"room": "rb", "move_id": "m-b", "to": "nowhere", "epoch": 2},
        ]})
        res = r.json()["results"]
        assert res[0] == {"status": 200, "body": {"closed": 1}}
        assert res[1]["status"] == 400 and res[1]["error"]["code"] == "bad_request"
        r = await http.post("/internal/handoffs/abort", json={"items": [
            {"room": "rb", "move_id": "m-b", "epoch": 2}]})
        assert r.json()["results"] == [{"status": 200, "body": {"unfrozen": True}}]
    assert await close_code(a) == 4010
    await b.send('{"type": "send", "id": "m2", "text": "still here"}')
    assert (await recv_json(b))["seq"] == 1  # rb was thawed by the abort and serves on
    await b.close()


async def test_batch_route_refuses_bad_requests_whole(shard):
    """Unknown kind 404, no token 401, a non-list or oversized batch 400: JSON error bodies."""
    s = shard.server
    auth = {"authorization": "Bearer " + s.signer.cluster_token("directory", to=s.cfg.instance, now=s.clock())}
    async with httpx.AsyncClient(base_url=s.url) as http:
        r = await http.post("/internal/handoffs/freeze", json={"items": []})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await http.post("/internal/handoffs/teleport", json={"items": []}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.post("/internal/handoffs/freeze", json={"items": {}}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post("/internal/handoffs/freeze", content=b"{oops", headers=auth)
        assert r.status_code == 400
        items = [{"room": f"r{n}", "move_id": "m", "epoch": 2} for n in range(MAX_BATCH + 1)]
        r = await http.post("/internal/handoffs/freeze", json={"items": items}, headers=auth)
        assert r.status_code == 400 and "at most" in r.json()["error"]["message"]
        r = await http.post("/internal/handoffs/discard", json={"items": []}, headers=auth)
        assert r.json() == {"results": []}


async def test_a_call_is_read_as_its_typed_body_or_refused_400(shard):
    """Per-room calls decode into the wire package's struct: wrong types, unknown fields and a
    room in the body (it is the path's) are 400 with the contract's body; nothing changes."""
    s = shard.server
    auth = {"authorization": "Bearer " + s.signer.cluster_token("directory", to=s.cfg.instance, now=s.clock())}
    async with httpx.AsyncClient(base_url=s.url, headers=auth) as http:
        for body, says in [({"move_id": "m", "epoch": "2"}, "Expected `int`, got `str` - at `$.epoch`"),
                           ({"move_id": "m", "epoch": 2, "z": 1}, "unknown field `z`"),
                           ({"move_id": "m", "epoch": 2, "room": "other"}, "unknown field `room`"),
                           ([], "Expected `object`, got `array`")]:
            r = await http.post("/internal/rooms/ra/freeze", json=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["code"] == "bad_request" and says in r.json()["error"]["message"]
        assert (await http.get("/internal/handoffs")).json()["frozen"] == {}
        r = await http.post("/internal/rooms/ra/freeze", json={"move_id": "m", "epoch": 2})
        assert r.status_code == 200 and r.json() == {"snapshot": None}  # not loaded here
