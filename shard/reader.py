"""A WebSocket connection's input, sans I/O: bytes in, messages out, at most N frames a call.

Two parsers behind one object:

- the common frames (complete, unfragmented, masked text/binary/pong
  frames) are cut and unmasked by :func:`shard.frames.read_client_frames`,
  a few integer operations per frame (it pays for itself: without it the
  fan-out costs 8% more shard CPU per delivery, docs/benchmarks/shard-transport.md);
- the first frame of any other kind (ping, close, fragment, protocol error,
  over ``max_frame``), and everything after it, goes to the sans-I/O
  ``websockets`` :class:`~websockets.protocol.Protocol` for the rest of the
  connection (pongs, the close handshake, 1002, 1009). Both start at the
  same frame boundary, so no frame is seen twice or skipped. The
  ``websockets`` parser is fed :data:`WS_FEED_SLICE` bytes at a time, so a
  call parses a bounded number of frames whatever the peer packed in one read.

A fragmented message is reassembled here, within ``max_fragments`` fragments
and ``max_frame`` bytes (each fragment charged :data:`FRAGMENT_OVERHEAD_BYTES`
on top of its payload); past either the connection fails with 1009.

:meth:`FrameReader.read` reports to a :class:`FrameSink` (the connection):
it charges each batch of frames to the sink's wire budget before handling
it, hands over messages and pongs, stops at the first frame once the sink
is closing (later data frames are charged, not delivered), and has the sink
take the ``websockets`` output (pongs, close frames) after each slice.
"""

from __future__ import annotations

import logging
import typing
from typing import cast

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol, Side

from roomshard.wire.protocol import CloseCode
from shard.frames import HEAD_PONG, HEAD_TEXT, read_client_frames

# websockets logs every closed connection at INFO; one shared quiet logger.
WS_LOGGER = logging.getLogger("roomshard.shard.ws")
WS_LOGGER.setLevel(logging.WARNING)
# The websockets parser gets the input in slices of this size: a slice holds
# at most WS_FEED_SLICE / 6 frames (the smallest masked frame), so a call
# parses a bounded number of frames whatever the sender packs in one read.
WS_FEED_SLICE = 2048
# What a fragment of a fragmented message is charged against ``max_frame`` on
# top of its payload (its frame object and header), so many tiny fragments
# cannot hold more than a large message would.
FRAGMENT_OVERHEAD_BYTES = 64
_TEXT, _BINARY, _CONT, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PONG


