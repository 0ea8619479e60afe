"""Shared helpers of the router_rules tests: registries built in code."""

from __future__ import annotations

from router_rules.registry import Instance, parse_instances


def registry(numbers: list[int], public_base: dict[int, str] | None = None) -> list[Instance]:
    """Instances iN at 10.x.y.z:8081 (IP targets), optional public_base per number."""
    public_base = public_base or {}
    return parse_instances({"instances": [
        {"id": f"i{n}", "state": "active", "internal_url": f"http://10.0.{n // 256}.{n % 256}:8081",
         "public_base": public_base.get(n)} for n in numbers]})
