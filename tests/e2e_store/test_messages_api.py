"""The history API and the server API's publish, against real processes.

One directory and two shards sharing a message store (a SQLite file, or a
real PostgreSQL), and a cluster without a store (history from the owner's
memory); real WebSocket members next to the HTTP calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from roomshard.client import ConnectRefused, DirectoryUnavailable, Publisher, connect, history
from roomshard.testing.chatter import Chatter, check_logs, start_chatting
from roomshard.testing.pg import PgServer
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Proc, Procs
from roomshard.testing.timing import await_until, t
from tests.e2e_handoff.conftest import DIRECTORY_ENV, SHARD_ENV

pytestmark = pytest.mark.e2e

API_KEY = "backend-key-1"
SERVER = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


@dataclass
class Cluster:
    directory: Proc
    shards: dict[str, Proc]
    store_url: str

    @property
    def url(self) -> str:
        return self.directory.url


def start(procs: Procs, store_url: str) -> Cluster:
    env = {"ROOMSHARD_HISTORY_URL": store_url}
    directory = procs.directory(env={**DIRECTORY_ENV, **env, "ROOMSHARD_API_KEYS": f"other,{API_KEY}"})
    shards = {i: procs.shard(i, directory.url, env={**SHARD_ENV, **env}) for i in ("i1", "i2")}
    return Cluster(directory, shards, store_url)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                                        "memory"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Procs() as procs:
        if request.param == "postgres":
            pg = PgServer()
            pg.start()
            try:
                yield start(procs, pg.create_database())
            finally:
                procs.stop_all()
                pg.destroy()
        else:
            url = (f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}"
                   if request.param == "sqlite" else "memory")
            yield start(procs, url)


async def publish(http: httpx.AsyncClient, c: Cluster, room: str, msg_id: str,
                  user: str = "bot", text: str = "hi", **kw) -> httpx.Response:
    return await http.post(f"{c.url}/v1/rooms/{room}/messages",
                           json={"id": msg_id, "user": user, "text": text}, **{"headers": SERVER, **kw})


async def pages(http: httpx.AsyncClient, c: Cluster, room: str, limit: int,
                **params) -> list[dict]:
    """Every page from the latest back: the pages' bodies, latest first."""
    out: list[dict] = []
    before = None
    while True:
        query = {"limit": limit, **params, **({"before": before} if before else {})}
        r = await http.get(f"{c.url}/v1/rooms/{room}/messages", params=query)
        assert r.status_code == 200, r.text
        out.append(r.json())
        if not out[-1]["more"]:
            return out
        before = out[-1]["messages"][0]["seq"]


async def test_publishes_and_member_sends_share_one_seq_order_and_history_pages_them_once(
        cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=t(10)) as http:
        members = await start_chatting([Chatter(cluster.url, "talk", f"u{k}", http)
                                        for k in range(3)])

        async def backend(n: int) -> list[int]:
            return [(await publish(http, cluster, "talk", f"p{n}-{i}", text=f"news {i}")).json()["seq"]
                    for i in range(15)]

        async def chat() -> None:
            for _ in range(15):
                for m in members:
                    await m.send()
                await asyncio.sleep(0.05)

        results = await asyncio.gather(backend(1), backend(2), chat())
        published = results[0] + results[1]
        assert len(set(published)) == 30
        await await_until(lambda: all(not m.unacked for m in members), 20, "every send acked")
        top = max([*published, *(s for m in members for s in m.acks.values())])
        await await_until(lambda: all(m.last_seq == top for m in members), 10, "all at the top")
        for m in members:
            await m.stop()
        assert check_logs(members) == []
        logs = [[(f["seq"], f["id"], f["user"]) for f in m.log] for m in members]
        assert logs[0] == logs[1] == logs[2]  # one order every member agrees on
        ids = [i for _, i, _ in logs[0]]
        assert sum(i.startswith("p") for i in ids) == 30 and len(ids) == len(set(ids))
        # A retried publish is the same message: same seq, not broadcast again.
        again = await publish(http, cluster, "talk", "p1-3", text="news 3")
        assert again.status_code == 200 and again.json() == {
            "room": "talk", "seq": results[0][3], "id": "p1-3"}
        got = await pages(http, cluster, "talk", limit=20)
        seen = [m["seq"] for page in reversed(got) for m in page["messages"]]
        assert seen == sorted(seen) and len(seen) == len(set(seen))
        assert {m["id"] for page in got for m in page["messages"]} >= set(ids)
        if cluster.store_url != "memory":
            assert seen == list(range(1, top + 1))  # every stored message exactly once
        first = got[0]["messages"][-1]
        assert first["seq"] == top and set(first) == {"seq", "id", "user", "text", "ts"}


async def test_history_refuses_what_it_must(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=t(10)) as http:
        assert (await publish(http, cluster, "secret", "s1")).status_code == 200
        r = await http.put(f"{cluster.url}/v1/admin/rooms/secret/access", headers=ADMIN,
                           json={"private": True, "members": ["alice"]})
        assert r.status_code == 200, r.text
        base = f"{cluster.url}/v1/rooms/secret/messages"
        for params, status, code in [
            ({}, 403, "not_a_member"),
            ({"user": "bob"}, 403, "not_a_member"),
            ({"user": "bad user"}, 400, "invalid_user"),
            ({"user": "alice", "limit": "0"}, 400, "invalid_parameter"),
            ({"user": "alice", "limit": "501"}, 400, "invalid_parameter"),
            ({"user": "alice", "before": "-3"}, 400, "invalid_parameter"),
            ({"user": "alice", "before": "x"}, 400, "invalid_parameter"),
        ]:
            r = await http.get(base, params=params)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), params
        r = await http.get(base, params={"user": "alice"})
        assert r.status_code == 200 and [m["id"] for m in r.json()["messages"]] == ["s1"]
        r = await http.get(base, headers=ADMIN)  # the admin token reads any room
        assert r.status_code == 200 and r.json()["more"] is False
        r = await http.get(f"{cluster.url}/v1/rooms/never-made/messages")
        assert (r.status_code, r.json()["error"]["code"]) == (404, "room_not_found")
        r = await http.get(f"{cluster.url}/v1/rooms/bad%20room/messages")
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_room")


