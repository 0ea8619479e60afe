"""Benchmark: directory connects/s and latency, existing rooms and new rooms.

Load comes from this process (asyncio + uvloop, a minimal keep-alive HTTP/1.1
client on raw streams: no httpx overhead), spread round-robin over the
directory URLs. Each phase runs ``--concurrency`` connections; with
``--rate`` every connection paces its requests on a fixed schedule and
latency is measured from the *scheduled* send time (no coordinated omission),
otherwise each connection sends back-to-back (closed loop, max throughput).

By default it starts a throwaway PostgreSQL (roomshard/testing/pg.py) and two
``roomshard directory`` processes on it; ``--url`` (repeatable) targets
running directories instead (give ``--admin-token``/``--cluster-secret``).
Three fake instances are registered and kept alive by heartbeats.

    python bench/directory_connect.py --duration 10 --concurrency 16
    python bench/directory_connect.py --duration 10 --concurrency 16 --rate 2000
    python bench/directory_connect.py --sqlite     # one directory on the embedded SQLite
    python bench/directory_connect.py --json out.json   # also write the phases as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from roomshard.wire.tickets import Signer


class RawHttp:
    """One keep-alive HTTP/1.1 connection; just enough of the protocol for JSON APIs."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: str = "") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{headers}\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def summary(self) -> dict[str, float | int | str | dict[int, int]]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

        return {"phase": self.name, "requests": len(lat), "connects_per_s": round(len(lat) / self.elapsed),
                "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
                "max_ms": round(lat[-1] * 1000, 2) if lat else 0.0, "errors": self.errors}


async def run_phase(phase: Phase, urls: list[str], rooms: RoomSource, *, concurrency: int,
                    duration: float, rate: float | None) -> None:
    conns = []
    for n in range(concurrency):
        u = urlsplit(urls[n % len(urls)])
        c = RawHttp(u.hostname or "127.0.0.1", u.port or 80)
        await c.open()
        conns.append(c)
    start = time.perf_counter()
    deadline = start + duration

    async def worker(n: int, c: RawHttp) -> None:
        interval = concurrency / rate if rate else 0.0
        scheduled = start + (n * interval / concurrency if rate else 0.0)
        while True:
            if rate:
                now = time.perf_counter()
                if scheduled > now:
                    await asyncio.sleep(scheduled - now)
                t0 = scheduled
                scheduled += interval
            else:
                t0 = time.perf_counter()
            if t0 >= deadline:
                return
            room = rooms.next()
            # One user per room: the room-creation budget counts new rooms per user.
            status, _ = await c.request("POST", f"/v1/rooms/{room}/connect",
                                        b'{"user":"u-%s"}' % room.encode())
            if status == 200:
                phase.latencies.append(time.perf_counter() - t0)
            else:
                phase.errors[status] = phase.errors.get(status, 0) + 1

    await asyncio.gather(*(worker(n, c) for n, c in enumerate(conns)))
    phase.elapsed = time.perf_counter() - start
    for c in conns:
        c.close()


class RoomSource:
    def __init__(self, existing: list[str] | None, prefix: str) -> None:
        self.existing, self.prefix, self.n = existing, prefix, 0

    def next(self) -> str:
        if self.existing:
            return random.choice(self.existing)
        self.n += 1
        return f"{self.prefix}{self.n}"


async def heartbeats(urls: list[str], signer: Signer, stop: asyncio.Event) -> None:
    u = urlsplit(urls[0])
    c = RawHttp(u.hostname or "127.0.0.1", u.port or 80)
    await c.open()
    while not stop.is_set():
        for iid in ("i1", "i2", "i3"):
            token = signer.cluster_token(iid, to="directory", now=time.time())
            body = json.dumps({"internal_url": f"http://127.0.0.1:9/{iid}", "boot_id": "bench",
                               "capacity": 1_000_000}).encode()
            status, text = await c.request("PUT", f"/v1/internal/instances/{iid}/heartbeat", body,
                                           f"Authorization: Bearer {token}\r\n")
            assert status == 200, text
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    c.close()


