"""roomshard.wire.tickets: its own HS256 makes ordinary JWTs and refuses every forgery."""

from __future__ import annotations

import base64
import hashlib
import hmac

import jwt
import pytest

from roomshard.wire.tickets import (
    TICKET_AUDIENCE,
    Signer,
    TicketError,
    TicketExpired,
    _key,
)

NOW = 1_800_000_000.0
SECRET = "a-cluster-secret"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


NONE_HEADER = _b64(b'{"alg":"none"}')
HS256_HEADER = _b64(b'{"alg":"HS256","typ":"JWT"}')
EVE_CLAIMS = _b64(b'{"aud":"roomshard:ticket","sub":"eve"}')
NOT_JSON = _b64(b"xx")


def _claims(**over: object) -> dict[str, object]:
    return {"aud": TICKET_AUDIENCE, "room": "r1", "ins": "i2", "epoch": 7, "sub": "alice",
            "jti": "j1", "iat": NOW, "exp": NOW + 60, **over}


def test_a_ticket_is_a_jwt_both_ways() -> None:
    signer = Signer([SECRET])
    ticket = signer.issue_ticket(room="r1", instance="i2", epoch=7, user="alice", ttl=60, now=NOW)
    token = signer.encode_ticket(ticket)
    claims = jwt.decode(token, _key(SECRET), algorithms=["HS256"], audience=TICKET_AUDIENCE,
                        options={"verify_exp": False, "verify_iat": False})
    assert (claims["room"], claims["ins"], claims["epoch"], claims["sub"]) == ("r1", "i2", 7, "alice")
    assert signer.verify_ticket(token, now=NOW) == ticket
    # A ticket PyJWT signs with the key (another header layout included) verifies too.
    other = jwt.encode(_claims(), _key(SECRET), algorithm="HS256", headers={"kid": "k1"})
    assert signer.verify_ticket(other, now=NOW).user == "alice"


def test_rotation_signs_with_the_first_and_verifies_with_every_secret() -> None:
    old = Signer(["old"])
    both = Signer(["new", "old"])
    token = old.encode_ticket(old.issue_ticket(room="r", instance="i1", epoch=1, user="u",
                                               ttl=60, now=NOW))
    assert both.verify_ticket(token, now=NOW).room == "r"
    with pytest.raises(TicketError, match="bad signature"):
        Signer(["new"]).verify_ticket(token, now=NOW)


def _forged() -> list[tuple[str, str]]:
    good = jwt.encode(_claims(), _key(SECRET), algorithm="HS256")
    head, body, sig = good.split(".")
    return [
        ("alg none", jwt.encode(_claims(), None, algorithm="none")),  # type: ignore[arg-type]
        ("alg none, good signature kept",
         f"{NONE_HEADER}.{body}.{sig}"),
        ("HS512", jwt.encode(_claims(), _key(SECRET) * 2, algorithm="HS512")),
        ("other key", jwt.encode(_claims(), _key("other"), algorithm="HS256")),
        ("claims changed", f"{head}.{EVE_CLAIMS}.{sig}"),
        ("padded signature", f"{good}="),
        ("signature with junk", f"{head}.{body}.{sig[:-1]}!"),
        ("two segments", f"{head}.{body}"),
        ("four segments", f"{good}.x"),
        ("not ascii", good[:-1] + "é"),
        ("empty", ""),
        ("header not json", f"{NOT_JSON}.{body}.{sig}"),
        ("crit header", jwt.encode(_claims(), _key(SECRET), algorithm="HS256",
                                   headers={"crit": ["exp"]})),
        ("other audience", jwt.encode(_claims(aud="roomshard:cluster"), _key(SECRET),
                                      algorithm="HS256")),
        ("no audience", jwt.encode({k: v for k, v in _claims().items() if k != "aud"},
                                   _key(SECRET), algorithm="HS256")),
        ("claims not an object", _signed_raw(b"[1,2]")),
        ("claims not json", _signed_raw(b"{nope")),
        ("epoch a string", jwt.encode(_claims(epoch="7"), _key(SECRET), algorithm="HS256")),
        ("epoch a bool", jwt.encode(_claims(epoch=True), _key(SECRET), algorithm="HS256")),
    ]


def _signed_raw(payload: bytes) -> str:
    """A token with a correct signature over an arbitrary claims segment."""
    signing_input = f"{HS256_HEADER}.{_b64(payload)}".encode()
    mac = hmac.new(_key(SECRET), signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{_b64(mac)}"


@pytest.mark.parametrize(("case", "token"), _forged(), ids=[c for c, _ in _forged()])
def test_forged_or_malformed_tokens_are_refused(case: str, token: str) -> None:
    with pytest.raises(TicketError):
        Signer([SECRET]).verify_ticket(token, now=NOW)


def test_expiry_and_issue_time_use_the_callers_clock() -> None:
    signer = Signer([SECRET])
    token = jwt.encode(_claims(), _key(SECRET), algorithm="HS256")
    assert signer.verify_ticket(token, now=NOW + 59.9).epoch == 7
    with pytest.raises(TicketExpired):
        signer.verify_ticket(token, now=NOW + 60)
    with pytest.raises(TicketError, match="future"):
        signer.verify_ticket(token, now=NOW - 10)
