"""`roomshard admin` against a real directory: tables, changes, and one-line errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from roomshard import client
from roomshard.cli import main
from roomshard.testing.pg import free_port
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs
from roomshard.testing.timing import t

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


def _rooms_on(directory_url: str, instance: str) -> list[str]:
    res = admin(directory_url, "rooms", "--instance", instance)
    assert res.returncode == 0, res.stderr
    return [line.split("│")[1].strip() for line in res.stdout.splitlines() if line.startswith("│")]


def _make_rooms(directory_url: str, rooms: list[str]) -> None:
    async def join() -> None:
        for r in rooms:
            async with client.connect(directory_url, r, "alice") as s:
                await s.send("x")
    asyncio.run(join())


def test_move_shows_the_report_and_refuses_a_second_move(procs: Procs) -> None:
    """move shows the report and the room's new home; moving it there again is one 409 line."""
    d = procs.directory()
    procs.shard("i1", d.url)
    procs.shard("i2", d.url)
    _make_rooms(d.url, ["mover"])
    src = "i1" if "mover" in _rooms_on(d.url, "i1") else "i2"
    dst = "i2" if src == "i1" else "i1"
    res = admin(d.url, "move", "mover", "--to", dst)
    assert res.returncode == 0 and "moved mover" in res.stdout and "pause_ms" in res.stdout, res.stderr
    assert _rooms_on(d.url, dst) == ["mover"]
    res = admin(d.url, "move", "mover", "--to", dst)
    assert res.returncode == 1 and "already_there: " in one_error_line(res)


def test_drain_empties_the_instance_and_disables_it(procs: Procs) -> None:
    """drain moves every room off the instance (table of moves) and leaves it disabled."""
    d = procs.directory()
    procs.shard("i1", d.url)
    _make_rooms(d.url, ["d1", "d2", "d3"])
    procs.shard("i2", d.url)
    res = admin(d.url, "drain", "i1", "--parallelism", "0")
    assert res.returncode == 2 and "parallelism" in res.stderr
    res = admin(d.url, "drain", "i1", "--parallelism", "2")
    assert res.returncode == 0 and "drained i1: 3 room(s) moved" in res.stdout, res.stdout + res.stderr
    assert _rooms_on(d.url, "i1") == [] and sorted(_rooms_on(d.url, "i2")) == ["d1", "d2", "d3"]
    row = next(line for line in admin(d.url, "instances").stdout.splitlines() if "│ i1 " in line)
    assert "disabled" in row


