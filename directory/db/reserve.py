"""Idle pooled connections kept at hand for the PostgreSQL hot path (``Store._raw``).

A checkout from SQLAlchemy's asyncio pool runs in a greenlet and costs more
CPU than the statement it serves (~105 us of CPU per checkout and lookup,
measured with 25 at once; ~32 us when the connection is already at hand).
So the hot path returns a connection here, not to the pool, while fewer than
``keep`` wait here, and takes one from here before it asks the pool. The
connections stay the pool's, counted against its limit (a connection kept
here is one the pool's other users wait for: ``keep`` is a third of it), and
the pool's invalidation still heals them:

* a statement that finds its connection dead invalidates it through the pool
  (with every older pooled one) and :meth:`ConnectionReserve.flush` hands
  back every kept one, so the retry gets a fresh connection from the pool;
* connections that waited here longer than ``idle_s`` go back to the pool
  (which recycles them by age), so a quiet directory holds none of them.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.util import greenlet_spawn

#: How long a connection waits here, unused, before it goes back to the pool.
IDLE_S = 5.0


class ConnectionReserve:
    def __init__(self, engine: Engine, keep: int, *, idle_s: float = IDLE_S) -> None:
        self.engine = engine  # its pool now: ``dispose()`` replaces it
        self.keep = keep
        self.idle_s = idle_s
        self._idle: list[tuple[Any, float]] = []  # (fairy, since): the last one kept on top
        self._closed = False

    def __len__(self) -> int:
        return len(self._idle)

    async def acquire(self) -> Any:
        """A pooled connection (SQLAlchemy's ``_ConnectionFairy``; its ``driver_connection``
        is asyncpg's): one kept here, else a checkout from the pool. Give it back with
        :meth:`release`, or :meth:`invalidate` it."""
        idle = self._idle
        if idle:
            fairy, since = idle.pop()
            if time.monotonic() - since <= self.idle_s:
                return fairy
            fairy.close()  # the newest one waited too long: every one did
            self.flush()
        return await greenlet_spawn(self.engine.pool.connect)

    def release(self, fairy: Any) -> None:
        """Keep ``fairy`` here for the next :meth:`acquire`, or give it back to the pool."""
        if len(self._idle) < self.keep and not self._closed:
            self._idle.append((fairy, time.monotonic()))
        else:
            fairy.close()  # no I/O: the hot path leaves no SQLAlchemy transaction to reset

    async def invalidate(self, fairy: Any, exc: BaseException) -> None:
        """``fairy``'s connection is dead: close it and every connection opened before it
        (the pool's own disconnect handling), the kept ones included."""
        await greenlet_spawn(self.engine.pool._invalidate, fairy, exc)  # checks it in
        self.flush()

    def flush(self) -> None:
        """Give every kept connection back to the pool."""
        idle, self._idle = self._idle, []
        for fairy, _ in idle:
            fairy.close()

    def close(self) -> None:
        """Give every kept connection back and keep none from now on (before the pool is
        disposed: a statement still running gives its connection straight back)."""
        self._closed = True
        self.flush()
