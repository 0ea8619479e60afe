"""The frame reader on its own (sans I/O): the fast path, the hand-over, fragments, the bounds."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from roomshard.wire.protocol import CloseCode
from shard.reader import FRAGMENT_OVERHEAD_BYTES, FrameReader

MAX_FRAME = 1 << 20


def masked(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])


class Sink:
    """The connection's side, recorded."""

    def __init__(self, reader: FrameReader, *, budget: int = 1 << 30,
                 close_on: bytes | None = None) -> None:
        self.reader = reader
        self.closing = self.failed = False
        self.messages: list[tuple[bytes, bool]] = []
        self.pongs = 0
        self.charged = 0
        self.budget = budget
        self.close_on = close_on  # a message that makes the connection close (e.g. a 4008)
        self.failures: list[int] = []
        self.output: list[bytes] = []

    def charge(self, frames: int) -> bool:
        self.charged += frames
        if self.charged > self.budget:
            self.fail(CloseCode.POLICY, "over budget")
            return False
        return True

    def on_message(self, payload: bytes, is_text: bool) -> None:
        self.messages.append((bytes(payload), is_text))
        if payload == self.close_on:
            self.closing = True
            self.reader.protocol.send_close(CloseCode.POLICY, "rate limit exceeded")

    def on_pong(self) -> None:
        self.pongs += 1

    def fail(self, code: int, reason: str) -> None:
        self.failures.append(code)
        self.failed = self.closing = True
        self.reader.discard()
        self.reader.protocol.fail(code, reason)
        self.take_output()

    def take_output(self) -> None:
        self.output.extend(self.reader.protocol.data_to_send())
        if self.reader.protocol.close_expected():
            self.closing = True

    def close_codes(self) -> list[int]:
        return [Close.parse(o[2:]).code for o in self.output if o and o[0] == 0x88]


def drain(reader: FrameReader, sink: Sink, limit: int = 64) -> None:
    """Read until nothing more can be handled (as the connection does over loop turns)."""
    for _ in range(10_000):
        before = (len(reader.buf), reader.fast)
        reader.read(sink, limit)
        if sink.failed or (len(reader.buf), reader.fast) == before:
            return


STREAM = [
    masked(Opcode.TEXT, b'{"type":"send","id":"1","text":"a"}'),
    masked(Opcode.BINARY, b"\x00\x01\x02"),
    masked(Opcode.PONG, b"p1"),
    masked(Opcode.TEXT, b"x" * 300),  # a 16-bit length
    masked(Opcode.PING, b"hello"),  # not a fast frame: the websockets parser takes over here
    masked(Opcode.TEXT, b"after the ping"),
    masked(Opcode.TEXT, b"frag", fin=False),
    masked(Opcode.CONT, b"men", fin=False),
    masked(Opcode.CONT, b"ted"),
    masked(Opcode.PONG, b"p2"),
    masked(Opcode.TEXT, b"last"),
]
EXPECTED = [(b'{"type":"send","id":"1","text":"a"}', True), (b"\x00\x01\x02", False),
            (b"x" * 300, True), (b"after the ping", True), (b"fragmented", True), (b"last", True)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(b"".join(STREAM))), max_size=12))
def test_any_split_of_the_input_gives_the_same_messages_in_order(cuts):
    data = b"".join(STREAM)
    reader = FrameReader(MAX_FRAME, 1024)
    sink = Sink(reader)
    bounds = [0, *sorted(set(cuts)), len(data)]
    for a, b in itertools.pairwise(bounds):
        reader.feed(data[a:b])
        drain(reader, sink)
    assert sink.messages == EXPECTED
    assert sink.pongs == 2 and sink.charged == len(STREAM) and not sink.failures
    assert not reader.fast and reader.buf == b""
    assert sink.output == [b"\x8a\x05hello"]  # the pong to the ping, from websockets


def test_common_frames_stay_on_the_fast_path():
    reader = FrameReader(MAX_FRAME, 1024)
    sink = Sink(reader)
    reader.feed(b"".join(STREAM[:4]))
    assert reader.read(sink, 64) == 60
    assert reader.fast and sink.messages == EXPECTED[:3] and sink.pongs == 1
    # Data frames and pongs never make the websockets protocol (~1 KiB per connection)...
    assert reader._protocol is None
    reader.feed(STREAM[4])
    reader.read(sink, 64)
    # ... the first other frame (here a ping) does, and it answers it.
    assert not reader.fast and reader._protocol is not None


