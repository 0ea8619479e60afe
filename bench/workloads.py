"""What the benchmark runs: workloads, rate ladders, repeats, and how a step is judged.

Pure data and functions (no I/O), shared by ``compare.py`` (which runs them)
and ``report.py`` (which reads their results back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

#: The ladder stops after this many failed rungs in a row (one noisy rung
#: on a shared machine does not end it); the max is the highest sustained rung.
MAX_CONSECUTIVE_FAILURES = 2

#: A step is sustained when at least this share of expected deliveries
#: arrived and the 99th percentile latency stayed below this bound.
MIN_DELIVERED = 0.99
#: Connects the load generator keeps in flight while it opens a workload's connections
#: (the connect storm the idle workload measures: issue #13 asks for 0 failures at 200).
CONNECT_CONCURRENCY = 200
MAX_P99_MS = 200.0

SINGLE = ("ws-node", "bare-websockets", "python-socketio", "socketio-1", "roomshard-1")
#: roomshard with a message store (every message stored before it is broadcast and acked):
#: the fan-out workload only, next to roomshard-1 (memory).
STORED = ("roomshard-1-sqlite", "roomshard-1-pg")
#: The fan-out workload's targets (its default).
FANOUT = (*SINGLE, "socketio-2-redis", "roomshard-2", *STORED)
#: roomshard as production deploys it: two directory processes on one PostgreSQL
#: (the idle workload: connects answered by either replica).
REPLICATED = ("roomshard-1-2dirs-pg",)
ALL_TARGETS = (*FANOUT, *REPLICATED)


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str  # "ladder" or "idle"
    rooms: int
    members: int
    rates: tuple[int, ...] = ()  # published messages per second, summed over all clients
    # The common rung: CPU per delivery and latency are compared at this same
    # offered load for every server (the goals use it).
    reference_rate: int | None = None
    targets: tuple[str, ...] = FANOUT
    # (target, repeats) for targets measured fewer times than the profile's
    # repeats: the time budget goes to the comparison the goals are about.
    repeats_by_target: tuple[tuple[str, int], ...] = ()

    @property
    def connections(self) -> int:
        return self.rooms * self.members

    def repeats_for(self, target: str, default: int) -> int:
        """How many times ``target`` runs this workload (at most ``default``)."""
        return min(default, dict(self.repeats_by_target).get(target, default))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        """Back from the copy a results file keeps (JSON lists -> tuples)."""
        return cls(**{**d, "rates": tuple(d.get("rates", ())), "targets": tuple(d["targets"]),
                      "repeats_by_target": tuple(tuple(x) for x in d.get("repeats_by_target", ()))})


@dataclass(frozen=True)
class Profile:
    name: str
    repeats: int
    step_seconds: float
    drain_seconds: float
    workloads: tuple[Workload, ...]


#: Measured twice, not three times, in the full run: the peers that are not
#: roomshard's headline comparison (roomshard-1 vs socketio-1), so that the
#: whole run, handoff and directory parts included, fits in 20 minutes.
PEERS_TWICE = (("roomshard-2", 2), ("socketio-2-redis", 2), ("python-socketio", 2),
               ("bare-websockets", 2), ("ws-node", 2), ("roomshard-1-sqlite", 2),
               ("roomshard-1-pg", 2))

FULL = Profile(
    name="full",
    repeats=3,
    step_seconds=2.0,
    drain_seconds=1.0,
    workloads=(
        # 100 rooms x 20: each publish is 20 deliveries (sender included).
        Workload("fanout", "ladder", 100, 20,
                 rates=(100, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000),
                 reference_rate=1000, repeats_by_target=PEERS_TWICE),
        # 1 room x 1,000: each publish is 1,000 deliveries.
        Workload("bigroom", "ladder", 1, 1000, rates=(10, 20, 40, 60, 80, 100, 150),
                 reference_rate=20, targets=SINGLE, repeats_by_target=PEERS_TWICE),
        # 5,000 idle connections in 250 rooms of 20: RSS per connection (it
        # barely moves between repeats: two each).
        Workload("idle", "idle", 250, 20, targets=(*SINGLE, *REPLICATED),
                 repeats_by_target=tuple((t, 2) for t in (*SINGLE, *REPLICATED))),
        # 2,000 rooms x 1 member: each message is one delivery (to its sender), so the max
        # is the messages/s one shard can sequence and, with a store, store.
        Workload("store", "ladder", 2000, 1,
                 rates=(2000, 5000, 10000, 15000, 20000, 25000, 30000, 35000, 40000),
                 reference_rate=2000, targets=("roomshard-1", *STORED),
                 repeats_by_target=tuple((t, 2) for t in STORED)),
    ),
)

QUICK = Profile(
    name="quick",
    repeats=1,
    step_seconds=1.5,
    drain_seconds=1.0,
    workloads=(
        Workload("fanout", "ladder", 100, 20, rates=(100, 250, 1000, 2000, 4000),
                 reference_rate=1000),
        Workload("bigroom", "ladder", 1, 1000, rates=(5, 10, 20, 40), reference_rate=20,
                 targets=SINGLE),
        Workload("idle", "idle", 50, 20, targets=(*SINGLE, *REPLICATED)),
        Workload("store", "ladder", 200, 1, rates=(500, 1000, 2000), reference_rate=1000,
                 targets=("roomshard-1", *STORED)),
    ),
)

PROFILES = {"full": FULL, "quick": QUICK}


def workloads_of(doc: dict[str, Any]) -> dict[str, Workload]:
    """The workloads a results file was measured with: its own copy (older files: the profile's)."""
    if "workloads" in doc:
        return {w["name"]: Workload.from_dict(w) for w in doc["workloads"]}
    out = {}
    for w in PROFILES[doc["profile"]].workloads:
        # The profile may have changed since: the rungs are the ones its runs climbed.
        seen = {s["rate_target"] for r in doc.get("runs", []) if r["workload"] == w.name
                for s in (r.get("result") or {}).get("steps") or []}
        out[w.name] = replace(w, rates=tuple(sorted(seen))) if seen else w
    return out


def is_sustained(step: dict[str, Any]) -> bool:
    """>= 99% of the expected deliveries arrived, p99 < 200 ms, and no client was dropped."""
    p99 = step.get("p99_ms")
    return (step.get("delivered_ratio", 0.0) >= MIN_DELIVERED
            and p99 is not None and p99 < MAX_P99_MS
            and not step.get("connections_lost", 0))


def max_sustained(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest-rate sustained step (the ladder stops at its first failure)."""
    best = None
    for step in steps:
        if is_sustained(step) and (best is None or step["rate_target"] > best["rate_target"]):
            best = step
    return best


def ladder_for_repeat(workload: Workload, previous_max: int | None, back: int = 1) -> list[int]:
    """Rates to climb in a repeat.

    The first repeat climbs the whole ladder. Later ones run the reference
    rung (compared for every server), then restart ``back`` steps below the
    max the first repeat found and climb from there: the rungs between are
    skipped, not the part of the ladder that decides the result.
    """
    rates = list(workload.rates)
    if previous_max is None or previous_max not in rates:
        return rates
    start = max(0, rates.index(previous_max) - back)
    ref = workload.reference_rate
    head = [ref] if ref in rates and rates.index(ref) < start else []
    return head + rates[start:]


def loadgen_config(workload: Workload, profile: Profile, protocol: str, *,
                   targets: Sequence[str], directories: Sequence[str], pids: Sequence[int],
                   rates: Sequence[int], room_prefix: str, clk_tck: int,
                   database_pids: Sequence[int] = ()) -> dict[str, Any]:
    """The JSON document ``bench/loadgen/loadgen.js`` takes."""
    return {
        "protocol": protocol,
        "mode": workload.mode,
        "targets": list(targets),
        "directories": list(directories),
        "rooms": workload.rooms,
        "members": workload.members,
        "roomPrefix": room_prefix,
        "rates": list(rates),
        "stepSeconds": profile.step_seconds,
        "drainSeconds": profile.drain_seconds,
        "minDelivered": MIN_DELIVERED,
        "maxP99Ms": MAX_P99_MS,
        "maxConsecutiveFailures": MAX_CONSECUTIVE_FAILURES,
        "pids": list(pids),
        "databasePids": list(database_pids),
        "clkTck": clk_tck,
        "connectConcurrency": CONNECT_CONCURRENCY,
        "settleSeconds": 2 if workload.mode == "idle" else 1,
    }