def cpu_seconds(pids: list[int]) -> float:
    """CPU (user+system) of processes, their live children and their exited, reaped
    children (PostgreSQL backends come and go), via psutil."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
            for child in proc.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
    return total


async def bench(args: argparse.Namespace, urls: list[str],
                server_pids: dict[str, list[int]] | None = None) -> list[dict[str, object]]:
    signer = Signer([s for s in args.cluster_secret.split(",") if s])
    stop = asyncio.Event()
    hb = asyncio.create_task(heartbeats(urls, signer, stop))
    await asyncio.sleep(0.2)
    tag = f"b{int(time.time())}x{random.randrange(10**6)}-"
    existing = [f"{tag}e{n}" for n in range(args.rooms)]
    warm = Phase("warm-up (creates the existing rooms)")
    await run_phase(warm, urls, _Seq(existing), concurrency=args.concurrency,
                    duration=max(2.0, args.rooms / 500), rate=None)
    results = []
    for name, source in (("existing rooms", RoomSource(existing, tag)),
                         ("new rooms", RoomSource(None, tag + "n"))):
        ph = Phase(name)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        srv0 = {k: cpu_seconds(v) for k, v in (server_pids or {}).items()}
        await run_phase(ph, urls, source, concurrency=args.concurrency,
                        duration=args.duration, rate=args.rate)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        s = ph.summary()
        s["client_cpu_pct"] = round(100 * ((cpu1.ru_utime + cpu1.ru_stime)
                                           - (cpu0.ru_utime + cpu0.ru_stime)) / ph.elapsed)
        # CPU per connect, machine-load independent: what an idle machine can do.
        n = max(len(ph.latencies), 1)
        for k, v in (server_pids or {}).items():
            s[f"{k}_cpu_us_per_connect"] = round((cpu_seconds(v) - srv0[k]) / n * 1e6)
        results.append(s)
        print(json.dumps(s), flush=True)
    stop.set()
    await hb
    return results


class _Seq(RoomSource):
    """Walk a room list in order (each room connected at least once)."""

    def __init__(self, rooms: list[str]) -> None:
        super().__init__(None, "")
        self.rooms = rooms

    def next(self) -> str:
        self.n += 1
        return self.rooms[(self.n - 1) % len(self.rooms)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", default=[], help="a running directory (repeatable)")
    p.add_argument("--directories", type=int, default=2, help="directories to start (without --url)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=None, help="target connects/s (paced, open loop)")
    p.add_argument("--rooms", type=int, default=2000, help="existing rooms to create first")
    p.add_argument("--sqlite", action="store_true",
                   help="one directory on the embedded SQLite default instead of PostgreSQL")
    p.add_argument("--admin-token", default=os.environ.get("ROOMSHARD_ADMIN_TOKEN", "bench-admin"))
    p.add_argument("--cluster-secret", default=os.environ.get("ROOMSHARD_CLUSTER_SECRET", "bench-secret"))
    p.add_argument("--json", help="also write the measured phases to this file (bench/compare)")
    args = p.parse_args()
    phases = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "database": "url" if args.url else ("sqlite" if args.sqlite else "postgresql"),
            "directories": len(args.url) or (1 if args.sqlite else args.directories),
            "concurrency": args.concurrency, "duration_s": args.duration, "rate": args.rate,
            "existing_rooms": args.rooms, "cores": os.cpu_count(), "phases": phases}))


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """Start what is needed (unless ``--url``), run both phases, return their summaries."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if args.url:
        return runner(bench(args, args.url))
    from roomshard.testing.pg import PgServer
    from roomshard.testing.procs import Procs

    env = {"ROOMSHARD_ADMIN_TOKEN": args.admin_token, "ROOMSHARD_CLUSTER_SECRET": args.cluster_secret,
           "ROOMSHARD_LOG_LEVEL": "warning"}
    if args.sqlite:
        with Procs(base_env=env) as procs:
            d = procs.directory("dir-sqlite")
            print(json.dumps({"directories": [d.url], "database": "sqlite", "cores": os.cpu_count()}),
                  flush=True)
            return runner(bench(args, [d.url], {"directories": [d.popen.pid]}))
    pg = PgServer()
    pg.start()
    try:
        db = pg.create_database()
        with Procs(base_env=env) as procs:
            dirs = [procs.directory(f"dir{n}", database_url=db) for n in range(args.directories)]
            print(json.dumps({"directories": [d.url for d in dirs], "cores": os.cpu_count()}), flush=True)
            pg_pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
            return runner(bench(args, [d.url for d in dirs],
                                {"directories": [d.popen.pid for d in dirs], "postgres": [pg_pid]}))
    finally:
        pg.destroy()


if __name__ == "__main__":
    main()
