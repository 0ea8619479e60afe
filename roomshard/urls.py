"""Strict checks for the URLs the registry stores: ``internal_url`` and ``public_base``.

These values end up inside generated load balancer configuration (nginx,
Terraform, CloudFormation) and in every room URL, so the registry accepts
only a clean URL: a lowercase scheme, a host name or an IP literal, an
optional port, and (``internal_url`` only) an optional path of unreserved
characters. No user info, query, fragment, whitespace, quotes, ``;{}$``,
percent-escapes or backslashes: nothing that could end or open a directive
or an interpolation in a file we generate.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_HOST_LENGTH = 253  # DNS
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_URL_RE = re.compile(
    rf"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    rf"(?:(?P<name>{_LABEL}(?:\.{_LABEL})*\.?)|\[(?P<v6>[0-9A-Fa-f:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>(?:/[A-Za-z0-9._~-]+)*/?)"
)
INTERNAL_SCHEMES = ("http", "https")
PUBLIC_SCHEMES = ("ws", "wss", "http", "https")
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class UrlError(ValueError):
    """Not a clean URL; the message says what is allowed."""


@dataclass(frozen=True)
class CleanUrl:
    scheme: str
    host: str  # name or IP literal, IPv6 without brackets
    port: int
    path: str  # "" or "/a/b" (no trailing slash)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port != _DEFAULT_PORTS[self.scheme] else host


def parse_clean_url(value: object, *, schemes: tuple[str, ...], allow_path: bool,
                    what: str = "URL") -> CleanUrl:
    """Parse ``value`` as ``scheme://host[:port][/path]``; raise :class:`UrlError` otherwise."""
    shape = f"{'|'.join(schemes)}://host[:port]{'[/path]' if allow_path else ''}"
    if not isinstance(value, str) or not (m := _URL_RE.fullmatch(value)):
        raise UrlError(f"{what} must be {shape} (a host name or IP literal, no user info, "
                       "query, fragment, spaces, quotes or ;{}$)")
    if m["scheme"] not in schemes:
        raise UrlError(f"{what} must be {shape}")
    host = m["name"] or m["v6"]
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlError(f"{what}: [{host}] is not an IPv6 address") from None
    if len(host) > MAX_HOST_LENGTH:
        raise UrlError(f"{what}: host name over {MAX_HOST_LENGTH} characters")
    port = int(m["port"]) if m["port"] is not None else _DEFAULT_PORTS[m["scheme"]]
    if not 0 < port < 65536:
        raise UrlError(f"{what}: invalid port (1..65535)")
    path = m["path"].rstrip("/")
    if path and not allow_path:
        raise UrlError(f"{what} must not have a path (the load balancer routes /iN/room/* only)")
    return CleanUrl(m["scheme"], host, port, path)


def check_internal_url(value: object) -> str:
    """A shard's ``internal_url``, without a trailing slash; raises :class:`UrlError`."""
    parse_clean_url(value, schemes=INTERNAL_SCHEMES, allow_path=True, what="internal_url")
    assert isinstance(value, str)
    return value.rstrip("/")


def check_public_base(value: object) -> str:
    """An instance's ``public_base``, without a trailing slash; raises :class:`UrlError`."""
    parse_clean_url(value, schemes=PUBLIC_SCHEMES, allow_path=False, what="public_base")
    assert isinstance(value, str)
    return value.rstrip("/")
