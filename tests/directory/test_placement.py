"""Placement and registry rules as pure functions: no database, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from directory.domain import instances, placement
from directory.domain.errors import BadRequest, Conflict
from directory.domain.placement import Candidate
from directory.domain.schemas import InstancePut
from roomshard.wire.internal import HeartbeatBody

NOW = 1000.0


def cand(iid: str, *, state: str = "active", capacity: int = 100, rooms: int = 0,
         conns: int = 0, seen: float = NOW) -> Candidate:
    return Candidate(id=iid, number=int(iid[1:]), state=state, capacity=capacity,
                     rooms_assigned=rooms, connections=conns, seen_at=seen)


def choose(*cands: Candidate) -> str | None:
    c = placement.choose(cands, now=NOW, down_after=10)
    return c.id if c else None


def test_least_loaded_by_rooms_plus_connections_over_capacity() -> None:
    """The instance with the lowest (rooms + connections) / capacity wins."""
    assert choose(cand("i1", rooms=5, conns=10), cand("i2", rooms=1, conns=20)) == "i1"
    assert choose(cand("i1", rooms=10), cand("i2", rooms=15, capacity=200)) == "i2"


def test_tie_breaks_on_instance_number() -> None:
    """Equal load picks the lowest instance number, whatever the input order."""
    assert choose(cand("i10"), cand("i2"), cand("i3")) == "i2"


@pytest.mark.parametrize("bad", [cand("i1", state="draining"), cand("i1", state="disabled"),
                                 cand("i1", seen=NOW - 10.5)])
def test_never_places_on_draining_disabled_or_down(bad: Candidate) -> None:
    """Draining, disabled and down instances never get a new room."""
    assert choose(bad) is None
    assert choose(bad, cand("i2", rooms=1000)) == "i2"


def test_effective_state_down_rules() -> None:
    """down overrides active/draining after down_after; disabled stays disabled."""
    es = placement.effective_state
    assert es("active", NOW - 10, now=NOW, down_after=10) == "active"
    assert es("active", NOW - 10.01, now=NOW, down_after=10) == "down"
    assert es("draining", NOW - 11, now=NOW, down_after=10) == "down"
    assert es("disabled", NOW - 11, now=NOW, down_after=10) == "disabled"
    assert placement.serves_rooms("draining", NOW, now=NOW, down_after=10)
    assert not placement.serves_rooms("disabled", NOW, now=NOW, down_after=10)


def row(**kw: Any) -> dict[str, Any]:
    base = {"id": "i1", "internal_url": "http://a", "public_base": None, "capacity": 100, "state": "active",
                "state_reason": None, "boot_id": "b1", "registered_at": NOW - 100, "last_heartbeat": NOW - 1,
                "rooms_assigned": 3}
    base.update(kw)
    return base


def hb(**kw: Any) -> HeartbeatBody:
    return HeartbeatBody(**{"internal_url": "http://a", "boot_id": "b1", **kw})


def changes(r: dict[str, Any] | None, body: HeartbeatBody) -> dict[str, Any]:
    return instances.heartbeat_changes(r, body, instance="i1", now=NOW, down_after=10,
                                      default_capacity=1000)


def test_heartbeat_registers_unknown_instance_active() -> None:
    """An unknown instance is registered active with the default capacity."""
    c = changes(None, hb())
    assert (c["state"], c["capacity"], c["number"], c["last_heartbeat"]) == ("active", 1000, 1, NOW)


def test_heartbeat_state_rules() -> None:
    """New boot lifts a shutdown park; admin states and same-boot heartbeats leave state alone."""
    assert changes(row(state="disabled", state_reason="shutdown"), hb(boot_id="b2"))["state"] == "active"
    assert "state" not in changes(row(state="disabled", state_reason="shutdown"), hb())
    assert "state" not in changes(row(state="disabled", state_reason="admin"), hb(boot_id="b2"))


def test_heartbeat_url_takeover_rules() -> None:
    """Another URL may not take a live instance with rooms; it may once the old process is down or gone."""
    with pytest.raises(Conflict):
        changes(row(), hb(internal_url="http://b", boot_id="b2"))
    assert changes(row(last_heartbeat=NOW - 11), hb(internal_url="http://b", boot_id="b2"))[
        "internal_url"] == "http://b"
    assert changes(row(rooms_assigned=0), hb(internal_url="http://b", boot_id="b2"))[
        "internal_url"] == "http://b"
    assert changes(row(state_reason="shutdown"), hb(internal_url="http://b", boot_id="b2"))[
        "internal_url"] == "http://b"


def test_admin_put_rules() -> None:
    """Admins may not set down; creating needs internal_url; states carry the admin reason."""
    with pytest.raises(BadRequest):
        instances.admin_put_changes(row(), InstancePut(state="down"), instance="i1", now=NOW,
                                   default_capacity=10)
    with pytest.raises(BadRequest):
        instances.admin_put_changes(None, InstancePut(capacity=5), instance="i1", now=NOW,
                                   default_capacity=10)
    c = instances.admin_put_changes(row(), InstancePut(state="draining"), instance="i1", now=NOW,
                                   default_capacity=10)
    assert c == {"state": "draining", "state_reason": "admin"}
