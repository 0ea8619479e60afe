"""Instance registry rules: pure functions from (stored row, request, now) to column changes.

The SQL lives in ``directory.db.store``; the decisions live here so they are
tested without a database. Rules (``docs/INTERNALS.md``):

* A heartbeat registers an unknown instance as ``active``.
* A heartbeat from a new process (new ``boot_id``) re-activates an instance
  that its own clean shutdown parked (``state_reason = "shutdown"``); an
  instance an admin set ``draining``/``disabled`` stays so. ``down`` is never
  stored (see ``placement.effective_state``), so any fresh heartbeat ends it.
* A different ``internal_url`` may not take over an instance that still has
  rooms *and* is alive under another process: that is two machines claiming
  one id (409 ``instance_in_use``). A restarted shard on a new port (its old
  process down or shut down) takes its instance back.
* With the route check on (``ROOMSHARD_ROUTE_CHECK``), an instance a new process
  registers (a new instance, or a new ``boot_id`` of one that was active or
  parked by its own stop or death) is ``pending``: no room goes there until the
  directory reached that very process through the load balancer
  (``directory.ops.route_check``), then it is ``active``. A pending instance is
  ``down`` like any other once its heartbeats stop, never for its route.
* Admins set ``active``/``draining``/``disabled``; ``down`` is the directory's
  (an admin may set a ``pending`` instance ``active``: the check is skipped).
* ``leave`` parks the instance with reason ``shutdown``: ``disabled`` at once
  without a drain, ``draining`` while a drain moves its rooms.
* A process proven gone (its control channel closed and nothing of it answers)
  parks the instance with reason ``died``: ``disabled``, reported ``down``; a new
  process re-activates it as after a shutdown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msgspec import UNSET

from directory.domain import placement
from directory.domain.errors import BadRequest, Conflict
from directory.domain.schemas import InstancePut
from roomshard.wire.internal import HeartbeatBody

REASON_ADMIN = "admin"
REASON_SHUTDOWN = "shutdown"
#: Parked because its process was proven gone (``directory.ops.failover``); reported ``down``.
REASON_DIED = "died"
#: Pending: its route through the load balancer is not proven yet.
REASON_ROUTE = "route_check"
#: The reasons a new process of the instance (a new ``boot_id``) ends by re-activating it.
_PROCESS_GONE = (REASON_SHUTDOWN, REASON_DIED)


def check_internal_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url) > 2000:
        raise BadRequest("invalid_internal_url", "internal_url must be an http:// or https:// URL")
    return url.rstrip("/")


def check_public_base(url: str | None) -> str | None:
    if url is None or url == "":
        return None
    if not url.startswith(("ws://", "wss://", "http://", "https://")) or len(url) > 2000:
        raise BadRequest("invalid_public_base", "public_base must be a ws://, wss://, http:// or https:// URL")
    return url.rstrip("/")


def check_capacity(capacity: int) -> int:
    if not 1 <= capacity <= 1_000_000_000:
        raise BadRequest("invalid_capacity", "capacity must be a positive integer")
    return capacity


def seen_at(row: Mapping[str, Any]) -> float:
    """The liveness reference: the last heartbeat, else the registration time."""
    hb = row["last_heartbeat"]
    return float(hb if hb is not None else row["registered_at"])


def state_of(row: Mapping[str, Any], *, now: float, down_after: float) -> str:
    """An instance row's effective state (``down`` once silent for ``down_after``)."""
    if row["state_reason"] == REASON_DIED:
        return placement.DOWN
    return placement.effective_state(row["state"], seen_at(row), now=now, down_after=down_after)


