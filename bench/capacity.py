"""The capacity model of ``docs/CAPACITY.md``: measured inputs in, plans out.

Pure arithmetic (no I/O). The inputs come from a ``bench/compare`` results
file (one shard on one core) and, for the directory, from
``docs/benchmarks/directory.md``; everything computed here is an
*extrapolation* and the rendered tables say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: AWS: target groups per ALB (hard limit); the default group's ALB also holds
#: the directory's target group (router_rules.model.DEFAULT_RESERVED_TARGET_GROUPS).
TARGET_GROUPS_PER_ALB = 100
DIRECTORY_TARGET_GROUPS = 1
#: ShardConfig.max_connections default.
SHARD_MAX_CONNECTIONS = 100_000


@dataclass(frozen=True)
class DirectoryMeasured:
    """CPU cost per connect measured by ``bench/directory_connect.py`` (docs/benchmarks/directory.md)."""

    cpu_us_per_connect: float  # directory CPU, existing room
    cpu_us_per_new_room: float  # directory CPU, connect that places a new room
    postgres_us_per_new_room: float  # PostgreSQL CPU for that connect
    source: str

    @property
    def connects_per_core(self) -> float:
        return 1e6 / self.cpu_us_per_connect

    @property
    def new_rooms_per_core(self) -> float:
        return 1e6 / self.cpu_us_per_new_room


#: Medians over the runs in docs/benchmarks/directory.md (2026-11-21,
#: `python bench/directory_connect.py --duration 10 --concurrency 8..16`, two
#: directories on PostgreSQL): 7 existing-room runs, 3 new-room runs.
DIRECTORY = DirectoryMeasured(
    cpu_us_per_connect=649, cpu_us_per_new_room=968, postgres_us_per_new_room=375,
    source=("docs/benchmarks/directory.md (`python bench/directory_connect.py`, medians of its "
            "runs: 649 µs of directory CPU per existing-room connect, 968 µs + 375 µs of "
            "PostgreSQL per new room)"))


@dataclass(frozen=True)
class Inputs:
    deliveries_per_cpu_second: float  # one shard, fan-out workload, at a low common rate
    max_deliveries_per_s: float  # one shard on one core (a lower bound when the load generator limited it)
    rss_per_connection: float  # bytes, idle, shard + directory
    directory: DirectoryMeasured = DIRECTORY


@dataclass(frozen=True)
class Assumptions:
    cpu_headroom: float = 0.5  # plan shards at half their measured CPU capacity
    shard_memory_bytes: float = 2 * 1024**3  # RAM a shard may use for connections
    room_size: int = 20
    seconds_between_messages: float = 30.0  # per user
    directory_headroom: float = 0.5


@dataclass(frozen=True)
class ShardPlan:
    deliveries_per_s: float  # planned, per shard core
    connections: int  # planned, per shard


def per_shard(i: Inputs, a: Assumptions) -> ShardPlan:
    by_memory = int(a.shard_memory_bytes / i.rss_per_connection)
    return ShardPlan(deliveries_per_s=i.deliveries_per_cpu_second * a.cpu_headroom,
                     connections=min(SHARD_MAX_CONNECTIONS, by_memory))


def albs_for(shards: int) -> int:
    """Load balancers for ``shards`` instances (one target group each)."""
    first = TARGET_GROUPS_PER_ALB - DIRECTORY_TARGET_GROUPS
    if shards <= first:
        return 1
    return 1 + math.ceil((shards - first) / TARGET_GROUPS_PER_ALB)


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: list[tuple[str, str]]


def connections_scenario(i: Inputs, a: Assumptions, connections: int) -> Scenario:
    plan = per_shard(i, a)
    publishes = connections / a.seconds_between_messages
    deliveries = publishes * a.room_size
    by_cpu = math.ceil(deliveries / plan.deliveries_per_s)
    by_conn = math.ceil(connections / plan.connections)
    shards = max(by_cpu, by_conn)
    return Scenario(f"{connections:,} connections", [
        ("traffic (assumed)", (f"rooms of {a.room_size}, one message per user every "
                              f"{a.seconds_between_messages:g} s: {publishes:,.0f} publishes/s, "
                              f"{deliveries:,.0f} deliveries/s")),
        ("shards for the deliveries", f"{by_cpu:,} ({deliveries:,.0f} / {plan.deliveries_per_s:,.0f})"),
        ("shards for the connections", f"{by_conn:,} ({connections:,} / {plan.connections:,})"),
        ("shards", f"{shards:,} (one core each), {albs_for(shards)} ALB(s)"),
        ("connection memory, whole cluster", f"{connections * i.rss_per_connection / 1024**3:,.1f} GiB"),
    ])


def shards_scenario(i: Inputs, a: Assumptions, shards: int) -> Scenario:
    plan = per_shard(i, a)
    return Scenario(f"{shards:,} shards", [
        ("deliveries/s", (f"{shards * plan.deliveries_per_s:,.0f} "
                         f"({shards} x {plan.deliveries_per_s:,.0f}; no cross-shard traffic)")),
        ("connections", f"{shards * plan.connections:,} ({shards} x {plan.connections:,})"),
        ("ALBs", (f"{albs_for(shards)} (100 target groups per ALB, hard limit; the first also "
                 f"routes the directory, so it takes {TARGET_GROUPS_PER_ALB - DIRECTORY_TARGET_GROUPS} shards)")),
    ])


def rooms_created_scenario(i: Inputs, a: Assumptions, rooms_per_s: int) -> Scenario:
    d = i.directory
    new_planned = d.new_rooms_per_core * a.directory_headroom
    join_planned = d.connects_per_core * a.directory_headroom
    first = math.ceil(rooms_per_s / new_planned)
    others = math.ceil(rooms_per_s * (a.room_size - 1) / join_planned)
    pg_cores = rooms_per_s * d.postgres_us_per_new_room / 1e6
    return Scenario(f"{rooms_per_s:,} rooms/s created", [
        ("directory work", (f"each new room is one connect that places it (an insert) and one "
                           f"shard open call (an update): {2 * rooms_per_s:,} writes/s")),
        ("directory replicas (one core each) for the first member",
         f"{first:,} ({rooms_per_s:,} new-room connects/s / {new_planned:,.0f} planned per replica)"),
        (f"+ replicas for the other {a.room_size - 1} members joining",
         f"{others:,} ({rooms_per_s * (a.room_size - 1):,} connects/s / {join_planned:,.0f})"),
        ("PostgreSQL CPU for the placements", (f"{pg_cores:,.1f} cores ({d.postgres_us_per_new_room:g} µs "
                                              "each; the shard open calls come on top)")),
        ("per-replica rates used", (f"{d.new_rooms_per_core:,.0f} new rooms/s and "
                                   f"{d.connects_per_core:,.0f} connects/s per directory core, at "
                                   f"{a.directory_headroom:.0%}, derived from {d.source}")),
    ])


def reconnect_scenario(i: Inputs, a: Assumptions, seconds: float = 10.0) -> Scenario:
    """A shard restarts: all its clients ask the directory again at once."""
    plan = per_shard(i, a)
    rate = plan.connections / seconds
    replicas = math.ceil(rate / (i.directory.connects_per_core * a.directory_headroom))
    return Scenario("one full shard reconnecting", [
        ("connects", f"{plan.connections:,} within {seconds:g} s = {rate:,.0f} connects/s"),
        ("directory replicas to absorb it", (f"{replicas:,} (one core each, at "
                                            f"{a.directory_headroom:.0%} of "
                                            f"{i.directory.connects_per_core:,.0f}/s)")),
    ])
