"""The checks a WebSocket passes before it may join a room (pure: no clock, no sockets).

:meth:`Admission.check` runs them in the contract's order and raises
:class:`Refused` with the close code of the first that fails:

1. the path is ``/{this instance}/room/{valid room id}`` (else 4004);
2. the ``Origin`` is allowed, when origins are configured (else 4008);
3. the shard is ready: registered and holding its lease (else 1013);
4. the ticket is present, valid and unexpired (else 4001), issued after
   this process started (a ticket from before may have been used on the
   previous incarnation, whose used-ticket set is gone: 4001), not used
   before (4001), and for this room and instance (4003); it is then
   recorded as used;
5. the shard is under ``max_connections`` (else 1013) and the address under
   ``max_connections_per_address`` (else 4008).

The room's own checks (frozen, unconfirmed, owner epoch, private members)
come later, once the room is in memory (``ShardServer._join``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from roomshard.config import ShardConfig
from roomshard.wire.protocol import CloseCode, valid_room_id
from roomshard.wire.tickets import Signer, Ticket, TicketError
from shard.http import HttpRequest

_SINCE_RE = re.compile(r"[0-9]{1,20}")  # ASCII digits only ("²".isdigit() is true)


class Refused(Exception):
    """An admission refusal: the WebSocket is closed with ``code`` after the 101."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Admitted:
    ticket: Ticket
    # The client's ``since``: None when absent, -1 when unreadable (answered recovered: false).
    since: int | None


@dataclass(slots=True)
class Admission:
    """One per shard process: the settings, the signer and the tickets used so far."""

    cfg: ShardConfig
    signer: Signer
    started_at: float  # wall-clock start of this process
    used: dict[str, float] = field(default_factory=dict)  # ticket jti -> its exp

    def check(self, request: HttpRequest, *, now: float, ready: bool, sockets: int,
              from_address: int, address: str) -> Admitted:
        """Admit ``request`` or raise :class:`Refused`; see the module docstring.

        ``sockets``: WebSockets open on the shard, this one included;
        ``from_address``: those of them from ``address``.
        """
        cfg = self.cfg
        parts = request.path.split("/")
        if len(parts) != 4 or parts[0] or parts[2] != "room" or parts[1] != cfg.instance:
            raise Refused(CloseCode.NOT_OWNER, f"not a room path of instance {cfg.instance}")
        room = parts[3]
        if not valid_room_id(room):
            raise Refused(CloseCode.NOT_OWNER, "invalid room id")
        if cfg.allowed_origins and request.headers.get("origin") not in cfg.allowed_origins:
            raise Refused(CloseCode.POLICY, "origin not allowed")
        if not ready:
            raise Refused(CloseCode.TRY_AGAIN_LATER, "shard not ready")
        token = request.query.get("ticket")
        if not token:
            raise Refused(CloseCode.TICKET_INVALID, "missing ticket")
        try:
            ticket = self.signer.verify_ticket(token, now=now)
        except TicketError as exc:
            raise Refused(CloseCode.TICKET_INVALID, f"invalid ticket: {exc}") from None
        if ticket.iat < self.started_at:
            raise Refused(CloseCode.TICKET_INVALID, "ticket predates this shard process")
        if ticket.jti in self.used:
            raise Refused(CloseCode.TICKET_INVALID, "ticket already used")
        if ticket.room != room or ticket.instance != cfg.instance:
            raise Refused(CloseCode.TICKET_MISMATCH, "ticket is for another room or instance")
        self.used[ticket.jti] = ticket.exp
        if sockets > cfg.max_connections:
            raise Refused(CloseCode.TRY_AGAIN_LATER, "shard at max connections")
        per_address = cfg.max_connections_per_address
        if per_address and from_address > per_address:
            raise Refused(CloseCode.POLICY, f"over {per_address} connections from {address}")
        raw_since = request.query.get("since")
        since: int | None = None
        if raw_since is not None:
            # An unreadable since cannot be honoured: answer recovered false.
            since = int(raw_since) if _SINCE_RE.fullmatch(raw_since) else -1
        return Admitted(ticket, since)

    def forget_expired(self, now: float) -> None:
        """Drop used tickets past their expiry (they would be refused as expired anyway)."""
        if self.used:
            self.used = {jti: exp for jti, exp in self.used.items() if exp > now}
