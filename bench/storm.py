"""Benchmark: a reconnect storm. N clients in R rooms on one shard of a 3-shard cluster;
the shard is stopped (SIGKILL; SIGTERM: a drain first; SIGSTOP: alive but silent, woken
with SIGCONT after ``--stopped-for``); how long until each client has its next welcome,
from the rooms' new owners.

The clients are ``bench/loadgen/storm.js`` (Node, one process): they follow the
contract's close codes as a production client does (ask the directory again; 1013 and
503 + Retry-After waited out with jitter; full-jitter backoff for a lost connection)
and resume with ``since``. The cluster is real processes on this machine
(``roomshard.testing.procs``): a directory on SQLite and shard i1 first, so that every
room is placed on i1; then i2 and i3 join; then i1 is stopped.

    python -m bench.storm --signal kill              # 5,000 clients in 250 rooms
    python -m bench.storm --signal term --clients 2000 --rooms 100
    python -m bench.storm --signal kill --down-after 3 --json out.json
    python -m bench.storm --signal kill --postgres --directories 2
    python -m bench.storm --signal stop --stopped-for 15   # clients drop a silent shard after 3 s
    python -m bench.storm --signal kill --spread     # rooms on 3 shards; the busiest is killed

Prints one JSON document: the storm client's result (time to the next welcome: p50,
p90, p99, max; how many within 5/10/20 s; welcomes that said ``recovered: false``;
which instances serve the clients now; what the directory answered meanwhile) with
the run's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import cluster
from roomshard.testing.procs import TEST_ADMIN_TOKEN, Proc, Procs
from roomshard.testing.timing import wait_until

STORM_JS = Path(__file__).resolve().parent / "loadgen" / "storm.js"
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def active(directory: str) -> set[str]:
    try:
        r = httpx.get(f"{directory}/v1/admin/instances", headers=ADMIN, timeout=5)
    except httpx.HTTPError:
        return set()
    return {i["id"] for i in r.json().get("instances", []) if i["state"] == "active"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rooms = args.rooms
    members = max(1, args.clients // rooms)
    env = {"ROOMSHARD_ROOM_CREATE_RATE": "0", "ROOMSHARD_LOG_LEVEL": "warning",
           "ROOMSHARD_DOWN_AFTER": str(args.down_after)}
    pg = None
    database_url = None
    if args.postgres:
        from roomshard.testing.pg import PgServer

        pg = PgServer(durable=True)
        pg.start()
        database_url = pg.create_database()
    try:
        with Procs(base_env={**os.environ, **env}) as procs:
            dirs = [procs.directory(f"directory{n}", database_url=database_url, env=env)
                    for n in range(args.directories)]
            try:
                result = _run_storm(args, procs, [d.url for d in dirs], env, rooms, members)
            finally:
                if args.logs:
                    _keep_logs(procs, Path(args.logs))
    finally:
        if pg is not None:
            pg.destroy()
    return {"signal": args.signal, "clients": rooms * members, "rooms": rooms,
            "database": "postgresql" if args.postgres else "sqlite",
            "directories": args.directories, "down_after_s": args.down_after, **result}


def _keep_logs(procs: Procs, into: Path) -> None:
    """Every process's output, one file each (a run worth a second look)."""
    into.mkdir(parents=True, exist_ok=True)
    for proc in procs.procs:
        (into / f"{proc.name}.log").write_text(proc.output())


def _run_storm(args: argparse.Namespace, procs: Procs, directories: list[str],
               env: dict[str, str], rooms: int, members: int) -> dict[str, Any]:
    """Shard i1 alone first (every room on it), then the storm; or, with ``--spread``, the
    three shards first (the rooms spread over them by the directory's placement) and the
    busiest stopped. The shards are spread over the directories (each shard's heartbeats
    and control channel go to one)."""
    directory = directories[0]
    i1 = procs.shard("i1", directory, env=env)
    if args.spread:
        for n, instance in enumerate(("i2", "i3"), start=1):
            procs.shard(instance, directories[n % len(directories)], env=env)
        wait_until(lambda: {"i1", "i2", "i3"} <= active(directory), 30, "3 shards active")
    else:
        wait_until(lambda: "i1" in active(directory), 30, "i1 active")
    config = {"directories": directories, "rooms": rooms, "members": members,
              "roomPrefix": f"storm{int(time.time())}", "connectConcurrency": 200,
              "timeoutSeconds": args.timeout,
              "liveness": args.liveness if args.liveness is not None
              else (3.0 if args.signal == "stop" else 0.0)}
    argv = [cluster.node(), str(STORM_JS), json.dumps(config)]
    if args.loadgen_cpu:
        argv = ["taskset", "-c", args.loadgen_cpu, *argv]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=sys.stderr, text=True, cwd=cluster.ROOT) as node:
        return _storm(args, procs, directories, i1, node, rooms * members)


