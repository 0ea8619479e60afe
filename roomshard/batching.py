"""Coalesce concurrent calls of one kind into one batch call (group commit, request batching).

A drain runs many moves at once, and they walk the move protocol in step:
16 rooms reserve, freeze, adopt, commit and release at about the same
moment. Made one by one, each step costs a transaction or an HTTP request
per room; made through a :class:`Batcher`, each costs one per batch.

No timer is involved, so a lone call pays nothing: a call made while no
batch of its key is in flight goes out at the end of the current loop turn,
together with every call of that key made in the same turn; calls made while
a batch is in flight wait for it and then go out together as the next one.
The batch function answers item by item; an item's answer that is an
exception is raised to that caller alone, an exception raised by the batch
function goes to every caller of that batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # an item

RunBatch = Callable[[K, list[I]], Awaitable[list[Any]]]


class Batcher(Generic[K, I]):
    """``await batcher.submit(key, item)`` -> that item's answer from ``run(key, items)``."""

    def __init__(self, run: RunBatch[K, I], max_batch: Callable[[K], int] | int = 64,
                 on_batch: Callable[[K, int], None] | None = None) -> None:
        self._run = run
        self._on_batch = on_batch  # (key, items) per batch sent: metrics
        self._max = max_batch if callable(max_batch) else (lambda _key: max_batch)
        self._pending: dict[K, list[tuple[I, asyncio.Future[Any]]]] = {}
        self._pumps: dict[K, asyncio.Task[None]] = {}

    async def submit(self, key: K, item: I) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.setdefault(key, []).append((item, fut))
        if key not in self._pumps:
            self._pumps[key] = loop.create_task(self._pump(key))
        answer = await fut
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def aclose(self) -> None:
        """Cancel the batches in flight; their callers get CancelledError."""
        pumps = list(self._pumps.values())
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, key: K) -> None:
        batch: list[tuple[I, asyncio.Future[Any]]] = []
        try:
            while True:
                waiting = self._pending.pop(key, [])
                live = [(i, f) for i, f in waiting if not f.done()]  # a cancelled caller's item is dropped
                if not live:
                    return
                limit = max(1, self._max(key))
                batch, rest = live[:limit], live[limit:]
                if rest:
                    self._pending[key] = rest
                if self._on_batch is not None:
                    self._on_batch(key, len(batch))
                try:
                    answers = await self._run(key, [i for i, _ in batch])
                    if len(answers) != len(batch):
                        raise RuntimeError(f"batch of {len(batch)} got {len(answers)} answers")
                except Exception as exc:  # noqa: BLE001 - the whole batch failed: every caller hears why
                    answers = [exc] * len(batch)
                for (_, fut), answer in zip(batch, answers):
                    if not fut.done():
                        fut.set_result(answer)
                batch = []
        finally:
            del self._pumps[key]
            # Cancelled (shutdown): nobody will answer what is still queued.
            for _, fut in batch + self._pending.pop(key, []):
                if not fut.done():
                    fut.cancel()
