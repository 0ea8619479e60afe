"""Benchmark: the JavaScript client (``js/``) delivering messages in one Node process.

``js/bench/deliveries.mjs`` opens ``--rooms`` x ``--members`` sessions with the package's
``connect()`` (as an application does) in one Node process pinned to one core, then, per
rate, sends that many messages per second through ``session.send`` for ``--seconds`` and
counts the ``message`` events all sessions get: deliveries per second, the latency from
send to event, the send failures, and the client's CPU. The servers (a directory and
``--shards`` shards, embedded SQLite, no message store) run on the other core, as in
``bench/compare``.

    python -m bench.js_client                       # 2,000 sessions, 2,500 and 5,000 msgs/s
    python -m bench.js_client --rates 1000,2500,4000 --seconds 5 --json out.json

Prints one JSON document (docs/BENCHMARKS.md has the numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script (bench/extras.py)

from bench import cluster

JS = cluster.ROOT / "js"
SCRIPT = JS / "bench" / "deliveries.mjs"


def build() -> None:
    """The package's dist/ (npm ci from the lockfile first, when its packages are missing)."""
    if not (JS / "node_modules" / "typescript").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS, check=True)
    subprocess.run(["npm", "run", "--silent", "build"], cwd=JS, check=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    build()
    launcher = cluster.Launcher(server_cpus=args.server_cpus)
    try:
        running = cluster.start_roomshard(launcher, args.shards)
        config = {"directory": running.directory, "rooms": args.rooms, "members": args.members,
                  "rates": [int(r) for r in args.rates.split(",")], "seconds": args.seconds}
        argv = ["taskset", "-c", args.client_cpu, cluster.node(), str(SCRIPT), json.dumps(config)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=JS, check=False,
                              timeout=120 + len(config["rates"]) * (args.seconds + 10))
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"deliveries.mjs exited {done.returncode}: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        launcher.stop_all()
    result.update(shards=args.shards, client_cpu=args.client_cpu, server_cpus=args.server_cpus)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--members", type=int, default=20)
    p.add_argument("--rates", default="2500,5000", help="messages per second, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="per rate")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--client-cpu", default="0", help="taskset list for the Node process")
    p.add_argument("--server-cpus", default="1", help="taskset list for the servers")
    p.add_argument("--json", default="", help="also write the result to this file")
    args = p.parse_args(argv)
    text = json.dumps(run(args))
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
