"""Client frame validation and server frame encoding."""

from __future__ import annotations

import orjson
import pytest
from websockets.frames import Frame
from websockets.streams import StreamReader

from shard.frames import FrameRejected, error_frame, parse_client_frame, server_frame, text_frame
from shard.ratelimit import TokenBucket, Verdict


def parse_server_frame(data: bytes) -> Frame:
    """Parse bytes with websockets' own client-side frame parser."""
    reader = StreamReader()
    reader.feed_data(data)
    gen = Frame.parse(reader.read_exact, mask=False)
    try:
        next(gen)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_server_frames_parse_with_websockets_at_every_length_boundary(size):
    """Frames built once for broadcast are valid unmasked RFC 6455 frames."""
    payload = b"x" * size
    frame = parse_server_frame(text_frame(payload))
    assert frame.fin and frame.opcode.name == "TEXT" and frame.data == payload
    assert parse_server_frame(server_frame(0x9, b"p")).opcode.name == "PING"


def test_valid_send_frame_is_parsed():
    """A well-formed send yields its id and text; extra fields are ignored."""
    f = parse_client_frame(b'{"type":"send","id":"a1","text":"hi","x":1}', is_text=True, max_text=10)
    assert (f.id, f.text) == ("a1", "hi")


@pytest.mark.parametrize("payload,is_text,code,msg_id", [
    (b"not json", True, "bad_request", None),
    (b"[1,2]", True, "bad_request", None),
    (b'{"type":"hello","id":"k"}', True, "bad_request", "k"),
    (b'{"type":"send","text":"t"}', True, "bad_request", None),
    (b'{"type":"send","id":"","text":"t"}', True, "bad_request", None),
    (b'{"type":"send","id":"' + b"i" * 65 + b'","text":"t"}', True, "bad_request", None),
    (b'{"type":"send","id":5,"text":"t"}', True, "bad_request", None),
    (b'{"type":"send","id":"k"}', True, "bad_request", "k"),
    (b'{"type":"send","id":"k","text":3}', True, "bad_request", "k"),
    (b'{"type":"send","id":"k","text":"t"}', False, "bad_request", None),
    ('{"type":"send","id":"k","text":"éééééé"}'.encode(), True, "too_long", "k"),
])
def test_bad_frames_are_rejected_with_code_and_id(payload, is_text, code, msg_id):
    """Malformed, mistyped, binary and over-long frames get the contract's error code."""
    with pytest.raises(FrameRejected) as info:
        parse_client_frame(payload, is_text=is_text, max_text=5)
    assert (info.value.code, info.value.msg_id) == (code, msg_id)
    body = orjson.loads(parse_server_frame(info.value.frame()).data)
    assert body["type"] == "error" and body["code"] == code and body.get("id") == msg_id


def test_invalid_utf8_text_is_not_a_bad_request_but_fails_the_connection():
    """RFC 6455 8.1: invalid UTF-8 in a text frame fails the connection (1007), no error frame."""
    from shard.frames import InvalidUtf8

    for payload in (b"\xff\xfe", b'{"type":"send","id":"k","text":"\xc3"}'):
        with pytest.raises(InvalidUtf8):
            parse_client_frame(payload, is_text=True, max_text=5)


def test_text_limit_counts_characters_not_bytes():
    """max_text is in characters: five multi-byte characters fit in five."""
    assert parse_client_frame('{"type":"send","id":"k","text":"ééééé"}'.encode(),
                              is_text=True, max_text=5).text == "ééééé"


def test_error_frame_without_id_has_no_id_field():
    """An error for a frame whose id is unknown carries no id."""
    assert "id" not in orjson.loads(parse_server_frame(error_frame("bad_request", "m")).data)


def test_token_bucket_allows_burst_then_rate():
    """The burst passes at once, then one message per 1/rate seconds."""
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [Verdict.OK] * 3 + [Verdict.REFUSE]
    assert b.take(0.1) is Verdict.OK
    assert b.take(0.1) is Verdict.REFUSE


def test_token_bucket_closes_a_persistent_flood_but_not_a_slight_overshoot():
    """3x burst of net refusals closes; refusals that drain as fast as they come do not."""
    flood = TokenBucket(rate=10, burst=4, now=0.0)
    verdicts = [flood.take(0.0) for _ in range(4 + 12)]
    assert verdicts[:4] == [Verdict.OK] * 4 and verdicts[-1] is Verdict.CLOSE
    assert Verdict.CLOSE not in verdicts[:-1]
    slight = TokenBucket(rate=10, burst=4, now=0.0)
    now = 0.0
    seen = set()
    for _ in range(2000):  # 20 msg/s against a limit of 10/s
        now += 0.05
        seen.add(slight.take(now))
    assert Verdict.REFUSE in seen and Verdict.CLOSE not in seen
