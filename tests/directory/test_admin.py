"""Admin API: the instance registry, room views with live load, access pushes, handoff plug points."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec

from directory.domain import schemas
from tests.directory.conftest import ADMIN, Clock, Harness


class FakeShards:
    """The shards' internal HTTP routes behind an httpx.MockTransport, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.rooms: dict[str, dict[str, Any]] = {}
        self.unreachable: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        body = json.loads(request.content) if request.content else None
        self.calls.append((request.method, f"{host}{request.url.path}", body))
        assert request.headers["authorization"].startswith("Bearer ")
        if host in self.unreachable:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/internal/rooms":
            return httpx.Response(200, json={"rooms": self.rooms})
        room = path.split("/")[3]
        if path.endswith("/access"):
            return httpx.Response(200, json={"room": room, "closed": 1})
        if room in self.rooms:
            return httpx.Response(200, json={"room": room, **self.rooms[room]})
        return httpx.Response(404, json={"error": {"code": "room_not_loaded", "message": "-"}})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


async def instances(h: Harness) -> dict[str, dict[str, Any]]:
    r = await h.client.get("/v1/admin/instances", headers=ADMIN)
    assert r.status_code == 200
    msgspec.convert(r.json(), schemas.InstanceList)
    return {i["id"]: i for i in r.json()["instances"]}


async def test_register_update_and_list_instances(h: Harness) -> None:
    """PUT registers then updates an instance; GET lists it with ISO 8601 UTC times."""
    created = await h.put_instance("i3", "http://10.0.0.3:8081", capacity=50)
    assert (created["state"], created["capacity"], created["public_base"]) == ("active", 50, None)
    assert created["last_heartbeat"] is None and created["registered_at"].endswith("Z")
    updated = await h.put_instance("i3", public_base="wss://b.example.com", state="draining")
    assert (updated["state"], updated["state_reason"], updated["capacity"]) == ("draining", "admin", 50)
    assert updated["public_base"] == "wss://b.example.com"
    assert list(await instances(h)) == ["i3"]
    one = await h.client.get("/v1/admin/instances/i3", headers=ADMIN)
    assert one.json()["internal_url"] == "http://10.0.0.3:8081"


