"""Routable before active: a ``pending`` instance becomes ``active`` once its route works.

With ``ROOMSHARD_ROUTE_CHECK`` on, a shard's new process registers as
``pending`` (``directory.domain.instances``): no room goes there, because the
load balancer may not route ``/iN/room/`` to it yet (a rule still being
written, a target still registering, a Service without endpoints) and every
client sent there would get the load balancer's 404 or 503. Every directory
replica checks its pending instances every :data:`CHECK_EVERY_S`:

    GET {public_base, else ROOMSHARD_PUBLIC_URL}/iN/room/~probe

through the load balancer, exactly as a client's WebSocket would go. The
shard answers that path (``~`` is never in a room id, so no room can be
named so) with its instance id and ``boot_id``. Only an answer from that very
process (the registered ``boot_id``) makes the instance ``active``: an answer
from its predecessor, from another shard (a rule that points to the wrong
target) or from the load balancer itself (404, 502, 503) proves nothing, and
the instance stays pending, with a log line saying why (once per reason).
The change is a conditional update (still pending, still that process), so
replicas checking together change it once, and a newer process is never
activated by its predecessor's check.

A pending instance is never marked ``down`` for its route, only, like any
instance, when its heartbeats stop. An admin may set it ``active`` by hand.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from directory.db.store import Store
from directory.domain import placement
from directory.domain.instances import state_of
from directory.metrics import Metrics
from roomshard.wire.probe import probe_url, verdict

log = logging.getLogger("roomshard.directory.route_check")

#: How often a replica checks its pending instances, and the bound of one check.
CHECK_EVERY_S = 1.0
CHECK_TIMEOUT_S = 2.0
class RouteChecker:
    """Checks the pending instances' routes, every :data:`CHECK_EVERY_S`."""

    def __init__(self, store: Store, metrics: Metrics, *, public_url: str | None,
                 clock: Any, down_after: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.public_url = public_url
        self.clock = clock
        self.down_after = down_after
        self.http = httpx.AsyncClient(timeout=CHECK_TIMEOUT_S, transport=transport,
                                      follow_redirects=False)
        self._said: dict[str, str] = {}  # instance -> the last reason logged

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(CHECK_EVERY_S)
                try:
                    await self.check_all()
                except Exception as exc:  # noqa: BLE001 - the database is down: next round
                    log.warning("could not check the pending instances' routes: %s", exc)
        finally:
            await self.http.aclose()

    async def check_all(self) -> int:
        """One round; how many instances became active."""
        now = self.clock()
        rows = [r for r in await self.store.list_instances()
                if r["state"] == placement.PENDING
                and state_of(r, now=now, down_after=self.down_after) == placement.PENDING]
        done = await asyncio.gather(*(self.check(r) for r in rows))
        return sum(done)

    async def check(self, row: Any) -> bool:
        """Probe one pending instance; True when this made it active."""
        instance, boot_id = row["id"], row["boot_id"]
        base = row["public_base"] or self.public_url
        if base is None:
            self._say(instance, "it has no public_base and ROOMSHARD_PUBLIC_URL is not set: "
                                "there is no load balancer address to check its route at")
            self.metrics.route_checks.labels("no_address").inc()
            return False
        url = probe_url(base, instance)
        try:
            resp = await self.http.get(url)
            try:
                body = resp.json()
            except ValueError:
                body = None
            why = verdict(resp.status_code, body, instance=instance, boot_id=boot_id)
        except httpx.HTTPError as exc:
            why = f"{url} did not answer ({exc.__class__.__name__})"
        if why is not None:
            self._say(instance, f"{why} at {url}")
            self.metrics.route_checks.labels("not_routed").inc()
            return False
        if not await self.store.confirm_route(instance, boot_id):
            return False  # another replica did, or a newer process registered meanwhile
        self.metrics.route_checks.labels("active").inc()
        self._said.pop(instance, None)
        log.warning("%s is active: its route answers through the load balancer at %s",
                    instance, url)
        return True

    def _say(self, instance: str, why: str) -> None:
        if self._said.get(instance) != why:
            self._said[instance] = why
            log.warning("%s stays pending: %s", instance, why)
