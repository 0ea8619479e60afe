"""The registry as the rules generator sees it: validated, typed instances.

Input is the JSON body of the directory's ``GET /v1/admin/instances``
(``{"instances": [{"id", "state", "capacity", "internal_url", "public_base",
"last_heartbeat", "load"}]}``), from the network or from a saved file. It is
checked once, here, at the edge: everything downstream (the model and the
renderers) trusts an :class:`Instance`.

Only the fields that shape routing are kept. ``state`` is kept for reports
but never changes the output: every registered instance keeps its rule
whatever its state (a ``draining`` instance still serves its rooms until
they have moved), and loses it only when it leaves the registry.

Unknown fields are ignored on purpose: the directory may add fields to its
admin view (the contract says "extend, never rename"), and that must not
break rule generation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from roomshard import urls
from roomshard.wire.protocol import instance_number


class RegistryError(ValueError):
    """The instances document is not what the directory serves; one line for the operator."""


@dataclass(frozen=True, order=True)
class Instance:
    """One registered shard instance, as far as routing is concerned."""

    number: int  # first field: instances sort by number, never by string ("i10" < "i2")
    id: str
    internal_url: str
    scheme: str  # "http" or "https": how the load balancer reaches the shard
    host: str  # host name or IP literal of internal_url (no brackets)
    port: int
    public_base: str | None  # normalised "scheme://host[:port]", or None
    state: str

    def __post_init__(self) -> None:
        # Every renderer trusts these fields: an Instance made by hand must be as
        # clean as one parse_instance made (see roomshard.urls).
        address = f"[{self.host}]" if ":" in self.host else self.host
        for what, value, schemes in (("internal_url", f"{self.scheme}://{address}:{self.port}",
                                      urls.INTERNAL_SCHEMES),
                                     ("public_base", self.public_base, urls.PUBLIC_SCHEMES)):
            if value is None:
                continue
            try:
                urls.parse_clean_url(value, schemes=schemes, allow_path=False, what=what)
            except urls.UrlError as exc:
                raise RegistryError(f"instance {self.id}: {exc}") from None
        if instance_number(self.id) != self.number:
            raise RegistryError(f"instance id {self.id!r} is not i1..i9999")

    @property
    def host_is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def public_host(self) -> str | None:
        """``host[:port]`` of public_base: the key of this instance's ALB group."""
        return urlsplit(self.public_base).netloc if self.public_base else None


def _clean(iid: str, what: str, raw: str, schemes: tuple[str, ...], shape: str) -> urls.CleanUrl:
    try:
        return urls.parse_clean_url(raw, schemes=schemes, allow_path=True, what=what)
    except urls.UrlError as exc:
        raise RegistryError(f"instance {iid}: {what} {raw!r} is not an {shape} URL "
                            f"({str(exc).removeprefix(what).lstrip(': ')})") from None


def _internal(iid: str, raw: Any) -> tuple[str, str, int]:
    if not isinstance(raw, str) or not raw:
        raise RegistryError(f"instance {iid}: internal_url must be a non-empty string")
    url = _clean(iid, "internal_url", raw, urls.INTERNAL_SCHEMES, "http(s)://host:port")
    if url.path:
        # The load balancer forwards /iN/room/... unchanged; a path prefix on the
        # shard side could not be honoured by an ALB target group.
        raise RegistryError(f"instance {iid}: internal_url {raw!r} must not have a path")
    return url.scheme, url.host, url.port


def _public(iid: str, raw: Any) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise RegistryError(f"instance {iid}: public_base must be a string or null")
    url = _clean(iid, "public_base", raw, urls.PUBLIC_SCHEMES, "ws(s)://host")
    if url.path:
        # Room URLs are public_base + /iN/room/ID and the load balancer routes on
        # /iN/room/* only (contract), so a path prefix would be unroutable.
        raise RegistryError(f"instance {iid}: public_base {raw!r} must not have a path "
                            "(the load balancer routes /iN/room/* only)")
    return f"{url.scheme}://{url.netloc.lower()}"


def parse_instance(raw: Any) -> Instance:
    """Validate one element of ``instances``. Raises :class:`RegistryError`."""
    if not isinstance(raw, Mapping):
        raise RegistryError(f"each instance must be a JSON object, got {type(raw).__name__}")
    iid = raw.get("id")
    number = instance_number(iid) if isinstance(iid, str) else None
    if number is None:
        raise RegistryError(f"instance id {iid!r} is not i1..i9999")
    state = raw.get("state", "active")
    if not isinstance(state, str) or not state:
        raise RegistryError(f"instance {iid}: state must be a non-empty string")
    scheme, host, port = _internal(iid, raw.get("internal_url"))
    return Instance(number=number, id=iid, internal_url=raw["internal_url"], scheme=scheme,
                    host=host, port=port, public_base=_public(iid, raw.get("public_base")),
                    state=state)


def parse_instances(doc: Any) -> list[Instance]:
    """The admin API's ``{"instances": [...]}`` -> instances sorted by number.

    Raises :class:`RegistryError` for a wrong shape, an invalid instance or a
    duplicate id. The sort makes every renderer's output independent of the
    order the directory (or a hand-edited file) lists instances in.
    """
    if not isinstance(doc, Mapping) or not isinstance(doc.get("instances"), list):
        raise RegistryError('expected a JSON object {"instances": [...]} '
                            "(the body of GET /v1/admin/instances)")
    return sort_unique(parse_instance(item) for item in doc["instances"])


def sort_unique(instances: Iterable[Instance]) -> list[Instance]:
    """Sort by instance number; raise :class:`RegistryError` on a repeated id."""
    seen: dict[int, Instance] = {}
    for inst in instances:
        if inst.number in seen:
            raise RegistryError(f"instance {inst.id} is listed twice")
        seen[inst.number] = inst
    return [seen[n] for n in sorted(seen)]
