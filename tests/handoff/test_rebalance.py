"""The rebalance and drain planners: balance, move counts against the lower bound, limits."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from directory.domain.rebalance import plan, plan_drain


def balanced_cluster(seed: int, n_inst: int, n_rooms: int,
                     sigma: float = 1.0) -> list[dict[str, Any]]:
    """Rooms of lognormal weight placed like the directory does: each on the least loaded."""
    rnd = random.Random(seed)
    heap = [(0, f"i{j}") for j in range(1, n_inst + 1)]
    weights = sorted((1 + int(rnd.lognormvariate(1.0, sigma)) for _ in range(n_rooms)),
                     reverse=True)
    rooms = []
    for k, w in enumerate(weights):
        load, inst = heapq.heappop(heap)
        rooms.append({"room": f"r{k}", "instance": inst, "weight": w})
        heapq.heappush(heap, (load + w, inst))
    rnd.shuffle(rooms)
    return rooms


def actives(n: int, capacity: int = 100) -> list[dict[str, Any]]:
    return [{"id": f"i{j}", "capacity": capacity, "state": "active"} for j in range(1, n + 1)]


def apply(rooms: list[dict[str, Any]], moves: list[dict[str, str]]) -> dict[str, float]:
    where = {r["room"]: r["instance"] for r in rooms}
    for m in moves:
        assert where[m["room"]] == m["from"]
        where[m["room"]] = m["to"]
    load: Counter[str] = Counter()
    for r in rooms:
        load[where[r["room"]]] += r["weight"]
    return load


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_inst,n_rooms", [(5, 600), (20, 4000), (60, 12000)])
def test_adding_an_empty_instance_moves_near_the_lower_bound(seed: int, n_inst: int,
                                                              n_rooms: int) -> None:
    """After adding an empty instance: at most 1.2x the lower bound, max/mean load <= 1.1."""
    rooms = balanced_cluster(seed, n_inst, n_rooms)
    out = plan(actives(n_inst + 1), rooms, max_moves=10_000)
    n, bound = len(out["moves"]), out["lower_bound"]
    assert bound > 0 and bound <= n <= 1.2 * bound, (n, bound)
    load = apply(rooms, out["moves"])
    assert max(load.values()) / (sum(load.values()) / (n_inst + 1)) <= 1.1
    assert out["balanced"] and all(m["to"] == f"i{n_inst + 1}" for m in out["moves"])


def test_result_shape_and_after_matches_the_moves() -> None:
    """The dry-run result has moves, before, after, lower_bound; after is the moves applied."""
    rooms = balanced_cluster(1, 4, 400)
    out = plan(actives(5), rooms)
    assert {"moves", "before", "after", "lower_bound", "balanced", "tolerance"} <= set(out)
    assert list(out["before"]) == ["i1", "i2", "i3", "i4", "i5"]
    assert set(out["before"]["i1"]) == {"load", "share", "ratio"}
    assert out["before"]["i5"]["load"] == 0 and out["before"]["i5"]["ratio"] == 0
    load = apply(rooms, out["moves"])
    for inst, stats in out["after"].items():
        assert stats["load"] == load[inst]
        assert 0.9 <= stats["ratio"] <= 1.1
    assert all(set(m) == {"room", "from", "to"} for m in out["moves"])


def test_max_moves_caps_the_plan() -> None:
    """max_moves bounds the plan even when balance needs more."""
    rooms = balanced_cluster(2, 10, 2000)
    full = plan(actives(11), rooms, max_moves=10_000)
    assert len(full["moves"]) > 5
    capped = plan(actives(11), rooms, max_moves=5)
    assert len(capped["moves"]) == 5 and not capped["balanced"]
    assert capped["moves"] == full["moves"][:5]
    assert plan(actives(11), rooms, max_moves=0)["moves"] == []


def test_only_active_instances_give_or_take_rooms() -> None:
    """Draining, disabled and down instances and their rooms are left out entirely."""
    rooms = [{"room": f"a{k}", "instance": "i1", "weight": 1} for k in range(30)]
    rooms += [{"room": f"d{k}", "instance": "i3", "weight": 1} for k in range(50)]
    rooms += [{"room": f"x{k}", "instance": "i5", "weight": 1} for k in range(50)]
    instances = [
        {"id": "i1", "capacity": 10, "state": "active"},
        {"id": "i2", "capacity": 10, "state": "active"},
        {"id": "i3", "capacity": 10, "state": "draining"},
        {"id": "i4", "capacity": 10, "state": "disabled"},
        {"id": "i5", "capacity": 10, "state": "down"},
    ]
    out = plan(instances, rooms)
    assert set(out["before"]) == {"i1", "i2"}
    assert len(out["moves"]) == 14  # 30 -> 16/14 is within 10% of 15 each
    assert {(m["from"], m["to"]) for m in out["moves"]} == {("i1", "i2")}


def test_shares_follow_capacity() -> None:
    """An instance with twice the capacity ends with about twice the load."""
    rooms = [{"room": f"r{k}", "instance": "i1", "weight": 1} for k in range(300)]
    instances = [{"id": "i1", "capacity": 10, "state": "active"},
                 {"id": "i2", "capacity": 20, "state": "active"}]
    out = plan(instances, rooms, max_moves=1000)
    assert out["after"]["i2"]["share"] == 200.0
    assert 0.9 <= out["after"]["i1"]["ratio"] <= 1.1 and 0.9 <= out["after"]["i2"]["ratio"] <= 1.1


def test_a_room_too_big_to_fit_anywhere_is_left_alone() -> None:
    """A single huge room that no band can hold: the plan stops, reports unbalanced."""
    rooms = [{"room": "huge", "instance": "i1", "weight": 1000}]
    rooms += [{"room": f"r{k}", "instance": "i2", "weight": 1} for k in range(10)]
    out = plan(actives(3), rooms)
    assert not out["balanced"] and all(m["room"] != "huge" for m in out["moves"])


def test_balanced_cluster_needs_no_moves() -> None:
    """A cluster already within tolerance gets an empty plan with bound 0."""
    rooms = balanced_cluster(3, 8, 1600)
    out = plan(actives(8), rooms)
    assert out["moves"] == [] and out["lower_bound"] == 0 and out["balanced"]


def test_bad_arguments_are_refused() -> None:
    """Negative tolerance or max_moves and non-positive weights raise ValueError."""
    with pytest.raises(ValueError):
        plan(actives(2), [], tolerance=-0.1)
    with pytest.raises(ValueError):
        plan(actives(2), [{"room": "r", "instance": "i1", "weight": 0}])


cluster_st = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 40)),  # (instance number, weight)
    min_size=1, max_size=120)
states_st = st.lists(st.sampled_from(["active", "active", "draining", "down", "disabled"]),
                     min_size=6, max_size=6)


@settings(max_examples=200, deadline=None)
@given(cluster=cluster_st, states=states_st, caps=st.lists(st.integers(1, 5), min_size=6,
                                                           max_size=6),
       tol=st.sampled_from([0.05, 0.1, 0.25]), max_moves=st.integers(0, 60))
def test_plans_are_always_legal(cluster: list[tuple[int, int]], states: list[str],
                                caps: list[int], tol: float, max_moves: int) -> None:
    """Any input: moves only between active instances, each room once, bound never beaten."""
    instances = [{"id": f"i{j + 1}", "capacity": caps[j], "state": states[j]} for j in range(6)]
    rooms = [{"room": f"r{k}", "instance": f"i{i}", "weight": w}
             for k, (i, w) in enumerate(cluster)]
    out = plan(instances, rooms, tolerance=tol, max_moves=max_moves)
    active = {i["id"] for i in instances if i["state"] == "active"}
    assert len(out["moves"]) <= max_moves
    assert len({m["room"] for m in out["moves"]}) == len(out["moves"])
    assert all(m["from"] in active and m["to"] in active and m["from"] != m["to"]
               for m in out["moves"])
    load = apply(rooms, out["moves"])
    for inst, stats in out["after"].items():
        assert stats["load"] == load[inst]
    if out["balanced"]:
        assert len(out["moves"]) >= out["lower_bound"]


def test_drain_plan_sends_largest_rooms_first_to_the_least_loaded() -> None:
    """plan_drain orders by weight and spreads over active instances only."""
    instances = [
        {"id": "i1", "capacity": 10, "state": "draining", "load": 100},
        {"id": "i2", "capacity": 10, "state": "active", "load": 0},
        {"id": "i3", "capacity": 10, "state": "active", "load": 5},
        {"id": "i4", "capacity": 10, "state": "down", "load": 0},
    ]
    rooms = [{"room": "s", "weight": 1}, {"room": "big", "weight": 9}, {"room": "m", "weight": 4}]
    out = plan_drain(instances, rooms, "i1")
    assert [o["room"] for o in out] == ["big", "m", "s"]
    assert [o["to"] for o in out] == ["i2", "i3", "i2"]  # 9 vs 9: lowest number wins
    with pytest.raises(ValueError):
        plan_drain(instances[:1], rooms, "i1")
