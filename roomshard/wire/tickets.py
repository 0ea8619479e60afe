"""Signed tickets (directory -> client -> shard) and cluster tokens (shard <-> directory).

Both are HS256 JWTs keyed by ``ROOMSHARD_CLUSTER_SECRET``. The secret may be a
comma-separated list to rotate it: the first entry signs, every entry
verifies. Each secret is stretched to a 32-byte HMAC key with SHA-256 so that
short operator-chosen secrets still make full-strength keys.

A cluster token names its receiver: ``aud`` holds ``roomshard:cluster:<to>``
(``to`` = ``"directory"`` or the target shard's instance id) next to the plain
``roomshard:cluster`` that versions before the binding check, so a token the
directory sends to one shard is refused by every other one (and by the
directory), whatever URL it was sent to. A receiver accepts a token only when
its own name is in ``aud``; the directory alone may also accept an unbound
token from a shard (``allow_unbound``, the rolling upgrade: see
docs/INTERNALS.md).

Signing and verifying are this module's own HS256 (RFC 7519 compact JWS:
``base64url(header).base64url(claims).base64url(HMAC-SHA256)``), not PyJWT's:
every connect signs one ticket on the directory and verifies it on the shard,
and PyJWT's general path (algorithm registry, key preparation, claim
validation) cost 20 us to sign and 45-100 us to verify, a sixth of a shard's
connect (docs/benchmarks/connect.md); this one is 3 and 6 us. The tokens
are ordinary JWTs (PyJWT reads and makes them, the tests do both). Verification
is strict where it matters: the header must name ``HS256`` (``none`` and
every other algorithm are refused), and the signature segment must be the
exact unpadded base64url of the MAC, compared in constant time. PyJWT stays
for the application's JWTs (``directory.domain.auth``: RS256/ES256 keys).

Nothing here reads the clock: callers pass ``now`` (seconds since the epoch,
a float), so expiry is testable without sleeping.

Errors::

    TicketError            any ticket or cluster token that must be refused
      TicketExpired        past its ``exp`` (refused from exp on)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
from dataclasses import dataclass
from typing import Any

import orjson

TICKET_AUDIENCE = "roomshard:ticket"
CLUSTER_AUDIENCE = "roomshard:cluster"
#: The directory's name as a cluster token's subject and receiver (shards are "iN").
DIRECTORY = "directory"
# Tokens are minted per request: a short life bounds what a captured one is worth.
CLUSTER_TOKEN_TTL_S = 30.0
# Clock skew tolerated between the directory's and a shard's clocks when
# checking ``iat`` (a ticket "from the future" is refused past this).
MAX_CLOCK_SKEW_S = 5.0


class TicketError(Exception):
    """A ticket or cluster token that must be refused (close 4001 / HTTP 401)."""


class TicketExpired(TicketError):
    """The token's ``exp`` has passed."""


@dataclass(frozen=True, slots=True)
class Ticket:
    room: str
    instance: str
    epoch: int
    user: str
    jti: str
    iat: float
    exp: float