def _storm(args: argparse.Namespace, procs: Procs, directories: list[str], i1: Proc,
           node: subprocess.Popen[str], clients: int) -> dict[str, Any]:
    env = procs.base_env
    directory = directories[0]
    watch: _CpuWatch | None = None
    try:
        assert node.stdout is not None and node.stdin is not None
        ready = json.loads(node.stdout.readline())
        placed: dict[str, int] = ready.get("instances") or {}
        if args.spread:
            if sum(placed.values()) != clients:
                raise RuntimeError(f"not every client is connected: {ready}")
            victim = max(sorted(placed), key=lambda i: placed[i])
            i1 = next(p for p in procs.procs if p.name == victim)
        else:
            if placed != {"i1": clients}:
                raise RuntimeError(f"not every client is on i1: {ready}")
            for n, instance in enumerate(("i2", "i3"), start=1):
                procs.shard(instance, directories[n % len(directories)], env=env)
            wait_until(lambda: {"i1", "i2", "i3"} <= active(directory), 30, "3 shards active")
        watch = _CpuWatch(procs.procs)
        busy0 = _machine_busy()
        stopped_at = time.time()
        os.kill(i1.popen.pid, SIGNALS[args.signal])
        node.stdin.write(f"{int(stopped_at * 1000)} {i1.name}\n")
        node.stdin.flush()
        woke = None
        if args.signal == "stop":
            woke = threading.Timer(args.stopped_for, os.kill, (i1.popen.pid, signal.SIGCONT))
            woke.start()
        line = node.stdout.readline()
        if not line:
            raise RuntimeError(f"the storm client exited with {node.wait()}")
        result: dict[str, Any] = json.loads(line)
        result["stopped"] = i1.name
        result["clients_before"] = placed
        # The other processes' CPU (directories, new owners) and the machine's over the storm
        # (to its end: the storm client waits for its last welcome before it answers).
        busy1 = _machine_busy()
        # Each process's share (the stopped one's until it exited): where the CPU went.
        cpu = result["cpu_s"] = watch.stop()
        result["servers_cpu_s"] = round(sum(v for name, v in cpu.items() if name != i1.name), 2)
        result["machine_busy"] = round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 2)
        if woke is not None:
            woke.join()
            result["stopped_for_s"] = args.stopped_for
        return result
    finally:
        if watch is not None:
            watch.stop()  # its thread ends (a second stop only samples once more)
        if args.signal == "stop" and i1.popen.poll() is None:
            os.kill(i1.popen.pid, signal.SIGCONT)  # never leave a stopped process behind
        if node.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=5)  # it exits once it has answered (and wrote a profile)
        if node.poll() is None:
            node.kill()


class _CpuWatch:
    """Each process's CPU seconds from now on, read from ``/proc`` every 20 ms, so a process
    that exits (the stopped shard, after its drain) counts what it used until its end."""

    def __init__(self, procs: list[Proc]) -> None:
        self.pids = {p.name: p.popen.pid for p in procs}
        self.start = {name: _cpu_of(pid) for name, pid in self.pids.items()}
        self.last = dict(self.start)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self._sample()

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            seconds = _cpu_of(pid)
            if seconds is not None:
                self.last[name] = seconds

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        self._sample()
        return {name: round(end - start, 2) for name, end in self.last.items()
                if end is not None and (start := self.start[name]) is not None}


def _cpu_of(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far; None once it is gone."""
    try:
        return sum(cluster.cpu_ticks(pid)) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of every core so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--signal", choices=tuple(SIGNALS), default="kill")
    p.add_argument("--stopped-for", type=float, default=15.0,
                   help="with --signal stop: seconds until SIGCONT (past --down-after: the "
                        "rooms are re-placed while it is stopped)")
    p.add_argument("--liveness", type=float, default=None,
                   help="seconds without a pong before a client drops its connection "
                        "(default 3 with --signal stop, else off)")
    p.add_argument("--spread", action="store_true",
                   help="the rooms spread over the 3 shards before the stop, and the busiest "
                        "is stopped (by default every room is on the stopped shard)")
    p.add_argument("--clients", type=int, default=5_000)
    p.add_argument("--rooms", type=int, default=250)
    p.add_argument("--down-after", type=float, default=10.0,
                   help="ROOMSHARD_DOWN_AFTER: seconds without a heartbeat before a shard is down")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the clients get to come back")
    p.add_argument("--loadgen-cpu", default="", help="taskset list for the storm client")
    p.add_argument("--postgres", action="store_true",
                   help="the directory on a throwaway PostgreSQL (else SQLite)")
    p.add_argument("--directories", type=int, default=1,
                   help="directory processes (the clients and shards spread over them; "
                        "more than one needs --postgres)")
    p.add_argument("--json", default="", help="also write the result to this file")
    p.add_argument("--logs", default="", help="keep every process's output in this directory")
    args = p.parse_args()
    if args.directories > 1 and not args.postgres:
        p.error("--directories > 1 needs --postgres (SQLite is one process's database)")
    result = run(args)
    text = json.dumps(result)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
