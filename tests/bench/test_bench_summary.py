"""Pure parts of the benchmark: step verdicts, ladders, medians and the goals table."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from bench import summary, workloads
from bench.workloads import FULL, Workload


def step(rate: int, ratio: float = 1.0, p99: float | None = 5.0, per_s: float = 0.0,
         per_cpu: float = 0.0) -> dict[str, Any]:
    return {"rate_target": rate, "delivered_ratio": ratio, "p99_ms": p99, "p50_ms": 1.0,
            "deliveries_per_s": per_s or rate * 20.0, "deliveries_per_cpu_second": per_cpu or rate * 10.0,
            "server_cpu_util": 0.5, "loadgen_cpu_util": 0.4}


def test_a_step_is_sustained_only_with_99_percent_delivered_and_p99_under_200ms() -> None:
    """Both thresholds decide; no latency sample or a dropped client is not sustained."""
    assert workloads.is_sustained(step(1, ratio=0.99, p99=199.9))
    assert not workloads.is_sustained(step(1, ratio=0.989, p99=1))
    assert not workloads.is_sustained(step(1, ratio=1.0, p99=200))
    assert not workloads.is_sustained(step(1, ratio=1.0, p99=None))
    assert not workloads.is_sustained({**step(1), "connections_lost": 3})


def test_max_sustained_is_the_highest_passing_rate() -> None:
    """The ladder's result is its highest sustained step, None when none passed."""
    assert workloads.max_sustained([step(10), step(20), step(40, p99=900)])["rate_target"] == 20
    assert workloads.max_sustained([step(10, ratio=0.5)]) is None


def test_later_repeats_run_the_reference_rung_then_restart_below_the_first_max() -> None:
    """Repeats 2+ run the common reference rung, then climb from one rung below the first max."""
    fan = FULL.workloads[0]
    assert fan.reference_rate == 1000
    assert workloads.ladder_for_repeat(fan, None) == list(fan.rates)
    assert workloads.ladder_for_repeat(fan, 5000) == [1000, 4000, 5000, 6000, 8000]
    assert workloads.ladder_for_repeat(fan, 1500) == [1000, 1500, 2000, 3000, 4000, 5000, 6000,
                                                      8000]
    assert workloads.ladder_for_repeat(fan, 500)[:3] == [250, 500, 1000]
    assert workloads.ladder_for_repeat(fan, 12345) == list(fan.rates)


def test_peers_run_fewer_repeats_than_the_headline_comparison() -> None:
    """roomshard-1 and socketio-1 run every repeat; the other peers at most two, never one."""
    for w in FULL.workloads:
        assert w.repeats_for("roomshard-1" if w.mode == "ladder" else "ws-node", 3) \
            == (3 if w.mode == "ladder" else 2)
        assert all(w.repeats_for(t, 3) >= 2 for t in w.targets)
        assert w.repeats_for("python-socketio", 1) == 1
    fan = FULL.workloads[0]
    assert Workload.from_dict(json.loads(json.dumps(dataclasses.asdict(fan)))) == fan


def test_loadgen_config_carries_the_thresholds_and_pids() -> None:
    """The load generator judges steps with the same thresholds as the report."""
    w = Workload("fanout", "ladder", 2, 3, rates=(1, 2))
    cfg = workloads.loadgen_config(w, FULL, "raw", targets=["ws://x"], directories=[], pids=[7],
                                   rates=[1, 2], room_prefix="p", clk_tck=100)
    assert (cfg["minDelivered"], cfg["maxP99Ms"]) == (workloads.MIN_DELIVERED, workloads.MAX_P99_MS)
    assert cfg["pids"] == [7] and cfg["rooms"] == 2 and cfg["members"] == 3
    replicated = workloads.loadgen_config(w, FULL, "roomshard", targets=[], pids=[7], rates=[],
                                          directories=["http://a", "http://b"], room_prefix="p",
                                          clk_tck=100)
    assert replicated["directories"] == ["http://a", "http://b"]


def test_the_replicated_directory_target_runs_the_idle_workload_only() -> None:
    """Two directories on PostgreSQL: a connect measurement, not a fan-out one."""
    by_name = {w.name: w for w in FULL.workloads}
    assert "roomshard-1-2dirs-pg" in by_name["idle"].targets
    assert all("roomshard-1-2dirs-pg" not in w.targets for w in FULL.workloads if w.name != "idle")
    assert "roomshard-1-2dirs-pg" in workloads.ALL_TARGETS


def doc_with(runs: list[tuple[str, str, list[dict[str, Any]]]]) -> dict[str, Any]:
    return {"runs": [{"target": t, "workload": w, "repeat": i, "result": {"steps": s}}
                     for i, (t, w, s) in enumerate(runs)]}


