"""The run-time model of bench/estimate.py."""

from __future__ import annotations

from typing import Any

from bench import estimate, extras
from bench.workloads import FULL, QUICK


def _run(workload: str, target: str, repeat: int, rates: list[int], top: int,
         seconds: float) -> dict[str, Any]:
    steps = [{"rate_target": r, "sustained": r <= top} for r in rates]
    return {"workload": workload, "target": target, "repeat": repeat, "elapsed_seconds": seconds,
            "started_at": "2026-11-21T00:00:00+00:00", "result": {"steps": steps}}


def test_the_ladder_stops_after_two_failed_rungs_above_the_max() -> None:
    """Rungs up to the max sustain; the climb ends at the second failure in a row."""
    assert estimate.rungs_climbed([1, 2, 3, 4, 5, 6], 3) == 5
    assert estimate.rungs_climbed([1, 2, 3], 3) == 3
    assert estimate.rungs_climbed([1, 2, 3], None) == 2


def test_fixed_cost_is_the_run_time_outside_its_steps() -> None:
    """A run's fixed cost is its time minus its rungs at step + per-rung seconds."""
    doc = {"runs": [_run("fanout", "ws-node", 0, [100, 250, 500], 250, 20.0)]}
    per_rung = 2.0 + estimate.PER_RUNG_S
    assert estimate.fixed_costs(doc, 2.0)[("fanout", "ws-node")] == 20.0 - 3 * per_rung
    assert estimate.first_max(doc) == {("fanout", "ws-node"): 250}


def test_parts_timed_with_the_same_command_use_that_time_else_a_stated_guess() -> None:
    """A roomshard-only part takes its earlier elapsed time when its command is unchanged."""
    part = extras.QUICK_EXTRAS[0]
    doc = {"runs": [], "extras": {part.name: {"command": part.command, "elapsed_seconds": 17.0}}}
    rows = {name: (secs, basis) for name, secs, basis in estimate.estimate(QUICK, doc)}
    assert rows[part.name] == (17.0, "timed in the earlier file")
    rows = {name: (secs, basis) for name, secs, basis in estimate.estimate(FULL, doc)}
    assert rows["pause"][1].startswith("guess: ")
    assert all(e.command in estimate.GUESSES for e in extras.FULL_EXTRAS)
