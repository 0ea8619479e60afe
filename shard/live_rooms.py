"""The rooms this shard holds in memory, and the live side of one room.

:class:`LiveRoom` pairs a pure :class:`shard.room.Room` with the connections
that are in it and does the fan-out: the room builds a frame once and
:meth:`LiveRoom.broadcast` appends that same ``bytes`` object to every
member's send queue (:class:`shard.writer.Writer`, written once per loop turn).

:class:`LiveRooms` is the one place rooms enter and leave memory:
``get`` / ``open`` (asks the directory once; concurrent joiners of one room
share that call) / ``adopt`` (a room rebuilt from a handoff snapshot) /
``close_room`` and ``close_all`` (close the members with a code, drop the
room) / ``evict_idle`` (rooms empty for longer than the linger). The live
handoff (``shard/handoff.py``) works through these and
:meth:`LiveRoom.freeze` / :meth:`LiveRoom.thaw`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from websockets.frames import CloseCode as WsCloseCode

from roomshard.config import ShardConfig
from roomshard.store.commit import GroupCommit
from roomshard.store.messages import STORE_ERRORS, MessageStore, StoredMessage
from roomshard.wire.internal import LiveLoad
from roomshard.wire.protocol import CloseCode, ErrorCode
from shard.connection import Connection
from shard.directory_client import DirectoryClient, DirectoryUnavailable
from shard.frames import (
    FrameRejected,
    InvalidUtf8,
    error_frame,
    frame_payload,
    parse_client_frame,
    text_frame,
)
from shard.ratelimit import TokenBucket, Verdict
from shard.room import MAX_IDEMPOTENCY_ENTRIES, HistoryBudget, Room, StoredRun, ack_frame
from shard.stats import Stats
from shard.writer import Writer

log = logging.getLogger("roomshard.shard.rooms")

#: A resume's replay is written in chunks of about this many bytes, the next
#: one once the client has read the last (the kernel took it all); never more
#: than half the send queue (:func:`replay_chunk_bytes`).
REPLAY_CHUNK_BYTES = 256 * 1024


def replay_chunk_bytes(send_queue_bytes: int) -> int:
    """A replay chunk's size under a send queue bound: half of it at most, so the chunk and
    the one frame that may cross the chunk's size fit in the queue (a chunk past the
    bound closed every resume with 4009, over and over, with a small ``send_queue_bytes``)."""
    return max(1, min(REPLAY_CHUNK_BYTES, send_queue_bytes // 2))
#: A resume from before the history window reads the store this many messages at a time.
STORE_REPLAY_ROWS = 500
#: Presence frames kept for a connection whose replay is still being written;
#: past this it is closed with 4009 (it does not read fast enough to catch up).
MAX_DEFERRED_PRESENCE = 10_000
#: A window's held presence goes out early at this many frames or bytes (bytes: at most a
#: quarter of ``send_queue_bytes``): one write per member stays small, and so does
#: the tail each connection that joined during the window gets.
MAX_HELD_PRESENCE = 64
MAX_HELD_PRESENCE_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class RoomContext:
    """What the rooms of a shard share: settings, counters, the writer, the clocks."""

    cfg: ShardConfig
    stats: Stats
    writer: Writer
    clock: Callable[[], float]  # wall-clock seconds (history timestamps, idempotency)
    monotonic: Callable[[], float]
    # With a message store: its group commit (a message is broadcast and acked once stored).
    commit: GroupCommit[Pending] | None = None
    # With a message store: a resume from before the history window replays from it.
    store: MessageStore | None = None
    # Whether the shard still holds its lease (False fences it at once: see ShardServer).
    holds_lease: Callable[[], bool] = lambda: True


class Sender(Protocol):
    """Who sent a message and gets its ack (or its refusal): a member's
    :class:`~shard.connection.Connection`, or a :class:`Publication`."""

    user: str

    def queue(self, frame: bytes) -> None: ...


class Publication:
    """A message from the server API (``POST /internal/rooms/{room}/publish``): sent like
    a member's, with ``answer`` resolved by its ack (or its refusal) instead of a socket."""

    __slots__ = ("answer", "user")

    def __init__(self, user: str) -> None:
        self.user = user
        # The ack ({"type": "ack", "seq", ...}) or the refusal ({"type": "error", "code", ...}).
        self.answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def queue(self, frame: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(orjson.loads(frame_payload(frame)))


class Pending:
    """A sequenced message on its way to the store: who sent it, and what to do once stored."""

    __slots__ = ("conn", "frame", "live", "message")

    def __init__(self, live: LiveRoom, conn: Sender, frame: bytes,
                 message: StoredMessage) -> None:
        self.live = live
        self.conn = conn
        self.frame = frame
        self.message = message


def deliver_stored(batch: list[Pending]) -> None:
    """A batch is stored: each message becomes its room's, is broadcast and acked, in order."""
    for p in batch:
        p.live.stored(p)


class StoreUnavailable(DirectoryUnavailable):
    """A room cannot open now: the message store holding its state did not answer
    (the joiner is refused with 1013, like when the directory does not answer; the
    directory's grant is kept for the retry)."""


#: What a message costs in the group commit's byte bound besides its text (ids, JSON).
STORE_OVERHEAD_BYTES = 200


class Replay:
    """A connection catching up after its welcome: the next seq to write, the presence held.

    A replay that starts before the history window reads the message store:
    ``fetch`` is the read in flight, ``fetched`` what it read and is not written
    yet (written in chunks like memory's), ``whole`` that the welcome promised
    every message (a gap found on the way is not written over: 4009, the client
    resumes again and hears of it).
    """

    __slots__ = ("conn", "fetch", "fetched", "held", "next_seq", "presence", "whole")

    def __init__(self, conn: Connection, next_seq: int, whole: bool = False) -> None:
        self.conn = conn
        self.next_seq = next_seq
        self.presence: list[bytes] = []  # written after the replay (a window's frames in one)
        self.held = 0  # presence frames in ``presence``
        self.whole = whole
        self.fetch: asyncio.Task[None] | None = None
        self.fetched: deque[tuple[int, bytes]] = deque()

    def stop(self) -> None:
        if self.fetch is not None:
            self.fetch.cancel()
            self.fetch = None


class LiveRoom:
    __slots__ = (
        "_held",
        "_held_bytes",
        "_held_from",
        "_last_count",
        "_window",
        "_window_len",
        "conns",
        "ctx",
        "frozen",
        "messages",
        "messages_per_s",
        "name",
        "replaying",
        "room",
        "settled",
        "unconfirmed",
        "waiting",
    )

    def __init__(self, room: Room, ctx: RoomContext) -> None:
        self.name = room.name
        self.room = room
        # The fan-out: members that get every broadcast. A member whose welcome
        # or replay is still being written is in ``replaying`` instead and
        # joins the fan-out once it has caught up (see refill).
        self.conns: dict[int, Connection] = {}
        self.replaying: dict[int, Replay] = {}
        self.ctx = ctx
        self.frozen = False  # mid-move: joins refused (1013), members' reading paused
        # Kept through a lost lease: not served (joins 1013) until a heartbeat's
        # answer confirms the directory still assigns it here at this epoch.
        self.unconfirmed = False
        # With a store: resends of a message still being stored, by seq: (connection, id).
        self.waiting: dict[int, list[tuple[Sender, str]]] = {}
        # With a store: set once every sequenced message is stored (see settle).
        self.settled: asyncio.Future[None] | None = None
        self.messages = 0
        self.messages_per_s = 0.0
        self._last_count = 0
        # Presence under churn (see presence): the frames held in the current window,
        # where each connection that joined during it starts in them, the window's end.
        self._held: list[bytes] = []
        self._held_from: dict[int, int] = {}
        self._held_bytes = 0
        self._window: asyncio.TimerHandle | None = None
        self._window_len = 0.0

    def join(self, conn: Connection, conn_id: int, user: str, since: int | None,
             stored: StoredRun | None = None) -> None:
        """Add an admitted connection: welcome (+ replay) to it, presence to the others.

        A resume's replay is not queued at once: it is written in chunks as
        the client reads (:meth:`refill`), so however large it is it never
        counts as a slow consumer; nor does the welcome (its member list can
        be megabytes in a large room), which is exempt from
        ``send_queue_bytes``. Until it has caught up, the connection gets no
        broadcast: the messages come from the history, in seq order, and the
        presence frames meanwhile are held and follow the replay. ``stored``: for a
        resume from before the history window, what the message store holds there
        (:meth:`LiveRooms.stored_run`); the replay then starts in the store.
        """
        ctx = self.ctx
        cfg = ctx.cfg
        out = self.room.join(conn_id, user, ctx.clock(), since, stored)
        if out.presence is not None:
            self.presence(out.presence)
        if self._window is not None:
            self._held_from[conn_id] = len(self._held)  # its welcome has what came before
        conn.queue(out.welcome)
        if out.replay_from is not None or len(out.welcome) > cfg.send_queue_bytes // 4:
            conn.queue_limit = cfg.send_queue_bytes + len(out.welcome)
            first = out.replay_from if out.replay_from is not None else self.room.seq + 1
            self.replaying[conn_id] = Replay(conn, first, stored is not None and stored.whole)
            conn.replaying = True
        else:
            self.conns[conn_id] = conn
        conn.joined(self, conn_id, user, TokenBucket(cfg.rate, cfg.rate_burst, ctx.monotonic()))
        if self.frozen and conn.transport is not None:
            conn.transport.pause_reading()

    def refill(self, conn: Connection) -> None:
        """Queue the next chunk of ``conn``'s replay; called when it has read the last one.

        Once every message up to the room's latest is queued, the held
        presence frames follow and the connection joins the fan-out (all in
        one turn, so no message is missed or doubled). A replay the history
        window has overtaken (the client read too slowly) is closed with 4009:
        the client resumes again and learns about the gap.
        """
        replay = self.replaying.get(conn.conn_id)  # conn ids are unique on a shard
        if replay is None:
            conn.replaying = False
            return
        conn.queue_limit = self.ctx.cfg.send_queue_bytes  # the welcome is out
        if replay.fetched:
            self._write_fetched(replay)
            return
        chunk = self.room.replay(replay.next_seq,
                                 replay_chunk_bytes(self.ctx.cfg.send_queue_bytes))
        if chunk is None:
            if self.ctx.store is None:
                self._fell_behind(replay)
            elif replay.fetch is None:  # before the history window: from the store
                replay.fetch = asyncio.get_running_loop().create_task(
                    self._fetch(replay, self.ctx.store))
            return
        frames, replay.next_seq = chunk
        for frame in frames:
            conn.queue(frame)
        if replay.next_seq > self.room.seq:
            del self.replaying[conn.conn_id]
            conn.replaying = False
            for frame in replay.presence:
                conn.queue(frame)
            self.conns[conn.conn_id] = conn

    async def _fetch(self, replay: Replay, store: MessageStore) -> None:
        """Read the next messages of a replay from the store, then write the first chunk."""
        conn = replay.conn
        try:
            rows = await store.after(self.name, replay.next_seq - 1, STORE_REPLAY_ROWS)
        except STORE_ERRORS as exc:
            log.warning("closing %s in room %s (1013): its replay could not be read from "
                        "the message store (%s)", conn.user, self.name, exc.__class__.__name__)
            conn.close(CloseCode.TRY_AGAIN_LATER, "message store unavailable")
            return
        finally:
            replay.fetch = None
        if self.replaying.get(conn.conn_id) is not replay:
            return  # it left meanwhile
        upto = self.room.oldest_seq()  # memory serves the rest
        expect = replay.next_seq
        for m in rows:
            if m.seq >= upto:
                break
            if replay.whole and m.seq != expect:
                break
            replay.fetched.append((m.seq, text_frame(m.payload.encode())))
            expect = m.seq + 1
        if replay.whole and not replay.fetched and expect < upto:
            # Promised whole, and the store no longer holds it (expired since).
            log.info("closing %s in room %s (4009): the store no longer holds seq %d",
                     conn.user, self.name, expect)
            self.ctx.stats.slow_consumer_closes += 1
            conn.close(CloseCode.SLOW_CONSUMER, "the resume's messages expired meanwhile")
            return
        if not replay.fetched:
            replay.next_seq = max(replay.next_seq, upto)  # a gap (announced): memory on
        if not conn.pending and not conn.write_paused and not conn.closing:
            self.refill(conn)  # the client read everything meanwhile: the next chunk now

    def _write_fetched(self, replay: Replay) -> None:
        """Write about a chunk of what the store gave a replay."""
        conn, fetched = replay.conn, replay.fetched
        size = 0
        limit = replay_chunk_bytes(self.ctx.cfg.send_queue_bytes)
        while fetched and size < limit:
            seq, frame = fetched.popleft()
            conn.queue(frame)
            size += len(frame)
            replay.next_seq = seq + 1

    def _fell_behind(self, replay: Replay) -> None:
        conn = replay.conn  # closing it makes it leave (and leave() forgets the replay)
        self.ctx.stats.slow_consumer_closes += 1
        log.info("closing %s in room %s (4009): its replay fell behind the history window",
                 conn.user, self.name)
        conn.close(CloseCode.SLOW_CONSUMER, "slow consumer: the resume fell behind the room")

    def presence(self, frame: bytes) -> None:
        """A presence frame for the room's members, at once or at its window's end.

        Under churn (a reconnect storm, a class joining at nine) every join
        and leave would be one write to every member: O(n^2) system calls for
        a room that fills. So a room gathers them (``presence_batch``, 0.25 s):
        the first frame after a quiet spell goes out at once and opens a
        window; the frames of the window go out together at its end (one
        write per member), and the next window opens only if there were any.
        While the churn goes on each window is twice the last, up to
        ``presence_batch_max`` (2 s): a storm that refills a room for seconds
        costs a few writes per member, not one every 0.25 s; a quiet window
        starts over. Order is kept: a message flushes what is held before it
        goes out; a connection that joined during a window gets only the
        frames after its join (its welcome's member list has the rest).
        """
        batch = self.ctx.cfg.presence_batch
        if self._window is not None:
            held = self._held
            held.append(frame)
            self._held_bytes += len(frame)
            if len(held) >= MAX_HELD_PRESENCE or self._held_bytes >= self._max_held_bytes():
                self.flush_presence()  # a window's write stays small (and its joiners' tails)
            return
        self._send_presence(frame, 1)
        if batch > 0:
            self._window_len = batch
            self._window = asyncio.get_running_loop().call_later(batch, self._window_ends)

    def _window_ends(self) -> None:
        self._window = None
        if self._held:
            self.flush_presence()
            cfg = self.ctx.cfg
            self._window_len = min(self._window_len * 2, cfg.presence_batch_max)
            self._window = asyncio.get_running_loop().call_later(self._window_len, self._window_ends)
        else:
            self._held_from.clear()  # a quiet window: whoever joined in it is caught up

    def flush_presence(self) -> None:
        """Send the presence frames held in the current window now (the window goes on)."""
        held, joined = self._held, self._held_from
        if not held:
            return
        self._held, self._held_from, self._held_bytes = [], {}, 0
        frame = held[0] if len(held) == 1 else b"".join(held)
        if not joined:
            self._send_presence(frame, len(held))
            return
        # Who joined during the window gets the frames after its join only.
        self._send_presence(frame, len(held), skip=joined)
        for cid, start in joined.items():
            if start < len(held):
                self._send_presence_to(cid, b"".join(held[start:]), len(held) - start)

    def _max_held_bytes(self) -> int:
        return min(MAX_HELD_PRESENCE_BYTES, self.ctx.cfg.send_queue_bytes // 4)

    def _send_presence(self, frame: bytes, count: int, skip: dict[int, int] | None = None) -> None:
        """``frame`` (``count`` presence frames) to the fan-out, and to the replays after them."""
        ctx = self.ctx
        conns = self.conns.values() if not skip else [
            c for cid, c in self.conns.items() if cid not in skip]
        ctx.stats.deliveries += ctx.writer.fan_out(conns, frame) * count
        for replay in list(self.replaying.values()):
            if not skip or replay.conn.conn_id not in skip:
                self._hold_for_replay(replay, frame, count)

    def _send_presence_to(self, cid: int, frame: bytes, count: int) -> None:
        conn = self.conns.get(cid)
        if conn is not None:
            conn.queue(frame)
            self.ctx.stats.deliveries += count
            return
        replay = self.replaying.get(cid)
        if replay is not None:
            self._hold_for_replay(replay, frame, count)

    def _hold_for_replay(self, replay: Replay, frame: bytes, count: int) -> None:
        replay.presence.append(frame)
        replay.held += count
        if replay.held > MAX_DEFERRED_PRESENCE:
            self._fell_behind(replay)

    def members_conns(self) -> list[Connection]:
        """Every connection in the room, caught up or still replaying."""
        if not self.replaying:
            return list(self.conns.values())
        return [*self.conns.values(), *(r.conn for r in self.replaying.values())]

    def connection_count(self) -> int:
        return len(self.conns) + len(self.replaying)

    def leave(self, conn: Connection) -> None:
        cid = conn.conn_id
        if self.conns.pop(cid, None) is None:
            replay = self.replaying.pop(cid, None)
            if replay is None:
                return
            replay.stop()
            conn.replaying = False
        self._held_from.pop(cid, None)
        presence = self.room.leave(cid, self.ctx.clock())
        if presence is not None:
            self.presence(presence)

    def receive(self, conn: Connection, payload: bytes, is_text: bool) -> None:
        """A data message from a member: rate-limit it, parse it, then :meth:`send` it.

        Over the rate: an error frame (``rate_limited``, with the message's id
        when it has one), and for a sender that keeps on (3 x the burst in
        refusals, net of what drains) the 4008 close; a frame that is
        not a valid ``send``: its error frame (``bad_request`` / ``too_long``);
        text that is not UTF-8: the connection fails with 1007 (RFC 6455 8.1).
        An ``ordered`` send behind one refused for now waits for it
        (:mod:`shard.ratelimit`): refused with its code, a strike, no token.
        """
        ctx = self.ctx
        if not ctx.holds_lease():
            # A loop that stalled past the lease (a stopped process, a frozen machine)
            # reads what waited in its sockets before its timers run: sequencing it could
            # make a second owner of a room the directory has re-placed meanwhile. The
            # shard fences itself in that call (the members are closed with 1001 and
            # resend it to the room's owner).
            return
        stats = ctx.stats
        stats.messages_in += 1
        bucket = conn.bucket
        assert bucket is not None  # set at join
        if bucket.held is not None and self._held_back(conn, bucket, payload, is_text):
            return
        verdict = bucket.take(ctx.monotonic())
        if verdict is not Verdict.OK:
            stats.rate_limited += 1
            if verdict is Verdict.CLOSE:
                conn.close(CloseCode.POLICY, "rate limit exceeded")
                return
            msg_id: str | None
            try:
                refused = parse_client_frame(payload, is_text=is_text, max_text=1 << 30)
            except FrameRejected as exc:
                msg_id = exc.msg_id
            except InvalidUtf8 as exc:
                conn.fail(WsCloseCode.INVALID_DATA, str(exc))
                return
            else:
                msg_id = refused.id
                if refused.ordered:
                    bucket.hold(msg_id, ErrorCode.RATE_LIMITED)
            conn.queue(error_frame(ErrorCode.RATE_LIMITED,
                                   f"over {ctx.cfg.rate:g} messages/s", msg_id))
            return
        try:
            send = parse_client_frame(payload, is_text=is_text, max_text=ctx.cfg.max_text)
        except FrameRejected as exc:
            stats.rejected += 1
            conn.queue(exc.frame())
            return
        except InvalidUtf8 as exc:
            stats.rejected += 1
            conn.fail(WsCloseCode.INVALID_DATA, str(exc))
            return
        code = self.send(conn, send.id, send.text)
        if code is None:
            bucket.release(send.id)
        elif send.ordered:
            bucket.hold(send.id, code)

    def _held_back(self, conn: Connection, bucket: TokenBucket, payload: bytes,
                   is_text: bool) -> bool:
        """Refuse an ordered send other than the held one; False: not held back (the
        held send itself, a send without ``ordered``, a frame the normal path refuses)."""
        assert bucket.held is not None
        held_id, code = bucket.held
        try:
            send = parse_client_frame(payload, is_text=is_text, max_text=1 << 30)
        except (FrameRejected, InvalidUtf8):
            return False
        if not send.ordered or send.id == held_id:
            return False
        ctx = self.ctx
        if code == ErrorCode.RATE_LIMITED:
            ctx.stats.rate_limited += 1
        else:
            ctx.stats.store_refused += 1
        if bucket.strike(ctx.monotonic()) is Verdict.CLOSE:
            conn.close(CloseCode.POLICY, "rate limit exceeded")
            return True
        conn.queue(error_frame(code, f"ordered after {held_id!r}, which was refused: "
                                     "send that one again first", send.id))
        return True

    def send(self, conn: Sender, msg_id: str, text: str) -> str | None:
        """Sequence a member's (or the server API's) message, fan it out, ack the sender.

        Returns None, or the error code it was refused with for now (``unavailable``:
        the message store cannot take it; the sender was told).
        """
        if self.ctx.commit is not None:
            return self._send_to_store(conn, msg_id, text, self.ctx.commit)
        out = self.room.send(conn.user, msg_id, text, self.ctx.clock())
        if out.broadcast is not None:
            self.messages += 1
            self.ctx.stats.messages_out += 1
            if self._held:
                self.flush_presence()  # what happened before the message arrives before it
            self.broadcast(out.broadcast)
            if self.replaying:
                self._check_replays()
        conn.queue(out.ack)
        return None

    def _send_to_store(self, conn: Sender, msg_id: str, text: str,
                       commit: GroupCommit[Pending]) -> str | None:
        """With a store: sequence the message and hand it to the group commit; it is
        broadcast and acked once stored (:meth:`stored`). A resend of a stored id is acked
        at once, of one still being stored once it is; past the commit's bounds the send is
        refused with ``unavailable`` (no seq taken: the client sends it again later)."""
        room, now = self.room, self.ctx.clock()
        seq = room.known(conn.user, msg_id, now)
        if seq is not None:
            if seq <= room.seq:
                conn.queue(ack_frame(msg_id, seq))
            else:
                self.waiting.setdefault(seq, []).append((conn, msg_id))
            return None
        if not commit.admit(len(text) + STORE_OVERHEAD_BYTES):
            self.ctx.stats.store_refused += 1
            conn.queue(error_frame(ErrorCode.UNAVAILABLE,
                                   "the message store is unavailable: send it again later",
                                   msg_id))
            return ErrorCode.UNAVAILABLE
        seq, payload = room.sequence(conn.user, msg_id, text, now)
        frame = text_frame(payload)
        commit.submit(Pending(self, conn, frame, StoredMessage(
            room=self.name, seq=seq, id=msg_id, user=conn.user, ts=round(now, 3),
            payload=payload.decode())), len(frame) + STORE_OVERHEAD_BYTES)
        return None

    def stored(self, p: Pending) -> None:
        """``p`` is stored: the room's latest message now; broadcast it, ack its sender
        (and whoever resent its id meanwhile)."""
        seq = p.message.seq
        self.room.stored(seq, p.frame)
        self.messages += 1
        self.ctx.stats.messages_out += 1
        if self._held:
            self.flush_presence()
        self.broadcast(p.frame)
        if self.replaying:
            self._check_replays()
        ack = ack_frame(p.message.id, seq)
        p.conn.queue(ack)
        for conn, msg_id in self.waiting.pop(seq, ()):
            conn.queue(ack if msg_id == p.message.id else ack_frame(msg_id, seq))
        if self.settled is not None and not self.storing():
            self._wake_settled()

    def storing(self) -> bool:
        """True while a message sequenced here is on its way to the store."""
        return self.room.assigned > self.room.seq

    async def settle(self, timeout: float) -> bool:
        """Wait until every message sequenced so far is stored (or the room closed);
        False after ``timeout`` seconds. A move calls it with the room frozen: its
        snapshot must carry every seq given (the new owner goes on after them)."""
        if not self.storing():
            return True
        if self.settled is None:
            self.settled = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.settled), timeout)
        except TimeoutError:
            return False
        return True

    def _wake_settled(self) -> None:
        if self.settled is not None:
            if not self.settled.done():
                self.settled.set_result(None)
            self.settled = None

    def _check_replays(self) -> None:
        """Close the replays the history window has just overtaken (4009)."""
        if self.ctx.store is not None:
            return  # a replay the window overtook goes on from the store
        oldest = self.room.oldest_seq()
        for replay in list(self.replaying.values()):
            if replay.next_seq < oldest:
                self._fell_behind(replay)

    def broadcast(self, frame: bytes) -> None:
        """Append one pre-built frame to every member: no per-recipient encoding or await."""
        ctx = self.ctx
        ctx.stats.deliveries += ctx.writer.fan_out(self.conns.values(), frame)

    def close_all(self, code: int, reason: str) -> int:
        """Close every member with ``code``; returns how many were closed."""
        self._wake_settled()
        self.flush_presence()  # before the close frames
        conns = self.members_conns()
        # Everyone goes at once: no presence leave for each to the rest (O(n^2)).
        self.conns.clear()
        for replay in self.replaying.values():
            replay.stop()
        self.replaying.clear()
        for c in conns:
            c.replaying = False
        now = self.ctx.clock()
        for c in conns:
            self.room.leave(c.conn_id, now)
            c.close(code, reason)
        return len(conns)

    def freeze(self) -> None:
        """Stop reading members' frames (TCP holds them) and refuse joins with 1013."""
        self.frozen = True
        self.flush_presence()  # a move's members have what happened before it
        for c in self.members_conns():
            if c.transport is not None and not c.closed:
                c.transport.pause_reading()

    def thaw(self) -> None:
        self.frozen = False
        for c in self.members_conns():
            c.resume()

    def update_rate(self, elapsed: float) -> None:
        if elapsed > 0:
            self.messages_per_s = (self.messages - self._last_count) / elapsed
            self._last_count = self.messages

    def load(self) -> LiveLoad:
        return LiveLoad(connections=self.connection_count(), members=len(self.room.users),
                        seq=self.room.seq, epoch=self.room.epoch,
                        messages_per_s=round(self.messages_per_s, 2))


