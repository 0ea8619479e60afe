"""The capacity model's arithmetic (bench/capacity.py)."""

from __future__ import annotations

from bench import capacity
from bench.capacity import Assumptions, Inputs

DIRECTORY = capacity.DirectoryMeasured(cpu_us_per_connect=500, cpu_us_per_new_room=1000,
                                       postgres_us_per_new_room=400, source="test")
INPUTS = Inputs(deliveries_per_cpu_second=80_000, max_deliveries_per_s=60_000,
                rss_per_connection=10 * 1024, directory=DIRECTORY)


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


def test_room_creation_counts_writes_replicas_and_database_cpu() -> None:
    """10k rooms/s: 20k writes/s, 20 replicas at 500 planned new rooms/s, 4 PostgreSQL cores."""
    rows = dict(capacity.rooms_created_scenario(INPUTS, Assumptions(), 10_000).rows)
    assert "20,000 writes/s" in rows["directory work"]
    assert rows["directory replicas (one core each) for the first member"].startswith("20 ")
    assert rows["+ replicas for the other 19 members joining"].startswith("190 ")
    assert rows["PostgreSQL CPU for the placements"].startswith("4.0 cores")


def test_a_restarted_shard_reconnecting_in_10_s_sizes_the_directory() -> None:
    """100,000 clients in 10 s at 1,000 planned connects/s per replica is 10 replicas."""
    rows = dict(capacity.reconnect_scenario(INPUTS, Assumptions()).rows)
    assert rows["directory replicas to absorb it"].startswith("10 ")
