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

A client that cannot reach its room's shard may say so on its next connect
(``"unreachable": "iN"`` in the body): a hint, never proof. It starts the
same check (at most one per instance every ``HINT_EVERY_S``), and nothing
changes unless the probe proves the process gone.

While a check is under way the instance is *suspect* in this process
(:attr:`Failover.suspects`): a connect for one of its rooms waits for the
verdict (up to ``SUSPECT_HOLD_S``) and then answers the room's owner after
it, re-placed or not; past the hold it answers 503 with ``Retry-After``,
never the URL of a shard that may be dead.

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
import math
import time
from collections.abc import Callable

from directory.db.store import Store
from directory.metrics import Metrics
from directory.shards import GONE, UNKNOWN, ShardClient

log = logging.getLogger("roomshard.directory.failover")

_SAID = {"channel_closed": "its control channel closed",
         "client_hint": "a client could not reach it"}

#: A check that proves nothing is tried again this often, this far apart (a moment of a
#: loaded directory or network); what stays unproven is left to the lease and down_after.
PROBE_TRIES, PROBE_PAUSE_S = 3, 0.2
#: A client's hint starts at most one check per instance this often (a hint is cheap to
#: send; a live shard is probed at most this often for it).
HINT_EVERY_S = 2.0
#: How long a connect for a suspect instance's room waits for the verdict before it is
#: answered 503 with Retry-After (a dead process's check takes milliseconds).
SUSPECT_HOLD_S = 1.0


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
        # The instances being checked, each with its verdict (True: parked, rooms re-placed).
        self.suspects: dict[str, asyncio.Future[bool]] = {}
        self._evidence: dict[str, str] = {}  # instance -> what started its check
        self._hinted: dict[str, float] = {}  # instance -> when a hint last started a check
        self._checks: set[asyncio.Task[None]] = set()  # the checks under way, referenced

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
        # A hint's check may have begun first (a client's reconnect can beat the channel's
        # close to this process): the closed channel still gets its own if that one
        # proves nothing (it may have probed a process that was still exiting).
        pending = self.suspects.get(instance)
        if (pending is not None and self._evidence.get(instance) == "client_hint"
                and await asyncio.shield(pending)):
            return True
        return await asyncio.shield(self._start(instance, boot_id, "channel_closed"))

    def verdict(self, instance: str, *, hinted: bool = False) -> asyncio.Future[bool] | None:
        """The pending verdict on ``instance`` when it is suspect, else None.

        ``hinted``: a client said it cannot reach ``instance``, its room's
        current owner. That starts a check unless one is under way or a hint
        started one less than ``HINT_EVERY_S`` ago.
        """
        pending = self.suspects.get(instance)
        if pending is not None:
            self.metrics.suspect_connects.labels("joined" if hinted else "held").inc()
            return pending
        if not hinted:
            return None
        now = time.monotonic()
        if self.stopping or now - self._hinted.get(instance, -math.inf) < HINT_EVERY_S:
            self.metrics.suspect_connects.labels("limited").inc()
            return None
        self._hinted[instance] = now
        if len(self._hinted) > 4096:  # instance ids come from the database; bound it anyway
            self._hinted = {i: t for i, t in self._hinted.items() if now - t < HINT_EVERY_S}
        self.metrics.suspect_connects.labels("checked").inc()
        return self._start(instance, None, "client_hint")

    def _start(self, instance: str, boot_id: str | None, evidence: str) -> asyncio.Future[bool]:
        """Check ``instance`` (one check at a time); it is suspect until the verdict."""
        pending = self.suspects.get(instance)
        if pending is not None:
            return pending
        loop = asyncio.get_running_loop()
        verdict: asyncio.Future[bool] = loop.create_future()
        self.suspects[instance] = verdict
        self._evidence[instance] = evidence
        task = loop.create_task(self._decide(instance, boot_id, evidence, verdict))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)
        return verdict

    async def _decide(self, instance: str, boot_id: str | None, evidence: str,
                      verdict: asyncio.Future[bool]) -> None:
        parked = False
        try:
            parked = await self._check(instance, boot_id, evidence)
        except Exception as exc:  # noqa: BLE001 - the database: one line, no traceback
            log.warning("%s: checking it (%s) failed (%r): the lease and down_after decide",
                        instance, _SAID[evidence], exc)
        finally:
            del self.suspects[instance], self._evidence[instance]
            verdict.set_result(parked)

    async def _check(self, instance: str, boot_id: str | None, evidence: str) -> bool:
        started = time.perf_counter()
        row = await self.store.get_instance(instance)
        if row is None or (boot_id is not None and row["boot_id"] != boot_id):
            return False  # another process registered meanwhile: its channel is its own
        if boot_id is None:  # a client's hint: the registered process is the one to check
            boot_id = row["boot_id"]
            if not boot_id:
                return False  # it never said which process it is: nothing to compare
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
                "%s: checked (%s), found %s: nothing changes (the lease and down_after "
                "decide)", instance, _SAID[evidence], found)
            return False
        parked = await self.store.park_dead(instance, boot_id)
        if parked is None:
            return False  # it left cleanly, or a new process took over meanwhile
        took = time.perf_counter() - started
        self.metrics.failovers.labels(evidence).inc()
        self.metrics.failover_detect.observe(took)
        seen = parked["last_heartbeat"]
        log.warning("%s is down: its process (boot %s) ended (%s, nothing of it answers at "
                    "%s); last heartbeat %.1f s ago; found in %.0f ms; re-placing its %d rooms",
                    instance, boot_id, _SAID[evidence], row["internal_url"],
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
