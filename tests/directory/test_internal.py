"""Shard -> directory routes: heartbeat registration rules, clean leave, and the atomic room open."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from directory.domain import schemas
from roomshard.wire import internal
from tests.directory.conftest import ADMIN, Harness, cluster_headers


async def state_of(h: Harness, iid: str) -> tuple[str, str | None]:
    r = (await h.client.get(f"/v1/admin/instances/{iid}", headers=ADMIN)).json()
    return r["state"], r["state_reason"]


async def test_heartbeat_registers_and_answers_down_after(h: Harness) -> None:
    """The first heartbeat registers the instance as active and returns its view and down_after."""
    r = await h.heartbeat("i4", capacity=200, public_base="wss://x.example.com",
                          load={"rooms": 1, "connections": 2, "messages_per_s": 0.0})
    assert r.status_code == 200, r.text
    body = msgspec.convert(r.json(), internal.HeartbeatResponse)
    assert body.down_after == 10.0
    assert (body.instance.id, body.instance.state, body.instance.capacity) == ("i4", "active", 200)
    assert body.instance.last_heartbeat is not None


async def test_heartbeat_needs_own_cluster_token(h: Harness) -> None:
    """A heartbeat without a valid cluster token is 401; a token of another instance is 403."""
    url = "/v1/internal/instances/i1/heartbeat"
    body = {"internal_url": "http://s", "boot_id": "b"}
    r = await h.client.put(url, json=body, headers={"Authorization": "Bearer forged"})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
    r = await h.client.put(url, json=body, headers=cluster_headers("i2", h.clock.now))
    assert (r.status_code, r.json()["error"]["code"]) == (403, "wrong_instance")
    stale = cluster_headers("i1", h.clock.now - 120)
    assert (await h.client.put(url, json=body, headers=stale)).status_code == 401


async def test_new_boot_reactivates_after_shutdown_but_not_after_admin(h: Harness) -> None:
    """A new process re-activates an instance parked by its own shutdown; an admin's disable sticks."""
    await h.heartbeat("i1", boot_id="one")
    r = await h.client.post("/v1/internal/instances/i1/leave", json={"drain": False},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.status_code == 200 and r.json()["state"] == "disabled"
    assert await state_of(h, "i1") == ("disabled", "shutdown")
    await h.heartbeat("i1", boot_id="one")
    assert await state_of(h, "i1") == ("disabled", "shutdown")  # same process: still leaving
    await h.heartbeat("i1", boot_id="two")
    assert await state_of(h, "i1") == ("active", None)
    await h.put_instance("i1", state="disabled")
    await h.heartbeat("i1", boot_id="three")
    assert await state_of(h, "i1") == ("disabled", "admin")


async def test_a_removed_instances_process_may_not_register_it_again(h: Harness) -> None:
    """DELETE retires the process the instance ran as: its heartbeats get 409
    instance_retired and the registry stays without it; a new process registers anew."""
    assert (await h.heartbeat("i1", boot_id="old")).status_code == 200
    assert (await h.heartbeat("i2", boot_id="other")).status_code == 200
    r = await h.client.delete("/v1/admin/instances/i1", headers=ADMIN)
    assert r.status_code == 200, r.text
    for _ in range(2):
        r = await h.heartbeat("i1", boot_id="old")
        assert (r.status_code, r.json()["error"]["code"]) == (409, "instance_retired"), r.text
        assert "stop it" in r.json()["error"]["message"]
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    assert [i["id"] for i in listed] == ["i2"]
    # Only that process: another instance's, and a new process of i1, register as before.
    assert (await h.heartbeat("i2", boot_id="other")).status_code == 200
    r = await h.heartbeat("i1", boot_id="new")
    assert r.status_code == 200 and r.json()["instance"]["state"] == "active", r.text
    # A week later the record is dropped (at the next removal): the table does not grow.
    h.clock.now += 8 * 86400
    assert (await h.heartbeat("i2", boot_id="other")).status_code == 200
    assert (await h.client.delete("/v1/admin/instances/i2", headers=ADMIN)).status_code == 200
    async with h.app.state.ctx.store.engine.connect() as conn:
        from sqlalchemy import select

        from directory.db.engine import retired_processes
        rows = (await conn.execute(select(retired_processes.c.boot_id))).scalars().all()
    assert rows == ["other"]


async def _claim(h: Harness, boot_id: str, url: str, subject: str = internal.UNNUMBERED) -> Any:
    return await h.client.post("/v1/internal/instances", headers=cluster_headers(subject, h.clock.now),
                               json={"internal_url": url, "boot_id": boot_id})


async def test_a_shard_without_a_number_gets_the_lowest_free_one_once(h: Harness) -> None:
    await h.heartbeat("i2", boot_id="fixed")
    r = await _claim(h, "a", "http://10.0.0.1:8081")
    assert r.status_code == 200 and r.json()["instance"]["id"] == "i1", r.text
    assert r.json()["instance"]["state"] == "active" and r.json()["down_after"] == 10.0
    again = await _claim(h, "a", "http://10.0.0.1:8081")  # a retried claim: the same number
    assert again.json()["instance"]["id"] == "i1"
    assert (await _claim(h, "b", "http://10.0.0.3:8081")).json()["instance"]["id"] == "i3"
    # The claimed number is the process's: it heartbeats as i1 with its own token.
    assert (await h.heartbeat("i1", boot_id="a", url="http://10.0.0.1:8081")).status_code == 200
    # Only an unnumbered token may claim; an unnumbered token may not act as an instance.
    r = await _claim(h, "c", "http://10.0.0.4:8081", subject="i1")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "wrong_instance")
    r = await h.client.put("/v1/internal/instances/i4/heartbeat",
                           headers=cluster_headers(internal.UNNUMBERED, h.clock.now),
                           json={"internal_url": "http://10.0.0.4:8081", "boot_id": "c"})
    assert r.status_code == 403
    assert (await _claim(h, "d", "not a url")).status_code == 400


