"""The shard's handoff table alone: phases, idempotency by move id, tombstones, admission."""

from __future__ import annotations

import pytest

from roomshard.wire.protocol import CloseCode
from shard.handoff import HandoffError, Handoffs, Phase
from shard.room import Room


def room_with_messages() -> Room:
    room = Room(name="r1", instance="i1", epoch=4, owner_epoch=4)
    room.join(1, "alice", 0.0)
    room.send("alice", "a1", "one", 1.0)
    room.send("alice", "a2", "two", 2.0)
    return room


def test_freeze_is_idempotent() -> None:
    """Freeze returns the snapshot; a repeat returns the same snapshot."""
    h = Handoffs("i1")
    room = room_with_messages()
    snap = h.freeze("r1", "m1", 5, room.snapshot(), now=10.0)
    assert snap is not None and snap["seq"] == 2
    assert h.phase("r1", 10.0) is Phase.FROZEN
    again = h.freeze("r1", "m1", 5, {"room": "r1", "changed": True}, now=11.0)
    assert again is snap
    assert h.phase("other-room", 10.0) is Phase.SERVING


def test_a_delayed_freeze_of_a_settled_move_is_refused() -> None:
    """After an abort at the burnt epoch, a late copy of that move's freeze cannot refreeze."""
    h = Handoffs("i1")
    room = room_with_messages()
    h.freeze("r1", "m1", 5, room.snapshot(), now=0.0)
    adm = h.abort("r1", "m1", 5)
    room.epoch = adm.epoch or room.epoch
    with pytest.raises(HandoffError) as err:
        h.freeze("r1", "m1", 5, room.snapshot(), now=1.0)
    assert err.value.code == "stale_epoch" and h.phase("r1", 1.0) is Phase.SERVING
    assert h.freeze("r1", "m2", 6, room.snapshot(), now=2.0) is not None


def test_freeze_by_another_move_is_refused_unless_newer() -> None:
    """A second move at the same epoch is refused; a newer epoch supersedes a leftover."""
    h = Handoffs("i1")
    h.freeze("r1", "m1", 5, None, now=0.0)
    with pytest.raises(HandoffError) as err:
        h.freeze("r1", "m2", 5, None, now=0.0)
    assert err.value.code == "moving" and err.value.who == "directory"
    h.freeze("r1", "m3", 6, None, now=0.0)
    assert h.frozen["r1"].move_id == "m3" and h.frozen["r1"].epoch == 6


def test_abort_unfreezes_at_the_burnt_epoch() -> None:
    """abort() gives the epoch to serve at (the room is thawed); repeats are no-ops."""
    h = Handoffs("i1")
    h.freeze("r1", "m1", 5, None, now=0.0)
    adm = h.abort("r1", "m1", 5)
    assert adm.kind == "unfrozen" and adm.epoch == 5
    assert h.phase("r1", 0.0) is Phase.SERVING
    assert h.abort("r1", "m1", 5).kind == "proceed"


def test_release_tombstones_and_stale_tickets_get_4004() -> None:
    """After release the room is gone; tickets below the move's epoch are refused until expiry."""
    h = Handoffs("i1", tombstone_ttl=100.0)
    h.freeze("r1", "m1", 5, None, now=0.0)
    assert h.release("r1", "m1", "i2", 5, now=1.0) is True
    assert h.release("r1", "m1", "i2", 5, now=2.0) is True  # a repeat: the same tombstone
    assert h.phase("r1", 2.0) is Phase.RELEASED
    adm = h.admit("r1", 4, now=50.0)
    assert adm.kind == "refuse" and adm.close_code == CloseCode.NOT_OWNER
    assert h.expire(200.0) == 1
    assert h.admit("r1", 4, now=200.0).kind == "proceed"  # the directory decides again


def test_abort_after_release_blames_the_directory() -> None:
    """Aborting a move this shard already released is a protocol error."""
    h = Handoffs("i1")
    h.freeze("r1", "m1", 5, None, now=0.0)
    h.release("r1", "m1", "i2", 5, now=0.0)
    with pytest.raises(HandoffError) as err:
        h.abort("r1", "m1", 5)
    assert err.value.code == "already_released"


def test_release_on_a_restarted_source_still_leaves_a_tombstone() -> None:
    """A shard that never had the room records the tombstone anyway."""
    h = Handoffs("i1")
    assert h.release("r1", "m1", "i2", 5, now=0.0) is True
    assert h.admit("r1", 4, now=1.0).close_code == CloseCode.NOT_OWNER


