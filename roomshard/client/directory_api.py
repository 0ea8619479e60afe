"""The directory call a client session makes: ``POST /v1/rooms/{room}/connect``.

Translates HTTP outcomes into the client's errors at this boundary (also for
:mod:`roomshard.client.messages`): a 4xx is final (:class:`ConnectRefused`),
a 5xx, a 429 or a network error is retryable (:class:`DirectoryUnavailable`,
carrying ``Retry-After``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import httpx
import msgspec

from roomshard.client.errors import ConnectRefused, DirectoryUnavailable
from roomshard.wire.errors import ErrorBody


@dataclass(frozen=True, slots=True)
class Route:
    room: str
    instance: str
    epoch: int
    url: str
    expires_in: float


def error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        err = msgspec.json.decode(resp.content, type=ErrorBody).error
    except msgspec.DecodeError:  # not the contract's body (a proxy page, a 501 stub...)
        return f"http_{resp.status_code}", resp.reason_phrase or resp.text[:200]
    return err.code, err.message


def retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def check(resp: httpx.Response) -> None:
    """Raise the client's error for an answer that is not a 200."""
    if resp.status_code == 200:
        return
    code, message = error_of(resp)
    if resp.status_code >= 500 or resp.status_code == 429:
        raise DirectoryUnavailable(f"{code}: {message}", retry_after(resp))
    raise ConnectRefused(resp.status_code, code, message)


def with_since(url: str, since: int | None) -> str:
    """The room URL with ``&since=SEQ`` added (the directory's URL already has ``?ticket=``)."""
    if since is None:
        return url
    return f"{url}{'&' if '?' in url else '?'}since={since}"


async def resolve(http: httpx.AsyncClient, directory_url: str, room: str, user: str | None,
                  token: str | None, unreachable: str | None = None) -> Route:
    """Ask the directory where ``room`` lives; raises ConnectRefused / DirectoryUnavailable.

    ``unreachable``: the instance this client could not reach on its last try
    (a hint: the directory checks that shard before it answers, docs/API.md)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, str] = {"user": user} if user is not None else {}
    if unreachable is not None:
        body["unreachable"] = unreachable
    url = f"{directory_url.rstrip('/')}/v1/rooms/{quote(room, safe='')}/connect"
    try:
        resp = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DirectoryUnavailable(f"directory unreachable: {exc!r}") from exc
    check(resp)
    try:
        data = resp.json()
        return Route(room=str(data["room"]), instance=str(data["instance"]),
                     epoch=int(data["epoch"]), url=str(data["url"]),
                     expires_in=float(data.get("expires_in", 60)))
    except (ValueError, KeyError, TypeError) as exc:
        raise DirectoryUnavailable(f"unexpected connect answer: {resp.text[:200]!r}") from exc