async def test_a_restarted_shard_takes_back_its_number_once_its_predecessor_is_gone(
        h: Harness) -> None:
    assert (await _claim(h, "first", "http://10.0.0.1:8081")).json()["instance"]["id"] == "i1"
    # The predecessor is alive: a second process at that address gets a number of its own.
    assert (await _claim(h, "rival", "http://10.0.0.1:8081")).json()["instance"]["id"] == "i2"
    h.clock.now += 11  # i1 and i2 are down now (no heartbeat for down_after)
    assert (await h.heartbeat("i2", boot_id="rival", url="http://10.0.0.1:8081")).status_code == 200
    r = await _claim(h, "second", "http://10.0.0.1:8081")
    assert r.json()["instance"]["id"] == "i1" and r.json()["instance"]["state"] == "active"
    # A process that left (shutdown) frees its number for the next one at its address.
    r = await h.client.post("/v1/internal/instances/i1/leave", json={"drain": False},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.status_code == 200
    assert (await _claim(h, "third", "http://10.0.0.1:8081")).json()["instance"]["id"] == "i1"


async def test_a_leave_with_remove_frees_the_number_and_retires_the_process(h: Harness) -> None:
    assert (await _claim(h, "p1", "http://10.0.0.1:8081")).json()["instance"]["id"] == "i1"
    assert (await _claim(h, "p2", "http://10.0.0.2:8081")).json()["instance"]["id"] == "i2"
    assert (await h.connect("left-room")).status_code == 200
    r = await h.client.post("/v1/internal/instances/i1/leave", json={"drain": False, "remove": True},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.status_code == 200 and r.json()["removed"] is True, r.text
    listed = (await h.client.get("/v1/admin/instances", headers=ADMIN)).json()["instances"]
    assert [i["id"] for i in listed] == ["i2"]
    # The room (if it was i1's) points at a live instance now, never at a removed one.
    room = (await h.client.get("/v1/admin/rooms/left-room", headers=ADMIN)).json()
    assert room["instance"] in (None, "i2")
    r = await h.heartbeat("i1", boot_id="p1", url="http://10.0.0.1:8081")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "instance_retired")
    r = await _claim(h, "p1", "http://10.0.0.1:8081")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "instance_retired")
    assert (await _claim(h, "p3", "http://10.0.0.3:8081")).json()["instance"]["id"] == "i1"


async def test_the_instance_view_says_where_its_route_is(h: Harness) -> None:
    r = await h.heartbeat("i4", public_base="wss://x.example.com")
    assert r.json()["instance"]["route_url"] == "wss://x.example.com/i4/room/"
    r = await h.heartbeat("i5")  # no public_base, no ROOMSHARD_PUBLIC_URL in this harness
    assert r.json()["instance"]["route_url"] is None


