"""The receiving side of a session: welcome, ordering, dedup and gaps.

The server sends every message of a room in seq order; a reconnect with
``since`` replays the history after ``since``. Across reconnects the same
message can arrive twice (replay overlapping what we saw) and, after a shard
crash, a resent message can come back under a new seq. The inbox keeps the
last seq seen and a bounded window of ``(user, id)`` pairs so the
application sees each message once, in order; when the welcome says
``recovered: false`` it reports a :class:`Gap` instead of hiding it.

Pure: frames in (already decoded), events out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

#: How many recent (user, id) pairs are remembered to drop a message that a
#: shard crash made reappear under a new seq. Ample for a chat room; bounded
#: so a long session does not grow without end.
SEEN_IDS_WINDOW = 10_000


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    id: str
    user: str
    text: str
    ts: Any = None


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages after ``after_seq`` may be lost (the welcome said ``recovered: false``)."""

    after_seq: int | None
    room_seq: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Presence:
    event: str  # "join" | "leave"
    user: str


@dataclass(frozen=True, slots=True)
class Welcome:
    room: str
    instance: str
    epoch: int
    user: str
    seq: int
    members: tuple[str, ...]
    recovered: bool | None


@dataclass
class Inbox:
    #: Highest seq handed to the application (or the room's seq at the first welcome).
    last_seq: int | None = None
    members: list[str] = field(default_factory=list)
    _seen: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)
    _seen_limit: int = SEEN_IDS_WINDOW

    def since(self) -> int | None:
        """The ``since`` of the next connection: resume after what we saw."""
        return self.last_seq

    def on_welcome(self, frame: dict[str, Any], since: int | None) -> tuple[Welcome, Gap | None]:
        """Take a welcome received on a connection opened with ``since``."""
        w = Welcome(room=str(frame.get("room", "")), instance=str(frame.get("instance", "")),
                    epoch=int(frame.get("epoch", 0)), user=str(frame.get("user", "")),
                    seq=int(frame.get("seq", 0)),
                    members=tuple(dict.fromkeys(str(m) for m in frame.get("members", []))),
                    recovered=frame.get("recovered"))
        self.members = list(w.members)
        gap = None
        if since is None:
            # First connection without a resume point: start at the room's present.
            if self.last_seq is None:
                self.last_seq = w.seq
        elif w.recovered is False:
            gap = Gap(after_seq=since, room_seq=w.seq, epoch=w.epoch)
            if self.last_seq is not None and w.seq < self.last_seq:
                # The room's numbering is below what we saw (it should never
                # go back; be safe): accept its messages rather than drop them.
                self.last_seq = w.seq
        return w, gap

    def on_message(self, frame: dict[str, Any]) -> Message | None:
        """The message to hand to the application, or None for a duplicate."""
        msg = Message(seq=int(frame["seq"]), id=str(frame.get("id", "")),
                      user=str(frame.get("user", "")), text=str(frame.get("text", "")),
                      ts=frame.get("ts"))
        if self.last_seq is not None and msg.seq <= self.last_seq:
            return None
        self.last_seq = msg.seq
        key = (msg.user, msg.id)
        if msg.id and key in self._seen:
            return None  # the same send under a new seq after a lost room
        if msg.id:
            self._seen[key] = None
            if len(self._seen) > self._seen_limit:
                self._seen.popitem(last=False)
        return msg

    def on_presence(self, frame: dict[str, Any]) -> Presence:
        p = Presence(event=str(frame.get("event", "")), user=str(frame.get("user", "")))
        if p.event == "join" and p.user not in self.members:
            self.members.append(p.user)
        elif p.event == "leave" and p.user in self.members:
            self.members.remove(p.user)
        return p
