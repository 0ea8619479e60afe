"""The SQL of live moves: reserve, persist, commit, roll back, lease (docs/HANDOFF.md).

Every write that decides a move is one transaction over the room row and the
move row, conditional on what the coordinator expects, so a commit and a
rollback racing (two replicas, a restart, a late retry) settle exactly one
way. ``moves.state`` is the authority; ``moves.record`` is the
coordinator's ``Move.to_dict()`` for recovery. Only the replica holding the
lease (``lease_owner`` until ``lease_until``) writes a move's progress.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import and_, case, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from directory.db import moves, rooms
from directory.errors import Conflict, NotFound
from directory.moves import Action, Move, State
from directory.store import Store, bump_rooms_assigned

UNDECIDED = ("reserved", "frozen", "adopted", "aborting")
FINISHED = ("released", "aborted")


async def reserve(store: Store, *, room: str, source: str, to: str, owner: str, now: float,
                  lease_s: float, make: Callable[[int], tuple[Move, list[Action]]]
                  ) -> tuple[Move, list[Action]]:
    """Mark the room ``moving`` and insert its move row, in one transaction.

    ``make(from_epoch)`` builds the coordinator record (``moves.begin``).
    Raises Conflict ``already_moving`` / ``room_changed`` and NotFound.
    """
    async with store.write() as conn:
        row = (await conn.execute(
            update(rooms)
            .where(rooms.c.room == room, rooms.c.instance == source, rooms.c.state == "active")
            .values(state="moving", move_to=to, updated_at=now)
            .returning(rooms.c.epoch))).first()
        if row is None:
            cur = (await conn.execute(select(rooms.c.instance, rooms.c.state)
                                      .where(rooms.c.room == room))).first()
            if cur is None:
                raise NotFound("room_not_found", f"no room {room}")
            if cur.state == "moving":
                raise Conflict("already_moving", f"room {room} is already moving")
            raise Conflict("room_changed", f"room {room} is now on {cur.instance}, not {source}")
        move, actions = make(int(row[0]))
        await conn.execute(moves.insert().values(
            move_id=move.move_id, room=room, state=move.state.value, record=move.to_dict(),
            lease_owner=owner, lease_until=now + lease_s, created_at=now, updated_at=now))
    return move, actions


async def persist(store: Store, move: Move, *, owner: str, now: float, lease_s: float,
                  expect: tuple[str, ...]) -> bool:
    """Write the record if the row is still in one of ``expect`` and we hold the lease."""
    async with store.write() as conn:
        res = await conn.execute(
            update(moves)
            .where(moves.c.move_id == move.move_id, moves.c.state.in_(expect),
                   moves.c.lease_owner == owner)
            .values(state=move.state.value, record=move.to_dict(), lease_until=now + lease_s,
                    updated_at=now))
        return bool(res.rowcount)


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


def _room_is_moving(move: Move) -> Any:
    return and_(rooms.c.room == move.room, rooms.c.state == "moving",
                rooms.c.epoch == move.from_epoch, rooms.c.move_to == move.target)


async def commit(store: Store, move: Move, now: float) -> bool:
    """The point of no return; True when this move committed (now or before)."""
    e1 = move.epoch
    async with store.write() as conn:
        opened = e1 if move.carries_state else rooms.c.opened_epoch
        row = (await conn.execute(
            update(rooms).where(_room_is_moving(move))
            .values(instance=move.target, epoch=e1, owner_epoch=e1, opened_epoch=opened,
                    state="active", move_to=None, updated_at=now)
            .returning(rooms.c.room))).first()
        if row is None:
            return await _decided(conn, move, now) in ("committed", "released")
        await conn.execute(update(moves).where(moves.c.move_id == move.move_id,
                                               moves.c.state.in_(UNDECIDED))
                           .values(state="committed", updated_at=now))
        await bump_rooms_assigned(conn, move.source, -1)
        await bump_rooms_assigned(conn, move.target, +1)
    return True


async def rollback(store: Store, move: Move, now: float) -> bool:
    """Give the room back to the source and burn the reserved epoch; True when rolled back."""
    e1 = move.epoch
    async with store.write() as conn:
        row = (await conn.execute(
            update(rooms).where(_room_is_moving(move))
            .values(epoch=e1, opened_epoch=case((rooms.c.opened_epoch.is_(None), None), else_=e1),
                    state="active", move_to=None, updated_at=now)
            .returning(rooms.c.room))).first()
        if row is None:
            return await _decided(conn, move, now) not in ("committed", "released")
        await conn.execute(update(moves).where(moves.c.move_id == move.move_id,
                                               moves.c.state.in_(UNDECIDED))
                           .values(state="rolled_back", updated_at=now))
    return True


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
