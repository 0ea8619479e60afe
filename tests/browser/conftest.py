"""Debian's chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roomshard.testing.timing import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


@pytest.fixture
def browser() -> Iterator[object]:
    """A headless Debian chromium, closed after the test."""
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("chromium missing: run the README's test command")
        pytest.skip("Debian chromium not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


def wait_js(page: Any, expression: str, timeout: float) -> None:
    """Poll a JavaScript expression until it is truthy (test units).

    Not ``page.wait_for_function``: its in-page predicate is compiled with
    ``eval``, which the chat page's Content-Security-Policy (rightly) forbids;
    ``page.evaluate`` runs through the DevTools protocol, outside the policy.
    """
    wait_until(lambda: bool(page.evaluate(expression)), timeout, f"{expression!r} in the page",
               poll=0.05)
