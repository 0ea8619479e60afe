"""The parts of ``bench/compare`` that measure roomshard alone: directory, handoff, planner.

Each part is one of roomshard's own benchmark scripts with ``--json PATH``,
run as a subprocess from the tree being measured (the ``git archive`` export
of ``--roomshard-rev``, so the directory, shards and planner are that
commit's code), and stored under ``doc["extras"][name]`` of the results
file. ``report_extras.py`` turns them into tables.

- ``directory``: ``bench/directory_connect.py``, connects/s for existing and
  new rooms, two directories on PostgreSQL;
- ``planner``: ``bench/planner.py``, the rebalance planner on 100k rooms x
  100 and x 1,000 instances;
- ``drain``: ``bench/handoff.py drain --postgres``, rooms/s of an instance drain;
- ``pause``: ``bench/handoff.py pause``, pause per move by room size;
- ``store-pause``: the same for a 100-member room whose messages are stored in
  PostgreSQL;
- ``publish``: ``bench/publish.py``, the server API's publishes/s with a store;
- ``js-client``: ``bench/js_client.py``, deliveries/s to 2,000 sessions of the
  JavaScript client in one Node process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Extra:
    name: str
    argv: tuple[str, ...]  # the script (relative to the tree) and its options, without --json
    timeout_s: float

    @property
    def command(self) -> str:
        """The exact command, as the docs quote it."""
        return "python " + " ".join(self.argv)


FULL_EXTRAS = (
    Extra("directory", ("bench/directory_connect.py", "--duration", "10", "--concurrency", "12"),
          timeout_s=240),
    Extra("planner", ("bench/planner.py",), timeout_s=300),
    Extra("drain", ("bench/handoff.py", "drain", "--rooms", "600", "--postgres"), timeout_s=420),
    # 12 moves of the 10- and 100-member rooms, 3 of the 1,000-member room
    # (each of those is a 1,000-join reconnect storm in one client process).
    Extra("pause", ("bench/handoff.py", "pause", "--members", "10,100,1000", "--moves", "12",
                    "--history", "1000"), timeout_s=900),
    Extra("store-pause", ("bench/handoff.py", "pause", "--members", "100", "--moves", "12",
                          "--history", "1000", "--store", "postgres"), timeout_s=300),
    Extra("publish", ("bench/publish.py", "--store", "postgres", "--duration", "10",
                      "--concurrency", "16"), timeout_s=180),
    Extra("js-client", ("bench/js_client.py", "--rates", "2500,3000,4000,5000", "--seconds", "10"),
          timeout_s=300),
)

#: The same code paths at toy sizes (seconds each), for ``bench/compare --quick``.
QUICK_EXTRAS = (
    Extra("directory", ("bench/directory_connect.py", "--duration", "2", "--concurrency", "8",
                        "--rooms", "200"), timeout_s=120),
    Extra("planner", ("bench/planner.py", "--rooms", "10000", "--instances", "10",
                      "--instances", "100", "--repeat", "1"), timeout_s=120),
    Extra("drain", ("bench/handoff.py", "drain", "--rooms", "30", "--postgres"), timeout_s=180),
    Extra("pause", ("bench/handoff.py", "pause", "--members", "10,100", "--moves", "4",
                    "--history", "50"), timeout_s=180),
    Extra("store-pause", ("bench/handoff.py", "pause", "--members", "10", "--moves", "4",
                          "--history", "50", "--store", "postgres"), timeout_s=180),
    Extra("publish", ("bench/publish.py", "--store", "postgres", "--duration", "2",
                      "--concurrency", "8", "--rooms", "20"), timeout_s=120),
    Extra("js-client", ("bench/js_client.py", "--rooms", "10", "--members", "10", "--rates", "200",
                        "--seconds", "2"), timeout_s=180),
)

EXTRAS = {"full": FULL_EXTRAS, "quick": QUICK_EXTRAS}
NAMES = tuple(e.name for e in FULL_EXTRAS)


def _loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def run(extra: Extra, tree: Path, prefix: list[str] | None = None) -> dict[str, Any]:
    """Run one part to completion (or its timeout); its JSON, or the error and the log's tail.

    The script runs with the tree first on ``PYTHONPATH`` and as its working
    directory, so the roomshard processes it starts (``python -m roomshard``)
    import the measured tree too. On timeout or interrupt it gets SIGINT first:
    its ``with``/``finally`` blocks then stop the servers and PostgreSQL it started.
    """
    record: dict[str, Any] = {
        "name": extra.name, "command": extra.command,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_before": _loadavg()}
    with tempfile.TemporaryDirectory(prefix=f"roomshard-bench-{extra.name}-") as tmp:
        out, log = Path(tmp) / "out.json", Path(tmp) / "log.txt"
        argv = [*(prefix or []), sys.executable, str(tree / extra.argv[0]), *extra.argv[1:],
                "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with log.open("wb") as sink:
            # A runner started as a background job has SIGINT ignored, and its children
            # inherit that: the part's SIGINT on timeout would then do nothing.
            restore = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    preexec_fn=_default_sigint if restore else None)  # noqa: PLW1509
            try:
                proc.wait(timeout=extra.timeout_s)
            except subprocess.TimeoutExpired:
                record["error"] = f"timed out after {extra.timeout_s:.0f} s"
            finally:
                _interrupt(proc)
        record["elapsed_seconds"] = round(time.monotonic() - t0, 1)
        record["loadavg_after"] = _loadavg()
        record["output_tail"] = _tail(log)
        if proc.returncode != 0 and "error" not in record:
            record["error"] = f"exit {proc.returncode}: {_tail(log, 600).strip()}"
        if out.exists() and out.stat().st_size:
            record["result"] = json.loads(out.read_text())
        elif "error" not in record:
            record["error"] = "no --json output"
    return record


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen[bytes], grace: float = 60) -> None:
    """SIGINT (clean shutdown of what the script started), then SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