@pytest.mark.parametrize("drain", [False, True])
async def test_after_leave_no_client_is_sent_there(h: Harness, drain: bool) -> None:
    """After a clean leave (with or without drain; here no shard answers a move) its rooms and new rooms go elsewhere."""
    await h.heartbeat("i1")
    await h.connect("r")
    await h.heartbeat("i2")
    r = await h.client.post("/v1/internal/instances/i1/leave", json={"drain": drain},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.status_code == 200, r.text
    msgspec.convert(r.json(), schemas.DrainReport)
    moved = (await h.connect("r")).json()
    assert moved["instance"] == "i2" and moved["epoch"] >= 2  # a failed live move burns one
    assert (await h.connect("other")).json()["instance"] == "i2"


async def test_other_url_cannot_take_live_instance_with_rooms(h: Harness) -> None:
    """A different internal_url claiming a live instance that has rooms is 409 instance_in_use."""
    await h.heartbeat("i1", boot_id="a", url="http://10.0.0.1:9000")
    await h.connect("r")
    r = await h.heartbeat("i1", boot_id="b", url="http://10.0.0.2:9000")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "instance_in_use")
    h.clock.advance(11)  # the first process is now down: a restart elsewhere may take over
    r = await h.heartbeat("i1", boot_id="b", url="http://10.0.0.2:9000")
    assert r.status_code == 200 and r.json()["instance"]["internal_url"] == "http://10.0.0.2:9000"


class Answer:
    """A single open's answer, or one room's result of a batch as the single call answers it."""

    def __init__(self, status_code: int, body: Any) -> None:
        self.status_code, self.body, self.text = status_code, body, str(body)

    def json(self) -> Any:
        return self.body


async def open_room(h: Harness, room: str, instance: str, epoch: int,
                    open_id: str | None = None, *, via: str = "single") -> Answer:
    body: dict[str, Any] = {"instance": instance, "ticket_epoch": epoch}
    if open_id is not None:
        body["open_id"] = open_id
    if via == "single":
        r = await h.client.post(f"/v1/internal/rooms/{room}/open", json=body,
                                headers=cluster_headers(instance, h.clock.now))
        return Answer(r.status_code, r.json())
    item = {k: v for k, v in body.items() if k != "instance"}
    r = await h.client.post("/v1/internal/opens",
                            json={"instance": instance, "rooms": [{"room": room, **item}]},
                            headers=cluster_headers(instance, h.clock.now))
    assert r.status_code == 200, r.text
    (result,) = msgspec.convert(r.json(), internal.OpenBatch).results
    assert result.room == room
    if result.grant is not None:
        return Answer(200, msgspec.to_builtins(result.grant))
    assert result.error is not None
    status = 409 if result.error.code in ("moving", "not_owner") else 400
    return Answer(status, {"error": msgspec.to_builtins(result.error)})


VIA = pytest.mark.parametrize("via", ["single", "batch"])


@VIA
async def test_a_retried_open_gets_the_same_grant_and_a_new_attempt_a_new_epoch(h: Harness, via: str) -> None:
    """The same open_id again (a lost answer, a late duplicate) changes nothing; a new id is a new copy."""
    await h.heartbeat("i1")
    await h.connect("r")
    first = (await open_room(h, "r", "i1", 1, "attempt-a", via=via)).json()
    assert (first["epoch"], first["seq_base"], first["lost"]) == (1, 0, False)
    for _ in range(2):
        assert (await open_room(h, "r", "i1", 1, "attempt-a", via=via)).json() == first
    assert (await h.connect("r")).json()["epoch"] == 1
    reopened = (await open_room(h, "r", "i1", 1, "attempt-b", via=via)).json()
    assert (reopened["epoch"], reopened["seq_base"], reopened["lost"]) == (2, 2 << 32, True)
    late = (await open_room(h, "r", "i1", 1, "attempt-a", via=via)).json()  # not the open of epoch 2
    assert (late["epoch"], late["lost"]) == (3, True)
    r = await open_room(h, "r", "i1", 3, "no spaces", via=via)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_open_id")


