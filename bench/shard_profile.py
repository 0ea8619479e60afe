"""Shard CPU per delivery at a fixed low rate, before/after a change, optionally profiled.

    python -m bench.shard_profile --revs HEAD~1,worktree --rate 1000 --steps 3 --rounds 3
    python -m bench.shard_profile --revs worktree --pyspy /tmp/shard.raw   # + a py-spy profile
    python -m bench.shard_profile --revs worktree --perf /tmp/shard.perf   # + perf record -g
    python -m bench.shard_profile --revs HEAD,HEAD@pg,HEAD@sqlite --paired   # with a store

The fan-out workload of ``bench/compare`` (100 rooms x 20 members, the Node
load generator on CPU 0, servers on CPU 1, started by ``bench/cluster.py``)
but one rung only, repeated ``--steps`` times per start, and with the CPU of
each process kept apart: the shard's user and system time, and the
directory's (``bench/compare`` sums both). Each ``--revs`` entry is a git
revision exported with ``git archive`` (or ``worktree``: the files as they
are), with ``@pg`` or ``@sqlite`` after it for a shard that stores every
message first (``bench/cluster.py``'s ``roomshard-1-pg``/``-sqlite``: the
database's CPU is not the shard's); ``bare-websockets`` (the Python ceiling)
and ``socketio-1`` measure a peer server instead.
Rounds interleave the entries so background load hits them alike. Prints a
line per step and, at the end, the median and min-max of deliveries per
CPU-second of the shard alone and of shard + directory per entry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench import cluster
from bench.compare import LOADGEN

CLK_TCK = os.sysconf("SC_CLK_TCK")
# One-process peers measured the same way (their server process is "the shard" here).
PEERS = ("bare-websockets", "socketio-1", "ws-node")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def start_target(entry: str, tree: Path | None, args: argparse.Namespace
                 ) -> tuple[cluster.Launcher, cluster.Running, int, int | None]:
    """Start one entry's processes; (launcher, running, serving pid, directory pid)."""
    launcher = cluster.Launcher(server_cpus=args.server_cpus, roomshard_tree=tree)
    try:
        if entry in PEERS:
            running = cluster.STARTERS[entry](launcher)
            return launcher, running, running.pids[0], None
        store = entry.partition("@")[2]
        running = cluster.STARTERS["roomshard-1" + (f"-{store}" if store else "")](launcher)
        return launcher, running, running.processes["i1"], running.processes["directory"]
    except BaseException:
        launcher.stop_all()
        raise