async def test_publish_refuses_what_it_must(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=t(10)) as http:
        url = f"{cluster.url}/v1/rooms/pub/messages"
        ok = {"id": "x1", "user": "bot", "text": "hi"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
            r = await http.post(url, json=ok, headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), headers
        assert (await http.post(url, json=ok, headers=ADMIN)).status_code == 200  # admin too
        for body, code in [
            ({"id": "", "user": "bot", "text": "hi"}, "invalid_id"),
            ({"id": "x" * 65, "user": "bot", "text": "hi"}, "invalid_id"),
            ({"id": "x2", "user": "a b", "text": "hi"}, "invalid_user"),
            ({"id": "x2", "user": "bot", "text": "hi", "extra": 1}, "invalid_body"),
            ({"id": "x2", "user": "bot"}, "invalid_body"),
            ({"id": "x2", "user": "bot", "text": "x" * 4097}, "too_long"),
        ]:
            r = await http.post(url, json=body, headers=SERVER)
            assert (r.status_code, r.json()["error"]["code"]) == (400, code), body
        r = await http.post(url, content=b"{nope", headers=SERVER)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
        r = await http.post(f"{cluster.url}/v1/rooms/bad%20room/messages", json=ok,
                            headers=SERVER)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_room")
        page = (await http.get(url, headers=ADMIN)).json()
        assert [m["id"] for m in page["messages"]] == ["x1"]  # nothing refused got in


async def test_a_publish_waits_out_a_move(cluster: Cluster) -> None:
    """Publishes sent together with each of 4 moves of the room: every one answered 200
    with its own seq, every member sees each once, in one order."""
    async with httpx.AsyncClient(timeout=t(10)) as http:
        members = await start_chatting([Chatter(cluster.url, "moving", f"u{k}", http)
                                        for k in range(2)])
        seqs: dict[str, int] = {}
        for k in range(4):
            room = (await http.get(f"{cluster.url}/v1/admin/rooms/moving", headers=ADMIN)).json()
            to = "i2" if room["instance"] == "i1" else "i1"
            move = http.post(f"{cluster.url}/v1/admin/rooms/moving/move", json={"to": to},
                             headers=ADMIN, timeout=t(30))
            moved, *answers = await asyncio.gather(
                move, *(publish(http, cluster, "moving", f"m{k}-{j}") for j in range(3)))
            assert moved.status_code == 200, moved.text
            for a in answers:
                assert a.status_code == 200, a.text
                seqs[a.json()["id"]] = a.json()["seq"]
        assert len(seqs) == 12 and len(set(seqs.values())) == 12
        top = max(seqs.values())
        await await_until(lambda: all((m.last_seq or 0) >= top for m in members), 10,
                          "members at the last publish")
        for m in members:
            await m.stop()
        assert check_logs(members) == []
        for m in members:
            published = {f["id"]: f["seq"] for f in m.log if f["id"].startswith("m")}
            assert published == seqs  # each once, under the seq its publish was answered with


async def test_the_python_client_pages_history_and_publishes(cluster: Cluster) -> None:
    async with Publisher(cluster.url, API_KEY) as pub:
        sent = [await pub.publish("client-room", "announcer", f"line {i}") for i in range(7)]
        assert [p.seq for p in sent] == sorted(p.seq for p in sent) and len({p.id for p in sent}) == 7
        again = await pub.publish("client-room", "announcer", "line 0", msg_id=sent[0].id)
        assert again == sent[0]  # the same (user, id): the same message
        with pytest.raises(ConnectRefused) as refused:
            await pub.publish("client-room", "bad user", "x")
        assert refused.value.status == 400 and refused.value.code == "invalid_user"
    page = await history(cluster.url, "client-room", limit=4)
    assert [m.text for m in page.messages] == [f"line {i}" for i in range(3, 7)] and page.more
    older = await history(cluster.url, "client-room", limit=4, before=page.messages[0].seq)
    assert [m.text for m in older.messages] == [f"line {i}" for i in range(3)] and not older.more
    with pytest.raises(ConnectRefused) as refused:
        await history(cluster.url, "no-such-room")
    assert refused.value.status == 404 and refused.value.code == "room_not_found"
    async with connect(cluster.url, "client-room", "reader") as session:
        page = await session.history(limit=2)
        assert [m.text for m in page.messages] == ["line 5", "line 6"]
        assert page.messages[-1].user == "announcer"


async def test_a_publisher_retries_what_cannot_be_delivered_then_says_so(procs: Procs) -> None:
    """No shard at all: 503 with Retry-After, retried with the same id until the patience ends."""
    directory = procs.directory(env={"ROOMSHARD_API_KEYS": API_KEY})
    async with httpx.AsyncClient(timeout=t(10)) as http:
        r = await http.post(f"{directory.url}/v1/rooms/r/messages", headers=SERVER,
                            json={"id": "a", "user": "bot", "text": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "unavailable"
    async with Publisher(directory.url, API_KEY, patience=2.5) as pub:
        with pytest.raises(DirectoryUnavailable):
            await pub.publish("r", "bot", "hi")
