"""The live-move coordinator: every transition of a room handoff, as data.

Theory of operation
-------------------
The directory is the authority on who owns a room; a move is fenced by the
epoch it reserves. One :class:`Move` record walks this table (h11 style: the
table below is the only place a state changes)::

    RESERVED --freeze_ok--> FROZEN --adopt_ok--> ADOPTED --commit_ok--> COMMITTED --release_ok--> RELEASED
       |                      |                    |                       (release retried
       +------ failure after retries, timeout, directory restart ------+    until it lands)
                                                                       v
    ABORTED <--discard+abort settled-- ROLLED_BACK <--rollback_ok-- ABORTING

- RESERVED: the room row says ``moving`` and the move row holds the move
  id, source, target and the reserved epoch ``E+1`` (one transaction, made by
  the driver before :func:`begin`). Entry action: ``call_freeze``.
- FROZEN: the source stopped taking sends and handed over its snapshot.
  Entry action: ``call_adopt`` (the target builds the room at ``E+1`` but
  does not serve it yet).
- ADOPTED: entry action ``commit_db`` -- the point of no return: one
  conditional update (``WHERE state = 'moving' AND epoch = E AND move_to =
  target``) makes the target the owner at ``E+1`` (epoch = owner_epoch =
  opened_epoch) and records COMMITTED on the move row in the same
  transaction; when it matches nothing, the move row's decided state says
  whether this move committed (``commit_ok``) or was rolled back
  (``commit_lost``). docs/HANDOFF.md has the SQL.
- COMMITTED: entry action ``call_release`` (source closes clients with 4010,
  drops the room, keeps a tombstone). Retried with backoff until it lands or
  the source is known gone (a restarted shard holds no room state).
- ABORTING: the decision to roll back. Entry action ``mark_rolled_back``: the
  same kind of conditional update, which gives the room back to the source
  and *burns* the reserved epoch (epoch = opened_epoch = ``E+1``, owner and
  owner_epoch unchanged). Commit and rollback race on one row, so exactly one
  of them wins, whatever replicas or restarts are involved.
- ROLLED_BACK: entry actions ``call_discard`` (target) and ``call_abort``
  (source unfreezes and serves on at ``E+1``), each retried a few times;
  correctness needs neither (see shard/handoff.py: an adoption activates
  only with a ticket for its exact epoch, which is never issued once burnt,
  and a frozen source unfreezes itself on a ticket at the burnt epoch).

Every call carries a token; a reply with an older token (a late answer to a
retried call) is ignored, a reply nobody asked for raises
:class:`MoveRuleError` naming who broke the rules. Failures are retried
``retries`` times with exponential backoff (the action says how long to wait)
before the step gives up. The driver persists the returned record after every
transition (RESERVED, COMMITTED and ROLLED_BACK atomically with the room
row; every other write conditional on the move not being decided yet), then
performs the actions; :func:`recover` turns a persisted record
into the actions that finish it after a directory restart: anything before
the commit rolls back, anything after it rolls forward.

Pure: plain data in and out, ``now`` passed in (seconds), no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class State(str, Enum):
    RESERVED = "reserved"
    FROZEN = "frozen"
    ADOPTED = "adopted"
    COMMITTED = "committed"
    RELEASED = "released"
    ABORTING = "aborting"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


PRE_COMMIT = frozenset({State.RESERVED, State.FROZEN, State.ADOPTED})
TERMINAL = frozenset({State.RELEASED, State.ABORTED})
#: States whose entry is the database write itself (atomic with the room row).
DB_DECIDED = frozenset({State.COMMITTED, State.ROLLED_BACK})

# Which call each reply answers, and which side sends that reply (for errors).
CALLS = {"freeze": "source", "adopt": "target", "commit": "database", "release": "source",
         "rollback": "database", "discard": "target", "abort": "source"}
DEFAULT_RETRIES = 2  # each call is retried twice before its step gives up
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0
#: The driver sends ``timeout`` this long after begin() unless committed: it bounds
#: how long a room stays frozen (clients' sends wait unacked meanwhile).
DEFAULT_MOVE_TIMEOUT_S = 10.0
#: Moves of one drain (or rebalance) in flight at once, unless the drain's body says otherwise.
DRAIN_PARALLELISM = 32


class MoveRuleError(Exception):
    """An event the table does not allow; ``who`` broke the rules, ``status`` is the HTTP hint."""

    def __init__(self, who: str, message: str, status: int = 409) -> None:
        super().__init__(f"{who} broke the move protocol: {message}")
        self.who = who
        self.status = status


@dataclass(frozen=True, slots=True)
class Action:
    """Something the driver must do. ``call`` names it; ``token`` goes back in the reply."""

    call: str  # call_freeze | call_adopt | commit_db | call_release | mark_rolled_back
    #            | call_discard | call_abort | finished
    instance: str | None = None  # the shard to call, None for the database
    token: int = 0
    delay_s: float = 0.0  # wait this long first (backoff of a retry)
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """A reply or a local happening: ``<call>_ok`` / ``<call>_failed`` / ``timeout`` / ..."""

    kind: str
    token: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Move:
    """The persisted record of one move (plain data; ``snapshot`` is never persisted)."""

    move_id: str
    room: str
    source: str
    target: str
    from_epoch: int
    epoch: int  # the reserved epoch, from_epoch + 1
    state: State = State.RESERVED
    started_at: float = 0.0
    committed_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # failures of the current step
    next_token: int = 1
    outstanding: tuple[tuple[str, int], ...] = ()  # (call, token) awaiting a reply
    # Rollback calls still to land, with their failures so far: ("discard", 0), ("abort", 1).
    cleanup: tuple[tuple[str, int], ...] = ()
    members: int = 0
    messages_transferred: int = 0
    carries_state: bool = True  # False: the source had no room in memory
    reason: str | None = None  # why it rolled back
    snapshot: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able row to persist (the snapshot stays in memory)."""
        # Field by field: asdict() would deep-copy the snapshot (a whole history) first.
        d = {f: getattr(self, f) for f in _RECORD_FIELDS}
        d["state"] = self.state.value
        d["outstanding"] = [list(p) for p in self.outstanding]
        d["cleanup"] = [list(p) for p in self.cleanup]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Move:
        """Raises ValueError on an unknown state, KeyError/TypeError on a malformed row."""
        d = dict(d)
        d["state"] = State(d["state"])
        d["outstanding"] = tuple((str(c), int(t)) for c, t in d.get("outstanding", ()))
        d["cleanup"] = tuple((str(c), int(n)) for c, n in d.get("cleanup", ()))
        return cls(**d)

    @property
    def owner(self) -> str:
        """Who the directory says owns the room in this state (the one it routes to)."""
        return self.target if self.state in (State.COMMITTED, State.RELEASED) else self.source


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Move) if f.name != "snapshot")


