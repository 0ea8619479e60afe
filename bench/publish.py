"""Benchmark: the server API's publishes per second (``POST /v1/rooms/{room}/messages``).

One ``roomshard directory`` and one ``roomshard shard`` (real processes) with a
message store, and this process sending publishes closed-loop over
``--concurrency`` keep-alive connections (the minimal HTTP/1.1 client of
``bench/directory_connect.py``) into ``--rooms`` rooms for ``--duration``
seconds. Each publish is answered once its room's shard gave it its seq and
stored it. Printed: publishes/s, latency percentiles, and the CPU each
process group used per publish.

    python bench/publish.py --store postgres --duration 10 --concurrency 16
    python bench/publish.py --store sqlite
    python bench/publish.py --store memory
    python bench/publish.py --json out.json     # also write the numbers as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.directory_connect import Phase, RawHttp, cpu_seconds
from roomshard.testing.procs import Procs

API_KEY = "bench-api-key"


async def run_phase(phase: Phase, url: str, *, concurrency: int, duration: float,
                    rooms: int) -> None:
    u = urlsplit(url)
    conns = []
    for _ in range(concurrency):
        c = RawHttp(u.hostname or "127.0.0.1", u.port or 80)
        await c.open()
        conns.append(c)
    ids = itertools.count()
    auth = f"Authorization: Bearer {API_KEY}\r\n"
    start = time.perf_counter()
    deadline = start + duration

    async def worker(c: RawHttp) -> None:
        while (t0 := time.perf_counter()) < deadline:
            n = next(ids)
            body = b'{"id":"p%d","user":"backend","text":"news %d"}' % (n, n)
            status, _ = await c.request("POST", f"/v1/rooms/room{n % rooms}/messages", body, auth)
            if status == 200:
                phase.latencies.append(time.perf_counter() - t0)
            else:
                phase.errors[status] = phase.errors.get(status, 0) + 1

    await asyncio.gather(*(worker(c) for c in conns))
    phase.elapsed = time.perf_counter() - start
    for c in conns:
        c.close()


async def bench(store: str, duration: float, concurrency: int, rooms: int) -> dict[str, Any]:
    pg = None
    if store == "postgres":
        from roomshard.testing.pg import PgServer

        pg = PgServer(durable=True, fsync=True)
        pg.start()
    try:
        with Procs() as procs:
            url = {"memory": "memory", "sqlite": f"sqlite+aiosqlite:///{procs.dir / 'messages.db'}",
                   "postgres": pg.create_database() if pg is not None else ""}[store]
            env = {"ROOMSHARD_HISTORY_URL": url, "ROOMSHARD_API_KEYS": API_KEY,
                   "ROOMSHARD_LOG_LEVEL": "warning"}
            database = url if store == "postgres" else None
            d = procs.directory(env=env, database_url=database)
            s = procs.shard("i1", d.url, env=env)
            warm = Phase("warm-up")  # every room placed and opened first
            await run_phase(warm, d.url, concurrency=4, duration=1.0, rooms=rooms)
            groups = {"directory": [d.popen.pid], "shard": [s.popen.pid]}
            if pg is not None:
                groups["postgres"] = [int((pg.datadir / "postmaster.pid").read_text().split()[0])]
            before = {k: cpu_seconds(v) for k, v in groups.items()}
            phase = Phase(f"publish ({store})")
            await run_phase(phase, d.url, concurrency=concurrency, duration=duration, rooms=rooms)
            used = {k: cpu_seconds(v) - before[k] for k, v in groups.items()}
    finally:
        if pg is not None:
            pg.destroy()
    out: dict[str, Any] = {**phase.summary(), "store": store, "concurrency": concurrency,
                           "rooms": rooms, "duration_s": duration}
    out["publishes_per_s"] = out.pop("connects_per_s")
    n = max(1, len(phase.latencies))
    out["cpu_us_per_publish"] = {k: round(1e6 * v / n) for k, v in used.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", choices=("memory", "sqlite", "postgres"), default="postgres",
                   help="the message store (postgres: the directory's database too)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    result = asyncio.run(bench(args.store, args.duration, args.concurrency, args.rooms))
    print("| store | publishes/s | p50 ms | p99 ms | errors | CPU µs per publish |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    cpu = ", ".join(f"{k} {v}" for k, v in result["cpu_us_per_publish"].items())
    print(f"| {result['store']} | {result['publishes_per_s']:,} | {result['p50_ms']} "
          f"| {result['p99_ms']} | {result['errors'] or 'none'} | {cpu} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
