"""A shard process's death, seen at once: its control channel closes, a probe proves it.

Each shard holds one long-lived request open to a directory, its control
channel (``GET /v1/internal/instances/{iN}/channel?boot_id=``, docs/HANDOFF.md).
When the shard's side of it closes, the directory checks the shard's
address at once (:meth:`ShardClient.probe`):

- nothing listens there (connection refused), or a process with another
  ``boot_id`` answers ``/healthz``: the process that held the channel is gone.
  The instance is parked (``disabled``, reason ``died``, reported ``down``),
  if that process is still the one registered and serves rooms; its rooms are
  re-placed at once, each with a higher epoch (a connect that comes first
  re-places its room itself, as for any dead owner), and a new process of
  the instance re-activates it with its first heartbeat;
- the same ``boot_id`` answers: it lives (the channel broke on the way, or
  the shard reopens it): nothing happens;
- no answer within the probe's bound, three times (a partition, a stopped
  process, a machine gone without a FIN): nothing is proven, and the lease
  and ``down_after`` decide as they always did.

Why this never makes two owners: rooms leave an instance here only when the
process that owned them cannot serve anything any more (it is not running),
and the parking is conditional on that very process (``boot_id``) still being
the registered one, so a restarted process is never parked for its
predecessor's death. A closed channel alone proves nothing (a proxy's idle
timeout, a directory replica restarting), which is why the probe decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from directory.db.store import Store
from directory.metrics import Metrics
from directory.shards import GONE, UNKNOWN, ShardClient

log = logging.getLogger("roomshard.directory.failover")

#: A check that proves nothing is tried again this often, this far apart (a moment of a
#: loaded directory or network); what stays unproven is left to the lease and down_after.
PROBE_TRIES, PROBE_PAUSE_S = 3, 0.5


class Failover:
    """Checks closed control channels and parks the instances whose process is gone."""

    def __init__(self, store: Store, shards: ShardClient, metrics: Metrics,
                 clock: Callable[[], float], *, down_after: float) -> None:
        self.store = store
        self.shards = shards
        self.metrics = metrics
        self.clock = clock
        self.down_after = down_after  # for choosing the rooms' new owners
        self.stopping = False  # this directory is shutting down: its own closes prove nothing
        # One future per open channel: resolved by stop() so that each ends its stream.
        self.channels: set[asyncio.Future[None]] = set()

    def stop(self) -> None:
        """This directory stops: end every channel (the shards open new ones elsewhere)."""
        self.stopping = True
        for stop in list(self.channels):
            if not stop.done():
                stop.set_result(None)

    async def channel_closed(self, instance: str, boot_id: str) -> bool:
        """The shard's side of ``instance``'s channel (held by ``boot_id``) closed; True
        when its process was found gone and the instance parked. A database that fails
        meanwhile proves nothing either: logged, and the lease and down_after decide."""
        if self.stopping:
            return False
        try:
            return await self._check(instance, boot_id)
        except Exception as exc:  # noqa: BLE001 - the database: one line, no traceback
            log.warning("%s's control channel closed; checking it failed (%r): the lease and "
                        "down_after decide", instance, exc)
            return False

    async def _check(self, instance: str, boot_id: str) -> bool:
        started = time.perf_counter()
        row = await self.store.get_instance(instance)
        if row is None or row["boot_id"] != boot_id:
            return False  # another process registered meanwhile: its channel is its own
        found = UNKNOWN
        for attempt in range(PROBE_TRIES):
            if attempt:
                await asyncio.sleep(PROBE_PAUSE_S)
            found = await self.shards.probe(row["internal_url"], boot_id)
            if found != UNKNOWN:
                break
        self.metrics.channel_checks.labels(found).inc()
        if found != GONE:
            (log.warning if found == UNKNOWN else log.info)(
                "%s's control channel closed; the check found it %s: nothing changes (the "
                "lease and down_after decide)", instance, found)
            return False
        parked = await self.store.park_dead(instance, boot_id)
        if parked is None:
            return False  # it left cleanly, or a new process took over meanwhile
        took = time.perf_counter() - started
        self.metrics.failovers.labels("channel_closed").inc()
        self.metrics.failover_detect.observe(took)
        seen = parked["last_heartbeat"]
        log.warning("%s is down: its process (boot %s) ended (control channel closed, nothing "
                    "of it answers at %s); last heartbeat %.1f s ago; found in %.0f ms; "
                    "re-placing its %d rooms", instance, boot_id, row["internal_url"],
                    self.clock() - seen if seen is not None else float("nan"), took * 1000,
                    parked["rooms_assigned"])
        # At once, not on each room's next connect: its clients, all reconnecting now,
        # find serving owners (answered at once) instead of one re-placement each.
        begun = time.perf_counter()
        try:
            moved = await self.store.replace_all(instance, now=self.clock(),
                                                 down_after=self.down_after)
        except Exception as exc:  # noqa: BLE001 - the connects re-place them one by one
            log.warning("%s: re-placing its rooms failed (%r); each is re-placed by its next "
                        "connect", instance, exc)
            return True
        self.metrics.placements.labels("replaced").inc(moved)
        log.warning("%s: %d rooms re-placed in %.0f ms (the others by their own connects)",
                    instance, moved, (time.perf_counter() - begun) * 1000)
        return True