def begin(*, move_id: str, room: str, source: str, target: str, from_epoch: int,
          now: float) -> tuple[Move, list[Action]]:
    """A freshly reserved move (the driver has written RESERVED) and its first call.

    Raises MoveRuleError when source and target are the same instance.
    """
    if source == target:
        raise MoveRuleError("operator", f"room {room} is already on {target}")
    move = Move(move_id=move_id, room=room, source=source, target=target,
                from_epoch=from_epoch, epoch=from_epoch + 1, started_at=now)
    return _enter(move, State.RESERVED, now)


def _backoff(attempt: int) -> float:
    return 0.0 if attempt <= 0 else min(BACKOFF_BASE_S * 2 ** (attempt - 1), BACKOFF_CAP_S)


def _calls_for(move: Move) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    """The entry calls of the move's state: (call kind, action name, instance, payload)."""
    base = {"room": move.room, "move_id": move.move_id, "epoch": move.epoch}
    s = move.state
    if s is State.RESERVED:
        return [("freeze", "call_freeze", move.source, base)]
    if s is State.FROZEN:
        return [("adopt", "call_adopt", move.target, {**base, "snapshot": move.snapshot})]
    if s is State.ADOPTED:
        return [("commit", "commit_db", None, {**base, "to": move.target, "from": move.source,
                                               "carries_state": move.carries_state})]
    if s is State.COMMITTED:
        return [("release", "call_release", move.source, {**base, "to": move.target})]
    if s is State.ABORTING:
        return [("rollback", "mark_rolled_back", None, {**base, "to": move.source})]
    if s is State.ROLLED_BACK:
        out: list[tuple[str, str, str | None, dict[str, Any]]] = []
        left = dict(move.cleanup)
        if "discard" in left:
            out.append(("discard", "call_discard", move.target, base))
        if "abort" in left:
            out.append(("abort", "call_abort", move.source, base))
        return out
    return []


