"""Shared helpers of the router_rules tests: registries built in code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from router_rules.registry import Instance, parse_instances
from tests.router_rules.moto_env import FakeAws, moto_server


def registry(numbers: list[int], public_base: dict[int, str] | None = None) -> list[Instance]:
    """Instances iN at 10.x.y.z:8081 (IP targets), optional public_base per number."""
    public_base = public_base or {}
    return parse_instances({"instances": [
        {"id": f"i{n}", "state": "active", "internal_url": f"http://10.0.{n // 256}.{n % 256}:8081",
         "public_base": public_base.get(n)} for n in numbers]})


@pytest.fixture(scope="module")
def fake_aws() -> Iterator[FakeAws]:
    """moto in server mode on 127.0.0.1 with a free port, stopped after the module."""
    with moto_server() as fake:
        yield fake
