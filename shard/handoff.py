"""A shard's side of live room handoff: per-room phase, idempotent by move id.

Theory of operation
-------------------
A room on a shard is in one of four phases. Rooms this table does not know
are SERVING (or simply not loaded); the table holds only the exceptions::

    SERVING --freeze(m, E+1)--> FROZEN(m) --release(m)--> tombstone (room gone)
       ^                          |
       +-------abort(m)-----------+          (source side)

    (absent) --adopt(m, E+1, snapshot)--> ADOPTED(m) --ticket at E+1 / commit(m)--> SERVING
                                              |
                                              +--discard(m)--> (absent)   (target side)

- FROZEN: the room takes no sends and refuses joins with 1013. The shard
  stops reading its members' sockets (``LiveRoom.freeze``), so their sends
  wait unread in TCP buffers, neither acked nor broadcast. ``abort`` thaws
  the room and they are sequenced normally; ``release`` drops the room --
  its members are closed with 4010 and resend the unacked ids to the new
  owner, where the idempotency window (which travelled in the snapshot)
  makes that safe.
- ADOPTED: the room exists here at ``E+1`` but is not served: the directory
  has not committed yet. A ticket that names this instance at exactly
  ``E+1`` proves the commit (the directory issues those only after it), so
  the first such join activates the room from the snapshot without asking
  the directory (asking ``open`` would call the state lost).
- A rollback burns ``E+1`` (see directory/domain/moves.py): a ticket for this
  source at ``>= E+1`` proves the rollback, so a source whose ``abort`` never
  arrived unfreezes on the next join at exactly ``E+1``, and a target whose
  ``discard`` never arrived never activates the leftover adoption (no such
  ticket names it). A ticket *above* the reserved epoch means the room was
  placed here again after a loss: a frozen copy is then stale and dropped.
- Tombstone: after ``release`` the shard remembers ``room -> (to, E+1)`` for
  ``tombstone_ttl`` seconds and refuses tickets below ``E+1`` with 4004
  without a round trip. After expiry or a restart the directory's ``open``
  check (owner and owner_epoch) is the authority.

Every operation is idempotent for its move id and raises
:class:`HandoffError` (who broke the rules, an error code and an HTTP
status) for requests that contradict what this shard knows.

Interface needed from the room (``shard/room.py``): ``Room.snapshot() ->
dict`` with at least ``room``, ``epoch``, ``seq``, ``history``,
``idempotency`` and ``members``, and ``Room.from_snapshot(snap, instance=,
epoch=, owner_epoch=)``. This module only stores and returns the dict.
Pure: ``now`` is passed in (seconds), nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from roomshard.wire.protocol import CloseCode

DEFAULT_TOMBSTONE_TTL_S = 3600.0  # > ticket TTL: no ticket from before a move outlives it


class Phase(str, Enum):
    SERVING = "serving"
    FROZEN = "frozen"
    ADOPTED = "adopted"
    RELEASED = "released"


class HandoffError(Exception):
    """A handoff request this shard must refuse: ``who`` broke the rules."""

    def __init__(self, who: str, code: str, message: str, status: int = 409) -> None:
        super().__init__(f"{who}: {message}")
        self.who = who
        self.code = code
        self.status = status
        self.message = message


@dataclass(slots=True)
class Frozen:
    move_id: str
    epoch: int  # the epoch the move reserved
    snapshot: dict[str, Any] | None  # None: the room was not in memory
    since: float


@dataclass(frozen=True, slots=True)
class Adopted:
    move_id: str
    epoch: int
    snapshot: dict[str, Any]
    since: float


@dataclass(frozen=True, slots=True)
class Tombstone:
    move_id: str
    to: str
    epoch: int  # tickets below this are stale here
    expires: float


@dataclass(frozen=True, slots=True)
class Admission:
    """What to do with a join that carries a valid ticket for this instance.

    ``kind``: ``proceed`` (the normal path: serve if loaded, else ask the
    directory to open), ``activate`` (build the room from ``snapshot`` at
    ``epoch`` and serve it), ``unfrozen`` (the rollback is proven: set the
    room's epoch to ``epoch`` and thaw it: the sends waiting unread are
    sequenced, then serve), ``stale`` (drop the in-memory room, close its
    connections with ``close_code`` 4010 -- they resend their unacked sends
    -- then take the normal path) or ``refuse`` (close with ``close_code``).
    """

    kind: str
    close_code: int | None = None
    snapshot: dict[str, Any] | None = None
    epoch: int | None = None


PROCEED = Admission("proceed")


@dataclass(slots=True)
class Handoffs:
    """All handoff state of one shard; one instance per shard process."""

    instance: str
    tombstone_ttl: float = DEFAULT_TOMBSTONE_TTL_S
    frozen: dict[str, Frozen] = field(default_factory=dict)
    adopted: dict[str, Adopted] = field(default_factory=dict)
    tombstones: dict[str, Tombstone] = field(default_factory=dict)

    # -- queries ---------------------------------------------------------
    def phase(self, room: str, now: float) -> Phase:
        if room in self.frozen:
            return Phase.FROZEN
        if room in self.adopted:
            return Phase.ADOPTED
        if self.tombstone(room, now) is not None:
            return Phase.RELEASED
        return Phase.SERVING

    def tombstone(self, room: str, now: float) -> Tombstone | None:
        stone = self.tombstones.get(room)
        if stone is not None and stone.expires <= now:
            del self.tombstones[room]
            return None
        return stone

    def expire(self, now: float) -> int:
        """Forget expired tombstones; returns how many went (call it periodically)."""
        gone = [r for r, s in self.tombstones.items() if s.expires <= now]
        for r in gone:
            del self.tombstones[r]
        return len(gone)

    def admit(self, room: str, ticket_epoch: int, now: float) -> Admission:
        """Decide a join whose ticket is otherwise valid (signature, room, instance, once)."""
        f = self.frozen.get(room)
        if f is not None:
            if ticket_epoch == f.epoch:  # a ticket for us at the reserved epoch: rolled back
                del self.frozen[room]
                return Admission("unfrozen", epoch=ticket_epoch)
            if ticket_epoch > f.epoch:
                # The room was placed here again since (after a loss elsewhere): this
                # frozen copy is older than what others may have sequenced. Drop it.
                del self.frozen[room]
                return Admission("stale", close_code=int(CloseCode.ROOM_MOVED))
            return Admission("refuse", close_code=int(CloseCode.TRY_AGAIN_LATER))
        a = self.adopted.get(room)
        if a is not None:
            if ticket_epoch == a.epoch:  # the directory committed the move to us
                del self.adopted[room]
                return Admission("activate", snapshot=a.snapshot, epoch=a.epoch)
            if ticket_epoch > a.epoch:  # a leftover of a move that never committed
                del self.adopted[room]
                return PROCEED
            return Admission("refuse", close_code=int(CloseCode.NOT_OWNER))
        stone = self.tombstone(room, now)
        if stone is not None:
            if ticket_epoch < stone.epoch:
                return Admission("refuse", close_code=int(CloseCode.NOT_OWNER))
            del self.tombstones[room]  # the room came back here later
        return PROCEED

    # -- source side -----------------------------------------------------
    def freeze(self, room: str, move_id: str, epoch: int, snapshot: dict[str, Any] | None,
               now: float) -> dict[str, Any] | None:
        """Stop the room's sends and return the snapshot to hand over.

        ``snapshot`` is ``room.snapshot()`` (None when the room is not in
        memory); on a repeat for the same move the stored one is returned,
        since nothing changed while frozen. A freeze at a higher epoch
        supersedes a leftover one (that move was settled before the directory
        reserved a newer epoch). Raises HandoffError when another move at an
        equal or higher epoch holds the room, when the room is already at
        ``epoch`` or later (a delayed freeze of a settled move), when it is
        only adopted here, or when it already left at this epoch or later.
        """
        f = self.frozen.get(room)
        if f is not None and f.move_id == move_id:
            return f.snapshot
        if f is None and snapshot is not None and snapshot.get("epoch", -1) >= epoch:
            # A delayed freeze of a move already settled (its epoch was burnt or
            # used): a live move always reserves above the room's epoch.
            raise HandoffError("directory", "stale_epoch",
                               f"room {room} is at epoch {snapshot['epoch']}, not below {epoch}")
        if f is not None and f.epoch >= epoch:
            raise HandoffError("directory", "moving",
                               f"room {room} is frozen by move {f.move_id} at epoch {f.epoch}")
        if room in self.adopted:
            raise HandoffError("directory", "not_owner",
                               f"room {room} is adopted here but not committed")
        stone = self.tombstone(room, now)
        if stone is not None:
            if stone.move_id == move_id or stone.epoch >= epoch:
                raise HandoffError("directory", "moved",
                                   f"room {room} left for {stone.to} at epoch {stone.epoch}")
            del self.tombstones[room]
        self.frozen[room] = Frozen(move_id, epoch, snapshot, now)
        return snapshot

    def abort(self, room: str, move_id: str, epoch: int) -> Admission:
        """Unfreeze after a rollback; the room serves on at ``epoch`` (the burnt one).

        Returns ``unfrozen`` (thaw the room), or
        ``proceed`` when there is nothing to undo (already aborted, never
        frozen, or frozen by a newer move). Raises HandoffError when this move
        was already released here: the directory committed it.
        """
        f = self.frozen.get(room)
        if f is not None and f.move_id == move_id:
            del self.frozen[room]
            return Admission("unfrozen", epoch=epoch)
        stone = self.tombstones.get(room)
        if stone is not None and stone.move_id == move_id:
            raise HandoffError("directory", "already_released",
                               f"move {move_id} of room {room} was released: it committed")
        return PROCEED

    def release(self, room: str, move_id: str, to: str, epoch: int, now: float, *,
                loaded_epoch: int | None = None) -> bool:
        """The move committed: drop the room here and leave a tombstone.

        True: released -- the wiring closes the room's clients with 4010 (they
        resend their unacked sends to the new owner) and drops it if loaded.
        False for a stale release (a later move already touched the room
        here): do nothing. A repeat, or a
        restarted shard that never had the room, just gets the tombstone.
        ``loaded_epoch`` is the epoch of the room this shard has in memory, if
        any: a room served here at the move's epoch or later (placed here
        again after a loss) is not the one this move took away, so the
        release is stale. Raises HandoffError when the room is adopted here by this move (this
        shard is the target, not the source).
        """
        a = self.adopted.get(room)
        if a is not None and a.move_id == move_id:
            raise HandoffError("directory", "wrong_instance",
                               f"move {move_id} releases room {room} on its own target")
        stone = self.tombstone(room, now)
        if stone is not None and stone.epoch > epoch:
            return False
        f = self.frozen.get(room)
        if f is not None and f.move_id != move_id and f.epoch > epoch:
            return False
        if f is None and loaded_epoch is not None and loaded_epoch >= epoch:
            return False
        self.frozen.pop(room, None)
        self.tombstones[room] = Tombstone(move_id, to, epoch, now + self.tombstone_ttl)
        return True

    # -- target side -----------------------------------------------------
    def adopt(self, room: str, move_id: str, epoch: int, snapshot: dict[str, Any],
              *, loaded: bool, now: float) -> None:
        """Keep the snapshot of a room arriving at ``epoch``, not served until the commit.

        ``loaded`` says whether this shard serves the room in memory right
        now. Raises HandoffError when it does, when the room is frozen here,
        when a tombstone or another adoption is at this epoch or later, or
        when the snapshot is not a room snapshot.
        """
        a = self.adopted.get(room)
        if a is not None and a.move_id == move_id:
            return
        if not isinstance(snapshot, dict) or snapshot.get("room") != room:
            raise HandoffError("directory", "bad_snapshot", f"snapshot is not of room {room}", 400)
        if loaded or room in self.frozen:
            raise HandoffError("directory", "room_loaded", f"room {room} is live on this shard")
        if a is not None and a.epoch >= epoch:
            raise HandoffError("directory", "moving",
                               f"room {room} is adopted by move {a.move_id} at epoch {a.epoch}")
        stone = self.tombstone(room, now)
        if stone is not None:
            if stone.epoch >= epoch:
                raise HandoffError("directory", "stale_epoch",
                                   f"room {room} left this shard at epoch {stone.epoch}")
            del self.tombstones[room]
        self.adopted[room] = Adopted(move_id, epoch, snapshot, now)

    def commit(self, room: str, move_id: str) -> Adopted | None:
        """Activate an adoption eagerly (optional: the first ticket at its epoch does too).

        Returns the adoption to build the room from, or None on a repeat.
        """
        a = self.adopted.get(room)
        if a is None or a.move_id != move_id:
            return None
        return self.adopted.pop(room)

    def discard(self, room: str, move_id: str) -> bool:
        """Drop an uncommitted adoption; False when there is none for this move."""
        a = self.adopted.get(room)
        if a is None or a.move_id != move_id:
            return False
        del self.adopted[room]
        return True