def heartbeat_changes(row: Mapping[str, Any] | None, hb: HeartbeatBody, *, instance: str,
                      now: float, down_after: float, default_capacity: int,
                      route_check: bool = False) -> dict[str, Any]:
    """Column values to write for a heartbeat; raises Conflict/BadRequest.

    ``route_check``: a new process starts ``pending`` instead of ``active``."""
    arriving = ({"state": placement.PENDING, "state_reason": REASON_ROUTE} if route_check
                else {"state": placement.ACTIVE, "state_reason": None})
    url = check_internal_url(hb.internal_url)
    public_base = check_public_base(hb.public_base)
    load = {
        "load_rooms": max(hb.load.rooms, 0),
        "load_connections": max(hb.load.connections, 0),
        "load_messages_per_s": max(hb.load.messages_per_s, 0.0),
    }
    if row is None:
        return {
            "id": instance,
            "number": int(instance[1:]),
            "internal_url": url,
            "public_base": public_base,
            "capacity": check_capacity(hb.capacity or default_capacity),
            **arriving,
            "boot_id": hb.boot_id,
            "registered_at": now,
            "last_heartbeat": now,
            **load,
        }
    new_process = hb.boot_id != row["boot_id"]
    if url != row["internal_url"] and row["rooms_assigned"] > 0 and new_process:
        alive = not placement.is_down(seen_at(row), now=now, down_after=down_after)
        if alive and row["state_reason"] not in _PROCESS_GONE:
            raise Conflict("instance_in_use",
                           f"{instance} is alive at {row['internal_url']} and still has rooms")
    changes: dict[str, Any] = {
        "internal_url": url,
        "boot_id": hb.boot_id,
        "last_heartbeat": now,
        **load,
    }
    if hb.public_base is not None:
        changes["public_base"] = public_base
    if hb.capacity is not None:
        changes["capacity"] = check_capacity(hb.capacity)
    if new_process and (row["state_reason"] in _PROCESS_GONE or (
            route_check and row["state"] == placement.ACTIVE)):
        changes.update(arriving)  # its route is the new process's to prove
    return changes


#: The highest instance number the directory hands out (``i1`` .. ``i9999``).
MAX_NUMBER = 9999


def lowest_free_number(taken: set[int]) -> int | None:
    """The lowest instance number not in ``taken`` (None: all 9,999 are)."""
    return next((n for n in range(1, MAX_NUMBER + 1) if n not in taken), None)


def reclaimable(row: Mapping[str, Any], *, internal_url: str, now: float,
                down_after: float) -> bool:
    """Whether a shard process starting at ``internal_url`` without a number may take
    ``row``'s: the same address, and that instance's process is gone (it left, died or
    went silent). A restarted shard keeps its number, its route and its rooms' owner."""
    return row["internal_url"] == internal_url and (
        row["state_reason"] in _PROCESS_GONE
        or placement.is_down(seen_at(row), now=now, down_after=down_after))


def admin_put_changes(row: Mapping[str, Any] | None, body: InstancePut, *, instance: str,
                      now: float, default_capacity: int) -> dict[str, Any]:
    """Column values to write for an admin PUT; raises BadRequest."""
    changes: dict[str, Any] = {}
    if body.state is not UNSET:
        if body.state == placement.DOWN:
            raise BadRequest("invalid_state", "'down' is set by the directory from missed heartbeats")
        if body.state not in placement.ADMIN_STATES:
            raise BadRequest("invalid_state", "state must be active, draining or disabled")
        changes["state"] = body.state
        changes["state_reason"] = None if body.state == placement.ACTIVE else REASON_ADMIN
    if body.internal_url is not UNSET:
        changes["internal_url"] = check_internal_url(body.internal_url)  # type: ignore[arg-type]
    if body.public_base is not UNSET:
        changes["public_base"] = check_public_base(body.public_base)  # type: ignore[arg-type]
    if body.capacity is not UNSET:
        changes["capacity"] = check_capacity(body.capacity)  # type: ignore[arg-type]
    if row is None:
        if "internal_url" not in changes:
            raise BadRequest("missing_internal_url", "registering an instance needs internal_url")
        changes = {
            "id": instance,
            "number": int(instance[1:]),
            "public_base": None,
            "capacity": default_capacity,
            "state": placement.ACTIVE,
            "state_reason": None,
            "registered_at": now,
            **changes,
        }
    return changes


def died_changes() -> dict[str, Any]:
    """The process that held the instance is proven gone: ``disabled`` (reported
    ``down``) until a new process of it heartbeats; its rooms are re-placed on their
    next connect (``directory.ops.failover``)."""
    return {"state": placement.DISABLED, "state_reason": REASON_DIED}


def leave_changes(*, drain: bool) -> dict[str, Any]:
    """A clean stop. Without a drain the process is going away now (it closes its
    clients with 1001 and they come straight back): ``disabled`` at once, so
    their rooms are re-placed on the next connect instead of being sent back
    to a dying process. With a drain it stays ``draining`` (still serving, no
    new rooms) while the handoff module moves its rooms away."""
    return {"state": placement.DRAINING if drain else placement.DISABLED,
            "state_reason": REASON_SHUTDOWN}

