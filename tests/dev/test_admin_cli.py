"""`roomshard admin` against a real directory: tables, changes, and one-line errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

import client
from roomshard.cli import main
from tests.support.procs import TEST_ADMIN_TOKEN, Procs
from tests.support.timing import t

pytestmark = pytest.mark.e2e


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def admin(directory_url: str, *args: str, token: str | None = TEST_ADMIN_TOKEN, stdin: str = "") -> Result:
    """Run `roomshard admin` in-process (click's runner): same code path, no interpreter start-up."""
    env = {"ROOMSHARD_ADMIN_TOKEN": token}  # None unsets it
    res = CliRunner().invoke(main, ["admin", "--directory-url", directory_url, *args], env=env, input=stdin)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback the user would have seen
    return Result(res.exit_code, res.stdout, res.stderr)


def one_error_line(res: Result) -> str:
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_instances_and_rooms_tables(procs: Procs) -> None:
    """instances, rooms and room print the registry and the room's assignment as tables."""
    d = procs.directory()
    procs.shard("i1", d.url)
    res = admin(d.url, "instances")
    assert res.returncode == 0, res.stderr
    assert "i1" in res.stdout and "active" in res.stdout

    async def join() -> None:
        async with client.connect(d.url, "tables", "alice") as s:
            await s.send("x")
    asyncio.run(join())

    res = admin(d.url, "rooms", "--instance", "i1")
    assert res.returncode == 0 and "tables" in res.stdout and "rooms on i1 (1)" in res.stdout
    res = admin(d.url, "room", "tables")
    assert res.returncode == 0 and "instance" in res.stdout and "i1" in res.stdout


def test_errors_are_one_line_with_the_contract_code(procs: Procs) -> None:
    """No token exits 2, a wrong token or unknown room exits 1 with `code: message`, no traceback."""
    d = procs.directory()
    res = admin(d.url, "instances", token=None)
    assert res.returncode == 2 and "ROOMSHARD_ADMIN_TOKEN" in one_error_line(res)
    res = admin(d.url, "instances", token="wrong")
    assert res.returncode == 1 and one_error_line(res).startswith("roomshard admin: ")
    res = admin(d.url, "room", "no-such-room")
    assert res.returncode == 1 and "not_found" in one_error_line(res)
    res = admin("http://127.0.0.1:1", "instances")
    assert res.returncode == 2 and "cannot reach the directory" in one_error_line(res)


def test_instance_set_changes_capacity_and_state(procs: Procs) -> None:
    """`instance set` updates the registry and instances shows it; `down` is refused by the CLI."""
    d = procs.directory()
    procs.shard("i1", d.url)
    res = admin(d.url, "instance", "set", "i1", "--capacity", "7", "--state", "draining")
    assert res.returncode == 0, res.stderr
    listing = admin(d.url, "instances").stdout
    row = next(line for line in listing.splitlines() if "│ i1 " in line)
    assert "draining" in row and "│ 7 " in row
    res = admin(d.url, "instance", "set", "i1", "--state", "down")
    assert res.returncode == 2 and "Traceback" not in res.stderr


async def test_access_makes_a_room_private(procs: Procs) -> None:
    """`access ROOM --private --member a` lets a in and refuses everyone else with 403."""
    d = procs.directory()
    procs.shard("i1", d.url)
    res = admin(d.url, "access", "secret", "--private", "--member", "alice")
    assert res.returncode == 0 and "private to alice" in res.stdout
    async with client.connect(d.url, "secret", "alice") as s:
        assert s.members == ["alice"]
    with pytest.raises(client.ConnectRefused) as err:
        await client.connect(d.url, "secret", "mallory", timeout=t(10))
    assert err.value.status == 403


def test_move_drain_and_rebalance_answer_cleanly(procs: Procs) -> None:
    """move, drain and rebalance --dry-run show a report, or the directory's error in one line."""
    d = procs.directory()
    procs.shard("i1", d.url)
    procs.shard("i2", d.url)

    async def join() -> None:
        async with client.connect(d.url, "mover", "alice") as s:
            await s.send("x")
    asyncio.run(join())
    where = admin(d.url, "room", "mover").stdout
    src = "i1" if "│ instance    │ i1" in where else "i2"
    dst = "i2" if src == "i1" else "i1"
    for args, ok_text in ((["move", "mover", "--to", dst], "moved mover"),
                          (["rebalance", "--dry-run"], "rebalance plan"),
                          (["drain", dst], f"drained {dst}")):
        res = admin(d.url, *args)
        if res.returncode == 0:
            assert ok_text in res.stdout, res.stdout
        else:
            assert res.returncode == 1 and one_error_line(res).startswith("roomshard admin: ")


def test_admin_runs_as_a_command() -> None:
    """The installed `roomshard admin` entry point starts and fails cleanly without a directory."""
    res = subprocess.run([sys.executable, "-m", "roomshard", "admin", "--directory-url",
                          "http://127.0.0.1:1", "instances"], capture_output=True, text=True,
                         env={**os.environ, "ROOMSHARD_ADMIN_TOKEN": "x"}, timeout=t(60))
    assert res.returncode == 2 and "cannot reach the directory" in res.stderr and "Traceback" not in res.stderr


def test_rebalance_asks_before_moving(procs: Procs) -> None:
    """Without --yes, rebalance shows the plan and moves nothing when the answer is no."""
    d = procs.directory()
    procs.shard("i1", d.url)
    res = admin(d.url, "rebalance", stdin="n\n")
    if res.returncode == 0:
        assert "rebalance plan" in res.stdout
        assert "nothing moved" in res.stdout or "already balanced" in res.stdout
    else:
        assert res.returncode == 1 and one_error_line(res).startswith("roomshard admin: ")


def test_error_line_reads_the_contract_body_or_falls_back_to_the_status() -> None:
    """The contract's error body gives `code: message`; anything else (a proxy's HTML) gives the status."""
    import httpx

    from roomshard.admin_cli import error_line

    body = {"error": {"code": "instance_not_active", "message": "i2 is draining"}}
    assert error_line(httpx.Response(409, json=body)) == "instance_not_active: i2 is draining"
    html = httpx.Response(502, text="<html><body>Bad Gateway</body></html>\n<hr>nginx")
    assert error_line(html) == "http_502: <html><body>Bad Gateway</body></html>"
    assert error_line(httpx.Response(501)) == "http_501: Not Implemented"
