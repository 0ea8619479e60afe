"""`roomshard dev` as a newcomer watches it: a shard killed under a chat in the page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from roomshard.testing.devrun import DevRun, instance_process
from roomshard.testing.timing import t, wait_until
from tests.browser.conftest import wait_js
from tests.browser.test_chat_page import join, say, shown

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def on_instance(page: Any) -> str | None:
    """The shard the page is open on, from its state line (None: not open)."""
    state = page.inner_text("#state")
    m = re.search(r"\bi\d+\b", state)
    return m.group(0) if m and "open" in state else None


def test_a_chat_in_the_page_goes_on_after_its_shard_is_killed(
        tmp_path: Path, browser: Any, run_dev: list[DevRun]) -> None:
    """SIGKILL of the room's shard: dev says what happened and starts it again, the
    directory finds it dead at once and places the room on the other shard, and both
    pages chat on there, every message once and in seq order."""
    dev = DevRun(["--port", "0", "--shards", "2", "--data-dir", str(tmp_path)])
    run_dev.append(dev)
    dev.wait_up()
    url = dev.field("chat page")
    ctx_a, ctx_b = browser.new_context(), browser.new_context()
    a, b = ctx_a.new_page(), ctx_b.new_page()
    try:
        join(a, url, "phoenix", "alice")
        join(b, url, "phoenix", "bob")
        say(a, "before the crash")
        for p in (a, b):
            wait_js(p, "document.querySelectorAll('#messages .msg[data-seq]').length === 1", 10)
        victim = on_instance(a)
        assert victim is not None
        instance_process(dev.descendants(), victim).kill()
        survivor = ({"i1", "i2"} - {victim}).pop()
        for p in (a, b):
            wait_until(lambda p=p: on_instance(p) == survivor, t(20),
                       f"the page open on {survivor}")
        say(b, "after the crash")
        for p in (a, b):
            wait_js(p, "[...document.querySelectorAll('#messages .msg[data-seq]')]"
                       ".some(n => n.textContent.includes('after the crash'))", 20)
            texts = [text for _, text in shown(p)]
            assert texts == ["before the crash", "after the crash"], texts
            seqs = [s for s, _ in shown(p)]
            assert seqs == sorted(set(seqs))
        wait_until(lambda: f"roomshard dev: {victim} started again" in dev.output, t(30),
                   f"{victim} started again")
        assert f"roomshard dev: {victim} was killed by SIGKILL" in dev.output
        assert dev.popen.poll() is None
        log = (tmp_path / "logs" / "directory.log").read_text()
        assert f"{victim} is down: its process" in log, log[-2000:]
    finally:
        ctx_a.close()
        ctx_b.close()
