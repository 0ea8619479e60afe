"""An in-process directory double for the shard's control calls (httpx MockTransport).

It implements just heartbeat, open (single and batched) and leave with the semantics of
docs/INTERNALS.md, and issues tickets like the directory does. The
end-to-end tests use the real ``roomshard directory``; this double lets the
in-process tests drive lease loss, ``moving`` and stale epochs directly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx
import msgspec

from roomshard.wire.internal import HeartbeatResponse, InstanceLoad, InstanceView
from roomshard.wire.protocol import seq_base_for_lost_state
from roomshard.wire.tickets import Signer

SECRET = "test-cluster-secret"


@dataclass
class RoomRecord:
    instance: str
    epoch: int = 1
    owner_epoch: int = 1
    opened_epoch: int | None = None
    opened_by: str | None = None
    seq_base: int = 0
    state: str = "active"
    private: bool = False
    members: list[str] | None = None


@dataclass
class FakeDirectory:
    signer: Signer = field(default_factory=lambda: Signer([SECRET]))
    rooms: dict[str, RoomRecord] = field(default_factory=dict)
    heartbeats: list[dict] = field(default_factory=list)
    leaves: list[dict] = field(default_factory=list)
    opens: list[str] = field(default_factory=list)
    open_ids: list[str | None] = field(default_factory=list)
    lose_open_answers: int = 0  # apply this many open calls, then answer them with a timeout
    batch_route: bool = True  # False: a directory from before ``POST /v1/internal/opens``
    open_batches: list[list[str]] = field(default_factory=list)
    reachable: bool = True

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if not self.reachable:
            raise httpx.ConnectError("directory unreachable (test)", request=request)
        auth = request.headers.get("authorization", "").removeprefix("Bearer ")
        subject = self.signer.verify_cluster_token(auth, receiver="directory", now=time.time())
        body = json.loads(request.content or b"null")
        parts = request.url.path.strip("/").split("/")
        if parts[:3] == ["v1", "internal", "instances"] and parts[4] == "heartbeat":
            assert subject == parts[3]
            self.heartbeats.append(body)
            view = InstanceView(
                id=parts[3], state="active", state_reason=None,
                capacity=body.get("capacity") or 1000, internal_url=body["internal_url"],
                public_base=body.get("public_base"), last_heartbeat="2026-12-06T00:00:00Z",
                registered_at="2026-12-06T00:00:00Z", rooms_assigned=len(self.rooms),
                load=msgspec.convert(body.get("load") or {}, InstanceLoad))
            answer: dict = msgspec.to_builtins(HeartbeatResponse(instance=view, down_after=10))
            if body.get("confirm") is not None:  # rooms kept through a lost lease
                answer["owned"] = [r for r, e in body["confirm"].items()
                                   if (rec := self.rooms.get(r)) is not None
                                   and rec.instance == parts[3] and rec.epoch == e]
            return httpx.Response(200, json=answer)
        if parts[:3] == ["v1", "internal", "instances"] and parts[4] == "leave":
            self.leaves.append(body)
            return httpx.Response(200, json={"moves": []})
        if parts[:3] == ["v1", "internal", "rooms"] and parts[4] == "open":
            return self._open(parts[3], body)
        if parts == ["v1", "internal", "opens"] and self.batch_route:
            return self._open_batch(body)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no route"}})

    def _open(self, name: str, body: dict) -> httpx.Response:
        response = self._grant(name, body)
        if self.lose_open_answers > 0:
            self.lose_open_answers -= 1
            raise httpx.ReadTimeout("the answer to this open was lost (test)")
        return response

    def _open_batch(self, body: dict) -> httpx.Response:
        self.open_batches.append([item["room"] for item in body["rooms"]])
        results = []
        for item in body["rooms"]:
            one = self._grant(item["room"], {**item, "instance": body["instance"]})
            answer = json.loads(one.content)
            results.append({"room": item["room"],
                            **({"grant": answer} if one.status_code == 200 else answer)})
        if self.lose_open_answers > 0:
            self.lose_open_answers -= 1
            raise httpx.ReadTimeout("the answer to these opens was lost (test)")
        return httpx.Response(200, json={"results": results})

    def _grant(self, name: str, body: dict) -> httpx.Response:
        self.opens.append(name)
        self.open_ids.append(body.get("open_id"))
        rec = self.rooms.setdefault(name, RoomRecord(instance=body["instance"]))
        if rec.state == "moving":
            return httpx.Response(409, json={"error": {"code": "moving", "message": "moving"}})
        if rec.instance != body["instance"] or body["ticket_epoch"] < rec.owner_epoch:
            return httpx.Response(409, json={"error": {"code": "not_owner", "message": "no"}})
        open_id = body.get("open_id")
        if rec.opened_epoch is None:
            rec.opened_epoch, rec.seq_base = rec.epoch, 0
        elif rec.opened_epoch == rec.epoch and open_id is not None and rec.opened_by == open_id:
            pass  # a retry of the open that opened this epoch: the same grant
        elif rec.opened_epoch == rec.epoch:
            rec.epoch += 1
            rec.opened_epoch = rec.epoch
            rec.seq_base = seq_base_for_lost_state(rec.epoch)
        else:
            rec.opened_epoch = rec.epoch
            rec.seq_base = seq_base_for_lost_state(rec.epoch)
        rec.opened_by = open_id
        return httpx.Response(200, json={
            "room": name, "instance": rec.instance, "epoch": rec.epoch,
            "owner_epoch": rec.owner_epoch, "seq_base": rec.seq_base, "lost": rec.seq_base != 0,
            "private": rec.private, "members": rec.members})

    def ticket(self, room: str, user: str, *, instance: str = "i1", epoch: int | None = None,
               ttl: float = 60, now: float | None = None) -> str:
        rec = self.rooms.setdefault(room, RoomRecord(instance=instance))
        t = self.signer.issue_ticket(room=room, instance=instance,
                                     epoch=rec.epoch if epoch is None else epoch, user=user,
                                     ttl=ttl, now=time.time() if now is None else now)
        return self.signer.encode_ticket(t)