def test_ladder_summary_takes_the_median_and_spread_over_repeats() -> None:
    """Three repeats give a median with min..max; a ladder that never failed is flagged."""
    doc = doc_with([
        ("socketio-1", "fanout", [step(10, per_s=100), step(20, p99=500)]),
        ("socketio-1", "fanout", [step(10, per_s=300), step(20, p99=500)]),
        ("socketio-1", "fanout", [step(10, per_s=200)]),
    ])
    s = summary.ladder(doc, "socketio-1", "fanout", reference_rate=10)
    assert s.max_deliveries_per_s == summary.Spread(200, 100, 300, 3)
    assert s.topped_out is True
    assert s.p99_ref_ms is not None and s.p99_ref_ms.median == 5.0


def test_goals_compare_roomshard_with_its_peers() -> None:
    """Efficiency ratios decide the goals; missing targets are 'not measured', never a pass."""
    fan = {
        "roomshard-1": summary.ladder(doc_with([("roomshard-1", "fanout", [step(10, per_cpu=300)])]),
                                      "roomshard-1", "fanout", 10),
        "socketio-1": summary.ladder(doc_with([("socketio-1", "fanout", [step(10, per_cpu=100)])]),
                                     "socketio-1", "fanout", 10),
        "bare-websockets": summary.ladder(
            doc_with([("bare-websockets", "fanout", [step(10, per_cpu=280)])]), "bare-websockets",
            "fanout", 10),
    }
    goals = summary.goals(fan, {})
    assert [g.met for g in goals] == [True, False, None, None, None, None, None]
    assert goals[0].value.startswith("3.00x at the common rung")


def idle_run(target: str, per_s: float, per_cpu: float | None, loadgen_util: float = 0.5,
             failed: int = 0) -> dict[str, Any]:
    connect: dict[str, Any] = {"ok": 100 - failed, "failed": failed, "seconds": 1.0, "per_s": per_s,
                               "first_errors": ["connect 503"] if failed else []}
    if per_cpu is not None:  # results from before the CPU was recorded have none
        connect.update(per_server_cpu_second=per_cpu, server_cpu_util=0.9,
                       loadgen_cpu_util=loadgen_util)
    return {"target": target, "workload": "idle", "repeat": 0,
            "result": {"idle": {"connect": connect, "connections": 100,
                                "rss_per_connection_bytes": 4096.0}}}


def test_idle_summary_says_which_core_bound_the_connects() -> None:
    """Connects per server CPU-second are the medians over repeats; a busy load generator is flagged."""
    doc = {"runs": [idle_run("roomshard-1", 1500, 2400, loadgen_util=0.97),
                    idle_run("roomshard-1", 1700, 2600, loadgen_util=0.95),
                    idle_run("socketio-1", 1900, 1900, loadgen_util=0.6),
                    idle_run("ws-node", 3000, None)]}
    mine = summary.idle(doc, "roomshard-1")
    assert mine.connects_per_server_cpu_second == summary.Spread(2500, 2400, 2600, 2)
    assert mine.loadgen_bound is True
    assert summary.idle(doc, "socketio-1").loadgen_bound is False
    old = summary.idle(doc, "ws-node")
    assert old.connects_per_server_cpu_second is None and old.loadgen_bound is False


def _connect_goals(doc: dict[str, Any]) -> list[summary.Goal]:
    idle_by = {t: summary.idle(doc, t) for t in ("roomshard-1", "socketio-1")}
    return [g for g in summary.goals({}, idle_by) if "connects" in g.text]


def test_connect_goals_compare_with_socketio_and_fail_on_failed_connects() -> None:
    """Both connect goals are judged on medians; a failed connect fails the rate goal."""
    rate, per_cpu = _connect_goals({"runs": [idle_run("roomshard-1", 1500, 2400),
                                             idle_run("socketio-1", 1900, 1900)]})
    assert (rate.met, per_cpu.met) == (False, True)
    assert rate.value.startswith("0.79x") and per_cpu.value.startswith("1.26x")
    rate, _ = _connect_goals({"runs": [idle_run("roomshard-1", 2000, 2400, failed=1),
                                       idle_run("socketio-1", 1900, 1900)]})
    assert rate.met is False and "failed connects" in rate.value
    rate, per_cpu = _connect_goals({"runs": [idle_run("roomshard-1", 2000, None)]})
    assert (rate.met, per_cpu.met) == (None, None)


def test_the_memory_goal_compares_with_peers_not_with_roomshard_s_other_targets() -> None:
    """The two-directory target is roomshard too: never the "lowest peer"."""
    doc = {"runs": [idle_run("roomshard-1", 2000, 2400), idle_run("socketio-1", 1900, 1900),
                    idle_run("roomshard-1-2dirs-pg", 1500, 2000)]}
    doc["runs"][0]["result"]["idle"]["rss_per_connection_bytes"] = 3000.0
    doc["runs"][2]["result"]["idle"]["rss_per_connection_bytes"] = 3500.0
    idle_by = {t: summary.idle(doc, t) for t in ("roomshard-1", "socketio-1", "roomshard-1-2dirs-pg")}
    (memory,) = [g for g in summary.goals({}, idle_by) if "idle memory" in g.text]
    assert "lowest peer socketio-1 4.0 KiB" in memory.value and memory.met is True
