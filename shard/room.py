"""One chat room as a pure object: members, seq, history, idempotency, linger.

Theory of operation
-------------------
A :class:`Room` never awaits, never reads the clock (every call takes
``now``, wall-clock seconds) and never touches a socket. The shard's I/O
layer feeds it joins, leaves and sends and writes out what it returns:

- :meth:`join` -> a :class:`JoinOutcome`: the welcome frame for the joiner,
  the first seq of the messages to replay to it (the I/O layer pulls them in
  chunks with :meth:`replay`, as the client reads), and a presence frame for
  the others when this is the user's first connection;
- :meth:`send` -> a :class:`SendOutcome`: the ack for the sender and, unless
  the id was a duplicate, the message frame to broadcast to every member
  (encoded ONCE here: the fan-out appends the same bytes everywhere);
- :meth:`leave` -> the presence frame for the others when the user's last
  connection went.

Sequence numbers number messages only. A room starts at ``seq_base``: 0 for a
brand-new room, ``epoch << 32`` when the directory says its state was lost,
so seq never decreases across a crash or an eviction. The history keeps the
last ``history_limit`` messages, as their frames: the very ``bytes`` object
the broadcast appended to every member's queue (no second copy of a text,
and a replay writes them as they are), within ``history_bytes`` bytes per
room and, through a :class:`HistoryBudget`
shared by a shard's rooms, within a bound for the whole shard: past either
the oldest messages leave memory. A resume with ``since`` is ``recovered``
only when every message after ``since`` is still there.

The idempotency window remembers ``(user, id) -> seq`` for at least
``idempotency_window`` seconds; memory is bounded by dropping expired
entries, and by :data:`MAX_IDEMPOTENCY_ENTRIES` per room as a hard cap (a
room would need > 300 accepted messages/s for 5 minutes to hit it).

:meth:`snapshot` / :meth:`Room.from_snapshot` carry all of this (JSON-able)
for a live handoff to another shard.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson

from roomshard.wire.protocol import DEFAULT_HISTORY_BYTES
from shard.frames import frame_payload, text_frame

MAX_IDEMPOTENCY_ENTRIES = 100_000
SNAPSHOT_VERSION = 1


class HistoryBudget:
    """The history bytes of every room of one shard, bounded by ``limit``.

    Past the limit the shard's oldest messages leave memory, whichever room
    holds them (each room's own oldest first, so every room keeps a contiguous
    window). Rooms report what they add (:meth:`added`) and drop
    (:meth:`removed`); the budget remembers the order messages were added in.

    That order is kept as two parallel deques (rooms, seqs), not as one of
    ``(room, seq)`` tuples: a tuple holding a room is an object the garbage
    collector tracks, one more per message for as long as the message is
    in memory, and the collector's full passes grew with them (measured: 9x
    the collection time over 300,000 sends). A deque is one object however
    long it is.
    """

    __slots__ = ("_live", "_rooms", "_seqs", "limit", "shed", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0  # bytes of history in memory
        self.shed = 0  # messages dropped for the shard-wide bound
        self._live = 0  # messages in memory
        # _rooms[i], _seqs[i]: the i-th message added, oldest first; entries of
        # messages already gone are skipped.
        self._rooms: deque[Room] = deque()
        self._seqs: deque[int] = deque()

    def added(self, room: Room, seq: int, nbytes: int) -> None:
        self.total += nbytes
        self._live += 1
        self._rooms.append(room)
        self._seqs.append(seq)
        if self.total > self.limit:
            self._shed()
        elif len(self._seqs) > 2 * self._live + 1024:
            self._compact()

    def removed(self, nbytes: int, count: int = 1) -> None:
        self.total -= nbytes
        self._live -= count

    def _shed(self) -> None:
        rooms, seqs = self._rooms, self._seqs
        for _ in range(len(seqs)):
            if self.total <= self.limit:
                return
            room, seq = rooms.popleft(), seqs.popleft()
            if not room.history or seq < room.oldest_seq():
                continue  # gone already (its room trimmed or released it)
            if len(room.history) > 1:
                room.drop_oldest()
                self.shed += 1
            else:  # a room's newest message stays
                rooms.append(room)
                seqs.append(seq)

    def _compact(self) -> None:
        rooms: deque[Room] = deque()
        seqs: deque[int] = deque()
        for room, seq in zip(self._rooms, self._seqs, strict=True):
            if room.history and seq >= room.oldest_seq():
                rooms.append(room)
                seqs.append(seq)
        self._rooms, self._seqs = rooms, seqs


@dataclass(frozen=True, slots=True)
class JoinOutcome:
    welcome: bytes  # the frame for the joiner
    # The first seq to replay after the welcome (every later message still in
    # history follows, in seq order: see Room.replay); None: nothing to replay.
    replay_from: int | None
    presence: bytes | None  # presence join for the other connections, if any


@dataclass(frozen=True, slots=True)
class StoredRun:
    """What the message store holds of a room after a resume's ``since``, before the
    history window (read by the I/O layer for a resume memory cannot serve alone)."""

    first: int | None  # the lowest stored seq after ``since`` (None: none before the window)
    whole: bool  # every message from ``since + 1`` to the window is stored


@dataclass(frozen=True, slots=True)
class SendOutcome:
    ack: bytes  # the frame for the sender
    broadcast: bytes | None  # the message frame for every member; None for a duplicate
    seq: int


@dataclass(slots=True)
class Room:
    """A room's state; see the module docstring."""

    name: str
    instance: str
    epoch: int
    seq_base: int = 0
    lost: bool = False
    owner_epoch: int = 0
    history_limit: int = 1000
    history_bytes_limit: int = DEFAULT_HISTORY_BYTES
    idempotency_window: float = 300.0
    private: bool = False
    allowed: frozenset[str] | None = None  # members of a private room
    seq: int = field(init=False)  # the latest message's (with a store: the latest stored)
    assigned: int = field(init=False)  # with a store: the latest seq given, stored or not
    # The frames of the last messages: history[i] has seq oldest_seq() + i.
    history: deque[bytes] = field(init=False)
    history_bytes: int = field(init=False)
    budget: HistoryBudget | None = field(init=False)
    # (user, client id) -> (seq, time accepted); insertion order = age order.
    seen_ids: OrderedDict[tuple[str, str], tuple[int, float]] = field(init=False)
    # connection id -> user, and user -> number of connections.
    conns: dict[int, str] = field(init=False)
    users: dict[str, int] = field(init=False)
    empty_since: float | None = None

    def __post_init__(self) -> None:
        self.seq = self.assigned = self.seq_base
        self.history = deque()
        self.history_bytes = 0
        self.budget = None
        self.seen_ids = OrderedDict()
        self.conns = {}
        self.users = {}

    # -- membership ------------------------------------------------------
    def may_join(self, user: str) -> bool:
        """False when the room is private and the user is not a member (close 4003)."""
        return not self.private or (self.allowed is not None and user in self.allowed)

    def join(self, conn_id: int, user: str, now: float, since: int | None = None,
             stored: StoredRun | None = None) -> JoinOutcome:
        """Add a connection; raises ValueError if ``conn_id`` is already a member.

        ``stored``: for a resume from before the history window (:meth:`before_window`),
        what the message store holds there: the resume is recovered when the store holds
        every message memory no longer does, and the replay starts in the store.
        """
        if conn_id in self.conns:
            raise ValueError(f"connection {conn_id} already joined")
        self.conns[conn_id] = user
        first = user not in self.users
        self.users[user] = self.users.get(user, 0) + 1
        self.empty_since = None
        welcome: dict[str, Any] = {
            "type": "welcome",
            "room": self.name,
            "instance": self.instance,
            "epoch": self.epoch,
            "user": user,
            "seq": self.seq,
            "members": list(self.users),
        }
        replay_from: int | None = None
        if since is not None:
            recovered = self._resumable(since) or (
                stored is not None and stored.whole and 0 <= since <= self.seq)
            welcome["recovered"] = recovered
            if 0 <= since < self.seq:
                # Not recovered: the gap is announced (recovered: false) and
                # what history (or the store) still holds after ``since``
                # follows, so a resuming client loses nothing more than what
                # is really gone.
                first_seq = max(since + 1, self.oldest_seq())
                if stored is not None and stored.first is not None:
                    first_seq = min(first_seq, max(since + 1, stored.first))
                replay_from = first_seq if first_seq <= self.seq else None
        presence = None
        if first and len(self.conns) > 1:
            presence = text_frame(orjson.dumps({"type": "presence", "event": "join", "user": user}))
        return JoinOutcome(text_frame(orjson.dumps(welcome)), replay_from, presence)

    def replay(self, from_seq: int, max_bytes: int) -> tuple[list[bytes], int] | None:
        """The frames of the messages from ``from_seq`` on, about ``max_bytes`` of them.

        Returns the frames and the next seq to replay (``seq + 1`` once every
        message is out), or None when ``from_seq`` has left the history
        window meanwhile (the replay fell behind the room).
        """
        if from_seq > self.seq:
            return [], from_seq
        oldest = self.oldest_seq()
        if not self.history or from_seq < oldest:
            return None
        frames: list[bytes] = []
        size = 0
        next_seq = from_seq
        for frame in islice(self.history, from_seq - oldest, None):
            frames.append(frame)
            size += len(frame)
            next_seq += 1
            if size >= max_bytes:
                break
        return frames, next_seq

    def page(self, before: int | None, limit: int) -> tuple[list[bytes], bool]:
        """The JSON payloads of the latest ``limit`` messages in history with seq <
        ``before`` (no bound: None), oldest first, and whether history holds older ones."""
        oldest = self.oldest_seq()
        upto = self.seq + 1 if before is None else min(before, self.seq + 1)
        first = max(oldest, upto - limit)
        if first >= upto:
            return [], False
        frames = islice(self.history, first - oldest, upto - oldest)
        return [frame_payload(f) for f in frames], first > oldest

    def before_window(self, since: int) -> bool:
        """True when a resume after ``since`` needs messages history no longer holds."""
        return 0 <= since < self.seq and since + 1 < self.oldest_seq()

    def oldest_seq(self) -> int:
        """The seq of the oldest message in history (``seq + 1`` when it is empty)."""
        return self.seq - len(self.history) + 1

    # -- history memory ----------------------------------------------------
    def use_budget(self, budget: HistoryBudget | None) -> None:
        """Count this room's history against ``budget`` (the shard's), from now on."""
        self.budget = budget
        if budget is not None:
            first = self.oldest_seq()
            for i, frame in enumerate(self.history):
                budget.added(self, first + i, len(frame))

    def release(self) -> None:
        """The room leaves memory: its history no longer counts."""
        if self.budget is not None:
            self.budget.removed(self.history_bytes, len(self.history))
            self.budget = None  # a message stored after the room left memory does not count
        self.history.clear()
        self.history_bytes = 0

    def drop_oldest(self) -> None:
        frame = self.history.popleft()
        self.history_bytes -= len(frame)
        if self.budget is not None:
            self.budget.removed(len(frame))

    def expire(self, horizon: float) -> int:
        """Drop the messages sent before ``horizon`` (retention); how many went."""
        dropped = 0
        while self.history and orjson.loads(frame_payload(self.history[0]))["ts"] < horizon:
            self.drop_oldest()
            dropped += 1
        return dropped

    def _trim(self) -> None:
        """Drop the oldest messages past the room's bounds; the newest always stays."""
        history = self.history
        while len(history) > 1 and (len(history) > self.history_limit
                                    or self.history_bytes > self.history_bytes_limit):
            self.drop_oldest()

    def _resumable(self, since: int) -> bool:
        """True when every message after ``since`` is still in history.

        False when ``since`` is beyond the latest seq (or negative: unreadable),
        when the history window no longer holds ``since + 1``, or when the
        room's state was lost and ``since`` predates this epoch's ``seq_base``.
        """
        if since > self.seq or since < 0:
            return False
        if since == self.seq:
            return True
        return since + 1 >= self.oldest_seq() and not (self.lost and since < self.seq_base)

    def leave(self, conn_id: int, now: float) -> bytes | None:
        """Remove a connection; the presence leave frame when its user's last one went."""
        user = self.conns.pop(conn_id, None)
        if user is None:
            return None
        if not self.conns:
            self.empty_since = now
        left = self.users[user] - 1
        if left:
            self.users[user] = left
            return None
        del self.users[user]
        if not self.conns:
            return None
        return text_frame(orjson.dumps({"type": "presence", "event": "leave", "user": user}))

    def members(self) -> list[str]:
        return list(self.users)

    def evictable(self, now: float, linger: float) -> bool:
        """True once the room has been empty for ``linger`` seconds."""
        return self.empty_since is not None and now - self.empty_since >= linger

    # -- messages --------------------------------------------------------
    def send(self, user: str, msg_id: str, text: str, now: float) -> SendOutcome:
        """Sequence a message (or recognise a retried id) and build its frames."""
        known = self.known(user, msg_id, now)
        if known is not None:
            return SendOutcome(ack_frame(msg_id, known), None, known)
        seq = self.seq = self.seq + 1
        # One frame for history and every member; orjson's own buffer is freed at
        # once and reused by the next message (kept, its blocks fragmented the heap).
        frame = text_frame(self._payload(seq, user, msg_id, text, now))
        self._remember(seq, frame)
        self._note_id(user, msg_id, seq, now)
        return SendOutcome(ack_frame(msg_id, seq), frame, seq)

    @staticmethod
    def _payload(seq: int, user: str, msg_id: str, text: str, now: float) -> bytes:
        """The ``message`` frame's JSON: built once, for history, every member and the store."""
        return orjson.dumps({"type": "message", "seq": seq, "id": msg_id, "user": user,
                             "text": text, "ts": round(now, 3)})

    def _note_id(self, user: str, msg_id: str, seq: int, now: float) -> None:
        """Into the idempotency window (bounded by MAX_IDEMPOTENCY_ENTRIES)."""
        ids = self.seen_ids
        ids[(user, msg_id)] = (seq, now)
        if len(ids) > MAX_IDEMPOTENCY_ENTRIES:
            ids.popitem(last=False)

    def _remember(self, seq: int, frame: bytes) -> None:
        """Into history; trimmed past the room's bounds."""
        history = self.history
        history.append(frame)
        size = len(frame)
        self.history_bytes += size
        if len(history) > self.history_limit or self.history_bytes > self.history_bytes_limit:
            self._trim()
        if self.budget is not None:
            self.budget.added(self, seq, size)

    # -- messages, with a store: sequenced first, the room's once stored ----------
    def known(self, user: str, msg_id: str, now: float) -> int | None:
        """The seq of the message ``user`` already sent with ``msg_id`` (within the
        idempotency window), stored (``<= seq``) or still being stored; None if new."""
        self._expire_ids(now)
        known = self.seen_ids.get((user, msg_id))
        return None if known is None else known[0]

    def sequence(self, user: str, msg_id: str, text: str, now: float) -> tuple[int, bytes]:
        """Give a new message its seq (after every seq given) and build its payload.

        The message is not the room's yet: no member sees it and ``seq`` does
        not move until :meth:`stored` says it is stored. Its id is in the
        idempotency window at once, so a resend is recognised meanwhile.
        """
        seq = self.assigned = max(self.seq, self.assigned) + 1
        payload = self._payload(seq, user, msg_id, text, now)
        self._note_id(user, msg_id, seq, now)
        return seq, payload

    def recover(self, tail: list[tuple[int, bytes]],
                ids: list[tuple[str, str, int, float]]) -> None:
        """Take the room's state from the message store: its latest stored messages
        (``(seq, payload)``, oldest first) and the ids of its idempotency window.

        The store decides: ``seq`` continues after its last message (nobody saw
        a message the store does not hold, so no seq a client saw is given
        again) and the room's state is no longer lost. Only the run of
        consecutive seqs that ends the tail enters history.
        """
        if tail:
            last = tail[-1][0]
            run = len(tail)
            for i in range(len(tail) - 1, 0, -1):
                if tail[i - 1][0] != tail[i][0] - 1:
                    run = len(tail) - i
                    break
            self.seq = self.assigned = last
            self.lost = False
            for seq, payload in tail[len(tail) - run:]:
                self._remember(seq, text_frame(payload))
        for user, msg_id, seq, at in ids:
            self.seen_ids[(user, msg_id)] = (seq, at)
        while len(self.seen_ids) > MAX_IDEMPOTENCY_ENTRIES:
            self.seen_ids.popitem(last=False)

    def stored(self, seq: int, frame: bytes) -> None:
        """A sequenced message is stored: it is the room's latest (call in seq order)."""
        self.seq = seq
        self._remember(seq, frame)

    def _expire_ids(self, now: float) -> None:
        horizon = now - self.idempotency_window
        ids = self.seen_ids
        while ids:
            key, (_, at) = next(iter(ids.items()))
            if at >= horizon:
                break
            del ids[key]

    # -- handoff ---------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The room's durable state as JSON-able data (members included for reports)."""
        return {
            "version": SNAPSHOT_VERSION,
            "room": self.name,
            "epoch": self.epoch,
            "owner_epoch": self.owner_epoch,
            "seq_base": self.seq_base,
            "lost": self.lost,
            "seq": self.seq,
            "history_limit": self.history_limit,
            "history": [orjson.loads(frame_payload(f)) for f in self.history],
            "idempotency_window": self.idempotency_window,
            "idempotency": [[u, i, s, at] for (u, i), (s, at) in self.seen_ids.items()],
            "private": self.private,
            "allowed": sorted(self.allowed) if self.allowed is not None else None,
            "members": self.members(),
        }

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any], *, instance: str, epoch: int | None = None,
                      owner_epoch: int | None = None,
                      history_bytes_limit: int | None = None) -> Room:
        """Rebuild a room on its new owner (no members: clients reconnect with ``since``).

        ``epoch``/``owner_epoch`` override the snapshot's when the move bumped
        them. Raises ValueError on an unknown snapshot version.
        """
        if snap.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unknown room snapshot version {snap.get('version')!r}")
        room = cls(
            name=snap["room"],
            instance=instance,
            epoch=snap["epoch"] if epoch is None else epoch,
            seq_base=snap["seq_base"],
            lost=snap["lost"],
            owner_epoch=snap["owner_epoch"] if owner_epoch is None else owner_epoch,
            history_limit=snap["history_limit"],
            history_bytes_limit=(history_bytes_limit if history_bytes_limit is not None
                                 else DEFAULT_HISTORY_BYTES),
            idempotency_window=snap["idempotency_window"],
            private=snap["private"],
            allowed=frozenset(snap["allowed"]) if snap["allowed"] is not None else None,
        )
        # Every seq given is stored before a move takes its snapshot: the next goes after
        # ``seq`` (a room recovered from the store has a seq below its seq_base).
        room.seq = room.assigned = snap["seq"]
        for message in snap["history"]:
            frame = text_frame(orjson.dumps(message))
            room.history.append(frame)
            room.history_bytes += len(frame)
        room._trim()
        for user, msg_id, seq, at in snap["idempotency"]:
            room.seen_ids[(user, msg_id)] = (seq, at)
        return room


def ack_frame(msg_id: str, seq: int) -> bytes:
    return text_frame(orjson.dumps({"type": "ack", "id": msg_id, "seq": seq}))
