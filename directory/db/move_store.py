"""The SQL of live moves: reserve, persist, commit, roll back, lease (docs/HANDOFF.md).

Every write that decides a move is one transaction over the room row and the
move row, conditional on what the coordinator expects, so a commit and a
rollback racing (two replicas, a restart, a late retry) settle exactly one
way. ``moves.state`` is the authority; ``moves.record`` is the
coordinator's ``Move.to_dict()`` for recovery. Only the replica holding the
lease (``lease_owner`` until ``lease_until``) writes a move's progress.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, case, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from directory.db.engine import moves, rooms
from directory.db.store import Store, bump_rooms_assigned
from directory.domain.errors import ApiError, Conflict, NotFound
from directory.domain.moves import Action, Move, State

UNDECIDED = ("reserved", "frozen", "adopted", "aborting")
FINISHED = ("released", "aborted")

# The statements are built once, bound per row: a batch of a drain's moves runs them
# back to back, and building a statement costs more than executing it.
_B = bindparam
_RESERVE_ROOM = (
    update(rooms)
    .where(rooms.c.room == _B("b_room"), rooms.c.instance == _B("b_source"),
           rooms.c.state == "active")
    .values(state="moving", move_to=_B("b_to"), updated_at=_B("b_now"))
    .returning(rooms.c.epoch))
_PERSIST = (
    update(moves)
    .where(moves.c.move_id == _B("b_id"), moves.c.state.in_(_B("b_expect", expanding=True)),
           moves.c.lease_owner == _B("b_owner"))
    .values(state=_B("b_state"), record=_B("b_record", type_=moves.c.record.type),
            lease_until=_B("b_until"), updated_at=_B("b_now")))
_ROOM_IS_MOVING = and_(rooms.c.room == _B("b_room"), rooms.c.state == "moving",
                       rooms.c.epoch == _B("b_from"), rooms.c.move_to == _B("b_target"))


def _commit_room(carries_state: bool) -> Any:
    # A move that carries the room's state opens the room at E+1 on the target.
    return (update(rooms).where(_ROOM_IS_MOVING)
            .values(instance=_B("b_target"), epoch=_B("b_e1"), owner_epoch=_B("b_e1"),
                    opened_epoch=_B("b_e1") if carries_state else rooms.c.opened_epoch,
                    opened_by=None, state="active", move_to=None, updated_at=_B("b_now"))
            .returning(rooms.c.room))


_COMMIT_ROOM = {True: _commit_room(True), False: _commit_room(False)}
_ROLLBACK_ROOM = (
    update(rooms).where(_ROOM_IS_MOVING)
    .values(epoch=_B("b_e1"),
            opened_epoch=case((rooms.c.opened_epoch.is_(None), None), else_=_B("b_e1")),
            opened_by=None, state="active", move_to=None, updated_at=_B("b_now"))
    .returning(rooms.c.room))
_DECIDE_MOVE = (update(moves).where(moves.c.move_id == _B("b_id"), moves.c.state.in_(UNDECIDED))
                .values(state=_B("b_state"), updated_at=_B("b_now")))
# The commit also renews the driver's lease: it stands for the record write after it.
_COMMIT_MOVE = _DECIDE_MOVE.values(lease_until=_B("b_until"))


def _moving(move: Move, now: float) -> dict[str, Any]:
    return {"b_room": move.room, "b_from": move.from_epoch, "b_target": move.target,
            "b_e1": move.epoch, "b_now": now}


@dataclass(frozen=True, slots=True)
class Reservation:
    """One room to reserve: ``make(from_epoch)`` builds the coordinator record (``moves.begin``)."""

    room: str
    source: str
    to: str
    make: Callable[[int], tuple[Move, list[Action]]]


async def reserve(store: Store, *, room: str, source: str, to: str, owner: str, now: float,
                  lease_s: float, make: Callable[[int], tuple[Move, list[Action]]]
                  ) -> tuple[Move, list[Action]]:
    """Mark the room ``moving`` and insert its move row, in one transaction.

    Raises Conflict ``already_moving`` / ``room_changed`` and NotFound.
    """
    (out,) = await reserve_many(store, [Reservation(room, source, to, make)], owner=owner,
                                now=now, lease_s=lease_s)
    if isinstance(out, Exception):
        raise out
    return out


async def reserve_many(store: Store, wanted: list[Reservation], *, owner: str, now: float,
                       lease_s: float) -> list[tuple[Move, list[Action]] | ApiError]:
    """:func:`reserve` for many rooms in one transaction; a refused room answers its error."""
    out: list[tuple[Move, list[Action]] | ApiError] = []
    async with store.write() as conn:
        for w in wanted:
            try:
                out.append(await _reserve(conn, w, owner=owner, now=now, lease_s=lease_s))
            except ApiError as exc:
                out.append(exc)
    return out


async def _reserve(conn: AsyncConnection, w: Reservation, *, owner: str, now: float,
                   lease_s: float) -> tuple[Move, list[Action]]:
    row = (await conn.execute(_RESERVE_ROOM, {"b_room": w.room, "b_source": w.source,
                                              "b_to": w.to, "b_now": now})).first()
    if row is None:
        cur = (await conn.execute(select(rooms.c.instance, rooms.c.state)
                                  .where(rooms.c.room == w.room))).first()
        if cur is None:
            raise NotFound("room_not_found", f"no room {w.room}")
        if cur.state == "moving":
            raise Conflict("already_moving", f"room {w.room} is already moving")
        raise Conflict("room_changed", f"room {w.room} is now on {cur.instance}, not {w.source}")
    move, actions = w.make(int(row[0]))
    await conn.execute(moves.insert(), {
        "move_id": move.move_id, "room": w.room, "state": move.state.value,
        "record": move.to_dict(), "lease_owner": owner, "lease_until": now + lease_s,
        "created_at": now, "updated_at": now})
    return move, actions


async def persist_many(store: Store, records: list[tuple[Move, tuple[str, ...]]], *, owner: str,
                       now: float, lease_s: float) -> list[bool]:
    """Write each move's record if its row is still in one of that move's ``expect`` states
    and we hold the lease; one transaction for all. True per record written."""
    out = []
    async with store.write() as conn:
        for move, expect in records:
            res = await conn.execute(_PERSIST, {
                "b_id": move.move_id, "b_expect": list(expect), "b_owner": owner,
                "b_state": move.state.value, "b_record": move.to_dict(),
                "b_until": now + lease_s, "b_now": now})
            out.append(bool(res.rowcount))
    return out


async def _decided(conn: AsyncConnection, move: Move, now: float) -> str:
    """The move row's decision; an undecided row whose room changed under it
    (re-placed after a crash) is decided rolled back here."""
    state = (await conn.execute(select(moves.c.state)
                                .where(moves.c.move_id == move.move_id))).scalar_one()
    if state in UNDECIDED:
        await conn.execute(update(moves).where(moves.c.move_id == move.move_id)
                           .values(state="rolled_back", updated_at=now))
        return "rolled_back"
    return str(state)


async def commit(store: Store, move: Move, now: float, lease_until: float | None = None) -> bool:
    """The point of no return; True when this move committed (now or before).

    ``lease_until`` renews the driver's lease on the move row in the same write."""
    (ok,) = await commit_many(store, [move], now, lease_until)
    return ok


