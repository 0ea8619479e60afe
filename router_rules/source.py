"""Where the registry comes from: the directory's admin API or a saved file.

The only I/O of rule generation. Every failure becomes a
:class:`SourceError` with one line for the operator (the CLI prints it and
exits 2); the httpx or JSON error is chained, never shown as a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from router_rules.registry import Instance, RegistryError, parse_instances

ADMIN_INSTANCES_PATH = "/v1/admin/instances"
DEFAULT_TIMEOUT_S = 10.0


class SourceError(RegistryError):
    """The registry could not be read; the message is one line."""


def _decode(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SourceError(f"{where}: not valid JSON ({exc})") from exc


def load_file(path: str | Path) -> list[Instance]:
    """Instances from a saved ``GET /v1/admin/instances`` body (``-`` is not special)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return parse_instances(_decode(raw, str(path)))
    except SourceError:
        raise
    except RegistryError as exc:
        raise SourceError(f"{path}: {exc}") from exc


def load_directory(url: str, admin_token: str | None, *,
                   transport: httpx.BaseTransport | None = None,
                   timeout: float = DEFAULT_TIMEOUT_S) -> list[Instance]:
    """Instances from ``GET {url}/v1/admin/instances`` with the admin token.

    ``transport`` is the test seam (httpx MockTransport). Raises
    :class:`SourceError` when the token is missing, the directory cannot be
    reached, answers with an error status, or returns something else than
    the instances document.
    """
    if not url.startswith(("http://", "https://")):
        raise SourceError(f"--from-directory {url!r}: expected an http(s):// URL")
    if not admin_token:
        raise SourceError("ROOMSHARD_ADMIN_TOKEN is not set (the admin API needs it)")
    endpoint = url.rstrip("/") + ADMIN_INSTANCES_PATH
    try:
        with httpx.Client(transport=transport, timeout=timeout) as client:
            resp = client.get(endpoint, headers={"Authorization": f"Bearer {admin_token}",
                                                 "Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise SourceError(f"cannot reach the directory at {endpoint}: "
                          f"{type(exc).__name__}: {exc}") from exc
    if resp.status_code == 401:
        raise SourceError(f"the directory refused ROOMSHARD_ADMIN_TOKEN (401) at {endpoint}")
    if resp.status_code != 200:
        detail = ""
        try:
            detail = ": " + str(resp.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            pass
        raise SourceError(f"GET {endpoint} answered {resp.status_code}{detail}")
    try:
        return parse_instances(_decode(resp.content, endpoint))
    except SourceError:
        raise
    except RegistryError as exc:
        raise SourceError(f"{endpoint}: {exc}") from exc
