"""``POST /v1/admin/rebalance``: live load in, ``rebalance.plan`` out, moves performed.

Room weights are 1 + the live connections each owning shard reports (1 when a
shard cannot be asked); only active instances that heartbeated take part, and
a move that fails leaves its room where it was (no retarget). Unless ``dry_run``,
the planned moves run with the drain's bounded parallelism and the answer
adds what was performed (``performed``: move reports, ``failed``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from directory.domain import placement
from directory.domain.moves import DRAIN_PARALLELISM, DrainProgress
from directory.domain.rebalance import plan
from directory.ops.drain import MAX_ROOMS, effective_instances, room_weights, run_moves
from directory.ops.mover import Mover


async def rebalance(mover: Mover, *, dry_run: bool, max_moves: int) -> dict[str, Any]:
    # An instance that never heartbeated never answered: it neither gives nor takes rooms.
    instances = [i for i in await effective_instances(mover)
                 if i["state"] == placement.ACTIVE and i["heartbeated"]]
    by_id = {i["id"]: i for i in instances}
    rows = [r for r in await mover.store.list_rooms(None, MAX_ROOMS)
            if r["instance"] in by_id and r["state"] == "active"]
    per_instance: dict[str, list[Any]] = {}
    for r in rows:
        per_instance.setdefault(r["instance"], []).append(r)
    names = sorted(per_instance)
    weights: dict[str, float] = {}
    for part in await asyncio.gather(*(room_weights(mover, by_id[n], per_instance[n])
                                       for n in names)):
        weights.update(part)
    result = plan(instances, [{"room": r["room"], "instance": r["instance"],
                               "weight": weights[r["room"]]} for r in rows],
                  max_moves=max_moves)
    result["dry_run"] = dry_run
    if dry_run or not result["moves"]:
        return result
    progress = DrainProgress("rebalance", [(m["room"], m["to"]) for m in result["moves"]],
                             parallelism=DRAIN_PARALLELISM, max_attempts=1)
    await run_moves(mover, progress, {m["room"]: m["from"] for m in result["moves"]},
                    retarget_failed=False)  # a failed move leaves the room where it was
    done = progress.report()
    result["performed"] = done["moves"]
    result["failed"] = done["failed"]
    return result