class FrameSink(typing.Protocol):
    """What a :class:`FrameReader` reports to (the connection)."""

    closing: bool  # our close frame is out (or going): data frames are no longer delivered
    failed: bool  # the connection failed: nothing more is parsed

    def charge(self, frames: int) -> bool:
        """Charge ``frames`` to the wire budget; False when over it (the sink has failed)."""

    def on_message(self, payload: bytes, is_text: bool) -> None:
        """A complete data message."""

    def on_pong(self) -> None:
        """A pong."""

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection with ``code`` (RFC 6455 7.1.7)."""

    def take_output(self) -> None:
        """Write what :attr:`FrameReader.protocol` has to send (pongs, close frames, EOF)."""


class FrameReader:
    """See the module docstring. ``buf`` is the input not handled yet."""

    __slots__ = ("_protocol", "buf", "fast", "frag", "frag_count", "frag_text", "max_fragments",
                 "max_frame")

    def __init__(self, max_frame: int, max_fragments: int, buffered: bytes = b"") -> None:
        self.max_frame = max_frame
        self.max_fragments = max_fragments
        self._protocol: Protocol | None = None  # see :attr:`protocol`
        # In fast mode buf starts at a frame boundary; after the hand-over it is
        # what the websockets parser has not been fed yet.
        self.buf = buffered
        self.fast = True
        self.frag: bytearray | None = None  # the fragmented message being reassembled
        self.frag_count = 0
        self.frag_text = False

    @property
    def protocol(self) -> Protocol:
        """The websockets protocol: the parser after the hand-over, and the writer of every
        control frame (pongs, close frames). Made on first use: most connections only ever
        send and receive data frames, and the protocol object is about 1 KiB of each idle
        connection's memory."""
        protocol = self._protocol
        if protocol is None:
            protocol = self._protocol = Protocol(Side.SERVER, state=OPEN, max_size=self.max_frame,
                                                 logger=WS_LOGGER)
        return protocol

    def feed(self, data: bytes) -> None:
        """Input read from the socket."""
        self.buf = self.buf + data if self.buf else data

    def discard(self) -> None:
        """Drop the input not handled yet (the connection failed or closes)."""
        self.buf = b""

    def read(self, sink: FrameSink, limit: int, *, eof: bool = False) -> int:
        """Handle at most ``limit`` frames of the input; returns how many of the limit are left.

        What is left in :attr:`buf` afterwards is either an incomplete frame
        (fast mode, limit not reached: wait for more input) or input the limit
        did not reach (handle it on a later call). ``eof``: the peer
        half-closed, so the rest goes to the websockets parser (call
        :meth:`end` once :attr:`buf` is empty).
        """
        left = limit
        if self.fast:
            buf = self.buf
            if not sink.closing:
                frames, used, slow = read_client_frames(buf, self.max_frame, left)
                if frames:
                    if not sink.charge(len(frames)):
                        return 0
                    for head, payload in frames:
                        if sink.closing:  # an earlier frame closed us (4008): the rest is dropped
                            break
                        if head == HEAD_PONG:
                            sink.on_pong()
                        else:
                            sink.on_message(payload, head == HEAD_TEXT)
                    if sink.failed:
                        return 0
                    left -= len(frames)
                buf = buf[used:] if used else buf
                if not (slow or sink.closing or eof):
                    self.buf = buf
                    return left
            # The websockets parser takes over for the rest of the connection
            # (another kind of frame, the closing handshake, or the peer's EOF).
            self.buf, self.fast = buf, False
        protocol = self.protocol
        data, pos, n = self.buf, 0, len(self.buf)
        while pos < n and left > 0 and not sink.failed:
            protocol.receive_data(data[pos:pos + WS_FEED_SLICE])
            pos += WS_FEED_SLICE
            left -= self._dispatch(sink)
        if sink.failed:
            self.buf = b""
            return 0
        self.buf = data[pos:] if pos < n else b""
        return left

    def end(self, sink: FrameSink) -> None:
        """The peer's EOF, once every byte before it was handled."""
        self.protocol.receive_eof()
        self._dispatch(sink)

    def _dispatch(self, sink: FrameSink) -> int:
        """Handle the frames the websockets parser produced; their count."""
        # Past the handshake the protocol yields frames only.
        events = cast(list[Frame], self.protocol.events_received())
        if events and not sink.closing:
            if not sink.charge(len(events)):
                return len(events)
            for frame in events:
                if sink.closing:  # an earlier frame of this batch closed us (4008)
                    break
                op = frame.opcode
                if op is _TEXT or op is _BINARY:
                    if frame.fin:  # the parser builds bytes (unmasked)
                        sink.on_message(cast(bytes, frame.data), op is _TEXT)
                    else:
                        self.frag, self.frag_count = bytearray(frame.data), 1
                        self.frag_text = op is _TEXT
                elif op is _CONT:
                    frag = self.frag
                    if frag is not None:
                        frag += frame.data
                        self.frag_count += 1
                        if not self._fragments_fit(sink, frag):
                            break
                        if frame.fin:
                            self.frag = None
                            sink.on_message(bytes(frag), self.frag_text)
                elif op is _PONG:
                    sink.on_pong()
        elif events and sink.closing and not sink.charge(len(events)):
            return len(events)
        sink.take_output()
        return len(events)

    def _fragments_fit(self, sink: FrameSink, frag: bytearray) -> bool:
        """Bound one fragmented message: fragment count and payload + per-fragment overhead."""
        if (self.frag_count <= self.max_fragments
                and len(frag) + self.frag_count * FRAGMENT_OVERHEAD_BYTES <= self.max_frame):
            return True
        self.frag = None
        sink.fail(CloseCode.MESSAGE_TOO_BIG,
                  f"over {self.max_fragments} fragments or {self.max_frame} bytes in one message")
        return False
