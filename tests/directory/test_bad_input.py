"""Bad input of every kind gets the contract's JSON error body with the right status, never a 500."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from roomshard.testing.procs import TEST_CLUSTER_SECRET
from roomshard.wire.tickets import Signer
from tests.directory.conftest import ADMIN, T0, Harness

SECRET = "app-secret-for-tests-0123456789abcdef"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def hs(claims: dict[str, Any], key: str = SECRET) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


def alg_none(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]


def assert_error(r: Any, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"].replace("_", "").isalpha() and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1


OPEN_CASES = [
    # (path room, raw body, content-type, status, code)
    ("..", b'{"user":"a"}', 400, "invalid_room"),
    ("%2e%2e", b'{"user":"a"}', 400, "invalid_room"),
    ("a%2Fb", b'{"user":"a"}', 400, "invalid_room"),
    ("a%20b", b'{"user":"a"}', 400, "invalid_room"),
    ("caf%C3%A9", b'{"user":"a"}', 400, "invalid_room"),
    ("%ff", b'{"user":"a"}', 400, "invalid_room"),
    ("a" * 65, b'{"user":"a"}', 400, "invalid_room"),
    ("ok", b'{"user":', 400, "invalid_json"),
    ("ok", b"", 400, "invalid_json"),
    ("ok", b"[1,2]", 400, "invalid_body"),
    ("ok", b'{"user":"a","admin":true}', 400, "invalid_body"),
    ("ok", b'{"user":"' + b"a" * (1 << 20) + b'"}', 413, "payload_too_large"),
    ("ok", b'{"user":42}', 400, "invalid_body"),
    ("ok", b"{}", 400, "missing_user"),
    ("ok", b'{"user":"has space"}', 400, "invalid_user"),
    ("ok", b'{"user":"' + b"u" * 65 + b'"}', 400, "invalid_user"),
    ("ok", '{"user":"jos\u00e9"}'.encode(), 400, "invalid_user"),
    ("a" * 64, b'{"user":"' + b"u" * 64 + b'"}', 200, None),
]


@pytest.mark.parametrize(("room", "body", "status", "code"), OPEN_CASES,
                         ids=[f"{c[0][:12]}-{c[1][:24]!r}-{c[2]}" for c in OPEN_CASES])
async def test_open_mode_connect_inputs(h: Harness, room: str, body: bytes, status: int,
                                        code: str | None) -> None:
    """Connect in open mode: each malformed room id or body is a 400 with its code."""
    await h.heartbeat("i1")
    r = await h.client.post(f"/v1/rooms/{room}/connect", content=body)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status, code)


JWT_CASES = [
    # (description, headers, body, status, code)
    ("absent", {}, b"", 401, "missing_credentials"),
    ("not bearer", {"Authorization": "Basic YTpi"}, b"", 401, "missing_credentials"),
    ("garbage", {"Authorization": "Bearer not.a.jwt"}, b"", 401, "invalid_token"),
    ("forged", {"Authorization": "Bearer " + hs({"sub": "alice"}, "wrong-secret-0123456789abcdef012")},
     b"", 401, "invalid_token"),
    ("expired", {"Authorization": "Bearer " + hs({"sub": "alice", "exp": T0 - 1})}, b"", 401,
     "token_expired"),
    ("not yet valid", {"Authorization": "Bearer " + hs({"sub": "alice", "nbf": T0 + 60})}, b"", 401,
     "invalid_token"),
    ("alg none", {"Authorization": "Bearer " + alg_none({"sub": "alice"})}, b"", 401, "invalid_token"),
    ("no sub", {"Authorization": "Bearer " + hs({"name": "alice"})}, b"", 401, "invalid_token"),
    ("rs256 wrong key", {"Authorization": "Bearer " + jwt.encode({"sub": "alice"}, OTHER_RSA_KEY,
                                                                 algorithm="RS256")},
     b"", 401, "invalid_token"),
    ("401 before 400", {}, b'{"bogus":1}', 401, None),
    ("bad sub is input", {"Authorization": "Bearer " + hs({"sub": "bad user"})}, b"", 400,
     "invalid_user"),
    ("unknown field", {"Authorization": "Bearer " + hs({"sub": "alice"})}, b'{"x":1}', 400,
     "invalid_body"),
    ("hs256 ok, user ignored", {"Authorization": "Bearer " + hs({"sub": "alice", "exp": T0 + 60})},
     b'{"user":"mallory"}', 200, None),
    ("rs256 ok", {"Authorization": "Bearer " + jwt.encode({"sub": "bob"}, RSA_KEY, algorithm="RS256")},
     b"", 200, None),
    ("es256 ok", {"Authorization": "Bearer " + jwt.encode({"sub": "carol"}, EC_KEY, algorithm="ES256")},
     b"{}", 200, None),
]


@pytest.mark.parametrize(("what", "headers", "body", "status", "code"), JWT_CASES,
                         ids=[c[0] for c in JWT_CASES])
async def test_jwt_mode_connect(harness_factory: Any, what: str, headers: dict[str, str],
                                body: bytes, status: int, code: str | None) -> None:
    """Connect in jwt mode: missing/forged/expired/alg-none/wrong-key tokens are 401, good ones 200."""
    # Both key kinds configured: HS256 tokens use the secret, RS256/ES256 the PEM
    # (one RSA key here; the EC case runs against its own app below).
    key = pem(EC_KEY) if what == "es256 ok" else pem(RSA_KEY)
    async with harness_factory(auth="jwt", jwt_secret=SECRET, jwt_public_key=key) as h:
        await h.heartbeat("i1")
        r = await h.client.post("/v1/rooms/r1/connect", content=body, headers=headers)
        if status == 200:
            assert r.status_code == 200, r.text
            token = headers["Authorization"].split()[1]
            sub = jwt.decode(token, options={"verify_signature": False})["sub"]
            ticket = r.json()["url"].split("?ticket=", 1)[1]
            assert Signer([TEST_CLUSTER_SECRET]).verify_ticket(ticket, now=T0).user == sub
        else:
            assert_error(r, status, code)


ADMIN_CASES = [
    ("GET", "/v1/admin/instances", None, {}, 401, "unauthorized"),
    ("GET", "/v1/admin/instances", None, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ("PUT", "/v1/admin/instances/i1", b"not json", {}, 401, "unauthorized"),
    ("DELETE", "/v1/admin/instances/i1", None, {"Authorization": "Bearer"}, 401, "unauthorized"),
    ("POST", "/v1/admin/rebalance", b"{}", {"Authorization": "test-admin-token"}, 401, "unauthorized"),
    ("PUT", "/v1/admin/instances/i0", b'{"internal_url":"http://x"}', ADMIN, 400, "invalid_instance"),
    ("PUT", "/v1/admin/instances/x1", b'{"internal_url":"http://x"}', ADMIN, 400, "invalid_instance"),
    ("PUT", "/v1/admin/instances/i10000", b'{"internal_url":"http://x"}', ADMIN, 400,
     "invalid_instance"),
    ("PUT", "/v1/admin/instances/i1", b'{"internal_url":"ftp://x"}', ADMIN, 400,
     "invalid_internal_url"),
    ("PUT", "/v1/admin/instances/i1", b'{"capacity":10}', ADMIN, 400, "missing_internal_url"),
    ("PUT", "/v1/admin/instances/i1", b'{"internal_url":"http://x","capacity":0}', ADMIN, 400,
     "invalid_capacity"),
    ("PUT", "/v1/admin/instances/i1", b'{"internal_url":"http://x","capacity":"9"}', ADMIN, 400,
     "invalid_body"),
    ("PUT", "/v1/admin/instances/i1", b'{"internal_url":"http://x","state":"down"}', ADMIN, 400,
     "invalid_state"),
    ("PUT", "/v1/admin/instances/i1", b'{"internal_url":"http://x","color":"red"}', ADMIN, 400,
     "invalid_body"),
    ("GET", "/v1/admin/instances/i7", None, ADMIN, 404, "instance_not_found"),
    ("DELETE", "/v1/admin/instances/i7", None, ADMIN, 404, "instance_not_found"),
    ("GET", "/v1/admin/rooms/%2e%2e", None, ADMIN, 400, "invalid_room"),
    ("GET", "/v1/admin/rooms/nope", None, ADMIN, 404, "room_not_found"),
    ("GET", "/v1/admin/rooms?instance=zz", None, ADMIN, 400, "invalid_instance"),
    ("GET", "/v1/admin/rooms?limit=-3", None, ADMIN, 400, "invalid_limit"),
    ("GET", "/v1/admin/rooms?limit=%C2%B2", None, ADMIN, 400, "invalid_limit"),
    ("GET", "/v1/admin/rooms?limit=%EF%BC%91", None, ADMIN, 400, "invalid_limit"),
    ("PUT", "/v1/admin/rooms/r/access", b'{"private":"yes"}', ADMIN, 400, "invalid_body"),
    ("PUT", "/v1/admin/rooms/r/access", b'{"private":true,"members":["a b"]}', ADMIN, 400,
     "invalid_member"),
    ("PUT", "/v1/admin/rooms/r/access", b'{"members":["a"]}', ADMIN, 400, "invalid_body"),
    ("PUT", "/v1/admin/rooms/a%20b/access", b'{"private":true}', ADMIN, 400, "invalid_room"),
    ("POST", "/v1/admin/rooms/r/move", b'{"to":"i2","now":true}', ADMIN, 400, "invalid_body"),
    ("POST", "/v1/admin/rooms/r/move", b'{"to":"nine"}', ADMIN, 400, "invalid_instance"),
    ("POST", "/v1/admin/rooms/r/move", b'{"to":"i2"}', ADMIN, 404, "room_not_found"),
    ("POST", "/v1/admin/rebalance", b'{"max_moves":-1}', ADMIN, 400, "invalid_max_moves"),
    ("POST", "/v1/admin/rebalance", b'{"dry_run":1}', ADMIN, 400, "invalid_body"),
    ("POST", "/v1/admin/instances/i9/drain", None, ADMIN, 404, "instance_not_found"),
    ("POST", "/v1/admin/instances/i1/drain", b'{"parallelism":0}', ADMIN, 400,
     "invalid_parallelism"),
    ("POST", "/v1/admin/instances/i1/drain", b'{"parallelism":257}', ADMIN, 400,
     "invalid_parallelism"),
    ("POST", "/v1/admin/instances/i1/drain", b'{"parallel":4}', ADMIN, 400, "invalid_body"),
    ("POST", "/v1/admin/instances/i1/drain", b'{"parallelism":"8"}', ADMIN, 400, "invalid_body"),
    ("GET", "/v1/nothing-here", None, {}, 404, "not_found"),
    ("DELETE", "/healthz", None, {}, 405, "method_not_allowed"),
    ("GET", "/v1/rooms/r/connect", None, {}, 405, "method_not_allowed"),
    ("PUT", "/v1/internal/instances/i1/heartbeat", b"{}", {}, 401, "unauthorized"),
    ("POST", "/v1/internal/rooms/r/open", b"{}", ADMIN, 401, "unauthorized"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "code"), ADMIN_CASES,
                         ids=[f"{c[0]} {c[1]} {c[4]}" for c in ADMIN_CASES])
async def test_admin_and_routing_errors(h: Harness, method: str, path: str, body: bytes | None,
                                        headers: dict[str, str], status: int, code: str) -> None:
    """Admin calls without/with a wrong token are 401; bad ids/bodies 400; unknown 404; 405s are JSON."""
    r = await h.client.request(method, path, content=body, headers=headers)
    assert_error(r, status, code)
