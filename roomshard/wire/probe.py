"""The route probe: is ``/iN/room/`` routed, through the load balancer, to that very process?

A shard answers ``GET /iN/room/~probe`` (``~`` is never in a room id, so no
room is shadowed) with its instance id and boot id. The directory probes a
``pending`` instance's route before it makes it ``active``
(``directory.ops.route_check``); ``roomshard admin retire`` probes a removed
instance's route until the load balancer no longer has it.
"""

from __future__ import annotations

from typing import Any

#: The last path segment of a probe (never a room id: ``~``).
PROBE_ROOM = "~probe"
#: The path under ``/iN`` a shard answers with ``{"instance", "boot_id"}``.
PROBE_SUFFIX = "/room/" + PROBE_ROOM


def route_url(base: str, instance: str) -> str:
    """The prefix of ``instance``'s room URLs under a public base: ``wss://host/i3/room/``."""
    return f"{base.rstrip('/')}/{instance}/room/"


def probe_url(base: str, instance: str) -> str:
    """The probe's URL under a public ws(s):// or http(s):// base."""
    return route_probe_url(route_url(base, instance))


def route_probe_url(route: str) -> str:
    """The probe's URL of a route (``wss://host/i3/room/`` -> ``https://host/i3/room/~probe``)."""
    if route.startswith("ws"):
        route = "http" + route[2:]
    return route.rstrip("/") + "/" + PROBE_ROOM


def verdict(status: int, body: Any, *, instance: str, boot_id: str | None) -> str | None:
    """None when the answer comes from the registered process of ``instance``, else why not."""
    if status != 200:
        return f"the load balancer answered {status}"
    if not isinstance(body, dict) or body.get("instance") != instance:
        who = body.get("instance") if isinstance(body, dict) else None
        return f"another process answered (instance {who!r})"
    if body.get("boot_id") != boot_id:
        return "an earlier process of it answered"
    return None


def route_gone(status: int | None, body: Any, *, instance: str, boot_id: str | None) -> bool:
    """Whether the load balancer no longer routes ``instance`` to the process ``boot_id``
    (None: which one is not known): it answers 404 for the path, another instance answers,
    or another process of it (a new one, routed anew). No answer, a 5xx or that very
    process (any of it, when ``boot_id`` is unknown) means the route may still be there."""
    if status == 404:
        return True
    if status != 200 or not isinstance(body, dict):
        return False
    if body.get("instance") != instance:
        return True
    return boot_id is not None and body.get("boot_id") != boot_id

