"""The capacity model's arithmetic (bench/capacity.py)."""

from __future__ import annotations

from bench import capacity
from bench.capacity import Assumptions, Inputs

INPUTS = Inputs(deliveries_per_cpu_second=80_000, max_deliveries_per_s=60_000,
                rss_per_connection=10 * 1024, directory_connects_per_s=2_000,
                directory_source="test")


def test_albs_hold_99_shards_in_the_first_and_100_in_the_others() -> None:
    """The directory's target group takes one slot of the first ALB only."""
    assert [capacity.albs_for(n) for n in (1, 99, 100, 199, 200, 1000)] == [1, 1, 2, 2, 3, 11]


def test_per_shard_plan_applies_headroom_and_caps_connections() -> None:
    """Deliveries get the CPU headroom; connections the memory budget or max_connections."""
    plan = capacity.per_shard(INPUTS, Assumptions(cpu_headroom=0.5, shard_memory_bytes=100 * 1024**2))
    assert plan.deliveries_per_s == 40_000
    assert plan.connections == 10_240
    assert capacity.per_shard(INPUTS, Assumptions()).connections == capacity.SHARD_MAX_CONNECTIONS


def test_a_million_connections_needs_the_larger_of_cpu_and_connection_shards() -> None:
    """33,333 publishes/s x 20 = 666,667 deliveries/s over 40,000 per shard is 17 shards."""
    rows = dict(capacity.connections_scenario(INPUTS, Assumptions(), 1_000_000).rows)
    assert rows["shards"].startswith("17 ")
    assert rows["shards for the connections"].startswith("10 ")


def test_room_creation_counts_two_writes_and_directory_replicas() -> None:
    """10k rooms/s is 20k writes/s and 10 replicas at 1,000 planned connects/s each."""
    rows = dict(capacity.rooms_created_scenario(INPUTS, Assumptions(), 10_000).rows)
    assert "20,000 writes/s" in rows["directory work"]
    assert rows["directory replicas, first member only"].startswith("10 ")
    assert rows["directory replicas, all members join"].startswith("200 ")
