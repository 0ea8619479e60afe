"""Quick transport measurement: shard vs a bare ``websockets.broadcast`` server, 100 rooms x 20.

    python -m bench.shard_transport [--rates 1000,2000] [--step-seconds 5] [--rounds 2]

Reuses the benchmark harness (``bench/cluster.py`` starts the servers pinned
to CPU 1, ``bench/loadgen/loadgen.js`` is the same Node client for both,
pinned to CPU 0). Only the serving process's CPU is counted: the shard's (not
the directory's) and the bare server's. Prints one line per step and a JSON
summary; the numbers are written down in docs/benchmarks/shard-transport.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from bench import cluster
from bench.compare import run_loadgen


def measure(target: str, rates: list[int], step_seconds: float) -> list[dict[str, Any]]:
    launcher = cluster.Launcher(server_cpus="1")
    try:
        running = cluster.STARTERS[target](launcher)
        pid = running.processes["i1"] if running.protocol == "roomshard" else running.pids[0]
        config = {
            "protocol": running.protocol, "mode": "ladder", "targets": running.targets,
            "directory": running.directory, "rooms": 100, "members": 20,
            "roomPrefix": f"bt{os.getpid()}", "rates": rates, "stepSeconds": step_seconds,
            "drainSeconds": 2, "minDelivered": 0.99, "maxP99Ms": 1000, "retries": 0,
            "stopOnFail": False, "pids": [pid], "clkTck": os.sysconf("SC_CLK_TCK"),
            "connectConcurrency": 50, "settleSeconds": 1,
        }
        result = run_loadgen(config, cpu="0", timeout=120 + len(rates) * (step_seconds + 5))
        return result["steps"]
    finally:
        launcher.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,2000")
    parser.add_argument("--step-seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    summary: dict[str, list[dict[str, Any]]] = {"bare-websockets": [], "roomshard-1": []}
    for _ in range(args.rounds):  # interleaved, so background load hits both alike
        for target, rows in summary.items():
            for step in measure(target, rates, args.step_seconds):
                row = {k: step[k] for k in ("rate_target", "deliveries_per_s",
                                            "deliveries_per_cpu_second", "server_cpu_util",
                                            "p50_ms", "p99_ms", "delivered_ratio")}
                rows.append(row)
                print(f"{target:16s} rate {row['rate_target']:5d}/s "
                      f"{row['deliveries_per_s']:8.0f} deliv/s "
                      f"{row['deliveries_per_cpu_second'] or 0:8.0f} deliv/CPU-s "
                      f"cpu {row['server_cpu_util'] * 100:3.0f}% p50 {row['p50_ms']} "
                      f"p99 {row['p99_ms']} ms delivered {row['delivered_ratio'] * 100:.2f}%",
                      flush=True)
    json.dump(summary, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
