"""Fold a results document into per-target numbers and the project's goals.

Pure functions over the JSON ``compare.py`` writes: no I/O. For each
(target, workload) and repeat it takes the highest sustained step of the rate
ladder (>= 99% delivered, p99 < 200 ms) and reports the median over repeats
with the min..max spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.workloads import max_sustained

#: Above this share of its CPU the load generator may be what limits a step.
LOADGEN_BUSY = 0.85


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        vals = [v for v in values if v is not None]
        if not vals:
            return None
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))


@dataclass
class LadderSummary:
    target: str
    workload: str
    max_deliveries_per_s: Spread | None = None
    per_cpu_second_at_max: Spread | None = None
    per_cpu_second_at_ref: Spread | None = None
    p50_ref_ms: Spread | None = None
    p99_ref_ms: Spread | None = None
    p99_max_ms: Spread | None = None
    server_cpu_at_max: Spread | None = None
    loadgen_cpu_at_max: Spread | None = None
    # The message store's database server at the reference rung: CPU-seconds per 1,000
    # deliveries (None: no database, or not measured).
    database_cpu_ms_per_1k_at_ref: Spread | None = None
    topped_out: bool = False  # some repeat never failed: the max is a lower bound
    loadgen_bound: bool = False  # the load generator was busy at the max step
    unsustained_repeats: int = 0  # repeats whose lowest rung already failed
    lowest_offered: float | None = None  # deliveries/s offered by the lowest rung tried
    errors: list[str] = field(default_factory=list)


@dataclass
class IdleSummary:
    target: str
    connections: int = 0
    rss_per_connection_bytes: Spread | None = None
    connects_per_s: Spread | None = None
    # Over the connects only (results from before these were recorded have none).
    connects_per_server_cpu_second: Spread | None = None
    server_cpu_util: Spread | None = None
    loadgen_cpu_util: Spread | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def loadgen_bound(self) -> bool:
        """The load generator's core, not the server's, was the limit of the connect rate."""
        return bool(self.loadgen_cpu_util and self.loadgen_cpu_util.median >= LOADGEN_BUSY)


def _runs(doc: dict[str, Any], target: str, workload: str) -> list[dict[str, Any]]:
    return [r for r in doc.get("runs", []) if r["target"] == target and r["workload"] == workload]


def _ref_step(steps: Sequence[dict[str, Any]], ref: int | None) -> dict[str, Any] | None:
    """The last attempt at the reference rate (a retry replaces a failed first try)."""
    found = None
    for s in steps:
        if s["rate_target"] == ref:
            found = s
    return found


def ladder(doc: dict[str, Any], target: str, workload: str, reference_rate: int | None) -> LadderSummary:
    out = LadderSummary(target, workload)
    tops, refs = [], []
    for run in _runs(doc, target, workload):
        if "error" in run:
            out.errors.append(run["error"].splitlines()[0])
            continue
        steps = run["result"].get("steps") or []
        if not steps:
            connect = run["result"].get("connect", {})
            out.errors.append(f"connect failed: {connect.get('first_errors')}")
            continue
        top = max_sustained(steps)
        if top is not None:
            tops.append(top)
            if top is steps[-1]:
                out.topped_out = True
        else:
            out.unsustained_repeats += 1
            offered = steps[0]["expected"] / steps[0]["send_seconds"]
            out.lowest_offered = min(offered, out.lowest_offered or offered)
        refs.append(_ref_step(steps, reference_rate))
    out.max_deliveries_per_s = Spread.of(t["deliveries_per_s"] for t in tops)
    out.per_cpu_second_at_max = Spread.of(t["deliveries_per_cpu_second"] for t in tops)
    out.p99_max_ms = Spread.of(t["p99_ms"] for t in tops)
    out.server_cpu_at_max = Spread.of(t["server_cpu_util"] for t in tops)
    out.loadgen_cpu_at_max = Spread.of(t["loadgen_cpu_util"] for t in tops)
    out.loadgen_bound = bool(out.loadgen_cpu_at_max and out.loadgen_cpu_at_max.median >= LOADGEN_BUSY)
    real_refs = [r for r in refs if r is not None]
    out.per_cpu_second_at_ref = Spread.of(r["deliveries_per_cpu_second"] for r in real_refs)
    out.p50_ref_ms = Spread.of(r["p50_ms"] for r in real_refs)
    out.p99_ref_ms = Spread.of(r["p99_ms"] for r in real_refs)
    out.database_cpu_ms_per_1k_at_ref = Spread.of(
        1e6 * r["database_cpu_seconds"] / r["delivered"] if r.get("database_cpu_seconds")
        is not None and r.get("delivered") else None for r in real_refs)
    return out


def idle(doc: dict[str, Any], target: str, workload: str = "idle") -> IdleSummary:
    out = IdleSummary(target)
    rss, rates, per_cpu, server_util, loadgen_util = [], [], [], [], []
    for run in _runs(doc, target, workload):
        if "error" in run:
            out.errors.append(run["error"].splitlines()[0])
            continue
        res = run["result"]["idle"]
        if res["connect"]["failed"]:
            out.errors.append(f"{res['connect']['failed']} connects failed: "
                              f"{res['connect']['first_errors'][:1]}")
        out.connections = max(out.connections, res["connections"])
        rss.append(res["rss_per_connection_bytes"])
        rates.append(res["connect"]["per_s"])
        per_cpu.append(res["connect"].get("per_server_cpu_second"))
        server_util.append(res["connect"].get("server_cpu_util"))
        loadgen_util.append(res["connect"].get("loadgen_cpu_util"))
    out.rss_per_connection_bytes = Spread.of(rss)
    out.connects_per_s = Spread.of(rates)
    out.connects_per_server_cpu_second = Spread.of(per_cpu)
    out.server_cpu_util = Spread.of(server_util)
    out.loadgen_cpu_util = Spread.of(loadgen_util)
    return out


def _ratio(a: Spread | None, b: Spread | None) -> float | None:
    if a is None or b is None or not b.median:
        return None
    return a.median / b.median


@dataclass(frozen=True)
class Goal:
    text: str
    value: str
    met: bool | None  # None: not measured


def goals(fan: dict[str, LadderSummary], idle_by: dict[str, IdleSummary]) -> list[Goal]:
    """The project's stated goals, judged on the medians of the fan-out workload.

    CPU efficiency is compared at the reference rung, where every server got
    the same offered load (at each one's own max the loads differ, and a
    busier server amortises its fixed costs better); the ratio at the max
    is shown beside it.
    """
    out: list[Goal] = []
    rs = fan.get("roomshard-1")

    def ratio_goal(text: str, peer: str, need: float) -> None:
        p = fan.get(peer)
        r = _ratio(rs.per_cpu_second_at_ref if rs else None, p.per_cpu_second_at_ref if p else None)
        at_max = _ratio(rs.per_cpu_second_at_max if rs else None, p.per_cpu_second_at_max if p else None)
        value = "not measured" if r is None else f"{r:.2f}x at the common rung"
        if r is not None and at_max is not None:
            value += f" ({at_max:.2f}x at each one's max)"
        out.append(Goal(text, value, None if r is None else r >= need))

    ratio_goal("roomshard >= 2x Socket.IO (1 node) deliveries per server CPU-second", "socketio-1", 2.0)
    ratio_goal("roomshard >= 1.2x bare websockets deliveries per server CPU-second",
               "bare-websockets", 1.2)

    mine = idle_by.get("roomshard-1")
    mine_rss = mine.rss_per_connection_bytes if mine else None
    peers = {k: v.rss_per_connection_bytes for k, v in idle_by.items()
             if not k.startswith("roomshard") and k != "ws-node" and v.rss_per_connection_bytes}
    if mine_rss is None or not peers:
        out.append(Goal("idle memory per connection below every peer but bare Node ws",
                        "not measured", None))
    else:
        worst = min(peers.items(), key=lambda kv: kv[1].median)
        out.append(Goal("idle memory per connection below every peer but bare Node ws",
                        f"{mine_rss.median / 1024:.1f} KiB vs lowest peer {worst[0]} "
                        f"{worst[1].median / 1024:.1f} KiB",
                        mine_rss.median < worst[1].median))

    sio_idle = idle_by.get("socketio-1")
    for what, mine_s, peer_s in (
            ("connects/s end to end", mine.connects_per_s if mine else None,
             sio_idle.connects_per_s if sio_idle else None),
            ("connects per server CPU-second", mine.connects_per_server_cpu_second if mine else None,
             sio_idle.connects_per_server_cpu_second if sio_idle else None)):
        r = _ratio(mine_s, peer_s)
        text = f"roomshard >= Socket.IO (1 node) {what} (idle workload)"
        if r is None or mine_s is None or peer_s is None:
            out.append(Goal(text, "not measured", None))
            continue
        failed = bool(mine and any("connects failed" in e for e in mine.errors))
        value = f"{r:.2f}x ({mine_s.median:,.0f} vs {peer_s.median:,.0f})"
        out.append(Goal(text, value + (", with failed connects" if failed else ""),
                        r >= 1.0 and not failed))

    r2 = fan.get("roomshard-2")
    two = _ratio(r2.max_deliveries_per_s if r2 else None, rs.max_deliveries_per_s if rs else None)
    eff2 = _ratio(r2.per_cpu_second_at_ref if r2 else None, rs.per_cpu_second_at_ref if rs else None)
    # Both shards share CPU 1 here, so their deliveries/s cannot double: the
    # goal is not measurable on this machine, whatever the ratio says.
    out.append(Goal("2 shards >= 1.8x one shard's deliveries/s",
                    "not measurable on 2 cores (both shards share CPU 1)" + (
                        "" if two is None else f"; measured {two:.2f}x deliveries/s, "
                        + ("" if eff2 is None else f"{eff2:.2f}x deliveries per CPU-s")),
                    None))
    for stored, what in (("roomshard-1-sqlite", "SQLite"), ("roomshard-1-pg", "PostgreSQL")):
        st = fan.get(stored)
        if st is None:
            continue
        r = _ratio(st.per_cpu_second_at_ref, rs.per_cpu_second_at_ref if rs else None)
        out.append(Goal(f"with a message store on {what}: deliveries per shard CPU-second "
                        ">= 0.8x memory mode's",
                        "not measured" if r is None else f"{r:.2f}x at the common rung",
                        None if r is None else r >= 0.8))
        p99 = st.p99_ref_ms
        out.append(Goal(f"with a message store on {what}: p99 delivery latency < 50 ms at the "
                        "common rung", "not measured" if p99 is None else f"{p99.median:.1f} ms",
                        None if p99 is None else p99.median < 50))
    s1, s2 = fan.get("socketio-1"), fan.get("socketio-2-redis")
    sio = _ratio(s2.per_cpu_second_at_ref if s2 else None, s1.per_cpu_second_at_ref if s1 else None)
    out.append(Goal("Socket.IO + Redis on 2 nodes delivers less per CPU-second than 1 node",
                    "not measured" if sio is None else f"{sio:.2f}x of 1 node at the common rung",
                    None if sio is None else sio < 1.0))
    return out
