"""Benchmark: the rebalance planner (directory/domain/rebalance.py) on large clusters.

Builds a balanced cluster the way the directory places rooms (each room on
the least loaded instance; weights 1 + lognormal connections), then plans
for two situations: one empty instance added (the scale-out case) and a
skewed cluster (a third of the instances carry 1.5x their share). Prints one
JSON line per case: planning time (best of ``--repeat``), moves, lower bound,
max/mean load after.

    python bench/planner.py                      # 100k rooms x 100 and x 1,000 instances
    python bench/planner.py --rooms 100000 --instances 100 --repeat 5
    python bench/planner.py --json out.json      # also write the cases as JSON (bench/compare)
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from directory.domain.rebalance import plan


def cluster(n_inst: int, n_rooms: int, seed: int, sigma: float) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    weights = sorted((1 + int(rnd.lognormvariate(1.0, sigma)) for _ in range(n_rooms)),
                     reverse=True)
    heap = [(0, j) for j in range(1, n_inst + 1)]
    rooms = []
    for k, w in enumerate(weights):
        load, j = heapq.heappop(heap)
        rooms.append({"room": f"r{k}", "instance": f"i{j}", "weight": w})
        heapq.heappush(heap, (load + w, j))
    rnd.shuffle(rooms)
    return rooms


def skew(rooms: list[dict[str, Any]], n_inst: int, seed: int) -> list[dict[str, Any]]:
    """Move rooms from the last third of instances onto the first third (1.5x load there)."""
    rnd = random.Random(seed)
    third = max(1, n_inst // 3)
    out = []
    for r in rooms:
        j = int(r["instance"][1:])
        if j > n_inst - third and rnd.random() < 0.5:
            r = {**r, "instance": f"i{1 + (j - 1) % third}"}
        out.append(r)
    return out


def run(name: str, instances: list[dict[str, Any]], rooms: list[dict[str, Any]],
        max_moves: int, repeat: int) -> dict[str, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = plan(instances, rooms, max_moves=max_moves)
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    loads = [s["load"] for s in out["after"].values()]
    return {"case": name, "rooms": len(rooms), "instances": len(instances),
            "max_moves": max_moves, "seconds": round(best, 3), "moves": len(out["moves"]),
            "lower_bound": out["lower_bound"], "balanced": out["balanced"],
            "max_over_mean_after": round(max(loads) / (sum(loads) / len(loads)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rooms", type=int, default=100_000)
    ap.add_argument("--instances", type=int, action="append")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of connections")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the cases to this file")
    args = ap.parse_args()
    cases = []
    for n in args.instances or [100, 1000]:
        rooms = cluster(n, args.rooms, args.seed, args.sigma)
        grown = [{"id": f"i{j}", "capacity": 100, "state": "active"} for j in range(1, n + 2)]
        same = grown[:-1]
        skewed = skew(rooms, n, args.seed)
        for name, insts, placed in (("add_empty_instance", grown, rooms),
                                    ("skewed_third", same, skewed)):
            for max_moves in (100, 100_000):
                cases.append(run(name, insts, placed, max_moves, args.repeat))
                print(json.dumps(cases[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"sigma": args.sigma, "repeat": args.repeat,
                                               "seed": args.seed, "cases": cases}))


if __name__ == "__main__":
    main()
