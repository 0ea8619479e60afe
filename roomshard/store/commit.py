"""Group commit: one write for whatever arrived while the previous write was in flight.

:meth:`GroupCommit.submit` never awaits: it appends an item to the queue and
makes sure the writer task runs. The writer takes the whole queue as one
batch, awaits ``write(batch)`` once, and calls ``done(batch)`` (which, in
the shard, broadcasts and acks the batch's messages in seq order, in one
loop turn). Meanwhile new items queue up behind it and become the next
batch. So a busy store is written once per commit time with everything
that arrived, never once per item, and items are written and done in the
order they were submitted. After a quiet spell the writer waits ``linger``
seconds before its first write, so that a batch gathers even at a low rate
(each later batch gathers while the previous one is written).

A failed write is retried, the same batch first, with a backoff doubling
from ``retry_initial`` to ``retry_max``, until the store is back; nothing
is dropped and nothing overtakes. A failure that retrying cannot cure (one
of ``permanent``: the store refuses this batch, e.g. a seq another writer
stored first) goes to ``rejected(batch, error)`` instead, and the next
batch is written. What waits is bounded: :meth:`admit`
says no once the items waiting (queued and in flight) hold ``max_bytes``,
or once the oldest has waited ``max_age`` seconds (the store is slow or
gone), and the caller refuses the new item (the shard answers
``unavailable``), so a dead database never grows memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("roomshard.store")

DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_MAX_AGE_S = 5.0
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0


#: Bucket bounds of the write-time histogram (seconds) and of the batch-size one (items).
WRITE_SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SIZE_BOUNDS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Buckets:
    """A histogram kept as plain counts (``counts[i]``: observations <= ``bounds[i]``, not
    cumulative; the last is +Inf), read by the metrics at scrape time."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = 0
        for bound in self.bounds:  # a dozen bounds: a scan beats bisect's call
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of observations <= le)`` pairs, Prometheus' way, +Inf last."""
        out, total = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class GroupCommit(Generic[T]):
    """See the module docstring."""

    def __init__(self, write: Callable[[list[T]], Awaitable[None]],
                 done: Callable[[list[T]], None], *,
                 rejected: Callable[[list[T], Exception], None] | None = None,
                 permanent: tuple[type[Exception], ...] = (),
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 max_age: float = DEFAULT_MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic,
                 retry_initial: float = RETRY_INITIAL_S, retry_max: float = RETRY_MAX_S,
                 linger: float = 0.0) -> None:
        self._write = write
        self._done = done
        self._rejected = rejected
        self._permanent = permanent
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        # Seconds the writer waits after the first item of a quiet spell before it writes:
        # at a low rate each batch would hold one item (a transaction per message).
        self.linger = linger
        self._queue: list[T] = []
        self._queue_bytes = 0
        self._queue_since: float | None = None  # when the oldest queued item arrived
        self._flight_bytes = 0
        self._flight_items = 0
        self._flight_since: float | None = None  # when the oldest item in flight arrived
        self._task: asyncio.Task[None] | None = None
        # Counters for metrics: batches and items written, failed writes, rejected batches.
        self.batches = 0
        self.items = 0
        self.failures = 0
        self.rejections = 0
        self.failing = False  # the last write failed and is being retried
        # Every stored batch: how long its write took (the last, successful try) and its size.
        self.write_seconds = Buckets(WRITE_SECONDS_BOUNDS)
        self.batch_sizes = Buckets(BATCH_SIZE_BOUNDS)

    # -- the caller's side (never awaits) ----------------------------------------
    @property
    def waiting_bytes(self) -> int:
        """Bytes of the items queued and in flight."""
        return self._queue_bytes + self._flight_bytes

    @property
    def waiting_items(self) -> int:
        """Items queued and in flight."""
        return len(self._queue) + self._flight_items

    def oldest_age(self) -> float:
        """How long the oldest waiting item has waited (0 when none waits)."""
        since = self._flight_since if self._flight_since is not None else self._queue_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def admit(self, nbytes: int) -> bool:
        """False when an item of ``nbytes`` would go past the bounds: refuse it."""
        return (self.waiting_bytes + nbytes <= self.max_bytes
                and self.oldest_age() < self.max_age)

    def submit(self, item: T, nbytes: int) -> None:
        """Queue ``item`` for the next batch (call :meth:`admit` first)."""
        if not self._queue:
            self._queue_since = self._clock()
        self._queue.append(item)
        self._queue_bytes += nbytes
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    # -- the writer --------------------------------------------------------------
    async def _run(self) -> None:
        try:
            if self.linger > 0:  # the first item of a quiet spell: let a batch gather
                await asyncio.sleep(self.linger)
            while self._queue:
                batch, self._queue = self._queue, []
                self._flight_bytes, self._queue_bytes = self._queue_bytes, 0
                self._flight_since, self._queue_since = self._queue_since, None
                self._flight_items = len(batch)
                refused = await self._write_until_stored(batch)
                self._flight_bytes, self._flight_since, self._flight_items = 0, None, 0
                try:
                    if refused is None:
                        self.batches += 1
                        self.items += len(batch)
                        self._done(batch)
                    else:
                        self.rejections += 1
                        if self._rejected is not None:
                            self._rejected(batch, refused)
                except Exception:  # a bug of the caller's: the next batches still go out
                    log.exception("handling a written batch of %d failed", len(batch))
        finally:
            self._task = None

    async def _write_until_stored(self, batch: list[T]) -> Exception | None:
        """None once stored; the error when the store refuses the batch for good."""
        delay = self._retry_initial
        while True:
            started = self._clock()
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                raise
            except self._permanent as exc:
                log.warning("the message store refused a batch of %d for good: %s", len(batch), exc)
                return exc
            except Exception as exc:  # noqa: BLE001 - any failure of the store: retry the batch
                self.failures += 1
                if not self.failing:
                    log.warning("the message store refused a batch of %d (%s: %s); retrying",
                                len(batch), exc.__class__.__name__, exc)
                self.failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            self.write_seconds.observe(self._clock() - started)
            self.batch_sizes.observe(len(batch))
            if self.failing:
                log.warning("the message store is back: %d messages stored", len(batch))
            self.failing = False
            return None

    async def flush(self, timeout: float) -> bool:
        """Wait until everything submitted is written (False: not within ``timeout``)."""
        try:
            async with asyncio.timeout(timeout):
                while self._task is not None:
                    await asyncio.shield(self._task)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop writing (what is still waiting is not written: call :meth:`flush` first)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