def _issue(move: Move, kinds: set[str] | None, delay: float) -> tuple[Move, list[Action]]:
    actions, outstanding, token = [], dict(move.outstanding), move.next_token
    for kind, name, instance, payload in _calls_for(move):
        if kinds is not None and kind not in kinds:
            continue
        outstanding[kind] = token
        actions.append(Action(name, instance, token, delay, payload))
        token += 1
    return dataclasses.replace(move, next_token=token, outstanding=tuple(outstanding.items())), actions


def _enter(move: Move, state: State, now: float, **changes: Any) -> tuple[Move, list[Action]]:
    if state is State.ROLLED_BACK and "cleanup" not in changes:
        changes["cleanup"] = (("discard", 0), ("abort", 0))
    if state not in PRE_COMMIT:
        changes["snapshot"] = None  # only the adopt call needs it
    move = dataclasses.replace(move, state=state, attempts=0, outstanding=(), **changes)
    if state is State.COMMITTED and move.committed_at is None:
        move = dataclasses.replace(move, committed_at=now)
    if state is State.ROLLED_BACK and not move.cleanup:
        return _enter(move, State.ABORTED, now)
    if state in TERMINAL:
        move = dataclasses.replace(move, finished_at=now, snapshot=None)
        return move, [Action("finished", payload={"state": state.value, "reason": move.reason})]
    return _issue(move, None, 0.0)


# (state, event) -> next state. ``<call>_failed`` rows are retried in place
# ``retries`` times first; the row says where the step goes once it gives up
# (None: retry forever, the step has no safe way out).
TABLE: dict[tuple[State, str], State | None] = {
    (State.RESERVED, "freeze_ok"): State.FROZEN,
    (State.RESERVED, "freeze_failed"): State.ABORTING,
    (State.FROZEN, "adopt_ok"): State.ADOPTED,
    (State.FROZEN, "adopt_failed"): State.ABORTING,
    (State.ADOPTED, "commit_ok"): State.COMMITTED,
    (State.ADOPTED, "commit_failed"): State.ABORTING,
    (State.ADOPTED, "commit_lost"): State.ROLLED_BACK,  # someone else rolled it back
    (State.COMMITTED, "release_ok"): State.RELEASED,
    (State.COMMITTED, "release_failed"): None,
    (State.COMMITTED, "source_gone"): State.RELEASED,
    (State.ABORTING, "rollback_ok"): State.ROLLED_BACK,
    (State.ABORTING, "rollback_failed"): None,
    (State.ABORTING, "rollback_lost"): State.COMMITTED,  # the commit won the row
    (State.ROLLED_BACK, "discard_ok"): State.ROLLED_BACK,
    (State.ROLLED_BACK, "discard_failed"): State.ROLLED_BACK,
    (State.ROLLED_BACK, "abort_ok"): State.ROLLED_BACK,
    (State.ROLLED_BACK, "abort_failed"): State.ROLLED_BACK,
}
# Local events, not in the table: ``timeout`` (the move's deadline passed) rolls
# back only before the commit; ``source_gone`` (the source is down or restarted)
# ends a COMMITTED move and is ignored elsewhere.
TIMEOUT_ROLLS_BACK = PRE_COMMIT


