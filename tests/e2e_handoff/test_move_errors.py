"""Move, drain and rebalance refusals on a real cluster: status, error body, nothing changed."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import orjson
from websockets.sync.client import connect as ws_connect

from roomshard.testing.procs import TEST_CLUSTER_SECRET
from roomshard.testing.timing import t, wait_until
from roomshard.wire.tickets import Signer
from tests.e2e_handoff.conftest import Cluster


def _connect(cluster: Cluster, room: str, user: str = "alice") -> dict:
    r = httpx.post(f"{cluster.url}/v1/rooms/{room}/connect", json={"user": user}, timeout=t(10))
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return r.status_code, body["error"]["code"]


def _close_code(url: str) -> int | None:
    """Open the room URL; the close code the shard answers with (None if it welcomed us)."""
    with ws_connect(url, open_timeout=t(5), close_timeout=t(2)) as ws:
        try:
            frame = orjson.loads(ws.recv(timeout=t(5)))
        except Exception:  # noqa: BLE001 - the close is what we look at
            return ws.close_code
        assert frame["type"] == "welcome"
        return None


def test_move_refusals_have_the_contract_codes(cluster: Cluster) -> None:
    """401 first, then 400/404/409 (already_there, instance_not_active, no_target) with the error body; nothing changes."""
    c = _connect(cluster, "lobby")
    src = c["instance"]
    other = "i1" if src != "i1" else "i2"
    path = "/v1/admin/rooms/lobby/move"
    r = httpx.post(cluster.url + path, json={"nope": 1}, timeout=t(10))
    assert _error(r) == (401, "unauthorized")
    assert _error(cluster.admin("POST", path, {"to": other, "extra": 1}))[0] == 400
    assert _error(cluster.admin("POST", path, {}))[0] == 400
    assert _error(cluster.admin("POST", path, {"to": "x7"}))[0] == 400
    assert _error(cluster.admin("POST", "/v1/admin/rooms/bad%20id/move", {"to": other}))[0] == 400
    assert _error(cluster.admin("POST", "/v1/admin/rooms/nosuch/move", {"to": other})) == (
        404, "room_not_found")
    assert _error(cluster.admin("POST", path, {"to": "i99"})) == (404, "instance_not_found")
    assert _error(cluster.admin("POST", path, {"to": src})) == (409, "already_there")
    assert cluster.admin("PUT", f"/v1/admin/instances/{other}", {"state": "draining"}).status_code == 200
    assert _error(cluster.admin("POST", path, {"to": other})) == (409, "instance_not_active")
    assert _error(cluster.admin("POST", "/v1/admin/rebalance", {"dry_run": "yes"}))[0] == 400
    assert _error(cluster.admin("POST", "/v1/admin/rebalance", {"max_moves": -1}))[0] == 400
    assert _error(cluster.admin("POST", "/v1/admin/instances/i99/drain")) == (
        404, "instance_not_found")
    third = ({"i1", "i2", "i3"} - {src, other}).pop()
    assert cluster.admin("PUT", f"/v1/admin/instances/{third}", {"state": "disabled"}).status_code == 200
    assert _error(cluster.admin("POST", f"/v1/admin/instances/{src}/drain")) == (409, "no_target")
    assert cluster.states()[src] == "active"
    room = cluster.room("lobby")
    assert (room["instance"], room["epoch"], room["state"]) == (src, c["epoch"], "active")


def test_a_second_move_while_moving_is_409(cluster: Cluster) -> None:
    """A second move while one waits on a stalled target is 409 already_moving; the room ends active on one instance."""
    c = _connect(cluster, "busy")
    assert _close_code(c["url"]) is None  # loaded on its shard
    src = c["instance"]
    to, third = [i for i in ("i1", "i2", "i3") if i != src]
    target = cluster.shards[to].popen.pid
    os.kill(target, signal.SIGSTOP)  # the adopt call hangs until its timeout
    results: dict[str, httpx.Response] = {}
    mover = threading.Thread(target=lambda: results.setdefault(
        "r", cluster.admin("POST", "/v1/admin/rooms/busy/move", {"to": to})))
    try:
        mover.start()
        wait_until(lambda: cluster.room("busy")["state"] == "moving", 10, "the room to be moving")
        second = cluster.admin("POST", "/v1/admin/rooms/busy/move", {"to": third})
        assert _error(second) == (409, "already_moving")
    finally:
        os.kill(target, signal.SIGCONT)
    mover.join(t(60))
    assert results["r"].status_code in (200, 409), results["r"].text
    room = cluster.room("busy")
    assert room["state"] == "active"
    assert room["instance"] == (to if results["r"].status_code == 200 else src)


def test_stale_ticket_is_refused_after_a_move_and_after_a_restart(cluster: Cluster) -> None:
    """A pre-move ticket gets 4004 on the old shard, is refused after its restart too, and the old epoch gets 4004 from open."""
    first = _connect(cluster, "moved", "amy")
    assert _close_code(first["url"]) is None
    stale = _connect(cluster, "moved", "bob")  # issued before the move, never used
    src, epoch = stale["instance"], stale["epoch"]
    to = "i1" if src != "i1" else "i2"
    r = cluster.admin("POST", "/v1/admin/rooms/moved/move", {"to": to})
    assert r.status_code == 200, r.text
    assert r.json()["epoch"] == epoch + 1
    assert _close_code(stale["url"]) == 4004
    cluster.procs.kill(cluster.shards[src])
    cluster.shards[src] = cluster.procs.restart(cluster.shards[src])
    wait_until(lambda: cluster.states()[src] == "active", 15, f"{src} back")
    base = cluster.shards[src].url.replace("http://", "ws://") + f"/{src}/room/moved"
    old_ticket = stale["url"].split("ticket=", 1)[1]
    assert _close_code(f"{base}?ticket={old_ticket}") in (4001, 4004)  # predates the process
    signer = Signer([TEST_CLUSTER_SECRET])
    forged = signer.encode_ticket(signer.issue_ticket(room="moved", instance=src, epoch=epoch,
                                                      user="bob", ttl=60, now=time.time()))
    assert _close_code(f"{base}?ticket={forged}") == 4004
    room = cluster.room("moved")
    assert (room["instance"], room["epoch"]) == (to, epoch + 1)
    fresh = _connect(cluster, "moved", "cy")
    assert (fresh["instance"], fresh["epoch"]) == (to, epoch + 1)
    assert _close_code(fresh["url"]) is None


def test_a_moved_room_nobody_rejoined_moves_on(cluster: Cluster) -> None:
    """A moved room nobody rejoined (adopted, never activated) moves on with its history intact."""
    c = _connect(cluster, "quiet")
    with ws_connect(c["url"], open_timeout=t(5)) as ws:
        assert orjson.loads(ws.recv(timeout=t(5)))["type"] == "welcome"
        ws.send(orjson.dumps({"type": "send", "id": "m1", "text": "hi"}).decode())
        while orjson.loads(ws.recv(timeout=t(5)))["type"] != "ack":
            pass
    src = c["instance"]
    hop, last = [i for i in ("i1", "i2", "i3") if i != src]
    first = cluster.admin("POST", "/v1/admin/rooms/quiet/move", {"to": hop})
    assert first.status_code == 200 and first.json()["messages_transferred"] == 1
    second = cluster.admin("POST", "/v1/admin/rooms/quiet/move", {"to": last})
    assert second.status_code == 200, second.text
    assert second.json()["messages_transferred"] == 1
    back = _connect(cluster, "quiet", "amy")
    assert back["instance"] == last
    with ws_connect(back["url"] + "&since=0", open_timeout=t(5)) as ws:
        welcome = orjson.loads(ws.recv(timeout=t(5)))
        assert (welcome["seq"], welcome["recovered"]) == (1, True)
        assert orjson.loads(ws.recv(timeout=t(5)))["id"] == "m1"
