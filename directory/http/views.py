"""Rows -> API bodies (pure): ISO 8601 UTC times, computed ``down`` state."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from directory.domain.instances import state_of
from roomshard.wire.probe import route_url


def iso(ts: float | None) -> str | None:
    """``1700000000.5`` -> ``"2023-11-14T22:13:20.500Z"``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def instance_view(row: Mapping[str, Any], *, now: float, down_after: float,
                  public_url: str | None) -> dict[str, Any]:
    base = row["public_base"] or public_url
    return {
        "id": row["id"],
        "state": state_of(row, now=now, down_after=down_after),
        "state_reason": row["state_reason"],
        "capacity": row["capacity"],
        "internal_url": row["internal_url"],
        "public_base": row["public_base"],
        "last_heartbeat": iso(row["last_heartbeat"]),
        "registered_at": iso(row["registered_at"]),
        "rooms_assigned": row["rooms_assigned"],
        "load": {
            "rooms": row["load_rooms"],
            "connections": row["load_connections"],
            "messages_per_s": row["load_messages_per_s"],
        },
        "route_url": None if base is None else route_url(base, row["id"]),
    }


def room_view(row: Mapping[str, Any], load: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "room": row["room"],
        "instance": row["instance"],
        "epoch": row["epoch"],
        "owner_epoch": row["owner_epoch"],
        "state": row["state"],
        "private": bool(row["private"]),
        "members": list(row["members"]) if row["members"] is not None else None,
        "load": load,
    }