def drive(entry: str, running: cluster.Running, shard_pid: int, dir_pid: int | None,
          args: argparse.Namespace, tag: str) -> list[dict[str, Any]]:
    """Run the load generator against a started entry; one row per step."""
    side: list[subprocess.Popen[bytes]] = []
    try:
        config = {
            "protocol": running.protocol, "mode": "ladder", "targets": running.targets,
            "directory": running.directory, "rooms": args.rooms, "members": args.members,
            "roomPrefix": f"sp{os.getpid()}{tag}", "rates": [args.rate] * args.steps,
            "stepSeconds": args.step_seconds, "drainSeconds": 1.5, "minDelivered": 0.99,
            "maxP99Ms": 1000, "maxConsecutiveFailures": 99, "stopOnFail": False,
            "pids": [shard_pid], "clkTck": CLK_TCK, "connectConcurrency": 50,
            "settleSeconds": 1,
        }
        proc = subprocess.Popen(["taskset", "-c", args.loadgen_cpu, cluster.node(), str(LOADGEN),
                                 json.dumps(config)], cwd=cluster.ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        samples: list[tuple[str, tuple[int, int], tuple[int, int] | None]] = []

        def read_log() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith(("[loadgen] connected", "[loadgen] step ")):
                    samples.append((line.strip(), cluster.cpu_ticks(shard_pid),
                                    cluster.cpu_ticks(dir_pid) if dir_pid else None))
                    if "connected" in line and entry not in PEERS and not side:
                        side.extend(start_profilers(args, shard_pid, tag))
                sys.stderr.write(f"  [{entry}] {line}")

        reader = threading.Thread(target=read_log, daemon=True)
        reader.start()
        assert proc.stdout is not None
        out = proc.stdout.read()  # stderr is the reader thread's
        proc.wait(timeout=120 + args.steps * (args.step_seconds + 5))
        reader.join(timeout=5)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen exited {proc.returncode}")
        result = json.loads(out.strip().splitlines()[-1])
        steps = result["steps"]
        if result.get("close_codes"):  # clients the server closed: a step that lost any is void
            print(f"  [{entry}] clients closed by the server, by code: {result['close_codes']}; "
                  f"lost per step: {[s.get('connections_lost') for s in steps]}", flush=True)
        rows = []
        for i, step in enumerate(steps):
            # CPU split between consecutive log lines (step i's window + the pause before it).
            (_, s0, d0), (_, s1, d1) = samples[i], samples[i + 1]
            user, sys_ = (s1[0] - s0[0]) / CLK_TCK, (s1[1] - s0[1]) / CLK_TCK
            dir_cpu = (sum(d1) - sum(d0)) / CLK_TCK if d0 and d1 else 0.0
            cpu = step["server_cpu_seconds"]
            rows.append({
                "entry": entry, "step": i, "delivered": step["delivered"],
                "lost": step.get("connections_lost", 0),
                "delivered_ratio": step["delivered_ratio"], "p99_ms": step["p99_ms"],
                "shard_cpu_s": cpu, "per_cpu_s": step["deliveries_per_cpu_second"],
                "user_share": user / (user + sys_) if user + sys_ else 0.0,
                "dir_cpu_s": dir_cpu,
                "per_cpu_s_with_dir": step["delivered"] / (cpu + dir_cpu) if cpu + dir_cpu else None,
                "loadavg": loadavg(),
            })
        return rows
    finally:
        for p in side:
            p.wait(timeout=60)


def report_losses(entry: str, launcher: cluster.Launcher, rows: list[dict[str, Any]]) -> None:
    """When the server dropped clients, print the end of every server log (kept nowhere else)."""
    if any(row.get("lost") and row["entry"] == entry for row in rows):
        for name, tail in launcher.log_tails(4000).items():
            print(f"  [{entry}] --- {name} log ---\n{tail}", flush=True)


def run_round(entries: list[str], trees: dict[str, Path | None], args: argparse.Namespace,
              r: int) -> list[dict[str, Any]]:
    """One round: every entry in turn or, with --paired, all at once (same background load)."""
    if not args.paired:
        rows = []
        for i, entry in enumerate(entries):
            launcher, running, pid, dpid = start_target(entry, trees[entry], args)
            try:
                rows += drive(entry, running, pid, dpid, args, f"r{r}e{i}")
                report_losses(entry, launcher, rows)
            finally:
                launcher.stop_all()
        return rows
    started = []
    try:
        for entry in entries:
            started.append((entry, *start_target(entry, trees[entry], args)))
        results: dict[str, list[dict[str, Any]]] = {}
        threads = [threading.Thread(target=lambda e=e, ru=ru, p=p, d=d, i=i: results.__setitem__(
            e, drive(e, ru, p, d, args, f"r{r}e{i}"))) for i, (e, _, ru, p, d) in enumerate(started)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e, launcher, *_rest in started:
            report_losses(e, launcher, results.get(e, []))
        return [row for e in entries for row in results.get(e, [])]
    finally:
        for _, launcher, *_rest in started:
            launcher.stop_all()


def start_profilers(args: argparse.Namespace, pid: int, tag: str) -> list[subprocess.Popen[bytes]]:
    seconds = max(1, int(args.steps * (args.step_seconds + 1.5)))
    out = []
    if args.pyspy:
        out.append(subprocess.Popen(["py-spy", "record", "-r", "500", "-f", "raw", *(["--native"] if args.native else ["--nonblocking"]),
                                     "-d", str(seconds), "-p", str(pid),
                                     "-o", f"{args.pyspy}.{tag}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if args.perf:
        out.append(subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(pid),
                                     "-o", f"{args.perf}.{tag}", "--", "sleep", str(seconds)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revs", default="worktree",
                        help="comma list: git revisions, 'worktree', a directory holding a "
                             "copy of the tree, or a peer: " + ", ".join(PEERS))
    parser.add_argument("--rate", type=int, default=1000, help="messages/s (x members deliveries)")
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--paired", action="store_true",
                        help="run the entries at the same time (each its own load generator): "
                             "background load then hits them alike; compare within a round")
    parser.add_argument("--server-cpus", default="1")
    parser.add_argument("--loadgen-cpu", default="0")
    parser.add_argument("--pyspy", help="py-spy raw profile path prefix (roomshard entries)")
    parser.add_argument("--native", action="store_true",
                        help="py-spy --native (C frames too; pauses the process per sample)")
    parser.add_argument("--perf", help="perf record output path prefix (roomshard entries)")
    parser.add_argument("--json", help="write every step row here")
    args = parser.parse_args()
    entries = args.revs.split(",")
    trees: dict[str, Path | None] = {}
    tmp = Path(tempfile.mkdtemp(prefix="shard-profile-"))
    for i, entry in enumerate(entries):
        rev = entry.partition("@")[0]
        if rev == "worktree" or entry in PEERS:
            trees[entry] = None
        elif Path(rev).is_dir():  # a copy of a tree made by hand (e.g. a change in progress)
            trees[entry] = Path(rev)
        else:
            commit = cluster.export_tree(rev, tmp / f"t{i}")
            print(f"{entry} = {commit}", flush=True)
            trees[entry] = tmp / f"t{i}"
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for row in run_round(entries, trees, args, r):
            row["r"] = r
            rows.append(row)
            print(f"{row['entry']:16s} {row['per_cpu_s'] or 0:8.0f} deliv/shard-CPU-s "
                  f"{row['per_cpu_s_with_dir'] or 0:8.0f} incl. directory  "
                  f"user {row['user_share'] * 100:3.0f}% delivered "
                  f"{row['delivered_ratio'] * 100:.2f}% p99 {row['p99_ms']} ms "
                  f"load {row['loadavg']:.2f}", flush=True)
    print("\nentry            shard-only median (min-max)      with directory median (min-max)   n")
    for entry in entries:
        mine = [x for x in rows if x["entry"] == entry and x["per_cpu_s"]]
        a = [x["per_cpu_s"] for x in mine]
        b = [x["per_cpu_s_with_dir"] for x in mine if x["per_cpu_s_with_dir"]]
        if a:
            print(f"{entry:16s} {statistics.median(a):8.0f} ({min(a):.0f}-{max(a):.0f})   "
                  f"{statistics.median(b) if b else 0:8.0f} ({min(b, default=0):.0f}-"
                  f"{max(b, default=0):.0f})   {len(a)}")
    if args.paired and len(entries) > 1:
        # Same round and step, same moment: the ratio cancels background load.
        base = {(x["r"], x["step"]): x["per_cpu_s"] for x in rows
                if x["entry"] == entries[0] and x["per_cpu_s"]}
        for entry in entries[1:]:
            ratios = [x["per_cpu_s"] / base[(x["r"], x["step"])] for x in rows
                      if x["entry"] == entry and x["per_cpu_s"] and (x["r"], x["step"]) in base]
            if ratios:
                print(f"{entry} / {entries[0]}, paired steps: median {statistics.median(ratios):.3f} "
                      f"({min(ratios):.3f}-{max(ratios):.3f}), n={len(ratios)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
