"""The admission checks on their own (no server, no sockets): each refusal's close code, in order."""

from __future__ import annotations

import dataclasses

import pytest

from roomshard.config import ShardConfig
from roomshard.wire.protocol import CloseCode
from roomshard.wire.tickets import Signer
from shard.admission import Admission, Refused
from shard.http import HttpRequest

SECRET = "s" * 32
CFG = ShardConfig(instance="i1", port=0, directory_url="http://directory.test",
                  cluster_secret=SECRET)
NOW = 1_700_000_000.0
SIGNER = Signer([SECRET])


def token(room: str = "r", *, instance: str = "i1", now: float = NOW, ttl: float = 60,
          signer: Signer = SIGNER) -> str:
    return signer.encode_ticket(signer.issue_ticket(room=room, instance=instance, epoch=1,
                                                    user="alice", ttl=ttl, now=now))


def request(path: str = "/i1/room/r", **query: str) -> HttpRequest:
    return HttpRequest("GET", path, query, {"origin": "https://chat.example"}, b"")


def check(adm: Admission, req: HttpRequest, *, now: float = NOW, ready: bool = True,
          sockets: int = 1, from_address: int = 1):
    return adm.check(req, now=now, ready=ready, sockets=sockets, from_address=from_address,
                     address="10.0.0.7")


def refused(adm: Admission, req: HttpRequest, **kw) -> tuple[int, str]:
    with pytest.raises(Refused) as exc:
        check(adm, req, **kw)
    return exc.value.code, exc.value.reason


def admission(**cfg) -> Admission:
    return Admission(dataclasses.replace(CFG, **cfg), SIGNER, started_at=NOW - 10)


def test_a_valid_ticket_is_admitted_once_with_its_since():
    adm = admission()
    t = token()
    got = check(adm, request(ticket=t, since="41"))
    assert (got.ticket.room, got.ticket.user, got.since) == ("r", "alice", 41)
    assert refused(adm, request(ticket=t)) == (CloseCode.TICKET_INVALID, "ticket already used")
    assert check(adm, request(ticket=token())).since is None
    assert check(adm, request(ticket=token(), since="4²")).since == -1  # unreadable


@pytest.mark.parametrize(("path", "why"), [
    ("/i2/room/r", "not a room path of instance i1"),
    ("/i1/rooms/r", "not a room path of instance i1"),
    ("/i1/room/r/x", "not a room path of instance i1"),
    ("/i1/room/bad%20id", "invalid room id"),
])
def test_a_path_that_is_not_this_instances_room_is_4004(path, why):
    assert refused(admission(), request(path, ticket=token())) == (CloseCode.NOT_OWNER, why)


def test_the_checks_come_in_the_contracts_order():
    adm = admission(allowed_origins=("https://other.example",))
    # Every check would fail: the path's comes first, then the origin's, then readiness.
    bad = request("/i2/room/r")
    assert refused(adm, bad, ready=False)[0] == CloseCode.NOT_OWNER
    assert refused(adm, request(), ready=False) == (CloseCode.POLICY, "origin not allowed")
    adm = admission()
    assert refused(adm, request(), ready=False) == (CloseCode.TRY_AGAIN_LATER, "shard not ready")
    assert refused(adm, request()) == (CloseCode.TICKET_INVALID, "missing ticket")


def test_tickets_that_are_not_good_here_are_4001_or_4003():
    adm = admission()
    code, why = refused(adm, request(ticket=token(ttl=5)), now=NOW + 60)
    assert code == CloseCode.TICKET_INVALID and why.startswith("invalid ticket")
    code, _ = refused(adm, request(ticket=token(signer=Signer(["x" * 32]))))
    assert code == CloseCode.TICKET_INVALID  # signed with another secret
    assert refused(adm, request(ticket=token(now=NOW - 20))) == (
        CloseCode.TICKET_INVALID, "ticket predates this shard process")
    assert refused(adm, request(ticket=token("other"))) == (
        CloseCode.TICKET_MISMATCH, "ticket is for another room or instance")
    assert refused(adm, request(ticket=token(instance="i2"))) == (
        CloseCode.TICKET_MISMATCH, "ticket is for another room or instance")


def test_connection_caps_refuse_after_the_ticket_is_spent():
    adm = admission(max_connections=10, max_connections_per_address=3)
    t = token()
    assert refused(adm, request(ticket=t), sockets=11) == (
        CloseCode.TRY_AGAIN_LATER, "shard at max connections")
    assert list(adm.used) == [SIGNER.verify_ticket(t, now=NOW).jti]  # spent: a retry needs a new one
    assert refused(adm, request(ticket=token()), sockets=10, from_address=4) == (
        CloseCode.POLICY, "over 3 connections from 10.0.0.7")
    assert check(adm, request(ticket=token()), sockets=10, from_address=3).since is None


def test_used_tickets_are_forgotten_once_expired():
    adm = admission()
    check(adm, request(ticket=token(ttl=30)))
    check(adm, request(ticket=token(ttl=90)))
    adm.forget_expired(NOW + 60)
    assert len(adm.used) == 1
    adm.forget_expired(NOW + 100)
    assert adm.used == {}
