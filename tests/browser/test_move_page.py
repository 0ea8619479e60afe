"""The chat page follows a live room move (real directory, shards and chromium)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t
from tests.browser.conftest import wait_js
from tests.browser.test_chat_page import join, members, say, shown

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def wait_count(page: Any, n: int) -> None:
    try:
        wait_js(page, f"document.querySelectorAll('#messages .msg[data-seq]').length === {n}", 20)
    except Exception as exc:  # say what the page shows instead of a bare timeout
        state = page.evaluate("(s => [s.state, s.instance, s.lastSeq, s.connections, s.pending])"
                              "(window.roomshard.session)")
        notes = page.eval_on_selector_all("#messages .note", "ns => ns.map(n => n.textContent)")
        raise AssertionError(f"expected {n} messages; page shows {shown(page)}; "
                             f"session [state, instance, lastSeq, connections, outbox] = {state}; "
                             f"notes {notes}") from exc


def test_pages_keep_every_message_across_a_move(procs: Procs, browser: Any, output_dir: Path) -> None:
    """The room moves while alice is typing: both pages show "moving", reconnect to the target,
    and show every message once, in seq order, with no gap notice."""
    d = procs.directory()
    procs.shard("i1", d.url)
    procs.shard("i2", d.url)
    ctx_a, ctx_b = browser.new_context(), browser.new_context()
    a, b = ctx_a.new_page(), ctx_b.new_page()
    try:
        join(a, d.url, "rover", "alice")
        join(b, d.url, "rover", "bob")
        for p in (a, b):
            # Record every state the page shows, so a brief "moving" is not missed.
            p.evaluate("""() => { window.seenStates = [];
                new MutationObserver(() => window.seenStates.push(document.getElementById('state').dataset.state))
                  .observe(document.getElementById('state'), {attributes: true}); }""")
        for i in range(3):
            say(a, f"before {i}")
            say(b, f"reply {i}")
        wait_count(a, 6)
        wait_count(b, 6)
        src = a.evaluate("window.roomshard.session.instance")
        dst = "i2" if src == "i1" else "i1"
        # Alice keeps typing through the move: 20 lines, one every 50 ms, through the form.
        a.evaluate("""() => { for (let i = 0; i < 20; i++) setTimeout(() => {
            document.getElementById('text').value = 'during ' + i;
            document.getElementById('composer').requestSubmit(); }, i * 50); }""")
        wait_count(b, 9)
        resp = httpx.post(f"{d.url}/v1/admin/rooms/rover/move", json={"to": dst}, timeout=t(60),
                          headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"})
        assert resp.status_code == 200, resp.text
        for p in (a, b):
            wait_js(p, f"window.roomshard.session.instance === '{dst}' && "
                                "window.roomshard.session.state === 'open'", 20)
        # Every "during" line is in before typing more: the timers above write
        # into the same input box and would overwrite a line typed meanwhile.
        wait_count(a, 26)
        wait_count(b, 26)
        for i in range(3):
            say(a, f"after {i}")
            say(b, f"again {i}")
        wait_count(a, 32)
        wait_count(b, 32)
        seen = shown(a)
        assert seen == shown(b)
        assert [s for s, _ in seen] == list(range(seen[0][0], seen[0][0] + 32))
        texts = [text for _, text in seen]
        assert len(set(texts)) == 32
        assert [x for x in texts if x.startswith("during")] == [f"during {i}" for i in range(20)]
        for p in (a, b):
            assert "moving" in p.evaluate("window.seenStates")
            assert p.eval_on_selector_all("#messages .note.gap", "ns => ns.length") == 0
            assert members(p) == ["alice", "bob"]
        a.screenshot(path=str(output_dir / "chat-page-after-move.png"))
    finally:
        ctx_a.close()
        ctx_b.close()