@VIA
async def test_open_first_then_lost_state_bumps_epoch(h: Harness, via: str) -> None:
    """First open: seq_base 0; opening the same epoch again means state was lost: epoch+1, seq_base epoch<<32."""
    await h.heartbeat("i1")
    await h.connect("r")
    r = await open_room(h, "r", "i1", 1, via=via)
    assert r.status_code == 200, r.text
    body = msgspec.convert(r.json(), internal.OpenGrant)
    assert (body.epoch, body.owner_epoch, body.seq_base, body.lost) == (1, 1, 0, False)
    again = (await open_room(h, "r", "i1", 1, via=via)).json()
    assert (again["epoch"], again["owner_epoch"], again["seq_base"], again["lost"]) == (2, 1, 2 << 32, True)
    assert (await h.connect("r")).json()["epoch"] == 2


@VIA
async def test_open_after_replacement_is_lost_with_new_base(h: Harness, via: str) -> None:
    """A room re-placed after its owner went down opens at its new epoch with seq_base epoch<<32."""
    await h.heartbeat("i1")
    await h.connect("r")
    assert (await open_room(h, "r", "i1", 1, via=via)).status_code == 200
    h.clock.advance(11)
    await h.heartbeat("i2")
    assert (await h.connect("r")).json()["epoch"] == 2
    stale = await open_room(h, "r", "i1", 1, via=via)
    assert (stale.status_code, stale.json()["error"]["code"]) == (409, "not_owner")
    old_ticket = await open_room(h, "r", "i2", 1, via=via)
    assert (old_ticket.status_code, old_ticket.json()["error"]["code"]) == (409, "not_owner")
    body = (await open_room(h, "r", "i2", 2, via=via)).json()
    assert (body["epoch"], body["seq_base"], body["lost"]) == (2, 2 << 32, True)


async def test_open_refuses_other_instance_token_and_unknown_room(h: Harness) -> None:
    """Open is 403 when the token is not the named instance's, 409 not_owner for an unknown room."""
    r = await h.client.post("/v1/internal/rooms/r/open", json={"instance": "i1", "ticket_epoch": 1},
                            headers=cluster_headers("i2", h.clock.now))
    assert r.status_code == 403
    r = await open_room(h, "ghost", "i1", 1)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "not_owner")
    r = await h.client.post("/v1/internal/rooms/r/open", json={"instance": "i1"},
                            headers=cluster_headers("i1", h.clock.now))
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body")


async def test_a_shard_s_numbers_out_of_the_database_s_range_are_a_bad_body(h: Harness) -> None:
    """An epoch past BIGINT or a count past INTEGER (or below 0) is 400 invalid_body on
    every database: neither a 500 nor PostgreSQL's refusal reported as database_unavailable."""
    await h.heartbeat("i1")
    await h.connect("r")
    headers = cluster_headers("i1", h.clock.now)
    for open_id in (None, "x1"):  # the batch's one statement on PostgreSQL, and the other
        item = {"ticket_epoch": 1 << 63, **({"open_id": open_id} if open_id else {})}
        for r in (await h.client.post("/v1/internal/rooms/r/open", headers=headers,
                                      json={"instance": "i1", **item}),
                  await h.client.post("/v1/internal/opens", headers=headers,
                                      json={"instance": "i1", "rooms": [{"room": "r", **item}]})):
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body"), r.text
    for extra in ({"load": {"rooms": 1 << 31}}, {"load": {"connections": -1}},
                  {"confirm": {"r": 1 << 63}}):
        r = await h.heartbeat("i1", **extra)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_body"), (extra, r.text)
    assert (await h.heartbeat("i1", load={"rooms": (1 << 31) - 1})).status_code == 200
    assert (await open_room(h, "r", "i1", 1, "x2", via="batch")).status_code == 200