def test_adopt_then_activate_only_with_the_exact_epoch() -> None:
    """An adoption serves on a ticket at its epoch, drops on a newer one, refuses an older one."""
    snap = room_with_messages().snapshot()
    h = Handoffs("i2")
    h.adopt("r1", "m1", 5, snap, loaded=False, now=0.0)
    h.adopt("r1", "m1", 5, snap, loaded=False, now=1.0)  # idempotent
    assert h.phase("r1", 0.0) is Phase.ADOPTED
    assert h.admit("r1", 4, now=1.0).close_code == CloseCode.NOT_OWNER
    adm = h.admit("r1", 5, now=1.0)
    assert adm.kind == "activate" and adm.epoch == 5
    room = Room.from_snapshot(adm.snapshot or {}, instance="i2", epoch=5, owner_epoch=5)
    assert room.seq == 2 and room.send("alice", "a1", "retry", 3.0).broadcast is None
    h.adopt("r1", "m2", 7, snap, loaded=False, now=0.0)
    assert h.admit("r1", 8, now=1.0).kind == "proceed" and "r1" not in h.adopted


def test_adopt_refuses_a_live_room_a_bad_snapshot_and_an_older_epoch() -> None:
    """adopt() refuses what contradicts the shard's own knowledge."""
    snap = room_with_messages().snapshot()
    h = Handoffs("i2")
    with pytest.raises(HandoffError) as err:
        h.adopt("r1", "m1", 5, snap, loaded=True, now=0.0)
    assert err.value.code == "room_loaded"
    with pytest.raises(HandoffError) as err:
        h.adopt("r2", "m1", 5, snap, loaded=False, now=0.0)
    assert err.value.code == "bad_snapshot" and err.value.status == 400
    h.adopt("r1", "m1", 5, snap, loaded=False, now=0.0)
    with pytest.raises(HandoffError) as err:
        h.adopt("r1", "m0", 4, snap, loaded=False, now=0.0)
    assert err.value.code == "moving"


def test_discard_and_commit_are_idempotent_by_move_id() -> None:
    """discard/commit act only for their own move, once."""
    snap = room_with_messages().snapshot()
    h = Handoffs("i2")
    h.adopt("r1", "m1", 5, snap, loaded=False, now=0.0)
    assert h.discard("r1", "other") is False
    assert h.discard("r1", "m1") is True and h.discard("r1", "m1") is False
    h.adopt("r1", "m2", 6, snap, loaded=False, now=0.0)
    assert h.commit("r1", "m2") is not None and h.commit("r1", "m2") is None


def test_frozen_room_refuses_joins_until_a_ticket_proves_the_rollback() -> None:
    """A join at the old epoch gets 1013; a ticket at the reserved epoch unfreezes."""
    h = Handoffs("i1")
    h.freeze("r1", "m1", 5, None, now=0.0)
    assert h.admit("r1", 4, now=0.0).close_code == CloseCode.TRY_AGAIN_LATER
    adm = h.admit("r1", 5, now=0.0)
    assert adm.kind == "unfrozen" and adm.epoch == 5


def test_frozen_copy_is_dropped_when_a_newer_epoch_places_the_room_here() -> None:
    """A ticket above the reserved epoch means the frozen copy is stale: drop it, 4010."""
    h = Handoffs("i1")
    h.freeze("r1", "m1", 5, None, now=0.0)
    adm = h.admit("r1", 7, now=0.0)
    assert adm.kind == "stale" and adm.close_code == CloseCode.ROOM_MOVED
    assert h.phase("r1", 0.0) is Phase.SERVING


def test_room_coming_back_clears_its_tombstone() -> None:
    """A room that moved away and back is adopted again at a newer epoch."""
    snap = room_with_messages().snapshot()
    h = Handoffs("i1")
    h.freeze("r1", "m1", 5, snap, now=0.0)
    h.release("r1", "m1", "i2", 5, now=0.0)
    with pytest.raises(HandoffError):
        h.adopt("r1", "m2", 5, snap, loaded=False, now=1.0)
    h.adopt("r1", "m2", 6, snap, loaded=False, now=1.0)
    assert "r1" not in h.tombstones and h.phase("r1", 1.0) is Phase.ADOPTED