def test_retire_drains_removes_and_says_when_the_route_does_not_go(procs: Procs) -> None:
    """retire: rooms moved, instance removed; with no load balancer in front (the route is
    the shard's own address, so it answers for as long as it runs) it waits no longer than
    --route-timeout and exits 1 saying why; without any public address it does not wait."""
    res = admin(procs.directory(name="d0").url, "retire", "i9")
    assert res.returncode == 1 and "instance_not_found: " in one_error_line(res)

    d = procs.directory()
    port = free_port()
    procs.shard("i1", d.url, extra=["--port", str(port), "--public-base", f"ws://127.0.0.1:{port}"])
    _make_rooms(d.url, ["r1", "r2"])
    procs.shard("i2", d.url)
    res = admin(d.url, "retire", "i1", "--route-timeout", "1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "drained i1: 2 room(s) moved" in res.stdout and "removed i1 from the registry" in res.stdout
    assert (f"the load balancer still routes ws://127.0.0.1:{port}/i1/room/ after 1s (it answered "
            "200)") in one_error_line(res)
    assert sorted(_rooms_on(d.url, "i2")) == ["r1", "r2"]
    assert "│ i1 " not in admin(d.url, "instances").stdout

    res = admin(d.url, "retire", "i2")  # the last shard with rooms: nowhere to move them
    assert res.returncode == 1 and "no_target: " in one_error_line(res)
    procs.shard("i3", d.url)
    res = admin(d.url, "retire", "i2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "drained i2: 2 room(s) moved" in res.stdout and "i2 has no route_url" in res.stdout
    assert res.stdout.rstrip().endswith("retired i2: no room and no route left; stop its process")


def test_rebalance_shows_the_plan_and_asks_before_moving(procs: Procs) -> None:
    """After a shard joins, rebalance prints the plan; answering no moves nothing, --yes moves."""
    d = procs.directory()
    procs.shard("i1", d.url)
    rooms = [f"heavy{i}" for i in range(4)]
    _make_rooms(d.url, rooms)
    procs.shard("i2", d.url)
    assert sorted(_rooms_on(d.url, "i1")) == rooms

    res = admin(d.url, "rebalance", "--dry-run")
    assert res.returncode == 0 and "rebalance plan: " in res.stdout and "load before" in res.stdout
    res = admin(d.url, "rebalance", stdin="n\n")
    assert res.returncode == 0 and "nothing moved" in res.stdout
    assert sorted(_rooms_on(d.url, "i1")) == rooms
    res = admin(d.url, "rebalance", "--yes")
    assert res.returncode == 0 and "rebalanced: " in res.stdout, res.stdout + res.stderr
    assert _rooms_on(d.url, "i2") and len(_rooms_on(d.url, "i1")) < 4


def test_admin_runs_as_a_command() -> None:
    """The installed `roomshard admin` entry point starts and fails cleanly without a directory."""
    res = subprocess.run([sys.executable, "-m", "roomshard", "admin", "--directory-url",
                          "http://127.0.0.1:1", "instances"], capture_output=True, text=True,
                         env={**os.environ, "ROOMSHARD_ADMIN_TOKEN": "x"}, timeout=t(60))
    assert res.returncode == 2 and "cannot reach the directory" in res.stderr and "Traceback" not in res.stderr


def test_error_line_reads_the_contract_body_or_falls_back_to_the_status() -> None:
    """The contract's error body gives `code: message`; anything else (a proxy's HTML) gives the status."""
    import httpx

    from roomshard.cli.admin import error_line

    body = {"error": {"code": "instance_not_active", "message": "i2 is draining"}}
    assert error_line(httpx.Response(409, json=body)) == "instance_not_active: i2 is draining"
    html = httpx.Response(502, text="<html><body>Bad Gateway</body></html>\n<hr>nginx")
    assert error_line(html) == "http_502: <html><body>Bad Gateway</body></html>"
    assert error_line(httpx.Response(501)) == "http_501: Not Implemented"


def test_a_report_with_failed_rooms_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A drain/rebalance report listing failed rooms prints them and exits 1; a complete one does not."""
    from roomshard.cli.admin import _exit_on_failures

    _exit_on_failures("drain of i1", {"moves": [], "failed": [], "complete": True})
    with pytest.raises(SystemExit) as exc:
        _exit_on_failures("drain of i1", {"failed": [{"room": "r9", "error": "move_rolled_back: x"}],
                                          "complete": False})
    assert exc.value.code == 1
    out = capsys.readouterr()
    assert "r9" in out.out and "drain of i1 incomplete: 1 room(s) failed" in out.err


def test_publish_and_history(procs: Procs) -> None:
    """`publish` sends as a user (idempotent by --id), `history` pages the room back."""
    d = procs.directory()
    procs.shard("i1", d.url)
    for i in range(1, 4):
        res = admin(d.url, "publish", "news", "--user", "bot", "--id", f"n{i}", f"line {i}")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"published to news: seq {i} (id n{i})"
    res = admin(d.url, "publish", "news", "--user", "bot", "--id", "n2", "line 2")
    assert res.stdout.strip() == "published to news: seq 2 (id n2)"  # the same message
    res = admin(d.url, "history", "news", "--limit", "2")
    assert res.returncode == 0 and "news: 2 message(s), older ones exist" in res.stdout
    assert "line 3" in res.stdout and "line 1" not in res.stdout
    res = admin(d.url, "history", "news", "--limit", "2", "--all")
    assert "news: 3 message(s)" in res.stdout and "older" not in res.stdout
    assert res.stdout.index("line 1") < res.stdout.index("line 2") < res.stdout.index("line 3")
    res = admin(d.url, "publish", "news", "--user", "not valid", "x")
    assert res.returncode == 1 and "invalid_user" in one_error_line(res)
    res = admin(d.url, "history", "never")
    assert res.returncode == 1 and "room_not_found" in one_error_line(res)
