"""Run every workload against every server, then roomshard's own parts; write ``bench/results/*.json``.

    bench/compare [--quick] [--repeats N] [--targets a,b] [--workloads a,b] [--no-report]

``bench/compare`` (the shell wrapper) installs what is missing first. Servers
run pinned to CPU 1, the load generator to CPU 0 (``taskset``). Each
(repeat, target, workload) gets freshly started servers so one run's memory
or backlog cannot leak into the next; repeats are interleaved across targets
so a burst of background load on this shared machine hits all of them alike.
Results are saved after every run, so an interrupted benchmark keeps what it
measured. After the side-by-side workloads come the parts that measure
roomshard alone (``extras.py``: directory connects/s, move pause per room
size, drain rate, rebalance planner), each one run of its own script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cluster, estimate, extras, workloads
from bench.workloads import PROFILES, Profile, Workload

LOADGEN = cluster.BENCH / "loadgen" / "loadgen.js"
RESULTS = cluster.BENCH / "results"


def run_loadgen(config: dict[str, Any], cpu: str, timeout: float, nice: int = 0) -> dict[str, Any]:
    """Run the Node load generator pinned to ``cpu``; its stdout is one JSON document."""
    argv = [*cluster.nice_prefix(nice), "taskset", "-c", cpu, cluster.node(), str(LOADGEN),
            json.dumps(config)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cluster.ROOT,
                          check=False)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exited {proc.returncode}: {proc.stderr[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False,
                                  cwd=cluster.ROOT).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    versions: dict[str, str] = {"python": platform.python_version(), "node": out(["node", "--version"])}
    for dist in ("websockets", "python-socketio", "uvicorn", "roomshard"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            versions[dist] = "missing"
    lock = json.loads((cluster.BENCH / "node" / "package-lock.json").read_text())
    for pkg in ("socket.io", "@socket.io/redis-adapter", "redis", "ws"):
        versions[pkg] = lock.get("packages", {}).get(f"node_modules/{pkg}", {}).get("version", "?")
    versions["redis-server"] = out(["redis-server", "--version"]).split(" ")[2:3][0] \
        if shutil.which("redis-server") else "missing"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), "?"),
        "kernel": platform.release(),
        "git_commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "versions": versions,
    }


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_one(target: str, workload: Workload, profile: Profile, repeat: int,
            previous_max: int | None, args: argparse.Namespace) -> dict[str, Any]:
    record: dict[str, Any] = {"target": target, "workload": workload.name, "repeat": repeat,
                              "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "loadavg_before": loadavg()}
    t0 = time.monotonic()
    launcher = cluster.Launcher(server_cpus=args.server_cpus, nice=args.nice,
                                roomshard_tree=args.roomshard_tree)
    running: cluster.Running | None = None
    try:
        running = cluster.STARTERS[target](launcher)
        record["processes"] = running.processes
        rates = workloads.ladder_for_repeat(workload, previous_max) if workload.mode == "ladder" else []
        config = workloads.loadgen_config(
            workload, profile, running.protocol, targets=running.targets,
            directories=running.directories, pids=running.pids, rates=rates,
            database_pids=running.database_pids,
            room_prefix=f"{workload.name}{repeat}", clk_tck=os.sysconf("SC_CLK_TCK"))
        budget = 180 + len(rates) * (profile.step_seconds + profile.drain_seconds + 2)
        record["result"] = run_loadgen(config, args.loadgen_cpu, timeout=budget, nice=args.nice)
    except (cluster.StartError, RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"[compare] {target}/{workload.name}: {record['error'][:300]}", file=sys.stderr)
    finally:
        result = record.get("result", {})
        if "error" in record or result.get("close_codes") or result.get("error_count"):
            record["server_logs"] = launcher.log_tails()
            if running is not None and running.metrics_urls:
                record["server_metrics"] = running.scrape_metrics()
        launcher.stop_all()
    record["elapsed_seconds"] = round(time.monotonic() - t0, 1)  # what bench/estimate.py reads
    record["loadavg_after"] = loadavg()
    return record


def announce_estimate(profile: Profile) -> None:
    """Print how long this profile should take, modelled on the latest results file of it."""
    earlier = sorted(RESULTS.glob(f"{profile.name}-*.json"))
    if not earlier:
        return
    try:
        parts = estimate.estimate(profile, json.loads(earlier[-1].read_text()))
    except (OSError, ValueError, KeyError) as exc:
        print(f"[compare] no estimate from {earlier[-1].name}: {exc!r}", file=sys.stderr)
        return
    total = sum(secs for _, secs, _ in parts)
    print(f"[compare] expected ~{total / 60:.0f} min for everything (bench/estimate.py on "
          f"{earlier[-1].name})", file=sys.stderr)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM, and SIGINT even when started in the background (where the shell
    # ignores it), unwind through the ``finally`` that stops every server.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    parser = argparse.ArgumentParser(description="roomshard vs Socket.IO and friends, side by side")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    parser.add_argument("--repeats", type=int, help="override the profile's repeats")
    parser.add_argument("--targets", help=f"comma list from {','.join(workloads.ALL_TARGETS)}")
    parser.add_argument("--workloads",
                        help=f"comma list from fanout,bigroom,idle,{','.join(extras.NAMES)}")
    parser.add_argument("--server-cpus", default="1", help="taskset list for servers")
    parser.add_argument("--loadgen-cpu", default="0", help="taskset list for the load generator")
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness of servers and load generator (root only for < 0): on a "
                             "shared machine, other work then preempts the benchmark less")
    parser.add_argument("--roomshard-rev", default="HEAD",
                        help="git revision of roomshard to measure (exported with git archive), "
                             "or 'worktree' for the files as they are")
    parser.add_argument("--out", help="results file (default bench/results/<profile>-<UTC>.json)")
    parser.add_argument("--no-report", action="store_true", help="skip the markdown/plots")
    args = parser.parse_args(argv)

    profile = PROFILES["quick" if args.quick else "full"]
    repeats = args.repeats or profile.repeats
    only_targets = set(args.targets.split(",")) if args.targets else set(workloads.ALL_TARGETS)
    unknown = only_targets - set(workloads.ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    only_workloads = set(args.workloads.split(",")) if args.workloads else None
    unknown = (only_workloads or set()) - {w.name for w in profile.workloads} - set(extras.NAMES)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS / f"{profile.name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    export_dir = None
    if args.roomshard_rev == "worktree":
        args.roomshard_tree = None
        roomshard_commit = "worktree"
    else:
        export_dir = Path(tempfile.mkdtemp(prefix="roomshard-bench-tree-"))
        roomshard_commit = cluster.export_tree(args.roomshard_rev, export_dir)
        args.roomshard_tree = export_dir
    doc: dict[str, Any] = {
        "profile": profile.name, "repeats": repeats, "step_seconds": profile.step_seconds,
        "drain_seconds": profile.drain_seconds, "server_cpus": args.server_cpus,
        "loadgen_cpu": args.loadgen_cpu, "nice": args.nice if os.geteuid() == 0 or args.nice > 0 else 0,
        "started_at": stamp, "environment": environment(),
        "command": "bench/compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "roomshard_commit": roomshard_commit,
        "workloads": [dataclasses.asdict(w) for w in profile.workloads],
        "runs": [],
        "extras": {},
    }
    if not args.targets and not args.workloads and not args.repeats:
        announce_estimate(profile)
    t0 = time.monotonic()
    best: dict[tuple[str, str], int] = {}  # (target, workload) -> max sustained rate of repeat 0
    for repeat in range(repeats):
        for workload in profile.workloads:
            if only_workloads and workload.name not in only_workloads:
                continue
            for target in workload.targets:
                if target not in only_targets or repeat >= (
                        repeats if args.repeats else workload.repeats_for(target, repeats)):
                    continue
                print(f"[compare] repeat {repeat + 1}/{repeats} {workload.name} {target} "
                      f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
                record = run_one(target, workload, profile, repeat, best.get((target, workload.name)), args)
                steps = record.get("result", {}).get("steps") or []
                top = workloads.max_sustained(steps)
                if repeat == 0 and top is not None:
                    best[(target, workload.name)] = top["rate_target"]
                doc["runs"].append(record)
                doc["elapsed_seconds"] = round(time.monotonic() - t0, 1)
                out.write_text(json.dumps(doc, indent=1))
    for extra in extras.EXTRAS[profile.name]:
        if only_workloads and extra.name not in only_workloads:
            continue
        print(f"[compare] {extra.name}: {extra.command} ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr)
        record = extras.run(extra, args.roomshard_tree or cluster.ROOT,
                            cluster.nice_prefix(args.nice))
        if "error" in record:
            print(f"[compare] {extra.name}: {record['error'][:300]}", file=sys.stderr)
        doc["extras"][extra.name] = record
        doc["elapsed_seconds"] = round(time.monotonic() - t0, 1)
        out.write_text(json.dumps(doc, indent=1))
    if export_dir is not None:
        shutil.rmtree(export_dir, ignore_errors=True)
    print(f"[compare] wrote {out} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if not args.no_report:
        from bench import report

        # Only a complete full run rewrites the documented numbers.
        complete = profile.name == "full" and not args.targets and not args.workloads
        report.main([str(out), *(["--docs"] if complete else [])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