async def commit_many(store: Store, batch: list[Move], now: float,
                      lease_until: float | None = None) -> list[bool]:
    """:func:`commit` for many moves in one transaction (a drain's moves commit in step)."""
    out = []
    bumps: Counter[str] = Counter()
    async with store.write() as conn:
        for move in batch:
            row = (await conn.execute(_COMMIT_ROOM[bool(move.carries_state)],
                                      _moving(move, now))).first()
            if row is None:
                out.append(await _decided(conn, move, now) in ("committed", "released"))
                continue
            decide = {"b_id": move.move_id, "b_state": "committed", "b_now": now}
            if lease_until is None:
                await conn.execute(_DECIDE_MOVE, decide)
            else:
                await conn.execute(_COMMIT_MOVE, {**decide, "b_until": lease_until})
            bumps[move.source] -= 1
            bumps[move.target] += 1
            out.append(True)
        await bump_rooms_assigned(conn, bumps)  # after the rooms, in id order
    return out


async def rollback(store: Store, move: Move, now: float) -> bool:
    """Give the room back to the source and burn the reserved epoch; True when rolled back."""
    (ok,) = await rollback_many(store, [move], now)
    return ok


async def rollback_many(store: Store, batch: list[Move], now: float) -> list[bool]:
    """:func:`rollback` for many moves in one transaction."""
    out = []
    async with store.write() as conn:
        for move in batch:
            row = (await conn.execute(_ROLLBACK_ROOM, _moving(move, now))).first()
            if row is None:
                out.append(await _decided(conn, move, now) not in ("committed", "released"))
                continue
            await conn.execute(_DECIDE_MOVE, {"b_id": move.move_id, "b_state": "rolled_back",
                                              "b_now": now})
            out.append(True)
    return out


async def renew_leases(store: Store, move_ids: list[str], *, owner: str, now: float,
                       lease_s: float) -> int:
    """Extend ``owner``'s lease on those of ``move_ids`` it still holds and that are not
    finished (one statement); how many it renewed. The driver's heartbeat: a replica
    that dies stops renewing, so another (or its restart) recovers its moves within
    ``lease_s``."""
    if not move_ids:
        return 0
    async with store.write() as conn:
        res = await conn.execute(
            update(moves).where(moves.c.move_id.in_(move_ids), moves.c.lease_owner == owner,
                                moves.c.state.notin_(FINISHED))
            .values(lease_until=now + lease_s))
    return int(res.rowcount or 0)


async def claim_orphans(store: Store, *, owner: str, now: float, lease_s: float,
                        limit: int = 100) -> list[Move]:
    """Unfinished moves whose lease ran out, now leased to ``owner`` (CAS per row)."""
    async with store.read() as conn:
        rows = (await conn.execute(
            select(moves.c.move_id, moves.c.state, moves.c.record, moves.c.lease_until)
            .where(moves.c.state.notin_(FINISHED), moves.c.lease_until < now)
            .limit(limit))).all()
    out = []
    for move_id, state, record, until in rows:
        async with store.write() as conn:
            res = await conn.execute(
                update(moves).where(moves.c.move_id == move_id, moves.c.lease_until == until,
                                    moves.c.state == state)
                .values(lease_owner=owner, lease_until=now + lease_s, updated_at=now))
            if not res.rowcount:
                continue  # another replica claimed it first
        rec = dict(record)
        rec["state"] = state  # the column is the authority (commit/rollback write only it)
        out.append(Move.from_dict(rec))
    return out


async def get(store: Store, move_id: str) -> Mapping[str, Any] | None:
    async with store.read() as conn:
        row = (await conn.execute(select(moves).where(moves.c.move_id == move_id))).first()
    return row._mapping if row is not None else None


def expected_before(state: State) -> tuple[str, ...]:
    """Row states a write of a record in ``state`` may overwrite (never a decision)."""
    if state in (State.RELEASED, State.COMMITTED):
        return ("committed",)
    if state in (State.ABORTED, State.ROLLED_BACK):
        return ("rolled_back",)
    return UNDECIDED
