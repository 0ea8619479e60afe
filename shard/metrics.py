"""Prometheus metrics of one shard, read from plain counters at scrape time.

The hot path only bumps ints on :class:`shard.stats.Stats` (a prometheus
``Counter.inc`` takes a lock, too costly once per delivery); a custom
collector on a per-server registry turns them into metrics when ``/metrics``
is scraped, from the sources it is given (:class:`MetricsSources`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from roomshard.linger import LingerPool
from roomshard.store.commit import GroupCommit
from shard.connection import Connection
from shard.live_rooms import LiveRooms
from shard.stats import Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MetricsSources:
    """What /metrics reads, at scrape time."""

    instance: str
    stats: Stats
    live_rooms: LiveRooms
    sockets: Collection[Connection]  # every WebSocket, admitted or not
    lingering: LingerPool
    ready: Callable[[], bool]
    commit: GroupCommit[Any] | None = None  # with a message store


class _ShardCollector(Collector):
    def __init__(self, sources: MetricsSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        st = s.stats
        inst = s.instance
        joined = sum(lr.connection_count() for lr in s.live_rooms.rooms.values())
        yield _gauge("roomshard_shard_connections", "WebSocket connections joined to a room", inst, joined)
        yield _gauge("roomshard_shard_sockets", "WebSocket connections incl. not yet admitted", inst,
                     len(s.sockets))
        yield _gauge("roomshard_shard_rooms", "rooms in memory", inst, len(s.live_rooms))
        yield _gauge("roomshard_shard_ready", "1 when registered and holding a lease", inst,
                     1 if s.ready() else 0)
        depth = sum(c.pending_bytes + (c.transport.get_write_buffer_size() if c.transport else 0)
                    for c in s.sockets if not c.closed)
        yield _gauge("roomshard_shard_send_queue_bytes", "bytes waiting to be written to clients",
                     inst, depth)
        for name, doc, value in (
            ("messages_in", "data frames received from clients", st.messages_in),
            ("messages_out", "messages sequenced and broadcast", st.messages_out),
            ("deliveries", "message/presence frames queued for recipients", st.deliveries),
            ("frames_rejected", "frames refused with bad_request or too_long", st.rejected),
            ("rate_limit_hits", "messages over the rate limit (rate_limited errors, 4008 closes)",
             st.rate_limited),
            ("wire_budget_closes", "connections closed with 4008 over the wire budget",
             st.wire_budget_closes),
            ("slow_consumer_closes", "connections closed with 4009", st.slow_consumer_closes),
            ("ping_timeouts", "connections closed for not answering a ping", st.ping_timeouts),
        ):
            yield _counter(name, doc, inst, value)
        budget = s.live_rooms.history_budget
        yield _gauge("roomshard_shard_history_bytes",
                     "bytes of message history in memory, every room together", inst, budget.total)
        shed = CounterMetricFamily("roomshard_shard_history_shed",
                                   "messages dropped from memory for the shard-wide history bound",
                                   labels=["instance"])
        shed.add_metric([inst], budget.shed)
        yield shed
        lingering = s.lingering
        yield _gauge("roomshard_shard_lingering_connections",
                     "closed connections whose late input is read and dropped", inst,
                     lingering.active)
        ends = CounterMetricFamily("roomshard_shard_linger_ends",
                                   "lingering closes by how they ended (fin, quiet, time, bytes: "
                                   "as bounded; full: closed at once, too many lingering)",
                                   labels=["instance", "how"])
        for how, n in lingering.ends.items():
            ends.add_metric([inst, how], n)
        yield ends
        dropped = CounterMetricFamily("roomshard_shard_linger_dropped_bytes",
                                      "bytes read and dropped from closed connections",
                                      labels=["instance"])
        dropped.add_metric([inst], lingering.dropped_bytes)
        yield dropped
        if s.commit is not None:
            yield from _store_metrics(inst, st, s.commit)
        refused = CounterMetricFamily("roomshard_shard_refused", "admissions refused, by close code",
                                      labels=["instance", "code"])
        for code, n in sorted(st.refused.items()):
            refused.add_metric([inst, str(int(code))], n)
        yield refused


def _gauge(name: str, doc: str, instance: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["instance"])
    g.add_metric([instance], value)
    return g


class ShardMetrics:
    def __init__(self, sources: MetricsSources) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ShardCollector(sources))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _counter(name: str, doc: str, inst: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(f"roomshard_shard_{name}", doc, labels=["instance"])
    c.add_metric([inst], value)
    return c


def _store_metrics(inst: str, st: Stats, commit: GroupCommit[Any]) -> Iterator[Metric]:
    """The message store's group commit (only with ``ROOMSHARD_HISTORY_URL``)."""
    for name, doc, value in (
        ("store_batches", "batches written to the message store (one transaction each)",
         commit.batches),
        ("store_messages", "messages written to the message store", commit.items),
        ("store_failures", "failed writes to the message store (retried)", commit.failures),
        ("store_rejections", "batches the store refused for good (their rooms closed, 1013)",
         commit.rejections),
        ("store_refused", "sends refused with unavailable: too much waiting for the store",
         st.store_refused),
        ("store_expired", "messages past ROOMSHARD_HISTORY_RETENTION deleted from the store",
         st.store_expired),
    ):
        yield _counter(name, doc, inst, value)
    for name, doc, buckets in (
        ("roomshard_shard_store_write_seconds",
         "time to write one batch to the message store (one transaction)", commit.write_seconds),
        ("roomshard_shard_store_batch_size", "messages per batch written to the message store",
         commit.batch_sizes),
    ):
        h = HistogramMetricFamily(name, doc, labels=["instance"])
        h.add_metric([inst], buckets.cumulative(), sum_value=buckets.sum)
        yield h
    yield _gauge("roomshard_shard_store_waiting_messages",
                 "messages waiting for the message store (queued and being written)", inst,
                 commit.waiting_items)
    yield _gauge("roomshard_shard_store_waiting_bytes",
                 "bytes of messages waiting for the message store", inst, commit.waiting_bytes)
    yield _gauge("roomshard_shard_store_oldest_wait_seconds",
                 "how long the oldest message waiting for the store has waited", inst,
                 commit.oldest_age())
