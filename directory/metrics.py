"""Prometheus metrics, one registry per app (several apps may share a test process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("roomshard_directory_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("roomshard_directory_request_seconds",
                                 "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.connects = Counter("roomshard_directory_connects",
                                "client connects by result (ok, or the error code)",
                                ["result"], registry=self.registry)
        # Read from the HTTP edge's ConnectAdmission (directory.main); 0 in-process.
        self.connects_in_flight = Gauge("roomshard_directory_connects_in_flight",
                                        "connects read and not answered yet (bounded by "
                                        "ROOMSHARD_CONNECTS_IN_FLIGHT)", registry=self.registry)
        self.answered_at_once = Counter("roomshard_directory_connects_answered_at_once",
                                        "connects answered inside the HTTP read, from a "
                                        "lookup that needed no wait (SQLite in-process; "
                                        "PostgreSQL: the room cache)", registry=self.registry)
        self.room_cache_live = Gauge("roomshard_directory_room_cache_live",
                                     "1 while the PostgreSQL room cache listens for changes "
                                     "(and is used)", registry=self.registry)
        self.room_cache_rooms = Gauge("roomshard_directory_room_cache_rooms",
                                      "rooms in the PostgreSQL room cache",
                                      registry=self.registry)
        self.route_checks = Counter("roomshard_directory_route_checks",
                                    "checks of pending instances' routes through the load "
                                    "balancer, by result (active, not_routed, no_address)",
                                    ["result"], registry=self.registry)
        self.placements = Counter("roomshard_directory_placements",
                                  "room assignments made: new rooms and re-placements",
                                  ["kind"], registry=self.registry)
        self.moves = Counter("roomshard_directory_moves", "live moves finished, by outcome",
                             ["outcome"], registry=self.registry)
        self.move_pause = Histogram("roomshard_directory_move_pause_seconds",
                                    "freeze request to commit of each committed move",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.handoff_batches = Counter("roomshard_directory_handoff_batches",
                                       "batched move steps sent (shard requests, transactions)",
                                       ["step"], registry=self.registry)
        self.handoff_batch_items = Counter("roomshard_directory_handoff_batch_items",
                                           "rooms carried by the batched move steps",
                                           ["step"], registry=self.registry)
        self.rooms_removed = Counter("roomshard_directory_rooms_removed",
                                     "rooms removed because no member joined them within "
                                     "room_unused_ttl", registry=self.registry)
        self.creates_refused = Counter("roomshard_directory_room_creates_refused",
                                       "connects refused with 429 for the room-creation budget, "
                                       "by budget (user, address)", ["budget"],
                                       registry=self.registry)
        # Label lookups cost more than the increments; cache the children.
        self.published = Counter("roomshard_directory_published",
                                 "messages the server API delivered to their rooms",
                                 registry=self.registry)
        self.channel_checks = Counter("roomshard_directory_channel_checks",
                                      "shard processes checked (a closed control channel, a "
                                      "client's hint), by what the check found (gone, alive, "
                                      "unknown)", ["found"], registry=self.registry)
        self.suspect_connects = Counter("roomshard_directory_suspect_connects",
                             "connects for the rooms of a shard that may have died: checked "
                             "(a client's unreachable hint started a check), joined (a hint "
                             "while one ran), held (no hint, one ran), limited (a hint "
                             "within 2 s of the last)", ["outcome"], registry=self.registry)
        self.failovers = Counter("roomshard_directory_failovers",
                                 "shard processes found dead and parked (their rooms "
                                 "re-placed at once), by evidence (channel_closed, "
                                 "client_hint)", ["evidence"],
                                 registry=self.registry)
        self.failover_detect = Histogram("roomshard_directory_failover_detect_seconds",
                                         "a dead shard's check (its control channel closing, "
                                         "a client's hint) to its instance parked", buckets=LATENCY_BUCKETS,
                                         registry=self.registry)
        self._req: dict[tuple[str, int], tuple[object, object]] = {}
        self.connect_ok = self.connects.labels("ok")

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        pair = self._req.get(key)
        if pair is None:
            pair = (self.requests.labels(route, str(status)), self.latency.labels(route))
            self._req[key] = pair
        pair[0].inc()  # type: ignore[attr-defined]
        pair[1].observe(seconds)  # type: ignore[attr-defined]

    def batch(self, step: str, items: int) -> None:
        self.handoff_batches.labels(step).inc()
        self.handoff_batch_items.labels(step).inc(items)

    def watch_cache(self, cache: Any) -> None:
        """Report a room cache (``directory.db.room_cache.RoomCache``) when scraped."""
        self.room_cache_live.set_function(lambda: float(cache.live))
        self.room_cache_rooms.set_function(lambda: float(len(cache)))

    def render(self) -> bytes:
        return generate_latest(self.registry)
