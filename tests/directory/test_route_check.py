"""Routable before active (ROOMSHARD_ROUTE_CHECK): a shard's new process is ``pending`` until
the directory reaches that very process at its public address; real processes on loopback
(the public address is the shard's own, or, for a wrong route, another shard's)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from directory.domain import instances, placement
from roomshard.testing.pg import free_port
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t, wait_until
from roomshard.wire.internal import HeartbeatBody
from roomshard.wire.probe import probe_url, route_gone, route_url, verdict

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def _hb(boot_id: str = "b1") -> HeartbeatBody:
    return HeartbeatBody(internal_url="http://10.0.0.1:8081", boot_id=boot_id)


def test_a_new_process_is_pending_with_the_check_and_active_without() -> None:
    new = instances.heartbeat_changes(None, _hb(), instance="i1", now=1.0, down_after=10,
                                      default_capacity=10, route_check=True)
    assert (new["state"], new["state_reason"]) == (placement.PENDING, instances.REASON_ROUTE)
    plain = instances.heartbeat_changes(None, _hb(), instance="i1", now=1.0, down_after=10,
                                        default_capacity=10)
    assert (plain["state"], plain["state_reason"]) == (placement.ACTIVE, None)
    row: dict[str, Any] = {**new, "state": placement.ACTIVE, "state_reason": None, "rooms_assigned": 0}
    # The same process heartbeating again keeps its state; a new one proves its route again.
    assert "state" not in instances.heartbeat_changes(row, _hb(), instance="i1", now=2.0,
                                                      down_after=10, default_capacity=10,
                                                      route_check=True)
    again = instances.heartbeat_changes(row, _hb("b2"), instance="i1", now=2.0, down_after=10,
                                        default_capacity=10, route_check=True)
    assert again["state"] == placement.PENDING
    for reason in (instances.REASON_SHUTDOWN, instances.REASON_DIED):
        parked = {**row, "state": placement.DISABLED, "state_reason": reason}
        back = instances.heartbeat_changes(parked, _hb("b3"), instance="i1", now=3.0,
                                           down_after=10, default_capacity=10, route_check=True)
        assert back["state"] == placement.PENDING
    # An admin's draining or disabled stays: the check does not override an operator.
    admin = {**row, "state": placement.DRAINING, "state_reason": instances.REASON_ADMIN}
    assert "state" not in instances.heartbeat_changes(admin, _hb("b4"), instance="i1", now=3.0,
                                                      down_after=10, default_capacity=10,
                                                      route_check=True)


def test_placement_never_chooses_a_pending_instance_and_it_goes_down_only_when_silent() -> None:
    pending = placement.Candidate(id="i1", number=1, state=placement.PENDING, capacity=10,
                                  rooms_assigned=0, connections=0, seen_at=100.0)
    busy = placement.Candidate(id="i2", number=2, state=placement.ACTIVE, capacity=10,
                               rooms_assigned=9, connections=0, seen_at=100.0)
    assert placement.choose([pending, busy], now=101.0, down_after=10) == busy
    assert placement.choose([pending], now=101.0, down_after=10) is None
    assert placement.effective_state(placement.PENDING, 100.0, now=105.0, down_after=10) == "pending"
    assert placement.effective_state(placement.PENDING, 100.0, now=111.0, down_after=10) == "down"


def test_only_the_registered_process_answering_counts() -> None:
    assert probe_url("wss://chat.example.com/", "i3") == "https://chat.example.com/i3/room/~probe"
    assert probe_url("http://127.0.0.1:81", "i3") == "http://127.0.0.1:81/i3/room/~probe"
    assert route_url("wss://chat.example.com/", "i3") == "wss://chat.example.com/i3/room/"
    ok = {"instance": "i3", "boot_id": "b"}
    assert verdict(200, ok, instance="i3", boot_id="b") is None
    assert "404" in (verdict(404, None, instance="i3", boot_id="b") or "")
    assert "another process" in (verdict(200, {**ok, "instance": "i4"}, instance="i3", boot_id="b") or "")
    assert "earlier process" in (verdict(200, ok, instance="i3", boot_id="new") or "")
    assert verdict(200, "<html>", instance="i3", boot_id="b") is not None


def test_a_route_is_gone_only_when_the_load_balancer_says_so() -> None:
    """`roomshard admin retire` waits for this: 404, another instance, or another process of
    it; never a 502, no answer, or the process itself (any of it when its boot id is not
    known, as when the first probe reached nothing)."""
    me = {"instance": "i3", "boot_id": "b"}
    assert route_gone(404, None, instance="i3", boot_id="b")
    assert route_gone(200, {**me, "instance": "i4"}, instance="i3", boot_id=None)
    assert route_gone(200, {**me, "boot_id": "new"}, instance="i3", boot_id="b")
    for status, body in ((200, me), (502, None), (None, None), (200, "<html>")):
        assert not route_gone(status, body, instance="i3", boot_id="b")
    assert not route_gone(200, {**me, "boot_id": "other"}, instance="i3", boot_id=None)


def _states(client: httpx.Client, url: str) -> dict[str, tuple[str, str | None]]:
    listed = client.get(f"{url}/v1/admin/instances", headers=ADMIN).json()["instances"]
    return {i["id"]: (i["state"], i["state_reason"]) for i in listed}


@pytest.mark.e2e
def test_a_shard_is_given_rooms_only_once_its_route_answers(procs: Procs) -> None:
    """i1's public address reaches i1: pending, then active by itself, then rooms. i2's
    public address reaches i1 (a wrong rule): i2 stays pending, gets no room, and the
    directory says why; an admin may still make it active. A restart of i1 (a new process)
    is pending again until its own route answers."""
    d = procs.directory(env={"ROOMSHARD_ROUTE_CHECK": "1"})
    p1 = free_port()
    s1 = procs.shard("i1", d.url, extra=["--port", str(p1), "--public-base", f"ws://127.0.0.1:{p1}"])
    procs.shard("i2", d.url, extra=["--public-base", f"ws://127.0.0.1:{p1}"])
    with httpx.Client(timeout=t(10)) as client:
        wait_until(lambda: _states(client, d.url).get("i1") == ("active", None), 20,
                   "i1 to become active")
        wait_until(lambda: "i2 stays pending: another process answered (instance 'i1')" in d.output(),
                   20, "the directory to say why i2 stays pending")
        assert _states(client, d.url)["i2"] == ("pending", "route_check")
        for n in range(6):
            r = client.post(f"{d.url}/v1/rooms/routed-{n}/connect", json={"user": "u"})
            assert r.status_code == 200 and r.json()["instance"] == "i1", r.text
        assert "i1 is active: its route answers through the load balancer" in d.output()
        metrics = client.get(f"{d.url}/metrics").text
        assert 'roomshard_directory_route_checks_total{result="active"} 1.0' in metrics

        # A new process of i1 proves its route again (same port: the same public address).
        boot = client.get(f"{s1.url}/healthz").json()["boot_id"]
        procs.kill(s1)
        s1 = procs.restart(s1, same_port=True)
        wait_until(lambda: client.get(f"{s1.url}/healthz").json()["boot_id"] != boot, 10, "the new i1")
        wait_until(lambda: _states(client, d.url).get("i1") == ("active", None), 20,
                   "the new i1 to become active again")
        assert d.output().count("i1 is active") == 2

        r = client.put(f"{d.url}/v1/admin/instances/i2", headers=ADMIN, json={"state": "active"})
        assert r.status_code == 200 and r.json()["state"] == "active", r.text
        # The least loaded active instance gets the next new room: i2 (i1 has six).
        r = client.post(f"{d.url}/v1/rooms/after-admin/connect", json={"user": "u"})
        assert r.status_code == 200 and r.json()["instance"] == "i2", r.text
