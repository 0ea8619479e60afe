"""The history API reading the message store in the directory's own database (SQLite file or
PostgreSQL): pages, ``more``, and retention ahead of the shards' expiry."""

from __future__ import annotations

from typing import Any

import jwt
import orjson

from roomshard.store.messages import MessageStore, StoredMessage
from tests.directory.conftest import ADMIN, T0


def stored(room: str, seq: int, ts: float) -> StoredMessage:
    payload = orjson.dumps({"type": "message", "seq": seq, "id": f"m{seq}", "user": "bob",
                            "text": f"t{seq}", "ts": ts}).decode()
    return StoredMessage(room=room, seq=seq, id=f"m{seq}", user="bob", ts=ts, payload=payload)


async def test_history_pages_the_store_and_hides_what_retention_expired(
        harness_factory: Any, db_url: str) -> None:
    async with harness_factory(history_url=db_url, history_retention=3600) as h:
        store = MessageStore(db_url)
        await store.open()
        try:
            # 1..5 older than the retention (not deleted yet), 6..12 within it.
            await store.write([stored("r", s, T0 - 7200 + s) for s in range(1, 6)]
                              + [stored("r", s, T0 - 60 + s) for s in range(6, 13)])
        finally:
            await store.close()
        await h.heartbeat("i1")
        assert (await h.connect("r")).status_code == 200  # the room exists
        page = (await h.client.get("/v1/rooms/r/messages", params={"limit": 4})).json()
        assert [m["seq"] for m in page["messages"]] == [9, 10, 11, 12] and page["more"] is True
        assert page["messages"][0] == {"seq": 9, "id": "m9", "user": "bob", "text": "t9",
                                       "ts": T0 - 60 + 9}
        page = (await h.client.get("/v1/rooms/r/messages",
                                   params={"limit": 4, "before": 9})).json()
        assert [m["seq"] for m in page["messages"]] == [6, 7, 8] and page["more"] is False
        page = (await h.client.get("/v1/rooms/r/messages", headers=ADMIN)).json()
        assert [m["seq"] for m in page["messages"]] == list(range(6, 13))


JWT_SECRET = "app-secret-for-tests-0123456789abcdef"


def bearer(sub: str, **claims: Any) -> dict[str, str]:
    token = jwt.encode({"sub": sub, **claims}, JWT_SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def test_history_in_jwt_mode_reads_as_the_token_s_user(harness_factory: Any,
                                                             db_url: str) -> None:
    """jwt mode: the bearer JWT names the reader (a private room's members only), a bad or
    missing token is a 401 (never a 500), the admin token reads any room."""
    async with harness_factory(auth="jwt", jwt_secret=JWT_SECRET, history_url=db_url) as h:
        await h.heartbeat("i1")
        r = await h.client.post("/v1/rooms/club/connect", headers=bearer("alice"))
        assert r.status_code == 200, r.text
        r = await h.client.put("/v1/admin/rooms/club/access", headers=ADMIN,
                               json={"private": True, "members": ["alice"]})
        assert r.status_code == 200, r.text
        url = "/v1/rooms/club/messages"
        r = await h.client.get(url, headers=bearer("alice"))
        assert r.status_code == 200 and r.json() == {"room": "club", "messages": [], "more": False}
        r = await h.client.get(url, headers=bearer("bob"))
        assert (r.status_code, r.json()["error"]["code"]) == (403, "not_a_member")
        r = await h.client.get(url, params={"user": "alice"})  # no token: user= is ignored
        assert r.status_code == 401
        for headers in (bearer("alice", exp=T0 - 10), {"Authorization": "Bearer not.a.jwt"},
                        {"Authorization": "Bearer " + jwt.encode({"sub": "alice"}, "another-key-of-32-bytes-or-more-0123",
                                                                 algorithm="HS256")}):
            r = await h.client.get(url, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] in (
                "invalid_token", "token_expired"), r.text
        r = await h.client.get(url, headers=ADMIN)
        assert r.status_code == 200
