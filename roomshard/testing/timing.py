"""Every test timeout is expressed in one unit that CI can scale.

``ROOMSHARD_TEST_TIME_SCALE=2`` doubles every bound on a slow machine.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

SCALE = float(os.environ.get("ROOMSHARD_TEST_TIME_SCALE", "1"))


def t(seconds: float) -> float:
    """A time bound in test units."""
    return seconds * SCALE


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` (test units)."""
    deadline = time.monotonic() + t(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {t(timeout):.1f}s waiting for {what}")
        time.sleep(poll)


async def await_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float,
                      what: str, poll: float = 0.02) -> None:
    """Async twin of :func:`wait_until`; the predicate may be a coroutine function."""
    deadline = time.monotonic() + t(timeout)
    while True:
        res = predicate()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {t(timeout):.1f}s waiting for {what}")
        await asyncio.sleep(poll)
