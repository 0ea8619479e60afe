"""JWT mode against a real directory process: every malformed token is a 401, never a 500.

One directory with an EC (P-256) public key, one with an RSA key, each with
a shard so that a good token gets its 200. A token whose header names any
algorithm family (HMAC, RSA, RSA-PSS, EC, EdDSA, none) the configured key
cannot verify is refused with the contract's error body and no traceback in
the log; so is a correctly signed token whose ``exp`` or ``nbf`` is not a
finite number (``NaN``, ``Infinity``, ``1e400``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from roomshard.testing.procs import Proc, Procs
from roomshard.testing.timing import t

pytestmark = pytest.mark.e2e

KEYS: dict[str, Any] = {
    "ec": ec.generate_private_key(ec.SECP256R1()),
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}
GOOD_ALG = {"ec": "ES256", "rsa": "RS256"}
ALGORITHMS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "ES512", "EdDSA", "none", "None", "", "XX999"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def junk_token(alg: str) -> str:
    """A token whose header names ``alg``, with a junk signature (no key needed)."""
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"sub": "mallory"}).encode())
    return f"{header}.{payload}.{_b64(b'x' * 64)}"


def signed_raw(key_kind: str, payload: bytes) -> str:
    """A correctly signed token over ``payload`` exactly as given (non-standard JSON too)."""
    return jwt.api_jws.PyJWS().encode(payload, KEYS[key_kind], algorithm=GOOD_ALG[key_kind])


@pytest.fixture(scope="module")
def directories() -> Iterator[dict[str, Proc]]:
    with Procs() as p:
        procs = {}
        for kind, key in KEYS.items():
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            procs[kind] = p.directory(f"dir-{kind}", env={"ROOMSHARD_AUTH": "jwt",
                                                          "ROOMSHARD_JWT_PUBLIC_KEY": pem})
            p.shard("i1" if kind == "ec" else "i2", procs[kind].url)
        yield procs


def _connect(proc: Proc, token: str) -> httpx.Response:
    return httpx.post(f"{proc.url}/v1/rooms/jwt-room/connect",
                      headers={"Authorization": f"Bearer {token}"}, timeout=t(10))


def _assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == "invalid_token", body
    assert body["error"]["message"]


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_every_algorithm_the_key_cannot_verify_is_a_401(directories, kind):
    proc = directories[kind]
    for alg in ALGORITHMS:
        _assert_401(_connect(proc, junk_token(alg)))
    good = jwt.encode({"sub": "alice"}, KEYS[kind], algorithm=GOOD_ALG[kind])
    assert _connect(proc, good).status_code == 200
    # The wrong family's real signature is refused too (RSA token on the EC key, ...).
    other = "rsa" if kind == "ec" else "ec"
    _assert_401(_connect(proc, jwt.encode({"sub": "eve"}, KEYS[other], algorithm=GOOD_ALG[other])))
    log = proc.output()
    assert "Traceback" not in log and "internal_error" not in log, log[-2000:]


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_time_that_is_not_a_finite_number_is_a_401(directories, claim, value):
    payload = f'{{"sub": "alice", "{claim}": {value}}}'.encode()
    _assert_401(_connect(directories["ec"], signed_raw("ec", payload)))
    assert "Traceback" not in directories["ec"].output()
