"""The shard's side of the server API: a message published into a room by the directory
(``POST /internal/rooms/{room}/publish``) and a room's history in memory
(``GET /internal/rooms/{room}/messages``). Real WebSocket members, a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from roomshard.store.messages import MessageStore
from tests.shard.conftest import Harness, recv_json, recv_until, start_shard
from tests.shard.fakedir import FakeDirectory, RoomRecord


def auth(h: Harness) -> dict[str, str]:
    s = h.server
    return {"authorization": "Bearer " + s.signer.cluster_token("directory", to=s.cfg.instance,
                                                                now=s.clock())}


async def publish(h: Harness, room: str, msg_id: str, user: str = "bot", text: str = "hi",
                  epoch: int = 1, **extra: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.server.url, headers=auth(h)) as http:
        return await http.post(f"/internal/rooms/{room}/publish", json={
            "epoch": epoch, "id": msg_id, "user": user, "text": text, **extra})


async def test_a_publish_reaches_every_member_as_a_message_once(shard: Harness) -> None:
    alice, _ = await shard.join("r", "alice")
    r = await publish(shard, "r", "p1", text="from the backend")
    assert r.status_code == 200 and r.json() == {"room": "r", "seq": 1, "id": "p1"}
    frame = await recv_until(alice, "message")
    assert {k: frame[k] for k in ("seq", "id", "user", "text")} == {
        "seq": 1, "id": "p1", "user": "bot", "text": "from the backend"}
    again = await publish(shard, "r", "p1", text="from the backend")
    assert again.json() == {"room": "r", "seq": 1, "id": "p1"}  # not broadcast twice
    await alice.send(orjson.dumps({"type": "send", "id": "a1", "text": "me"}).decode())
    assert (await recv_until(alice, "message"))["id"] == "a1"  # the next message: no copy of p1
    # One idempotency window with that user's WebSocket sends.
    bot, _ = await shard.join("r", "bot")
    await bot.send(orjson.dumps({"type": "send", "id": "p1", "text": "x"}).decode())
    assert await recv_until(bot, "ack") == {"type": "ack", "id": "p1", "seq": 1}


async def test_a_publish_opens_a_room_not_in_memory(shard: Harness) -> None:
    r = await publish(shard, "fresh", "p1")
    assert r.status_code == 200 and r.json()["seq"] == 1
    assert shard.server.live_rooms.get("fresh") is not None
    bob, welcome = await shard.join("fresh", "bob", since=0)
    assert welcome["seq"] == 1 and welcome["recovered"] is True
    assert (await recv_json(bob))["id"] == "p1"


async def test_bad_publishes_are_refused_with_the_error_body(shard: Harness) -> None:
    cases = [
        (dict(msg_id=""), 400, "bad_request"),
        (dict(msg_id="x" * 65), 400, "bad_request"),
        (dict(msg_id="ok", user="no spaces"), 400, "invalid_user"),
        (dict(msg_id="ok", text="x" * 4097), 400, "too_long"),
        (dict(msg_id="ok", color="red"), 400, "bad_request"),
    ]
    for kw, status, code in cases:
        r = await publish(shard, "r", **kw)  # type: ignore[arg-type]
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), kw
    async with httpx.AsyncClient(base_url=shard.server.url) as http:
        r = await http.post("/internal/rooms/r/publish", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert shard.server.live_rooms.get("r") is None  # nothing was opened


async def test_a_publish_to_a_moving_or_stale_room_tells_the_directory_to_retry(
        shard: Harness) -> None:
    alice, _ = await shard.join("r", "alice")
    async with httpx.AsyncClient(base_url=shard.server.url, headers=auth(shard)) as http:
        r = await http.post("/internal/rooms/r/freeze", json={"move_id": "m", "epoch": 2})
        assert r.status_code == 200
    r = await publish(shard, "r", "p1")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "moving")
    shard.fake.rooms["other"] = RoomRecord(instance="i2")  # placed on another shard
    r = await publish(shard, "other", "p1")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_owner")


async def test_history_in_memory_pages_back_with_more(shard: Harness) -> None:
    alice, _ = await shard.join("r", "alice")
    for i in range(1, 8):
        assert (await publish(shard, "r", f"p{i}", text=f"t{i}")).json()["seq"] == i
    async with httpx.AsyncClient(base_url=shard.server.url, headers=auth(shard)) as http:
        page = (await http.get("/internal/rooms/r/messages", params={"limit": 3})).json()
        assert [m["seq"] for m in page["messages"]] == [5, 6, 7] and page["more"] is True
        assert set(page["messages"][0]) == {"seq", "id", "user", "text", "ts"}
        page = (await http.get("/internal/rooms/r/messages",
                               params={"limit": 3, "before": 5})).json()
        assert [m["seq"] for m in page["messages"]] == [2, 3, 4] and page["more"] is True
        page = (await http.get("/internal/rooms/r/messages",
                               params={"limit": 3, "before": 2})).json()
        assert [m["seq"] for m in page["messages"]] == [1] and page["more"] is False
        page = (await http.get("/internal/rooms/nothere/messages")).json()
        assert page == {"room": "nothere", "messages": [], "more": False}
        for bad in ({"limit": "0"}, {"limit": "501"}, {"before": "x"}, {"before": "-1"}):
            r = await http.get("/internal/rooms/r/messages", params=bad)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", bad


@pytest.fixture
async def stored_shard(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    fake = FakeDirectory()
    h = Harness(await start_shard(fake, store=MessageStore(url)), fake)
    try:
        yield h, url
    finally:
        await h.server.shutdown()


async def test_with_a_store_a_publish_answers_once_stored(stored_shard) -> None:
    h, url = stored_shard
    alice, _ = await h.join("r", "alice")
    r = await publish(h, "r", "p1", text="kept")
    assert r.json() == {"room": "r", "seq": 1, "id": "p1"}
    store = MessageStore(url)
    try:
        assert [(m.seq, m.id, m.user) for m in await store.tail("r", 10)] == [(1, "p1", "bot")]
    finally:
        await store.close()
    assert (await recv_until(alice, "message"))["text"] == "kept"
    assert (await publish(h, "r", "p1", text="kept")).json()["seq"] == 1
