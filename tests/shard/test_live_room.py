"""A live room on its own (no server, no sockets): fan-out, acks, presence, paced resumes."""

from __future__ import annotations

import asyncio

import orjson

from roomshard.config import ShardConfig
from roomshard.protocol import CloseCode
from shard.registry import REPLAY_CHUNK_BYTES, LiveRoom, RoomContext
from shard.room import Room
from shard.stats import Stats
from shard.writer import Writer

NOW = 1_700_000_000.0
CFG = ShardConfig(instance="i1", port=0, directory_url="http://directory.test",
                  cluster_secret="s" * 32)


class Member:
    """A connection as the room sees it: its send queue, flushed by the writer."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.queue_limit = 0
        self.replaying = False
        self.reading = True  # False: the kernel takes nothing, no refill
        self.room: LiveRoom | None = None
        self.conn_id = 0
        self.user = ""
        self.transport = None
        self.closed: int | None = None
        self.frames: list[bytes] = []  # written, in order
        self.largest_write = 0

    def queue(self, frame: bytes) -> None:
        if not self.pending:
            self.writer.mark_dirty(self)
        self.pending.append(frame)
        self.pending_bytes += len(frame)

    def flush(self) -> None:
        if not self.reading:
            return
        self.largest_write = max(self.largest_write, self.pending_bytes)
        self.frames.extend(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        if self.replaying and self.room is not None:
            self.room.refill(self)  # as Connection.flush: everything was taken

    def joined(self, room: LiveRoom, conn_id: int, user: str, bucket: object) -> None:
        self.room, self.conn_id, self.user = room, conn_id, user

    def close(self, code: int, reason: str = "") -> None:
        self.closed = code
        if self.room is not None:
            self.room.leave(self)  # as the server's detach

    def messages(self) -> list[dict]:
        return [orjson.loads(f[_header_len(f):]) for f in self.frames]


def _header_len(frame: bytes) -> int:
    n = frame[1] & 0x7F
    return 2 if n < 126 else 4 if n == 126 else 10


class Fixture:
    def __init__(self, **room_kw) -> None:
        self.stats = Stats()
        self.writer = Writer()
        self.room = Room(name="r", instance="i1", epoch=1, **room_kw)
        self.live = LiveRoom(self.room, RoomContext(CFG, self.stats, self.writer,
                                                    lambda: NOW, lambda: 0.0))
        self.ids = 0

    def join(self, user: str, since: int | None = None) -> Member:
        m = Member(self.writer)
        self.ids += 1
        self.live.join(m, self.ids, user, since)  # type: ignore[arg-type]
        return m


async def turns(n: int = 1) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_message_reaches_every_member_once_and_its_sender_an_ack_after_it():
    f = Fixture()
    alice, bob, carol = f.join("alice"), f.join("bob"), f.join("carol")
    await turns()
    f.live.send(alice, "m1", "hi")  # type: ignore[arg-type]
    await turns()
    kinds = {m.user: [x["type"] for x in m.messages()] for m in (alice, bob, carol)}
    assert kinds == {"alice": ["welcome", "presence", "presence", "message", "ack"],
                     "bob": ["welcome", "presence", "message"],
                     "carol": ["welcome", "message"]}
    assert alice.frames[3] is bob.frames[2] is carol.frames[1]  # encoded once for the room
    assert f.stats.messages_out == 1 and f.stats.deliveries == 3 + 3  # + presence
    f.live.leave(carol)  # type: ignore[arg-type]
    await turns()
    assert alice.messages()[-1] == {"type": "presence", "event": "leave", "user": "carol"}


async def test_a_resume_is_written_in_chunks_as_the_member_reads_then_joins_the_fan_out():
    f = Fixture()
    alice = f.join("alice")
    text = "x" * 100_000
    for i in range(12):  # about 1.2 MB of history
        f.live.send(alice, f"m{i}", text)  # type: ignore[arg-type]
    await turns()
    bob = f.join("bob", since=0)
    f.live.send(alice, "during", "sent while bob catches up")  # type: ignore[arg-type]
    carol = f.join("carol")  # a presence while bob replays: held until he caught up
    await turns(20)
    got = bob.messages()
    assert got[0]["type"] == "welcome" and got[0]["recovered"] is True
    assert [m["seq"] for m in got if m["type"] == "message"] == list(range(1, 14))
    assert got[-1] == {"type": "presence", "event": "join", "user": "carol"}
    assert bob.largest_write <= REPLAY_CHUNK_BYTES + 110_000  # never the whole replay at once
    assert not bob.replaying and bob.conn_id in f.live.conns
    f.live.send(carol, "after", "now live")  # type: ignore[arg-type]
    await turns()
    assert bob.messages()[-1]["id"] == "after"
    assert carol.closed is None and alice.closed is None


async def test_a_replay_the_history_window_overtakes_is_closed_4009():
    f = Fixture(history_limit=5)
    alice = f.join("alice")
    for i in range(5):
        f.live.send(alice, f"m{i}", "y" * 100_000)  # type: ignore[arg-type]
    await turns()
    bob = f.join("bob", since=0)
    bob.reading = False  # reads nothing: the replay does not move
    await turns()
    for i in range(5):  # the window moves past bob's next message
        f.live.send(alice, f"n{i}", "z")  # type: ignore[arg-type]
    assert bob.closed == CloseCode.SLOW_CONSUMER
    assert f.stats.slow_consumer_closes == 1
    assert bob.conn_id not in f.live.replaying and f.live.connection_count() == 1
