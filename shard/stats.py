"""The shard's plain counters, bumped on the hot path and read by /metrics at scrape time.

A prometheus ``Counter.inc`` takes a lock, too costly once per delivery: the
hot path adds to these ints and :mod:`shard.metrics` turns them into metrics
when scraped.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Stats:
    messages_in: int = 0  # data frames received from clients
    messages_out: int = 0  # messages sequenced and broadcast
    deliveries: int = 0  # frames appended for recipients by broadcasts
    rejected: int = 0  # frames answered with bad_request / too_long
    rate_limited: int = 0  # messages over the rate (error frames, then the one 4008 close)
    store_expired: int = 0  # messages the shard's retention runs deleted from the store
    store_refused: int = 0  # sends refused with unavailable: the message store's queue was full
    wire_budget_closes: int = 0  # connections closed with 4008 for frames or bytes
    slow_consumer_closes: int = 0
    ping_timeouts: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # close code -> count
