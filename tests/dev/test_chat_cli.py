"""`roomshard chat` in a pseudo-terminal, against real directory and shard processes."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

from roomshard import client
from roomshard.testing.procs import Procs
from roomshard.testing.timing import t

pytestmark = pytest.mark.e2e


def _spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "roomshard", "chat", *args], encoding="utf-8",
                         timeout=t(20), env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_chat_echoes_typed_lines_and_shows_the_room(procs: Procs) -> None:
    """A typed line comes back as `[seq] user: text`; others' presence and messages are printed."""
    d = procs.directory()
    procs.shard("i1", d.url)
    chat = _spawn("tty-room", "--user", "alice", "--directory-url", d.url)
    try:
        chat.expect(r"connected to i1 \(epoch \d+\); members: alice")
        chat.sendline("hello from the terminal")
        chat.expect(r"\[(\d+)\] alice: hello from the terminal")
        first = int(chat.match.group(1))
        async with client.connect(d.url, "tty-room", "bob") as bob:
            chat.expect(r"\* bob joined")
            seq = await bob.send("hi alice")
            chat.expect(rf"\[{seq}\] bob: hi alice")
            assert seq > first
        chat.expect(r"\* bob left")
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


def test_chat_with_a_bad_room_id_says_why(procs: Procs) -> None:
    """A refused connect prints the directory's `code: message` and exits 1."""
    d = procs.directory()
    chat = _spawn("bad room", "--user", "alice", "--directory-url", d.url)
    chat.expect(r"roomshard chat: \w+: ")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 1 and "Traceback" not in (chat.before or "")


def test_chat_shows_reconnecting_and_comes_back(procs: Procs) -> None:
    """A shard crash prints the reconnect state and the lost history; a line typed meanwhile is
    sent once the chat is connected again."""
    d = procs.directory()
    shard = procs.shard("i1", d.url)
    chat = _spawn("tty-crash", "--user", "alice", "--directory-url", d.url)
    try:
        chat.expect(r"connected to i1")
        chat.sendline("one")
        chat.expect(r"\[1\] alice: one")
        procs.kill(shard)
        chat.expect(r"~ connecting: ")
        chat.sendline("two")
        procs.restart(shard)
        chat.expect(r"~ some messages after \[1\] were lost", timeout=t(30))
        chat.expect(r"\[(\d+)\] alice: two", timeout=t(30))
        assert int(chat.match.group(1)) > 1
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0
