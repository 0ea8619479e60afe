"""Plug points for live moves, drains and rebalancing.

The directory's routes validate the request (ids, 404s, the contract's 409s)
and then call these functions, which delegate to the live-move modules
below when those modules are installed, and answer 501
``not_implemented`` otherwise. The modules implement::

    # directory/move_driver.py
    async def start(ctx: Directory) / async def stop(ctx: Directory)
        # the app's lifespan: the driver and its recovery loop for orphaned moves
    async def move_room(ctx: Directory, *, room: str, source: str, to: str) -> dict
        # -> the contract's move report; raises directory.errors.ApiError (409 ...)

    # directory/drain.py
    async def drain_instance(ctx: Directory, *, instance: str, reason: str,
                             parallelism: int = ...) -> dict
        # live-moves every room off ``instance`` then marks it disabled with
        # state_reason ``reason`` ("admin" or "shutdown"); -> a DrainReport-shaped dict

    # directory/rebalance_driver.py
    async def rebalance(ctx: Directory, *, dry_run: bool, max_moves: int) -> dict
        # -> {"moves": [{"room", "from", "to"}], "before": {...}, "after": {...}}
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

from directory.context import Directory
from directory.errors import NotImplementedYet


def _plugin(module: str, attr: str) -> Callable[..., Awaitable[dict[str, Any]]] | None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None
    fn = getattr(mod, attr, None)
    return fn if callable(fn) else None


def has_drain() -> bool:
    return _plugin("directory.drain", "drain_instance") is not None


async def move_room(ctx: Directory, *, room: str, source: str, to: str) -> dict[str, Any]:
    fn = _plugin("directory.move_driver", "move_room")
    if fn is None:
        raise NotImplementedYet("not_implemented", "live room moves are not available in this build")
    return await fn(ctx, room=room, source=source, to=to)


async def drain_instance(ctx: Directory, *, instance: str, reason: str,
                         parallelism: int | None = None) -> dict[str, Any]:
    fn = _plugin("directory.drain", "drain_instance")
    if fn is None:
        raise NotImplementedYet("not_implemented", "draining is not available in this build")
    extra = {} if parallelism is None else {"parallelism": parallelism}
    return await fn(ctx, instance=instance, reason=reason, **extra)


async def rebalance(ctx: Directory, *, dry_run: bool, max_moves: int) -> dict[str, Any]:
    fn = _plugin("directory.rebalance_driver", "rebalance")
    if fn is None:
        raise NotImplementedYet("not_implemented", "rebalancing is not available in this build")
    return await fn(ctx, dry_run=dry_run, max_moves=max_moves)


async def start(ctx: Directory) -> None:
    """Called by the app's lifespan once the context exists."""
    fn = _plugin("directory.move_driver", "start")
    if fn is not None:
        await fn(ctx)


async def stop(ctx: Directory) -> None:
    fn = _plugin("directory.move_driver", "stop")
    if fn is not None:
        await fn(ctx)
