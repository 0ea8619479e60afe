"""Live handoff benchmark: pause per move by room size, drain rate, the full-size scenario.

    python bench/handoff.py pause [--members 10,100,1000] [--moves 20] [--history 1000]
                                  [--store memory|sqlite|postgres]
    python bench/handoff.py drain [--rooms 600] [--postgres] [--idle]
    python bench/handoff.py scenario [--rooms 200] [--clients 10]

Real processes on loopback (one ``roomshard directory`` on SQLite, shards),
real WebSocket members that reconnect after every 4010 (they follow the
room, so every move pays for the members it has).

- ``pause``: one room with N members and a full history is moved back and
  forth between two shards; per move the directory's ``pause_ms`` (freeze
  request -> commit: how long the room takes no send) and, per member, the
  time from its 4010 to its welcome on the new shard (reconnect). ``--store``:
  the shards share a message store (a SQLite file, or a throwaway
  PostgreSQL with synchronous commits) instead of memory only.
- ``drain``: rooms with one member each spread over three shards; one
  instance is drained (the admin drain's default: 32 moves at once) and the
  report's rooms/s printed, with the CPU each process group spent per move.
- ``scenario``: ``tests/e2e_handoff/test_live_moves.py`` at the issue's size.

Numbers and the machine they came from: docs/HANDOFF.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.directory_connect import cpu_seconds
from roomshard.testing.chatter import Chatter
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Procs

ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
# One client process hosts every member: under a 1,000-join presence storm its pongs come
# late, so the shards ping rarely (the bench measures moves, not dead-peer detection).
SHARD_ENV = {"ROOMSHARD_HEARTBEAT_INTERVAL": "1", "ROOMSHARD_LEASE": "8",
             "ROOMSHARD_PING_INTERVAL": "600", "ROOMSHARD_PING_TIMEOUT": "600"}
DIRECTORY_ENV = {"ROOMSHARD_DOWN_AFTER": "12"}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def fill_history(members: list[Chatter], total: int) -> None:
    """``total`` messages from up to 50 members, under the per-connection rate limit."""
    senders = members[:50]
    per = max(1, total // len(senders))
    for _ in range(per):
        for c in senders:
            await c.send()
        await asyncio.sleep(1 / 15)
    await wait(lambda: all(not c.unacked for c in senders), 120, "history acked")


async def bench_pause(sizes: list[int], moves: int, history: int,
                      out: list[dict[str, object]] | None = None, store: str = "memory") -> None:
    pg = None
    if store == "postgres":
        from roomshard.testing.pg import PgServer

        pg = PgServer(durable=True)
        pg.start()
    try:
        with Procs() as procs:
            url = {"memory": "memory", "sqlite": f"sqlite+aiosqlite:///{procs.dir / 'store.db'}",
                   "postgres": pg.create_database() if pg is not None else ""}[store]
            await _pause(procs, sizes, moves, history, out, url)
    finally:
        if pg is not None:
            pg.destroy()


async def _pause(procs: Procs, sizes: list[int], moves: int, history: int,
                 out: list[dict[str, object]] | None, store_url: str) -> None:
    d = procs.directory(env=DIRECTORY_ENV)
    for i in ("i1", "i2"):
        procs.shard(i, d.url, env={**SHARD_ENV, "ROOMSHARD_HISTORY_URL": store_url})
    limits = httpx.Limits(max_connections=2000)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        print("| members | moves | pause_ms p50 | pause_ms p99 | max | reconnect p50 ms | reconnect p99 ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for n in sizes:
            room = f"bench{n}"
            gate = asyncio.Semaphore(64)
            members = [Chatter(d.url, room, f"m{k}", http, open_timeout=60, gate=gate)
                       for k in range(n)]
            for c in members:
                c.start()
            await wait(lambda ms=members: all(c.opened.is_set() for c in ms), 600, "members in")
            await fill_history(members, history)
            settled = {id(c): len(c.welcomes) for c in members}  # before the first move
            pauses: list[float] = []
            reconnects: list[float] = []
            count = moves if n < 1000 else max(3, moves // 4)  # each costs a 1,000-join storm
            for k in range(count):
                src = (await http.get(f"{d.url}/v1/admin/rooms/{room}", headers=ADMIN)).json()
                to = "i2" if src["instance"] == "i1" else "i1"
                marks = {id(c): len(c.welcomes) for c in members}
                t0 = time.monotonic()
                r = await http.post(f"{d.url}/v1/admin/rooms/{room}/move", json={"to": to},
                                    headers=ADMIN)
                if r.status_code != 200:
                    raise SystemExit(f"move failed: {r.text}")
                pauses.append(r.json()["pause_ms"])
                await wait(lambda ms=members, mk=marks: all(len(c.welcomes) > mk[id(c)] for c in ms),
                           600, "members to follow")
                reconnects.append((time.monotonic() - t0) * 1000)
                await members[k % n].send()
            print(f"| {n} | {count} | {pct(pauses, .5):.1f} | {pct(pauses, .99):.1f} | "
                  f"{max(pauses):.1f} | {statistics.median(reconnects):.0f} | "
                  f"{pct(reconnects, .99):.0f} |", flush=True)
            if out is not None:  # --json: the same numbers, machine-readable
                out.append({"members": n, "moves": count, "history": history,
                            "store": store_url.split(":", 1)[0],
                            "pause_ms": pauses, "reconnect_ms": reconnects})
            bad = [w for c in members for w in c.welcomes[settled[id(c)]:]
                   if w.recovered is not True]
            if bad:
                raise SystemExit(f"{len(bad)} reconnects were not recovered")
            for c in members:
                await c.stop()


async def bench_drain(rooms: int, postgres: bool, idle: bool,
                      out: dict[str, object] | None = None) -> None:
    pg = None
    if postgres:
        from roomshard.testing.pg import PgServer

        pg = PgServer()
        pg.start()
    try:
        pg_pid = int((pg.datadir / "postmaster.pid").read_text().split()[0]) if pg else None
        await _drain(rooms, pg.create_database() if pg is not None else None, idle, pg_pid,
                     out=out)
    finally:
        if pg is not None:
            pg.destroy()


class CpuMeter:
    """CPU seconds per process group over one interval (where a drain's cost goes)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = self._sample()
        self.t0 = time.monotonic()

    def _sample(self) -> dict[str, float]:
        out = {k: cpu_seconds(v) for k, v in self.groups.items()}
        me = resource.getrusage(resource.RUSAGE_SELF)
        out["bench clients"] = me.ru_utime + me.ru_stime
        return out

    def report(self, moves: int) -> str:
        end, wall = self._sample(), time.monotonic() - self.t0
        used = {k: end[k] - self.start[k] for k in end}
        parts = [f"{k} {v:.2f}s ({1000 * v / max(1, moves):.1f} ms/move)" for k, v in used.items()]
        return (f"CPU over {wall:.2f}s wall: " + ", ".join(parts)
                + f"; all {sum(used.values()) / wall:.2f} cores")


async def _drain(rooms: int, database_url: str | None, idle: bool,
                 pg_pid: int | None = None, out: dict[str, object] | None = None) -> None:
    with Procs() as procs:
        d = procs.directory(env=DIRECTORY_ENV, database_url=database_url)
        shards = [procs.shard(i, d.url, env=SHARD_ENV) for i in ("i1", "i2", "i3")]
        groups = {"directory": [d.popen.pid], "shards": [s.popen.pid for s in shards]}
        if pg_pid is not None:
            groups["postgres"] = [pg_pid]
        # A small keep-alive pool: httpx checks every pooled connection on each request (half
        # of the directory's CPU per move in its profile before batching), and every member
        # reconnects through this one client.
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            if idle:
                await _drain_idle(d.url, http, rooms, out)
                return
            gate = asyncio.Semaphore(64)
            # One user per room: the room-creation budget counts new rooms per user.
            members = [Chatter(d.url, f"d{n}", f"m{n}", http, gate=gate) for n in range(rooms)]
            try:
                await _drain_live(d.url, http, members, groups, rooms, database_url, out)
            finally:
                for c in members:  # before the client closes, whatever happened
                    await c.stop()


async def _drain_live(url: str, http: httpx.AsyncClient, members: list[Chatter],
                      groups: dict[str, list[int]], rooms: int, database_url: str | None,
                      out: dict[str, object] | None) -> None:
    """Each of ``members`` in its own room, one message each; drain the busiest shard."""
    for c in members:
        c.start()
    await wait(lambda: all(c.opened.is_set() for c in members), 180, "members in")
    for c in members:
        await c.send()
    await wait(lambda: all(not c.unacked for c in members), 60, "first messages")
    counts: dict[str, int] = {}
    for c in members:
        counts[c.welcomes[0].instance] = counts.get(c.welcomes[0].instance, 0) + 1
    victim = max(counts, key=lambda i: counts[i])
    t0 = time.monotonic()
    meter = CpuMeter(groups)
    spy = None
    if os.environ.get("BENCH_PROFILE"):  # py-spy (collapsed stacks) of the directory
        spy = subprocess.Popen(["py-spy", "record", "-p", str(groups["directory"][0]), "-r", "250",
                                "-f", "raw", "-o", os.environ["BENCH_PROFILE"]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = await http.post(f"{url}/v1/admin/instances/{victim}/drain", headers=ADMIN,
                        timeout=600)
    wall = time.monotonic() - t0
    rep = r.json()
    cpu_line = meter.report(rep["moved"])
    print(cpu_line, flush=True)
    if spy is not None:
        spy.send_signal(2)
        spy.wait(30)
    pauses = [m["pause_ms"] for m in rep["moves"]]
    print(f"drained {victim}: {rep['moved']}/{rep['total']} rooms in {wall:.2f}s "
          f"({rep['moved'] / wall:.0f} rooms/s; report {rep['rooms_per_s']} rooms/s), "
          f"failed {len(rep['failed'])}, state {rep['state']}, pause_ms p50 "
          f"{pct(pauses, .5):.1f} p99 {pct(pauses, .99):.1f}", flush=True)
    hit = [c for c in members if c.welcomes[0].instance == victim]
    await wait(lambda: all(len(c.welcomes) > 1 for c in hit), 120, "members to follow")
    bad = [c for c in hit if c.welcomes[1].recovered is not True]
    print(f"members of drained rooms back: {len(hit)}, not recovered: {len(bad)}")
    if out is not None:  # --json: the same numbers, machine-readable
        out.update(_drain_record(rep, wall, rooms, database_url, idle=False),
                   cpu=cpu_line, members_back=len(hit), not_recovered=len(bad))


def _drain_record(rep: dict, wall: float, rooms: int, database_url: str | None,  # type: ignore[type-arg]
                  idle: bool) -> dict[str, object]:
    """What ``--json`` writes for a drain (the numbers the printed line shows)."""
    return {"rooms": rooms, "database": "postgresql" if database_url else "sqlite",
            "idle": idle, "instance": rep.get("instance"), "moved": rep["moved"],
            "total": rep["total"], "wall_s": wall, "rooms_per_s": rep["moved"] / wall,
            "report_rooms_per_s": rep.get("rooms_per_s"), "failed": len(rep["failed"]),
            "state": rep.get("state"), "pause_ms": [m["pause_ms"] for m in rep["moves"]]}


async def _drain_idle(url: str, http: httpx.AsyncClient, rooms: int,
                      out: dict[str, object] | None = None) -> None:
    """Rooms placed but never opened (no snapshot, no member): the move machinery alone."""
    for n in range(rooms):
        # One user per room: the room-creation budget counts new rooms per user.
        r = await http.post(f"{url}/v1/rooms/d{n}/connect", json={"user": f"m{n}"})
        r.raise_for_status()
    t0 = time.monotonic()
    rep = (await http.post(f"{url}/v1/admin/instances/i1/drain", headers=ADMIN, timeout=600)).json()
    wall = time.monotonic() - t0
    pauses = [m["pause_ms"] for m in rep["moves"]]
    print(f"drained i1 (idle rooms): {rep['moved']}/{rep['total']} rooms in {wall:.2f}s "
          f"({rep['moved'] / wall:.0f} rooms/s), failed {len(rep['failed'])}, pause_ms p50 "
          f"{pct(pauses, .5):.1f} p99 {pct(pauses, .99):.1f}", flush=True)
    if out is not None:
        out.update(_drain_record(rep, wall, rooms, None, idle=True))


def scenario(rooms: int, clients: int) -> None:
    env = {**os.environ, "ROOMSHARD_E2E_ROOMS": str(rooms), "ROOMSHARD_E2E_CLIENTS": str(clients)}
    cmd = [sys.executable, "-m", "pytest", "tests/e2e_handoff/test_live_moves.py", "-q",
           "-p", "no:cacheprovider", "-o", "timeout=1200", "--durations=1"]
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    print(f"scenario {rooms} rooms x {clients} clients: exit {rc} in {time.monotonic() - t0:.0f}s")
    raise SystemExit(rc)


def raise_fd_limit() -> None:
    """1,000 members + their shard's sockets exceed the usual soft limit of 1,024 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def main() -> None:
    raise_fd_limit()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pause")
    a.add_argument("--members", default="10,100,1000")
    a.add_argument("--moves", type=int, default=20)
    a.add_argument("--history", type=int, default=1000)
    a.add_argument("--store", choices=("memory", "sqlite", "postgres"), default="memory",
                   help="the shards' message store")
    a.add_argument("--json", help="also write the measured numbers to this file")
    b = sub.add_parser("drain")
    b.add_argument("--rooms", type=int, default=600)
    b.add_argument("--postgres", action="store_true", help="the directory on PostgreSQL")
    b.add_argument("--idle", action="store_true", help="rooms without members (never opened)")
    b.add_argument("--json", help="also write the measured numbers to this file")
    c = sub.add_parser("scenario")
    c.add_argument("--rooms", type=int, default=200)
    c.add_argument("--clients", type=int, default=10)
    args = p.parse_args()
    if args.cmd == "pause":
        sizes: list[dict[str, object]] = []
        asyncio.run(bench_pause([int(x) for x in args.members.split(",")], args.moves,
                                args.history, sizes, args.store))
        if args.json:
            Path(args.json).write_text(json.dumps({"pause": sizes}))
    elif args.cmd == "drain":
        drained: dict[str, object] = {}
        asyncio.run(bench_drain(args.rooms, args.postgres, args.idle, drained))
        if args.json:
            Path(args.json).write_text(json.dumps({"drain": drained}))
    else:
        scenario(args.rooms, args.clients)


if __name__ == "__main__":
    main()
