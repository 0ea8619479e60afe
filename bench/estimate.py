"""How long a ``bench/compare`` profile will take, from the timings of an earlier results file.

    python bench/estimate.py bench/results/full-XXXX.json [--profile full]

A model, not a measurement: per (workload, target) the earlier file gives
the fixed cost of a run (start the servers, connect, stop: its time minus
its steps) and where its first repeat's max was; the profile then says which
rungs each repeat climbs (``workloads.ladder_for_repeat``; the ladder stops
after ``MAX_CONSECUTIVE_FAILURES`` failed rungs) and each rung costs its step,
a drain margin and a gap. The roomshard-only parts take what the same command
took in the earlier file, else the stated ``GUESSES``. Pure functions but
``main``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import extras
from bench.workloads import MAX_CONSECUTIVE_FAILURES, PROFILES, Profile, Workload, ladder_for_repeat

#: Per rung beyond ``step_seconds``: the drain the window usually needs
#: (window_seconds - step_seconds, ~0.1 s in the full runs of 2026-11-21) plus
#: the load generator's bookkeeping between steps. Fitted so that the model
#: gives 1,109 s for full-20261121T133200Z.json, which took 1,076 s.
PER_RUNG_S = 0.4

#: Parts never timed at this size: seconds, and what the guess rests on.
GUESSES: dict[str, tuple[float, str]] = {
    "python bench/directory_connect.py --duration 10 --concurrency 12": (
        35, "9 s to start PostgreSQL and 2 directories (timed, quick run) + 4 s warm-up + 2 x 10 s"),
    "python bench/planner.py": (12, "timed: 11 s on a busy machine (load average 5)"),
    "python bench/handoff.py drain --rooms 600 --postgres": (
        45, "10 s start-up (timed, 30 rooms) + 600 members joining + ~5 s of drain at 44 rooms/s"),
    "python bench/handoff.py pause --members 10,100,1000 --moves 12 --history 1000": (
        200, ("timed in two pieces at nice 19 on a shared machine (load average 3-5), "
              "2026-11-21: 171 s for --members 1000, 31 s for --members 10,100")),
    "python bench/handoff.py pause --members 100 --moves 12 --history 1000 --store postgres": (
        15, "timed: 11.6 s, 2026-12-06"),
    "python bench/publish.py --store postgres --duration 10 --concurrency 16": (
        16, "timed: 13.8 s, 2026-12-06"),
    "python bench/js_client.py --rates 2500,3000,4000,5000 --seconds 10": (
        55, "timed: 42 s for three rates, 2026-12-07 (a start-up of ~8 s, 11 s per rate)"),
}


def run_seconds(doc: dict[str, Any]) -> list[tuple[dict[str, Any], float]]:
    """(run, seconds) for every run whose duration is known."""
    runs = doc.get("runs", [])
    out = []
    for i, r in enumerate(runs):
        if "elapsed_seconds" in r:
            out.append((r, float(r["elapsed_seconds"])))
        elif i + 1 < len(runs):  # older files: the gap to the next run's start
            gap = (dt.datetime.fromisoformat(runs[i + 1]["started_at"])
                   - dt.datetime.fromisoformat(r["started_at"])).total_seconds()
            out.append((r, gap))
    return out


def fixed_costs(doc: dict[str, Any], step_seconds: float) -> dict[tuple[str, str], float]:
    """Mean seconds per run outside its steps, per (workload, target)."""
    costs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r, secs in run_seconds(doc):
        steps = (r.get("result") or {}).get("steps") or []
        costs[(r["workload"], r["target"])].append(secs - len(steps) * (step_seconds + PER_RUNG_S))
    return {k: statistics.mean(v) for k, v in costs.items()}


def first_max(doc: dict[str, Any]) -> dict[tuple[str, str], int | None]:
    """The highest sustained rung of each first repeat (None: nothing sustained)."""
    out: dict[tuple[str, str], int | None] = {}
    for r in doc.get("runs", []):
        steps = (r.get("result") or {}).get("steps")
        if r["repeat"] == 0 and steps:
            ok = [s["rate_target"] for s in steps if s.get("sustained")]
            out[(r["workload"], r["target"])] = max(ok) if ok else None
    return out


def rungs_climbed(ladder: Sequence[int], max_rate: int | None) -> int:
    """Rungs run when every rung up to ``max_rate`` sustains and every one above fails."""
    n = fails = 0
    for rate in ladder:
        n += 1
        fails = fails + 1 if max_rate is None or rate > max_rate else 0
        if fails >= MAX_CONSECUTIVE_FAILURES:
            break
    return n


def ladder_seconds(w: Workload, profile: Profile, target: str, fixed: float,
                   earlier_max: int | None) -> float:
    reached = max((r for r in w.rates if earlier_max is not None and r <= earlier_max), default=None)
    total = 0.0
    for repeat in range(w.repeats_for(target, profile.repeats)):
        ladder = list(w.rates) if repeat == 0 else ladder_for_repeat(w, reached)
        steps = rungs_climbed(ladder, earlier_max) if w.mode == "ladder" else 0
        total += fixed + steps * (profile.step_seconds + PER_RUNG_S)
    return total


def estimate(profile: Profile, earlier: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(part, seconds, basis) for every run of the profile, then every roomshard-only part."""
    fixed = fixed_costs(earlier, earlier.get("step_seconds", profile.step_seconds))
    tops = first_max(earlier)
    out = []
    for w in profile.workloads:
        same = [v for (wl, _), v in fixed.items() if wl == w.name]
        for target in w.targets:
            cost = fixed.get((w.name, target), statistics.mean(same) if same else 10.0)
            secs = ladder_seconds(w, profile, target, cost, tops.get((w.name, target)))
            out.append((f"{w.name} {target} x{w.repeats_for(target, profile.repeats)}", secs,
                        "model from the earlier file"))
    timed = {e["command"]: e["elapsed_seconds"] for e in (earlier.get("extras") or {}).values()
             if "elapsed_seconds" in e and "error" not in e}
    for part in extras.EXTRAS[profile.name]:
        if part.command in timed:
            out.append((part.name, timed[part.command], "timed in the earlier file"))
        else:
            secs, why = GUESSES.get(part.command, (60.0, "no basis: a default"))
            out.append((part.name, secs, f"guess: {why}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("earlier", help="a results file of an earlier bench/compare run")
    ap.add_argument("--profile", default="full", choices=sorted(PROFILES))
    args = ap.parse_args(argv)
    parts = estimate(PROFILES[args.profile], json.loads(Path(args.earlier).read_text()))
    for name, secs, basis in parts:
        print(f"{secs:7.0f} s  {name}  ({basis})")
    total = sum(s for _, s, _ in parts)
    print(f"{total:7.0f} s  total = {total / 60:.1f} min (plus installs on a fresh machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
