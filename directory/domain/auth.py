"""Who is calling: application users (open / JWT), operators, and cluster members.

* ``open`` mode: the user id is the body's ``user`` (an input, so a bad one
  is a 400).
* ``jwt`` mode: ``Authorization: Bearer <JWT>`` signed with HS256 (the
  configured secret) or, with the configured PEM public key, the algorithms
  that key verifies (RSA: RS256/384/512 and PS256/384/512; EC: ES256,
  ES384 or ES512 by its curve; Ed25519/Ed448: EdDSA). A token naming any
  other algorithm is refused (``alg: none`` and algorithm confusion too),
  the signature must verify, ``exp``/``nbf`` (when present) must be finite
  numbers that hold against the directory's clock, and ``sub`` must be a
  string. Any failure is 401. A verified ``sub`` that is not a valid user id
  (``^[A-Za-z0-9_.@-]{1,64}$``) is an input error, 400 ``invalid_user``: the
  credentials are genuine, the id they carry is not usable. ``aud`` is not
  checked (no audience is configured).
* Operators: ``Authorization: Bearer <admin token>``, compared in constant time.
* Shards: a cluster token (``roomshard.wire.tickets``) made for the directory,
  ``sub`` = their instance. An unbound token of an older shard (no receiver
  in ``aud``) is still accepted here during a rolling upgrade; one whose
  ``aud`` names another receiver (a directory -> shard token) never is.
"""

from __future__ import annotations

import hmac
import math
import os
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from directory.domain.errors import Forbidden, Unauthorized
from roomshard.config import ConfigError, DirectoryConfig
from roomshard.wire.tickets import DIRECTORY, Signer, TicketError

#: The JWT algorithms an EC public key verifies, by curve (RFC 7518 3.4: one curve each).
_EC_ALGS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def load_public_key(value: str) -> Any:
    """A PEM public key from the setting's text (``\\n`` escapes allowed) or a file path."""
    text = value.strip()
    if not text.startswith("-----BEGIN") and os.path.isfile(text):
        with open(text) as fh:
            text = fh.read()
    text = text.replace("\\n", "\n")
    try:
        return load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError("ROOMSHARD_JWT_PUBLIC_KEY: not a PEM public key") from exc


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The JWT algorithms ``key`` can verify: a token naming any other is refused (401)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGS:
        return _EC_ALGS[key.curve.name]
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    raise ConfigError("ROOMSHARD_JWT_PUBLIC_KEY: expected an RSA, EC (P-256, P-384, P-521) "
                      "or Ed25519/Ed448 public key")


class ClientAuth:
    """Verifies application JWTs; construct once per app (it parses the key)."""

    def __init__(self, cfg: DirectoryConfig) -> None:
        self.mode = cfg.auth
        self._keys: dict[str, Any] = {}
        if cfg.jwt_secret:
            self._keys["HS256"] = cfg.jwt_secret
        if cfg.jwt_public_key:
            key = load_public_key(cfg.jwt_public_key)
            for alg in algorithms_for(key):
                self._keys[alg] = key

    def jwt_subject(self, authorization: str | None, *, now: float) -> str:
        """The verified ``sub`` of the request's bearer JWT; raises :class:`Unauthorized`."""
        token = bearer(authorization)
        if token is None:
            raise Unauthorized("missing_credentials", "Authorization: Bearer <JWT> required")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(alg) if isinstance(alg, str) else None
            if key is None:
                raise Unauthorized("invalid_token", f"token algorithm {alg!r} is not accepted")
            claims = jwt.decode(token, key, algorithms=[alg],
                                options={"verify_exp": False, "verify_nbf": False,
                                         "verify_iat": False, "verify_aud": False,
                                         "require": ["sub"]})
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            # PyJWT raises more than PyJWTError on some malformed tokens (TypeError
            # for a key of another type): every one of them is a refused token.
            raise Unauthorized("invalid_token", f"token refused: {exc}") from exc
        exp, nbf = claims.get("exp"), claims.get("nbf")
        for name, value in (("exp", exp), ("nbf", nbf)):
            if value is not None and not _is_number(value):
                raise Unauthorized("invalid_token", f"token {name} is not a finite number")
        if exp is not None and now >= exp:
            raise Unauthorized("token_expired", "token expired")
        if nbf is not None and now < nbf:
            raise Unauthorized("invalid_token", "token not valid yet")
        sub = claims["sub"]
        if not isinstance(sub, str):
            raise Unauthorized("invalid_token", "token sub must be a string")
        return sub


def _is_number(value: Any) -> bool:
    """A finite JSON number (``NaN``, ``Infinity`` and ``1e400`` are not a time)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_admin(authorization: str | None, admin_token: bytes) -> None:
    token = bearer(authorization)
    if token is None or not hmac.compare_digest(token.encode(), admin_token):
        raise Unauthorized("unauthorized", "admin token required: Authorization: Bearer <token>")


def is_admin(authorization: str | None, admin_token: bytes) -> bool:
    token = bearer(authorization)
    return token is not None and hmac.compare_digest(token.encode(), admin_token)


def check_server_key(authorization: str | None, admin_token: bytes,
                     api_keys: tuple[bytes, ...]) -> None:
    """The server API's caller: the admin token or one of ``ROOMSHARD_API_KEYS``."""
    token = bearer(authorization)
    ok = False
    if token is not None:
        given = token.encode()
        for key in (admin_token, *api_keys):
            ok |= hmac.compare_digest(given, key)  # every key compared: no timing hint
    if not ok:
        raise Unauthorized("unauthorized",
                           "an API key or the admin token required: Authorization: Bearer <key>")


def cluster_subject(authorization: str | None, signer: Signer, *, now: float) -> str:
    token = bearer(authorization)
    if token is None:
        raise Unauthorized("unauthorized", "cluster token required")
    try:
        return signer.verify_cluster_token(token, receiver=DIRECTORY, now=now,
                                           allow_unbound=True)
    except TicketError as exc:
        raise Unauthorized("unauthorized", f"cluster token refused: {exc}") from exc


def check_acting_for(subject: str, instance: str) -> None:
    """A shard may only act for its own instance."""
    if subject != instance:
        raise Forbidden("wrong_instance", f"token of {subject} cannot act for {instance}")
