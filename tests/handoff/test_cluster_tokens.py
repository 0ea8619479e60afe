"""Cluster tokens are bound to their receiver (D7): a real shard refuses the directory's
token made for another instance, an unbound (pre-binding) one and a shard's own token."""

from __future__ import annotations

import json
import time

import httpx
import jwt
import pytest
from websockets.sync.client import ClientConnection, connect

from roomshard.testing.procs import TEST_ADMIN_TOKEN, TEST_CLUSTER_SECRET, Procs
from roomshard.testing.timing import t
from roomshard.wire.tickets import CLUSTER_AUDIENCE, CLUSTER_TOKEN_TTL_S, DIRECTORY, Signer, _key


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unbound(subject: str) -> str:
    """A token of the version before the binding: ``aud`` names no receiver."""
    now = time.time()
    claims = {"aud": CLUSTER_AUDIENCE, "sub": subject, "iat": now, "exp": now + 30}
    return jwt.encode(claims, _key(TEST_CLUSTER_SECRET), algorithm="HS256")


def test_unit_binding_rotation_and_lifetime() -> None:
    """Bound to the receiver; the first secret signs, every one verifies; life <= 30 s."""
    old, new = Signer(["s-old"]), Signer(["s-new", "s-old"])
    token = old.cluster_token(DIRECTORY, to="i1", now=1_000.0)
    assert new.verify_cluster_token(token, receiver="i1", now=1_001.0) == DIRECTORY
    with pytest.raises(Exception, match="not for i2"):
        new.verify_cluster_token(token, receiver="i2", now=1_001.0)
    with pytest.raises(Exception, match="not for directory"):
        new.verify_cluster_token(token, receiver=DIRECTORY, now=1_001.0, allow_unbound=True)
    with pytest.raises(Exception, match="expired"):
        new.verify_cluster_token(token, receiver="i1", now=1_000.0 + CLUSTER_TOKEN_TTL_S)
    assert CLUSTER_TOKEN_TTL_S <= 30
    with pytest.raises(Exception, match="future"):
        new.verify_cluster_token(old.cluster_token(DIRECTORY, to="i1", now=1_100.0),
                                 receiver="i1", now=1_000.0)
    a, b = (new.cluster_token(DIRECTORY, to="i1", now=1_000.0) for _ in range(2))
    assert jwt.decode(a, options={"verify_signature": False})["jti"] != \
        jwt.decode(b, options={"verify_signature": False})["jti"]


def test_shard_refuses_a_token_made_for_another_instance(procs: Procs) -> None:
    """i1's internal routes, the freeze included, answer 401 to a token for i2 or an unbound
    one (and 401 to i1's own shard token); the directory's token for i1 works."""
    d = procs.directory()
    s1 = procs.shard("i1", d.url)
    r = httpx.post(f"{d.url}/v1/rooms/tok/connect", json={"user": "u"}, timeout=t(5))
    assert r.status_code == 200 and r.json()["instance"] == "i1", r.text
    with connect(r.json()["url"], open_timeout=t(5)) as ws:
        _check_routes(s1.url, d.url, ws)


def _check_routes(shard_url: str, directory_url: str, ws: ClientConnection) -> None:
    assert json.loads(ws.recv(timeout=t(5)))["type"] == "welcome"
    signer = Signer([TEST_CLUSTER_SECRET])
    freeze = {"move_id": "m1", "epoch": 99}
    routes = [("GET", "/internal/rooms", None), ("GET", "/internal/rooms/tok", None),
              ("POST", "/internal/rooms/tok/freeze", freeze),
              ("POST", "/internal/handoffs/freeze", {"items": [{"room": "tok", **freeze}]}),
              ("GET", "/internal/handoffs", None)]
    refused = {"for i2": signer.cluster_token(DIRECTORY, to="i2", now=time.time()),
               "unbound": unbound(DIRECTORY),
               "shard i1's": signer.cluster_token("i1", to=DIRECTORY, now=time.time())}
    with httpx.Client(base_url=shard_url, timeout=t(5)) as http:
        for what, token in refused.items():
            for method, path, body in routes:
                r = http.request(method, path, json=body, headers=bearer(token))
                assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), \
                    (what, path, r.text)
        good = bearer(signer.cluster_token(DIRECTORY, to="i1", now=time.time()))
        r = http.get("/internal/rooms", headers=good)
        assert r.status_code == 200 and "tok" in r.json()["rooms"]
        assert http.get("/internal/handoffs", headers=good).json()["frozen"] == {}
    # The directory's own calls to i1 carry i1's token: the admin room view reads its load.
    room = httpx.get(f"{directory_url}/v1/admin/rooms/tok", timeout=t(5),
                     headers=bearer(TEST_ADMIN_TOKEN)).json()
    assert room["load"] is not None and room["load"]["connections"] == 1, room
    ws.send(json.dumps({"type": "send", "id": "a", "text": "still served, never frozen"}))
    assert json.loads(ws.recv(timeout=t(5)))["type"] in ("ack", "message")