def handle(move: Move, event: Event, now: float, *,
           retries: int = DEFAULT_RETRIES) -> tuple[Move, list[Action]]:
    """Apply one event; returns the new record and the actions to perform, in order.

    Raises MoveRuleError for an event the table does not allow in this state,
    naming the side that sent it.
    """
    kind = event.kind
    if kind == "timeout":
        if move.state in TIMEOUT_ROLLS_BACK:
            return _enter(move, State.ABORTING, now, reason="timeout")
        return move, []  # past the commit a move only rolls forward
    if kind == "source_gone" and move.state is not State.COMMITTED:
        return move, []  # before the commit the rollback copes with a dead source itself
    call, _, outcome = kind.rpartition("_")
    if kind != "source_gone":
        if call not in CALLS or outcome not in ("ok", "failed", "lost"):
            raise MoveRuleError("local driver", f"unknown event {kind!r}", 500)
        pending = dict(move.outstanding)
        if pending.get(call) != event.token:
            if event.token is not None and event.token < move.next_token:
                return move, []  # a late reply to a call we already gave up on or re-sent
            raise MoveRuleError(CALLS[call], f"{kind} (token {event.token}) answers no call "
                                f"of move {move.move_id} in state {move.state.value}")
    if (move.state, kind) not in TABLE:
        raise MoveRuleError(CALLS.get(call, "local driver"),
                            f"{kind} is not allowed in state {move.state.value}")
    nxt = TABLE[(move.state, kind)]
    if outcome == "failed":
        return _failed(move, call, nxt, event, now, retries)
    if move.state is State.ROLLED_BACK:  # one of the two cleanup calls landed
        return _cleanup_done(move, call, now)
    assert nxt is not None
    if kind == "freeze_ok":
        snap = event.payload.get("snapshot")
        changes: dict[str, Any] = {"snapshot": snap, "carries_state": snap is not None}
        if snap is not None:
            changes["members"] = len(snap.get("members", ()))
            changes["messages_transferred"] = len(snap.get("history", ()))
        if snap is None:  # nothing in memory to hand over: straight to the commit
            return _enter(move, State.ADOPTED, now, **changes)
        return _enter(move, nxt, now, **changes)
    if kind == "commit_lost":
        return _enter(move, nxt, now, reason="rolled back elsewhere")
    return _enter(move, nxt, now)


def _failed(move: Move, call: str, give_up: State | None, event: Event, now: float,
            retries: int) -> tuple[Move, list[Action]]:
    if move.state is State.ROLLED_BACK:
        # Cleanup calls retry independently; giving up on one leaves a harmless leftover
        # (an adoption that can never activate, a freeze lifted by the next ticket).
        tries = dict(move.cleanup)[call] + 1
        if tries > retries:
            return _cleanup_done(move, call, now, reason=f"{move.reason}; {call} left undone")
        cleanup = tuple((c, tries if c == call else n) for c, n in move.cleanup)
        pending = tuple((k, v) for k, v in move.outstanding if k != call)
        move = dataclasses.replace(move, cleanup=cleanup, outstanding=pending)
        return _issue(move, {call}, _backoff(tries))
    attempts = move.attempts + 1
    if give_up is not None and attempts > retries:
        why = event.payload.get("error") or f"{call} failed"
        return _enter(move, give_up, now, reason=str(why))
    move = dataclasses.replace(move, attempts=attempts, outstanding=())
    return _issue(move, None, _backoff(attempts))


def _cleanup_done(move: Move, call: str, now: float,
                  reason: str | None = None) -> tuple[Move, list[Action]]:
    cleanup = tuple((c, n) for c, n in move.cleanup if c != call)
    pending = tuple((k, v) for k, v in move.outstanding if k != call)
    move = dataclasses.replace(move, cleanup=cleanup, outstanding=pending,
                               reason=reason or move.reason)
    if not cleanup:
        return _enter(move, State.ABORTED, now)
    return move, []


