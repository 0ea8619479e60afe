"""The per-app state every route reads: built in the lifespan, stored on ``app.state.ctx``.

Nothing here is global: two apps in one process have two contexts. The
operations over the whole directory (``directory.ops.drain``,
``directory.ops.rebalance``) receive this object too; the move driver
(``mover``) is built from the parts it uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from directory.db.store import Store
from directory.domain.auth import ClientAuth
from directory.domain.budget import CreateBudget
from directory.metrics import Metrics
from directory.ops.failover import Failover
from directory.ops.mover import Mover
from directory.shards import ShardClient
from roomshard.config import DirectoryConfig
from roomshard.store.messages import MessageStore
from roomshard.wire.tickets import Signer


@dataclass
class Directory:
    cfg: DirectoryConfig
    clock: Callable[[], float]
    store: Store
    signer: Signer
    shards: ShardClient
    metrics: Metrics
    client_auth: ClientAuth
    admin_token: bytes
    mover: Mover
    failover: Failover
    # The server API's bearer keys (ROOMSHARD_API_KEYS); the admin token works too.
    api_keys: tuple[bytes, ...] = ()
    # The message store the history API reads (None: ask the room's owner).
    messages: MessageStore | None = None
    # Room creations per user, and per client address (0: off, the default).
    create_budget: CreateBudget = field(default_factory=lambda: CreateBudget(0))
    create_budget_by_address: CreateBudget = field(default_factory=lambda: CreateBudget(0))
    # When this replica started serving, or last came back from a stalled
    # event loop (``directory.app.watch_stalls``): see :meth:`replace_after`.
    awake_since: float = 0.0

    def replace_after(self, now: float) -> float:
        """The ``down_after`` to use when re-placing rooms off an instance that seems down.

        A replica that has just started (a deploy, a crash) has not had the
        chance to hear from the shards yet: every instance's last heartbeat
        in the database is as old as the outage. For ``down_after`` seconds
        after its start it re-places no room for lack of a heartbeat (the
        shards retry their heartbeats within a fraction of a second), so a
        directory restart or stall longer than ``down_after`` never makes it
        place rooms elsewhere while their shards are alive.
        """
        if now - self.awake_since < self.cfg.down_after:
            return math.inf
        return self.cfg.down_after
