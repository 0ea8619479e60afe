"""Drain an instance (and run any batch of moves) with bounded parallelism.

``rebalance.plan_drain`` picks a target per room (largest rooms first, each
to the least loaded active instance); ``moves.DrainProgress`` hands out at
most ``parallelism`` moves at a time and requeues a rolled-back one once;
``Mover.move_room`` (``directory.ops.mover``) performs each. A move that fails marks its target
bad for the rest of the drain and is retargeted to another active instance
(those that heartbeated within ``FRESH_S`` first), so a target that died just
before the drain -- still ``active`` until ``down_after`` -- costs one failed
try per room, not the room. The instance is ``draining`` (no
new placements) from the first moment and ``disabled`` only when every room
left; otherwise it stays ``draining`` and the report says what failed (drain
again to retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from directory.domain import instances, placement
from directory.domain.errors import ApiError, Conflict
from directory.domain.moves import DRAIN_PARALLELISM, DrainProgress
from directory.domain.rebalance import plan_drain
from directory.ops.mover import Mover

MAX_ROOMS = 10_000_000
# A target that heartbeated within this many seconds is preferred when a move is retargeted.
FRESH_S = 3.0


async def effective_instances(mover: Mover) -> list[dict[str, Any]]:
    """Every registered instance with its effective state and its load (rooms + connections)."""
    now = mover.clock()
    return [{"id": r["id"], "capacity": r["capacity"], "internal_url": r["internal_url"],
             "state": instances.state_of(r, now=now, down_after=mover.down_after),
             "load": r["rooms_assigned"] + r["load_connections"],
             "heartbeated": r["last_heartbeat"] is not None, "seen_at": instances.seen_at(r)}
            for r in await mover.store.list_instances()]


async def room_weights(mover: Mover, instance: Mapping[str, Any],
                       rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """weight = 1 + live connections, asked from the owning shard (1 when it cannot say)."""
    loads = await mover.shards.rooms_load(instance["id"], instance["internal_url"]) or {}
    return {r["room"]: 1.0 + float((loads.get(r["room"]) or {}).get("connections", 0))
            for r in rows}


def targets(known: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The instances a room of ``source`` may move to: active ones, and of those the ones
    that ever heartbeated when there are any (a registered-only instance never answered)."""
    active = [i for i in known if i["state"] == placement.ACTIVE and i["id"] != source]
    return [i for i in active if i["heartbeated"]] or active


async def retarget(mover: Mover, source: str, bad: set[str]) -> str | None:
    """Another target for a failed move: an active instance no move of this drain failed
    on, fresh ones (heartbeat within ``FRESH_S``) first, then the least loaded."""
    now = mover.clock()
    candidates = [i for i in targets(await effective_instances(mover), source)
                  if i["id"] not in bad and i["capacity"] > 0]
    if not candidates:
        return None
    best = min(candidates, key=lambda i: (now - i["seen_at"] > FRESH_S,
                                          i["load"] / i["capacity"], i["id"]))
    return str(best["id"])


async def run_moves(mover: Mover, progress: DrainProgress,
                    sources: Mapping[str, str], *, retarget_failed: bool = True) -> None:
    """Perform ``progress``'s moves, at most ``progress.parallelism`` at once; a failed
    move is retargeted away from the instance it failed on (see :func:`retarget`)
    unless ``retarget_failed`` is false (a rebalance: the room stays where it is)."""
    running: dict[asyncio.Task[dict[str, Any]], str] = {}
    bad: set[str] = set()
    while True:
        for room, to in progress.next_moves():
            task = asyncio.ensure_future(
                mover.move_room(room=room, source=sources[room], to=to))
            running[task] = room
        if not running:
            return
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            room = running.pop(task)
            exc = task.exception()
            if exc is None:
                progress.succeeded(room, task.result())
                continue
            why = f"{exc.code}: {exc.message}" if isinstance(exc, ApiError) else repr(exc)
            bad.add(progress.in_flight[room])
            progress.rolled_back(room, why, await retarget(mover, sources[room], bad)
                                 if retarget_failed else None)


async def drain_instance(mover: Mover, *, instance: str, reason: str,
                         parallelism: int = DRAIN_PARALLELISM) -> dict[str, Any]:
    """Live-move every room off ``instance``, then mark it disabled; the drain report."""
    started = time.monotonic()
    if not targets(await effective_instances(mover), instance):
        if reason != instances.REASON_SHUTDOWN:
            raise Conflict("no_target", f"no active instance to drain {instance} to")
        # A shard leaving anyway: park it so its clients are re-placed when one comes back.
        await mover.store.upsert_instance(instance, lambda _row: {
            "state": placement.DISABLED, "state_reason": reason})
        return {**DrainProgress(instance, []).report(), "complete": False,
                "state": placement.DISABLED, "replaced": 0, "duration_s": 0.0, "rooms_per_s": None}
    await mover.store.upsert_instance(instance, lambda _row: {
        "state": placement.DRAINING, "state_reason": reason})
    known = await effective_instances(mover)
    source = next(i for i in known if i["id"] == instance)
    rows = [r for r in await mover.store.list_rooms(instance, MAX_ROOMS)]
    weights = await room_weights(mover, source, rows)
    try:
        plan = plan_drain(targets(known, instance),
                          [{"room": r, "weight": w} for r, w in weights.items()],
                          instance) if rows else []
    except ValueError as exc:
        raise Conflict("no_target", str(exc)) from None
    progress = DrainProgress(instance, [(p["room"], p["to"]) for p in plan],
                             parallelism=parallelism)
    await run_moves(mover, progress, {r["room"]: instance for r in rows})
    out = progress.report()
    state = placement.DRAINING
    # A shard leaving goes away whatever happened: what did not move is re-placed on
    # its next connect (recovered: false). An admin's drain disables only when done.
    if out["complete"] or reason == instances.REASON_SHUTDOWN:
        state = placement.DISABLED
        await mover.store.upsert_instance(instance, lambda _row: {
            "state": placement.DISABLED, "state_reason": reason})
    took = time.monotonic() - started
    return {**out, "state": state, "replaced": 0, "duration_s": round(took, 3),
            "rooms_per_s": round(out["moved"] / took, 1) if took > 0 else None}