def recover(persisted: dict[str, Any] | Move, now: float) -> tuple[Move, list[Action]]:
    """After a directory restart: the record to drive and the actions that finish the move.

    Before the commit the move rolls back (the snapshot lived in the dead
    process's memory); from COMMITTED on it rolls forward. Terminal records
    need nothing. Raises ValueError on a record with an unknown state.
    """
    move = persisted if isinstance(persisted, Move) else Move.from_dict(persisted)
    move = dataclasses.replace(move, snapshot=None)
    if move.state in TERMINAL:
        return move, []
    if move.state in PRE_COMMIT:
        return _enter(move, State.ABORTING, now, reason="directory restarted mid-move")
    if move.state is State.ROLLED_BACK:
        return _enter(move, move.state, now, cleanup=move.cleanup)
    return _enter(move, move.state, now)


def report(move: Move) -> dict[str, Any]:
    """The contract's move report; ``pause_ms`` is freeze request to commit."""
    pause = None if move.committed_at is None else max(0.0, move.committed_at - move.started_at)
    return {
        "room": move.room,
        "from": move.source,
        "to": move.target,
        "epoch": move.epoch,  # the room's epoch after the move (burnt by a rollback too)
        "members": move.members,
        "messages_transferred": move.messages_transferred,
        "pause_ms": None if pause is None else round(pause * 1000, 3),
    }


@dataclass(slots=True)
class DrainProgress:
    """Accounting of one drain: which moves to start next, with bounded parallelism.

    ``plan`` is the ordered ``(room, to)`` list from ``rebalance.plan_drain``.
    A move that rolled back is retried: to another target (``retarget``) as
    long as the drain finds one, to the same target up to ``max_attempts``
    times; the instance becomes ``disabled`` only
    when :attr:`complete` and nothing failed, otherwise it stays ``draining``
    and the report lists what is left (an operator can drain again).
    """

    instance: str
    plan: list[tuple[str, str]]
    parallelism: int = DRAIN_PARALLELISM
    max_attempts: int = 2
    pending: list[tuple[str, str]] = field(init=False)
    in_flight: dict[str, str] = field(init=False, default_factory=dict)
    attempts: dict[str, int] = field(init=False, default_factory=dict)
    moved: list[dict[str, Any]] = field(init=False, default_factory=list)
    failed: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.parallelism < 1:
            raise ValueError("drain parallelism must be at least 1")
        self.pending = list(reversed(self.plan))  # pop() from the end = plan order

    def next_moves(self) -> list[tuple[str, str]]:
        """Moves to start now (never more than ``parallelism`` in flight)."""
        started = []
        while self.pending and len(self.in_flight) < self.parallelism:
            room, to = self.pending.pop()
            self.in_flight[room] = to
            self.attempts[room] = self.attempts.get(room, 0) + 1
            started.append((room, to))
        return started

    def succeeded(self, room: str, move_report: dict[str, Any]) -> None:
        """Raises KeyError for a room that is not in flight."""
        del self.in_flight[room]
        self.failed.pop(room, None)
        self.moved.append(move_report)

    def rolled_back(self, room: str, reason: str, retarget: str | None = None) -> None:
        """A move of this drain rolled back; requeue it unless out of attempts."""
        to = self.in_flight.pop(room)
        if retarget is not None and retarget != to:
            self.pending.insert(0, (room, retarget))  # a new target: never out of attempts
        elif self.attempts[room] < self.max_attempts:
            self.pending.insert(0, (room, to))  # retried after the others
        else:
            self.failed[room] = reason

    @property
    def complete(self) -> bool:
        return not self.pending and not self.in_flight

    def report(self) -> dict[str, Any]:
        """The drain report: the move reports plus what is left or failed."""
        return {
            "instance": self.instance,
            "total": len(self.plan),
            "moved": len(self.moved),
            "in_flight": len(self.in_flight),
            "pending": len(self.pending),
            "failed": [{"room": r, "error": why} for r, why in sorted(self.failed.items())],
            "complete": self.complete and not self.failed,
            "moves": list(self.moved),
        }
