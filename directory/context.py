"""The per-app state every route reads: built in the lifespan, stored on ``app.state.ctx``.

Nothing here is global: two apps in one process have two contexts. The
handoff modules (``directory.moves``, ``directory.rebalance``) receive this
object too: ``store`` for SQL (``store.engine``, ``store.write()``,
``directory.store.reassign``), ``shards.http`` for calls to shards (with
``shards`` headers), ``signer`` for cluster tokens, ``clock`` for ``now``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from directory.auth import ClientAuth
from directory.metrics import Metrics
from directory.shards import ShardClient
from directory.store import Store
from roomshard.config import DirectoryConfig
from roomshard.tickets import Signer


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
    # Per-app state of optional modules (the live-move driver: "mover").
    extensions: dict[str, Any] = field(default_factory=dict)
