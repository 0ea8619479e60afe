"""Who is calling: application users (open / JWT), operators, and cluster members.

* ``open`` mode: the user id is the body's ``user`` (an input, so a bad one
  is a 400).
* ``jwt`` mode: ``Authorization: Bearer <JWT>`` signed with HS256 (the
  configured secret) or RS256/ES256 (the configured PEM public key). The
  algorithm must match a configured key (``alg: none`` and algorithm
  confusion are refused), the signature must verify, ``exp``/``nbf`` (when
  present) must hold against the directory's clock, and ``sub`` must be a
  string. Any failure is 401. A verified ``sub`` that is not a valid user id
  (``^[A-Za-z0-9_.@-]{1,64}$``) is an input error, 400 ``invalid_user``: the
  credentials are genuine, the id they carry is not usable. ``aud`` is not
  checked (no audience is configured).
* Operators: ``Authorization: Bearer <admin token>``, compared in constant time.
* Shards: a cluster token (``roomshard.tickets``) made for the directory,
  ``sub`` = their instance. An unbound token of an older shard (no receiver
  in ``aud``) is still accepted here during a rolling upgrade; one whose
  ``aud`` names another receiver (a directory -> shard token) never is.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from directory.errors import Forbidden, Unauthorized
from roomshard.config import ConfigError, DirectoryConfig
from roomshard.tickets import DIRECTORY, Signer, TicketError

ASYMMETRIC_ALGS = ("RS256", "ES256")


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


class ClientAuth:
    """Verifies application JWTs; construct once per app (it parses the key)."""

    def __init__(self, cfg: DirectoryConfig) -> None:
        self.mode = cfg.auth
        self._keys: dict[str, Any] = {}
        if cfg.jwt_secret:
            self._keys["HS256"] = cfg.jwt_secret
        if cfg.jwt_public_key:
            key = load_public_key(cfg.jwt_public_key)
            for alg in ASYMMETRIC_ALGS:
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
        except jwt.PyJWTError as exc:
            raise Unauthorized("invalid_token", f"token refused: {exc}") from exc
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if exp is not None and (not _is_number(exp) or now >= exp):
            raise Unauthorized("token_expired", "token expired")
        if nbf is not None and (not _is_number(nbf) or now < nbf):
            raise Unauthorized("invalid_token", "token not valid yet")
        sub = claims["sub"]
        if not isinstance(sub, str):
            raise Unauthorized("invalid_token", "token sub must be a string")
        return sub


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_admin(authorization: str | None, admin_token: bytes) -> None:
    token = bearer(authorization)
    if token is None or not hmac.compare_digest(token.encode(), admin_token):
        raise Unauthorized("unauthorized", "admin token required: Authorization: Bearer <token>")


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
