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
        assert res[2]["error"] == {"code": "bad_request", "message": "epoch must be a int"}
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