async def test_delete_refused_while_rooms_assigned(h: Harness) -> None:
    """DELETE is 409 instance_has_rooms while a room points at the instance, 200 after."""
    await h.heartbeat("i1")
    await h.connect("r1")
    r = await h.client.delete("/v1/admin/instances/i1", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "instance_has_rooms"
    await h.put_instance("i1", state="disabled")
    await h.heartbeat("i2")
    assert (await h.connect("r1")).json()["instance"] == "i2"  # re-placed off the disabled one
    r = await h.client.delete("/v1/admin/instances/i1", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"id": "i1", "deleted": True}
    assert list(await instances(h)) == ["i2"]


async def test_instance_goes_down_after_missed_heartbeats(h: Harness) -> None:
    """An instance reads as down once down_after passes without a heartbeat, and up again after one."""
    await h.heartbeat("i1", load={"rooms": 2, "connections": 7, "messages_per_s": 1.5})
    view = (await instances(h))["i1"]
    assert view["state"] == "active"
    assert view["load"] == {"rooms": 2, "connections": 7, "messages_per_s": 1.5}
    h.clock.advance(10.0)
    assert (await instances(h))["i1"]["state"] == "active"  # exactly down_after: not yet
    h.clock.advance(0.5)
    assert (await instances(h))["i1"]["state"] == "down"
    await h.heartbeat("i1")
    assert (await instances(h))["i1"]["state"] == "active"


async def test_admin_registered_instance_without_heartbeat_goes_down(h: Harness) -> None:
    """An instance registered by an admin that never heartbeats is down after down_after."""
    await h.put_instance("i5", "http://shard-i5.test")
    h.clock.advance(11)
    assert (await instances(h))["i5"]["state"] == "down"
    assert (await h.connect("x")).status_code == 503


async def test_room_views_carry_live_load_or_null(harness_factory: Any) -> None:
    """Room GET/list show the assignment and the owner's live load; load is null when the shard is unreachable."""
    fake = FakeShards()
    async with harness_factory(shard_transport=fake.transport()) as h:
        await h.heartbeat("i1")
        await h.heartbeat("i2")
        await h.placement_sees("i1", "i2")
        for room in ("a", "b", "c"):
            await h.connect(room)
        fake.rooms["a"] = {"connections": 3, "members": 2, "seq": 40, "messages_per_s": 0.5}
        r = await h.client.get("/v1/admin/rooms/a", headers=ADMIN)
        assert r.status_code == 200, r.text
        view = msgspec.convert(r.json(), schemas.RoomView)
        assert (view.instance, view.epoch, view.state) == ("i1", 1, "active")
        assert r.json()["load"] == {"loaded": True, "connections": 3, "members": 2, "seq": 40,
                                    "messages_per_s": 0.5}
        assert (await h.client.get("/v1/admin/rooms/b", headers=ADMIN)).json()["load"]["loaded"] is False
        listed = (await h.client.get("/v1/admin/rooms?instance=i1", headers=ADMIN)).json()["rooms"]
        msgspec.convert({"rooms": listed}, schemas.RoomList)
        assert [x["room"] for x in listed] == ["a", "c"] and listed[0]["load"]["connections"] == 3
        fake.unreachable.add("shard-i1.test")
        r = await h.client.get("/v1/admin/rooms/a", headers=ADMIN)
        assert r.status_code == 200 and r.json()["load"] is None
        listed = (await h.client.get("/v1/admin/rooms", headers=ADMIN)).json()["rooms"]
        assert {x["room"]: x["load"] is None for x in listed} == {"a": True, "b": False, "c": True}


async def test_access_change_is_pushed_to_owner(harness_factory: Any) -> None:
    """Making a placed room private tells its owner (which closes removed members with 4003)."""
    fake = FakeShards()
    async with harness_factory(shard_transport=fake.transport()) as h:
        await h.heartbeat("i1")
        await h.connect("club", "bob")
        r = await h.client.put("/v1/admin/rooms/club/access",
                               json={"private": True, "members": ["alice", "alice", "carol"]},
                               headers=ADMIN)
        assert r.status_code == 200, r.text
        body = msgspec.convert(r.json(), schemas.AccessView)
        assert (body.members, body.instance, body.closed) == (["alice", "carol"], "i1", 1)
        assert ("POST", "shard-i1.test/internal/rooms/club/access",
                {"private": True, "members": ["alice", "carol"]}) in fake.calls
        assert (await h.connect("club", "bob")).status_code == 403


async def test_access_on_unplaced_room_creates_record(h: Harness) -> None:
    """An access PUT on an unknown room creates its record; the first member connect places it at epoch 1."""
    r = await h.client.put("/v1/admin/rooms/new/access", json={"private": True, "members": ["a"]},
                           headers=ADMIN)
    assert r.json()["instance"] is None and r.json()["closed"] is None
    room = (await h.client.get("/v1/admin/rooms/new", headers=ADMIN)).json()
    assert (room["instance"], room["private"], room["members"], room["load"]) == (None, True, ["a"], None)
    await h.heartbeat("i1")
    c = (await h.connect("new", "a")).json()
    assert (c["instance"], c["epoch"]) == ("i1", 1)


async def test_move_validations_then_rollback_without_reachable_shards(h: Harness) -> None:
    """Move answers the contract's 404/409s; with no shard to call, a move rolls back (409) and the room stays."""
    await h.heartbeat("i1")
    await h.heartbeat("i2")
    await h.connect("r")  # on i1

    async def move(to: str) -> httpx.Response:
        return await h.client.post("/v1/admin/rooms/r/move", json={"to": to}, headers=ADMIN)

    assert (await move("i9")).json()["error"]["code"] == "instance_not_found"
    assert (await move("i1")).json()["error"]["code"] == "already_there"
    await h.put_instance("i2", state="draining")
    r = await move("i2")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "instance_not_active")
    await h.put_instance("i2", state="active")
    r = await move("i2")  # the registered shard URLs answer nothing: the freeze fails
    assert (r.status_code, r.json()["error"]["code"]) == (409, "move_rolled_back")
    view = (await h.client.get("/v1/admin/rooms/r", headers=ADMIN)).json()
    assert (view["instance"], view["state"], view["epoch"]) == ("i1", "active", 2)  # epoch 2 burnt
    r = await h.client.post("/v1/admin/rebalance", json={"dry_run": True}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["dry_run"] is True
    r = await h.client.post("/v1/admin/instances/i1/drain", headers=ADMIN)
    assert r.status_code == 200
    assert (r.json()["state"], r.json()["failed"][0]["room"]) == ("draining", "r")
    assert (await instances(h))["i1"]["state"] == "draining"  # not disabled: a room is left


async def test_drain_of_down_instance_replaces_rooms_now(h: Harness) -> None:
    """Draining a down instance re-places its rooms at once (epoch +1) and disables it."""
    await h.heartbeat("i1")
    for room in ("a", "b"):
        await h.connect(room)
    h.clock.advance(8)
    await h.heartbeat("i2")
    h.clock.advance(3)
    r = await h.client.post("/v1/admin/instances/i1/drain", headers=ADMIN)
    assert r.status_code == 200, r.text
    report = msgspec.convert(r.json(), schemas.DrainReport)
    assert (report.state, report.replaced) == ("disabled", 2)
    for room in ("a", "b"):
        view = (await h.client.get(f"/v1/admin/rooms/{room}", headers=ADMIN)).json()
        assert (view["instance"], view["epoch"], view["owner_epoch"]) == ("i2", 2, 2)
    inst = await instances(h)
    assert (inst["i1"]["state"], inst["i1"]["rooms_assigned"], inst["i2"]["rooms_assigned"]) == (
        "disabled", 0, 2)


async def test_two_apps_share_nothing_but_the_database(harness_factory: Any) -> None:
    """Two apps in one process (own metrics registries) see the same registry through the database."""
    clock = Clock()
    async with harness_factory(clock=clock) as a, harness_factory(clock=clock) as b:
        await a.heartbeat("i1")
        assert (await b.connect("shared")).json()["instance"] == "i1"
        metrics_a = (await a.client.get("/metrics")).text
        metrics_b = (await b.client.get("/metrics")).text
        assert 'roomshard_directory_connects_total{result="ok"} 1.0' in metrics_b
        assert 'roomshard_directory_connects_total{result="ok"} 0.0' in metrics_a
