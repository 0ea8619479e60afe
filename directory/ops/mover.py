"""Drives live moves: performs the coordinator's actions against the database and shards.

``directory.domain.moves`` decides (pure); this module does the I/O: it reserves a
move (``move_store.reserve``), then loops *perform action -> event ->
moves.handle -> persist -> next actions* until the move is finished. The
record is persisted after every change (conditional on the lease and on the
row not being decided), so a directory that dies mid-move leaves a row that
:meth:`Mover.recover_once` -- run at start-up and every second by every
replica -- claims once its lease ran out and finishes with ``moves.recover``
(roll back before the commit, forward after it).

The lease is short and renewed: while a replica drives moves it extends their
leases every ``RENEW_EVERY_S`` (one statement for all of them, whatever step
each is in), so a driver that dies -- SIGKILL mid-freeze included -- leaves its
rooms frozen for at most ``LEASE_S`` plus a recovery pass, not for the whole
move timeout. The lease only decides who drives (a slow renewal at worst
lets two replicas drive one move, which the conditional commit/rollback
settle one way); it never decides the move.

One :class:`Mover` per app (``Directory.mover``), built from the parts it
uses and started and stopped by the app's lifespan. Drains live in
``directory.ops.drain`` and rebalancing in ``directory.ops.rebalance``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc

from directory.db import move_store
from directory.db.store import Store
from directory.domain import instances, placement
from directory.domain.errors import Conflict
from directory.domain.moves import (
    DEFAULT_MOVE_TIMEOUT_S,
    PRE_COMMIT,
    TERMINAL,
    Action,
    Event,
    Move,
    MoveRuleError,
    State,
    begin,
    handle,
    recover,
    report,
)
from directory.metrics import Metrics
from directory.shards import Outcome, ShardClient
from roomshard.batching import Batcher
from roomshard.wire.internal import HANDOFF_CALLS, HandoffCall

log = logging.getLogger("roomshard.directory.moves")

# A driver's lease on its moves, renewed every RENEW_EVERY_S while it drives them: a few
# missed renewals (a stalled database, a busy loop) before another replica may take over.
LEASE_S = 4.0
RENEW_EVERY_S = 1.0
RECOVER_EVERY_S = 1.0  # how often every replica looks for moves whose lease ran out
MOVE_WAIT_S = 20.0  # the admin request waits this long for the move to finish
DB_BATCH = 128  # moves per batched transaction
CALL_BATCH = 128  # rooms per batched shard call
ADOPT_BATCH = 16  # adopts carry whole histories (up to 1,000 messages each)


class Mover:
    """Drives this replica's moves and recovers orphaned ones."""

    def __init__(self, store: Store, shards: ShardClient, metrics: Metrics,
                 clock: Callable[[], float], *, down_after: float) -> None:
        self.store = store
        self.shards = shards
        self.metrics = metrics
        self.clock = clock
        self.down_after = down_after
        self.owner = f"dir-{secrets.token_hex(6)}"
        self.driving: dict[str, asyncio.Task[Move]] = {}
        self.current: dict[str, Move] = {}
        self._recovery: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._urls: dict[str, str] = {}  # instance -> internal_url, dropped on a failed call
        # A drain's moves walk the protocol in step: their database writes and shard calls
        # go out as one transaction / one request per step (directory/ops/batching.py).
        self.db: Batcher[str, Any] = Batcher(
            self._db_batch, max_batch=DB_BATCH,
            on_batch=lambda kind, n: metrics.batch(f"db_{kind}", n))
        self.calls: Batcher[tuple[str, str], HandoffCall] = Batcher(
            self._call_batch, max_batch=lambda key: ADOPT_BATCH if key[1] == "adopt" else CALL_BATCH,
            on_batch=lambda key, n: metrics.batch(key[1], n))

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._recovery = loop.create_task(self._recover_loop())
        self._renewal = loop.create_task(self._renew_loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._recovery, self._renewal, *self.driving.values())
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.db.aclose()
        await self.calls.aclose()

    async def _recover_loop(self) -> None:
        while True:
            try:
                await self.recover_once()
            except (sa_exc.SQLAlchemyError, OSError) as exc:
                log.warning("move recovery pass failed: %s", exc)
            await asyncio.sleep(RECOVER_EVERY_S)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self.renew_once()
            except (sa_exc.SQLAlchemyError, OSError) as exc:
                log.warning("renewing move leases failed: %s", exc)

    async def renew_once(self) -> int:
        """Extend the lease of every move this replica drives; how many were renewed."""
        return await move_store.renew_leases(self.store, list(self.driving), owner=self.owner,
                                             now=self.clock(), lease_s=LEASE_S)

    async def recover_once(self) -> int:
        """Claim and finish every unfinished move whose driver is gone; returns how many."""
        now = self.clock()
        orphans = await move_store.claim_orphans(self.store, owner=self.owner, now=now,
                                                 lease_s=LEASE_S)
        for persisted in orphans:
            if persisted.move_id in self.driving:
                continue
            move, actions = recover(persisted, now)
            log.warning("recovering move %s of room %s from state %s", move.move_id, move.room,
                        persisted.state.value)
            self._spawn(move, actions, persist_first=True)
        return len(orphans)

    # -- one move --------------------------------------------------------------
    async def start_move(self, *, room: str, source: str, to: str) -> asyncio.Task[Move]:
        """Reserve the move (409 ``already_moving``) and start driving it."""
        now = self.clock()
        move_id = secrets.token_hex(8)

        def make(from_epoch: int) -> tuple[Move, list[Action]]:
            return begin(move_id=move_id, room=room, source=source, target=to,
                         from_epoch=from_epoch, now=now)

        move, actions = await self.db.submit(
            "reserve", move_store.Reservation(room=room, source=source, to=to, make=make))
        return self._spawn(move, actions, persist_first=False)

    async def move_room(self, *, room: str, source: str, to: str) -> dict[str, Any]:
        """Move one room and wait for it; the contract's move report, 409 when it rolled back."""
        task = await self.start_move(room=room, source=source, to=to)
        started = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), MOVE_WAIT_S)
        move = task.result() if task.done() else self.current.get(task.get_name())
        if move is not None and move.state in (State.COMMITTED, State.RELEASED):
            return report(move)
        why = move.reason if move is not None else "unknown"
        log.warning("move of %s to %s did not commit after %.1fs: %s", room, to,
                    time.monotonic() - started, why)
        raise Conflict("move_rolled_back", f"room {room} stayed on {source}: {why}")

    def _spawn(self, move: Move, actions: list[Action], *, persist_first: bool) -> asyncio.Task[Move]:
        self.current[move.move_id] = move
        task = asyncio.get_running_loop().create_task(self._drive(move, actions, persist_first),
                                                      name=move.move_id)
        self.driving[move.move_id] = task

        def done(t: asyncio.Task[Move]) -> None:
            self.driving.pop(move.move_id, None)
            self.current.pop(move.move_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("driving move %s failed: %r", move.move_id, t.exception())

        task.add_done_callback(done)
        return task

    async def _persist(self, move: Move, expect: tuple[str, ...]) -> bool:
        for attempt in range(3):
            try:
                return bool(await self.db.submit("persist", (move, expect)))
            except sa_exc.SQLAlchemyError as exc:
                log.warning("persisting move %s failed (%d): %s", move.move_id, attempt, exc)
                await asyncio.sleep(0.1 * 2 ** attempt)
        return False

    async def _drive(self, move: Move, actions: list[Action], persist_first: bool) -> Move:
        if persist_first and not await self._persist(move, move_store.expected_before(move.state)):
            return move
        queue = deque(actions)
        deadline = move.started_at + DEFAULT_MOVE_TIMEOUT_S
        while queue and move.state not in TERMINAL:
            action = queue.popleft()
            if action.call == "finished":
                break
            if move.state in PRE_COMMIT and self.clock() > deadline:
                event = Event("timeout")
            else:
                event = await self._perform(move, action)
            before = move
            try:
                move, new = handle(move, event, self.clock())
            except MoveRuleError as exc:
                log.error("move %s: %s", move.move_id, exc)
                continue
            if event.kind == "timeout":
                queue.clear()  # the calls of the abandoned step are superseded
            if move != before:
                self.current[move.move_id] = move
                if move.state in PRE_COMMIT and before.state in PRE_COMMIT:
                    # recover() rolls every pre-commit state back alike, so these
                    # writes would change nothing but the pause; the renewal loop
                    # keeps the lease meanwhile.
                    queue.extend(new)
                    continue
                if before.state is State.ADOPTED and move.state is State.COMMITTED:
                    # The commit wrote the decision and renewed the lease; what else the
                    # record holds, recover() does not need to roll forward.
                    queue.extend(new)
                    continue
                if not await self._persist(move, move_store.expected_before(move.state)):
                    log.warning("move %s: lease lost or decided elsewhere; stop driving",
                                move.move_id)
                    return move
            queue.extend(new)
        log.info("move %s of room %s %s -> %s: %s%s", move.move_id, move.room, move.source,
                 move.target, move.state.value, f" ({move.reason})" if move.reason else "")
        if move.state in TERMINAL:
            self.metrics.moves.labels(move.state.value).inc()
        if move.committed_at is not None and move.state is State.RELEASED:
            self.metrics.move_pause.observe(max(0.0, move.committed_at - move.started_at))
        return move

    # -- actions ---------------------------------------------------------------
    async def _perform(self, move: Move, a: Action) -> Event:
        if a.delay_s:
            await asyncio.sleep(a.delay_s)
        p, tok = a.payload, a.token
        try:
            if a.call == "commit_db":
                ok = await self.db.submit("commit", move)
                return Event("commit_ok" if ok else "commit_lost", tok)
            if a.call == "mark_rolled_back":
                ok = await self.db.submit("rollback", move)
                return Event("rollback_ok" if ok else "rollback_lost", tok)
        except sa_exc.SQLAlchemyError as exc:
            kind = "commit" if a.call == "commit_db" else "rollback"
            return Event(f"{kind}_failed", tok, {"error": f"database: {exc.__class__.__name__}"})
        kind = a.call.removeprefix("call_")
        spec = HANDOFF_CALLS[kind]
        # The call's fields from the action's payload (the room goes in the batch item).
        call = spec(room=p["room"], **{f: p[f] for f in spec.__struct_fields__ if f != "room"})
        assert a.instance is not None
        status, answer = await self._shard_call(a.instance, kind, call)
        if status == 200:
            return Event(f"{kind}_ok", tok, answer if isinstance(answer, dict) else {})
        if kind == "release" and await self._gone(a.instance):
            return Event("source_gone")
        return Event(f"{kind}_failed", tok, {"error": f"{kind} on {a.instance}: {answer}"})

    async def _db_batch(self, kind: str, items: list[Any]) -> list[Any]:
        """One transaction for every write of ``kind`` queued in this loop turn."""
        store, now = self.store, self.clock()
        if kind == "reserve":
            return await move_store.reserve_many(store, items, owner=self.owner, now=now,
                                                 lease_s=LEASE_S)
        if kind == "persist":
            return await move_store.persist_many(store, items, owner=self.owner, now=now,
                                                 lease_s=LEASE_S)
        if kind == "commit":
            return await move_store.commit_many(store, items, now, lease_until=now + LEASE_S)
        assert kind == "rollback", kind
        return await move_store.rollback_many(store, items, now)

    async def _shard_url(self, instance: str) -> str | None:
        url = self._urls.get(instance)
        if url is None:
            row = await self.store.get_instance(instance)
            if row is None:
                return None
            url = self._urls[instance] = row["internal_url"]
        return url

    async def _shard_call(self, instance: str, kind: str, call: HandoffCall) -> Outcome:
        """One handoff call, batched with the same calls of this loop turn: (status, answer)."""
        answer: Outcome = await self.calls.submit((instance, kind), call)
        return answer

    async def _call_batch(self, key: tuple[str, str], items: list[HandoffCall]) -> list[Outcome]:
        """Every call of one kind to one shard queued in this loop turn, in one request."""
        instance, kind = key
        try:
            base = await self._shard_url(instance)
        except sa_exc.SQLAlchemyError as exc:
            return [(0, f"database: {exc.__class__.__name__}")] * len(items)
        if base is None:
            return [(0, "instance not registered")] * len(items)
        outcomes = await self.shards.handoffs(instance, base, kind, items)
        if any(status == 0 for status, _ in outcomes):
            self._urls.pop(instance, None)  # a restarted shard may listen elsewhere now
        return outcomes

    async def _gone(self, instance: str) -> bool:
        """The source is down: a restarted shard holds no room state, nothing to release."""
        try:
            row = await self.store.get_instance(instance)
        except sa_exc.SQLAlchemyError:
            return False  # unknown: keep retrying the release
        if row is None:
            return True
        return instances.state_of(row, now=self.clock(), down_after=self.down_after) == placement.DOWN