def _key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(segment: bytes) -> bytes:
    """Strict base64url (no padding, nothing outside the alphabet); raises TicketError."""
    try:
        return base64.b64decode(segment + b"=" * (-len(segment) % 4), altchars=b"-_",
                                validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TicketError("malformed token") from exc


#: The header every token of this module carries (what PyJWT writes for HS256).
_HEADER = _b64(b'{"alg":"HS256","typ":"JWT"}')


class _HS256:
    """One key's HS256 signer/verifier; the keyed HMAC state is built once and copied."""

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def signature(self, signing_input: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(signing_input)
        return _b64(mac.digest())

    def sign(self, claims: dict[str, Any]) -> str:
        signing_input = _HEADER + b"." + _b64(orjson.dumps(claims))
        return (signing_input + b"." + self.signature(signing_input)).decode("ascii")


def _check_header(segment: bytes) -> None:
    if segment == _HEADER:
        return
    try:
        header = orjson.loads(_unb64(segment))
    except orjson.JSONDecodeError as exc:
        raise TicketError("malformed token header") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TicketError("token algorithm is not HS256")
    if "crit" in header:
        raise TicketError("token header has critical extensions")


def parse_secrets(value: str) -> list[str]:
    """Split a comma-separated secret list; empty entries are dropped."""
    return [s.strip() for s in value.split(",") if s.strip()]


def new_secret() -> str:
    return _secrets.token_urlsafe(32)


class Signer:
    """Issues and verifies tickets and cluster tokens with a rotating key list."""

    def __init__(self, cluster_secrets: list[str]) -> None:
        if not cluster_secrets:
            raise ValueError("at least one cluster secret is required")
        self._signer = _HS256(_key(cluster_secrets[0]))
        self._verifiers = [_HS256(_key(s)) for s in cluster_secrets]

    # -- tickets ---------------------------------------------------------
    def issue_ticket(
        self, *, room: str, instance: str, epoch: int, user: str, ttl: float, now: float
    ) -> Ticket:
        return Ticket(
            room=room,
            instance=instance,
            epoch=epoch,
            user=user,
            jti=_secrets.token_urlsafe(12),
            iat=round(now, 3),
            exp=round(now + ttl, 3),
        )

    def encode_ticket(self, ticket: Ticket) -> str:
        claims = {
            "aud": TICKET_AUDIENCE,
            "room": ticket.room,
            "ins": ticket.instance,
            "epoch": ticket.epoch,
            "sub": ticket.user,
            "jti": ticket.jti,
            "iat": ticket.iat,
            "exp": ticket.exp,
        }
        return self._signer.sign(claims)

    def verify_ticket(self, token: str, *, now: float) -> Ticket:
        """Check signature, audience, shape and expiry; raises :class:`TicketError`."""
        claims = self._decode(token, TICKET_AUDIENCE)
        try:
            ticket = Ticket(
                room=_str(claims, "room"),
                instance=_str(claims, "ins"),
                epoch=_int(claims, "epoch"),
                user=_str(claims, "sub"),
                jti=_str(claims, "jti"),
                iat=_num(claims, "iat"),
                exp=_num(claims, "exp"),
            )
        except (KeyError, TypeError) as exc:
            raise TicketError(f"malformed ticket: {exc}") from exc
        if now >= ticket.exp:
            raise TicketExpired("ticket expired")
        if ticket.iat > now + MAX_CLOCK_SKEW_S:
            raise TicketError("ticket issued in the future")
        return ticket

    # -- cluster tokens --------------------------------------------------
    def cluster_token(self, subject: str, *, to: str, now: float) -> str:
        """A token for one call from ``subject`` to ``to`` (``"directory"`` or ``"iN"``)."""
        claims = {
            "aud": [CLUSTER_AUDIENCE, cluster_audience(to)],
            "sub": subject,
            "jti": _secrets.token_urlsafe(12),
            "iat": round(now, 3),
            "exp": round(now + CLUSTER_TOKEN_TTL_S, 3),
        }
        return self._signer.sign(claims)

    def verify_cluster_token(self, token: str, *, receiver: str, now: float,
                             allow_unbound: bool = False) -> str:
        """Return the caller's subject (``"iN"`` or ``"directory"``); raises :class:`TicketError`.

        The token must name ``receiver`` in its ``aud``. ``allow_unbound`` also
        accepts a token of an older version that names no receiver (``aud`` =
        ``roomshard:cluster`` alone) when its subject is not the directory.
        """
        claims = self._decode(token, CLUSTER_AUDIENCE)
        try:
            subject = _str(claims, "sub")
            exp = _num(claims, "exp")
            iat = _num(claims, "iat")
        except (KeyError, TypeError) as exc:
            raise TicketError(f"malformed cluster token: {exc}") from exc
        aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if cluster_audience(receiver) not in aud:
            bound = any(isinstance(a, str) and a.startswith(CLUSTER_AUDIENCE + ":") for a in aud)
            if bound or not allow_unbound or subject == DIRECTORY:
                raise TicketError(f"cluster token is not for {receiver}")
        if now >= exp:
            raise TicketExpired("cluster token expired")
        if iat > now + MAX_CLOCK_SKEW_S:
            raise TicketError("cluster token issued in the future")
        return subject

    def _decode(self, token: str, audience: str) -> dict[str, Any]:
        """The claims of a token signed by one of the keys, whose ``aud`` holds ``audience``."""
        raw = token.encode("ascii", "replace")
        signing_input, dot, signature = raw.rpartition(b".")
        header, dot2, payload = signing_input.partition(b".")
        if not dot or not dot2 or b"." in payload:
            raise TicketError("malformed token: not three segments")
        _check_header(header)
        if not any(hmac.compare_digest(v.signature(signing_input), signature)
                   for v in self._verifiers):
            raise TicketError("bad signature")
        try:
            claims = orjson.loads(_unb64(payload))
        except orjson.JSONDecodeError as exc:
            raise TicketError("malformed token claims") from exc
        if not isinstance(claims, dict):
            raise TicketError("malformed token claims")
        aud = claims.get("aud")
        if not (aud == audience or (isinstance(aud, list) and audience in aud)):
            raise TicketError("token is not for this audience")
        return claims


def cluster_audience(receiver: str) -> str:
    """The ``aud`` entry that binds a cluster token to its receiver."""
    return f"{CLUSTER_AUDIENCE}:{receiver}"


def _str(claims: dict[str, Any], name: str) -> str:
    value = claims[name]
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    return value


def _int(claims: dict[str, Any], name: str) -> int:
    value = claims[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer")
    return value


def _num(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number")
    return float(value)