async def test_a_batch_of_opens_answers_each_room_in_order(h: Harness) -> None:
    """One call: each room granted or refused on its own (not the owner, mid-move, a bad id),
    in the order asked; the token must be the named instance's; at most 1,000 rooms."""
    await h.heartbeat("i1")
    for room in ("a", "b", "c"):
        await h.connect(room)
    await h.heartbeat("i2")
    h.clock.advance(11)
    await h.heartbeat("i2")
    assert (await h.connect("c")).json()["instance"] == "i2"  # c was re-placed: i1 is down
    await h.heartbeat("i1")
    rooms = [{"room": "a", "ticket_epoch": 1, "open_id": "x1"}, {"room": "ghost", "ticket_epoch": 1},
             {"room": "c", "ticket_epoch": 1}, {"room": "bad id", "ticket_epoch": 1},
             {"room": "b", "ticket_epoch": 1, "open_id": "no spaces"}, {"room": "b", "ticket_epoch": 1}]
    url = "/v1/internal/opens"
    r = await h.client.post(url, json={"instance": "i1", "rooms": rooms},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.status_code == 200, r.text
    results = msgspec.convert(r.json(), internal.OpenBatch).results
    assert [x.room for x in results] == [x["room"] for x in rooms]
    assert [(x.grant.epoch, x.grant.seq_base) if x.grant else x.error.code  # type: ignore[union-attr]
            for x in results] == [(1, 0), "not_owner", "not_owner", "invalid_room",
                                  "invalid_open_id", (1, 0)]
    again = await h.client.post(url, json={"instance": "i1", "rooms": rooms[:1]},
                                headers=cluster_headers("i1", h.clock.now))
    assert again.json()["results"][0]["grant"]["epoch"] == 1  # same open_id: the same grant
    # Every open with its id (what shards send; on PostgreSQL one statement for the batch):
    # a retry, a refusal and a new copy of a room opened before, each answered as alone.
    ided = [{"room": "a", "ticket_epoch": 1, "open_id": "x1"},
            {"room": "c", "ticket_epoch": 1, "open_id": "x2"},
            {"room": "b", "ticket_epoch": 1, "open_id": "x3"},
            {"room": "ghost", "ticket_epoch": 1, "open_id": "x4"}]
    r = await h.client.post(url, json={"instance": "i1", "rooms": ided},
                            headers=cluster_headers("i1", h.clock.now))
    results = msgspec.convert(r.json(), internal.OpenBatch).results
    assert [x.room for x in results] == ["a", "c", "b", "ghost"]
    assert [(x.grant.epoch, x.grant.seq_base, x.grant.lost) if x.grant
            else x.error.code for x in results] == [  # type: ignore[union-attr]
        (1, 0, False), "not_owner", (2, 2 << 32, True), "not_owner"]
    assert (await h.connect("b")).json()["epoch"] == 2
    r = await h.client.post(url, json={"instance": "i1", "rooms": ided[2:3]},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.json()["results"][0]["grant"]["epoch"] == 2  # x3 again: the same grant
    r = await h.client.post(url, json={"instance": "i1", "rooms": rooms},
                            headers=cluster_headers("i2", h.clock.now))
    assert r.status_code == 403
    many = [{"room": f"r{i}", "ticket_epoch": 1} for i in range(1_001)]
    r = await h.client.post(url, json={"instance": "i1", "rooms": many},
                            headers=cluster_headers("i1", h.clock.now))
    assert (r.status_code, r.json()["error"]["code"]) == (400, "too_many_rooms")
    r = await h.client.post(url, json={"instance": "i1", "rooms": []},
                            headers=cluster_headers("i1", h.clock.now))
    assert r.json() == {"results": []}


async def test_heartbeat_refuses_a_token_made_for_a_shard(h: Harness) -> None:
    """Cluster tokens name their receiver: one made for a shard is 401 at the directory;
    an unbound token of an older shard (the rolling upgrade) is still accepted."""
    import jwt

    from roomshard.testing.procs import TEST_CLUSTER_SECRET
    from roomshard.wire.tickets import CLUSTER_AUDIENCE, Signer, _key

    url = "/v1/internal/instances/i1/heartbeat"
    body = {"internal_url": "http://s", "boot_id": "b"}
    signer = Signer([TEST_CLUSTER_SECRET])
    for to in ("i1", "i2"):
        token = signer.cluster_token("i1", to=to, now=h.clock.now)
        r = await h.client.put(url, json=body, headers={"Authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), to
    claims = {"aud": CLUSTER_AUDIENCE, "sub": "i1", "iat": h.clock.now, "exp": h.clock.now + 30}
    old = jwt.encode(claims, _key(TEST_CLUSTER_SECRET), algorithm="HS256")
    r = await h.client.put(url, json=body, headers={"Authorization": f"Bearer {old}"})
    assert r.status_code == 200, r.text
    r = await h.client.put(url, json=body, headers=cluster_headers("i1", h.clock.now))
    assert r.status_code == 200, r.text