MAX_CONFIRM_PER_HEARTBEAT = 10_000  # kept rooms one heartbeat asks the directory about
MAX_PENDING_OPEN_IDS = 10_000  # then ids older than the TTL are dropped
OPEN_ID_TTL_S = 300.0


class LiveRooms:
    def __init__(self, ctx: RoomContext, directory: DirectoryClient,
                 ready: Callable[[], bool]) -> None:
        self.ctx = ctx
        self.directory = directory
        self.store = ctx.store  # a room that opens takes its state from it
        self._ready = ready  # the shard holds its lease (see ShardServer.ready)
        self.rooms: dict[str, LiveRoom] = {}
        # Every room's history together stays within history_bytes_total.
        self.history_budget = HistoryBudget(ctx.cfg.history_bytes_total)
        self._opening: dict[str, asyncio.Task[LiveRoom]] = {}
        # room -> (open_id, since): an open whose answer we never got (timeout, 5xx) is
        # retried under the same id, so the directory grants it once (docs/INTERNALS.md).
        self._open_ids: dict[str, tuple[str, float]] = {}

    def __len__(self) -> int:
        return len(self.rooms)

    def get(self, name: str) -> LiveRoom | None:
        return self.rooms.get(name)

    async def open(self, name: str, ticket_epoch: int) -> LiveRoom:
        """Load ``name`` after asking the directory; raises ``DirectoryError``.

        Concurrent callers for one room share the first caller's directory call.
        """
        task = self._opening.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(name, ticket_epoch))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
            self._opening[name] = task
        return await asyncio.shield(task)

    def _open_id(self, name: str) -> str:
        """This room's pending open id, or a new one (old pending ids are dropped)."""
        now = self.ctx.clock()
        pending = self._open_ids.get(name)
        if pending is not None:
            return pending[0]
        if len(self._open_ids) >= MAX_PENDING_OPEN_IDS:
            self._open_ids = {k: v for k, v in self._open_ids.items()
                              if now - v[1] < OPEN_ID_TTL_S}
        open_id = secrets.token_urlsafe(12)
        self._open_ids[name] = (open_id, now)
        return open_id

    async def _open(self, name: str, ticket_epoch: int) -> LiveRoom:
        try:
            grant = await self.directory.open_room(name, ticket_epoch, open_id=self._open_id(name))
            recovered = await self._from_store(name) if self.store is not None else None
        except DirectoryUnavailable:
            raise  # the directory may have granted it: retry under the same id
        except BaseException:
            self._open_ids.pop(name, None)  # refused: nothing was opened
            raise
        finally:
            self._opening.pop(name, None)
        if not self._ready():
            # The lease ran out while we asked: holding the room now could
            # serve it after the directory has placed it elsewhere. (The id stays:
            # the grant was not used, a retry may have it again.)
            raise DirectoryUnavailable("lease lost while opening the room")
        self._open_ids.pop(name, None)  # the room exists now: a later open is a new copy
        cfg = self.ctx.cfg
        room = Room(name=name, instance=cfg.instance, epoch=grant.epoch, seq_base=grant.seq_base,
                    lost=grant.lost, owner_epoch=grant.owner_epoch, history_limit=cfg.history,
                    history_bytes_limit=cfg.history_bytes,
                    idempotency_window=cfg.idempotency_window, private=grant.private,
                    allowed=frozenset(grant.members) if grant.members is not None else None)
        if recovered is not None:
            room.recover(*recovered)
        log.info("opened room %s epoch %d seq %d%s", name, grant.epoch, room.seq,
                 " (state lost)" if room.lost else "")
        return self.adopt(room)

    async def _from_store(self, name: str) -> tuple[list[tuple[int, bytes]],
                                                    list[tuple[str, str, int, float]]]:
        """A room's latest stored messages and its idempotency window's ids."""
        assert self.store is not None
        cfg = self.ctx.cfg
        try:
            tail = await self.store.tail(name, cfg.history)
            ids = await self.store.recent_ids(name, self.ctx.clock() - cfg.idempotency_window,
                                              MAX_IDEMPOTENCY_ENTRIES)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"message store: {exc.__class__.__name__}") from exc
        return [(m.seq, m.payload.encode()) for m in tail], ids

    async def stored_run(self, room: Room, since: int) -> StoredRun:
        """What the store holds of ``room`` after ``since``, before its history window
        (for a resume memory cannot serve alone); raises :class:`StoreUnavailable`."""
        assert self.store is not None
        upto = room.oldest_seq()
        try:
            first, count = await self.store.span(room.name, since, upto)
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"message store: {exc.__class__.__name__}") from exc
        return StoredRun(first, first == since + 1 and count == upto - since - 1)

    def adopt(self, room: Room) -> LiveRoom:
        """Install ``room`` (new, or rebuilt from a snapshot); replaces a stale copy."""
        old = self.rooms.get(room.name)
        if old is not None:
            self.close_room(room.name, CloseCode.GOING_AWAY, "room state replaced")
        room.empty_since = self.ctx.clock()
        room.use_budget(self.history_budget)
        live = LiveRoom(room, self.ctx)
        self.rooms[room.name] = live
        return live

    def close_room(self, name: str, code: int, reason: str) -> int:
        """Close the room's members with ``code`` and drop it from memory."""
        live = self.rooms.pop(name, None)
        if live is None:
            return 0
        closed = live.close_all(code, reason)
        live.room.release()
        return closed

    def close_all(self, code: int, reason: str) -> int:
        return sum(self.close_room(name, code, reason) for name in list(self.rooms))

    def suspend_all(self, code: int, reason: str) -> int:
        """Close every member with ``code`` but keep the rooms, each unconfirmed.

        Used when the lease is lost: the rooms stop being served at once, and
        their state survives in case the directory never placed them elsewhere
        (:meth:`confirm`). Returns how many clients were closed.
        """
        closed = 0
        for live in self.rooms.values():
            live.unconfirmed = True
            closed += live.close_all(code, reason)
        return closed

    def unconfirmed(self, limit: int = MAX_CONFIRM_PER_HEARTBEAT) -> dict[str, int]:
        """Up to ``limit`` rooms kept through a lost lease, with their epochs.

        The limit keeps a heartbeat's body well under the directory's 1 MiB
        (a room id is at most 64 characters); the rest go with the next ones.
        """
        out: dict[str, int] = {}
        for name, lr in self.rooms.items():
            if lr.unconfirmed:
                out[name] = lr.room.epoch
                if len(out) >= limit:
                    break
        return out

    def confirm(self, asked: dict[str, int], owned: set[str]) -> tuple[int, int]:
        """Serve again the rooms the directory confirmed; drop the others.

        A room re-placed while we were fenced has a higher epoch (or another
        owner) in the directory, so it is not in ``owned`` and its copy here is
        stale. Returns (kept, dropped).
        """
        kept = dropped = 0
        for name, epoch in asked.items():
            live = self.rooms.get(name)
            if live is None or not live.unconfirmed or live.room.epoch != epoch:
                continue  # evicted, replaced or reopened meanwhile
            if name in owned:
                live.unconfirmed = False
                kept += 1
            else:
                self.close_room(name, CloseCode.GOING_AWAY, "room was placed elsewhere")
                dropped += 1
        return kept, dropped

    def evict(self, name: str) -> None:
        """Forget an empty room (its next open gets a new epoch from the directory)."""
        live = self.rooms.get(name)
        if live is not None and not live.connection_count():
            del self.rooms[name]
            live.room.release()
            log.info("evicted idle room %s at seq %d", name, live.room.seq)

    def evict_idle(self, now: float, linger: float) -> None:
        for name in [n for n, lr in self.rooms.items()
                     if not lr.connection_count() and not lr.frozen
                     and lr.room.evictable(now, linger)]:
            self.evict(name)