def test_a_call_handles_at_most_limit_frames_and_keeps_the_rest():
    reader = FrameReader(MAX_FRAME, 1024)
    sink = Sink(reader)
    reader.feed(masked(Opcode.TEXT, b"m") * 100)
    assert reader.read(sink, 64) == 0 and len(sink.messages) == 64 and reader.buf
    assert reader.read(sink, 64) == 28 and len(sink.messages) == 100 and not reader.buf
    # The same bound after the hand-over: tiny frames in one read are parsed a slice at a time.
    reader = FrameReader(MAX_FRAME, 1024)
    sink = Sink(reader)
    reader.feed(masked(Opcode.PING, b"") + masked(Opcode.TEXT, b"m") * 2000)
    left = reader.read(sink, 64)
    assert left <= 0 and len(sink.messages) < 64 + 2048 // 7 and reader.buf
    drain(reader, sink)
    assert len(sink.messages) == 2000


def test_data_after_our_close_is_charged_not_delivered():
    reader = FrameReader(MAX_FRAME, 1024)
    sink = Sink(reader, close_on=b"stop")
    reader.feed(masked(Opcode.TEXT, b"a") + masked(Opcode.TEXT, b"stop")
                + masked(Opcode.TEXT, b"dropped") + masked(Opcode.CLOSE, struct.pack("!H", 1000)))
    drain(reader, sink)
    assert sink.messages == [(b"a", True), (b"stop", True)]
    assert sink.charged == 4  # the dropped frame and the peer's close were read and charged
    assert reader.protocol.close_rcvd is not None and reader.protocol.close_rcvd.code == 1000


def test_a_fragmented_message_past_its_bounds_fails_1009():
    reader = FrameReader(MAX_FRAME, 3)
    sink = Sink(reader)
    reader.feed(masked(Opcode.TEXT, b"a", fin=False)
                + b"".join(masked(Opcode.CONT, b"b", fin=False) for _ in range(3)))
    drain(reader, sink)
    assert sink.failures == [CloseCode.MESSAGE_TOO_BIG] and sink.messages == []
    assert sink.close_codes() == [CloseCode.MESSAGE_TOO_BIG]
    # Bytes: each fragment counts its payload and FRAGMENT_OVERHEAD_BYTES.
    reader = FrameReader(1000, 100)
    sink = Sink(reader)
    n = 1000 // (10 + FRAGMENT_OVERHEAD_BYTES) + 1
    reader.feed(masked(Opcode.TEXT, b"x" * 10, fin=False)
                + b"".join(masked(Opcode.CONT, b"x" * 10, fin=False) for _ in range(n)))
    drain(reader, sink)
    assert sink.failures == [CloseCode.MESSAGE_TOO_BIG]


def test_an_oversized_frame_goes_to_websockets_which_closes_1009():
    reader = FrameReader(1000, 100)
    sink = Sink(reader)
    reader.feed(masked(Opcode.TEXT, b"ok") + masked(Opcode.TEXT, b"y" * 1001))
    drain(reader, sink)
    assert sink.messages == [(b"ok", True)] and not reader.fast
    assert sink.close_codes() == [CloseCode.MESSAGE_TOO_BIG]


def test_an_unmasked_client_frame_is_a_protocol_error_1002():
    reader = FrameReader(MAX_FRAME, 100)
    sink = Sink(reader)
    reader.feed(Frame(Opcode.TEXT, b"hi").serialize(mask=False, extensions=[]))
    drain(reader, sink)
    assert sink.messages == [] and sink.close_codes() == [1002]


def test_over_the_wire_budget_nothing_of_the_batch_is_delivered():
    reader = FrameReader(MAX_FRAME, 100)
    sink = Sink(reader, budget=3)
    reader.feed(masked(Opcode.TEXT, b"m") * 5)
    reader.read(sink, 64)
    assert sink.messages == [] and sink.failures == [CloseCode.POLICY] and reader.buf == b""


def test_eof_goes_through_websockets():
    reader = FrameReader(MAX_FRAME, 100)
    sink = Sink(reader)
    reader.feed(masked(Opcode.TEXT, b"bye"))
    reader.read(sink, 64, eof=True)
    assert sink.messages == [(b"bye", True)] and not reader.fast and reader.buf == b""
    reader.end(sink)
    assert sink.output[-1:] == [b""]  # websockets asks for the TCP close (EOF)
