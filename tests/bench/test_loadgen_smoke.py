"""The Node load generator against the bare websockets server, for a couple of seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from roomshard.testing.timing import t, wait_until

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / "bench" / "node" / "node_modules"
LOADGEN = ROOT / "bench" / "loadgen" / "loadgen.js"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("node") is None or not (NODE_MODULES / "ws").is_dir(),
                       reason="bench/node/node_modules not installed (bench/compare installs it)"),
]


@pytest.fixture
def bare_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """bench/servers/bare_websockets.py on a free loopback port."""
    ready = tmp_path / "ready.json"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "servers" / "bare_websockets.py"),
                             "--port", "0", "--ready-file", str(ready)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        return ready.exists() and ready.stat().st_size > 0

    try:
        wait_until(up, 20, "the bare websockets server to be ready")
        yield json.loads(ready.read_text())["url"], proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=t(10))
        log.close()


def run_loadgen(config: dict[str, object]) -> dict[str, object]:
    out = subprocess.run(["node", str(LOADGEN), json.dumps(config)], capture_output=True, check=False,
                         text=True, timeout=t(60), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_every_published_message_is_counted_once_per_room_member(bare_server: tuple[str, int]) -> None:
    """Each publish is delivered to all 4 members of its room and counted exactly so."""
    url, pid = bare_server
    result = run_loadgen({
        "protocol": "raw", "mode": "ladder", "targets": [url], "rooms": 3, "members": 4,
        "roomPrefix": "smoke", "rates": [40, 80], "stepSeconds": 1.0, "drainSeconds": 3.0,
        "pids": [pid], "clkTck": os.sysconf("SC_CLK_TCK"), "settleSeconds": 0.2,
    })
    assert result["connect"]["ok"] == 12
    steps = result["steps"]
    assert [s["rate_target"] for s in steps] == [40, 80]
    for step in steps:
        assert step["sent"] >= 0.9 * step["rate_target"] * step["send_seconds"]
        assert step["expected"] == 4 * step["sent"]
        assert step["delivered"] == step["expected"]
        assert step["late_from_earlier_steps"] == 0
        assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["max_ms"] + 0.1
        assert step["sustained"] is True
        assert step["server_cpu_seconds"] >= 0
    assert result["error_count"] == 0


def test_idle_mode_reports_server_rss_growth(bare_server: tuple[str, int]) -> None:
    """Idle mode opens every connection and reads the server's RSS before and after."""
    url, pid = bare_server
    result = run_loadgen({
        "protocol": "raw", "mode": "idle", "targets": [url], "rooms": 10, "members": 20,
        "roomPrefix": "idle", "pids": [pid], "clkTck": os.sysconf("SC_CLK_TCK"),
        "settleSeconds": 0.2,
    })
    idle = result["idle"]
    assert idle["connections"] == 200
    assert idle["rss_after_kb"] > idle["rss_before_kb"] > 0
    per_conn = (idle["rss_after_kb"] - idle["rss_before_kb"]) * 1024 / 200
    assert idle["rss_per_connection_bytes"] == pytest.approx(per_conn)
    # The CPU both sides spent on the connects, and the server's per connect.
    connect = idle["connect"]
    assert connect["ok"] == 200 and connect["loadgen_cpu_seconds"] > 0
    # The server's CPU is read in clock ticks (10 ms): 200 connects may take less than one.
    assert connect["per_server_cpu_second"] == (
        pytest.approx(200 / connect["server_cpu_seconds"]) if connect["server_cpu_seconds"] else None)
    assert connect["server_cpu_util"] == pytest.approx(connect["server_cpu_seconds"] / connect["seconds"])
    assert connect["database_cpu_seconds"] is None  # no database pids given


def test_roomshard_idle_connects_report_where_the_time_went(tmp_path: Path) -> None:
    """The roomshard protocol against a real directory and shard: every client is
    welcomed, and each connect's time is split into the directory's answer and the
    socket until the welcome (neither phase longer than the whole connect)."""
    from roomshard.testing.procs import Procs

    with Procs() as procs:
        directory = procs.directory()
        procs.shard("i1", directory.url)

        def registered() -> bool:
            import httpx
            r = httpx.post(f"{directory.url}/v1/rooms/probe/connect", json={"user": "p"})
            return r.status_code == 200

        wait_until(registered, 20, "the shard to register")
        result = run_loadgen({
            "protocol": "roomshard", "mode": "idle", "directory": directory.url,
            "rooms": 2, "members": 20, "roomPrefix": "phases", "settleSeconds": 0.2,
            "pids": [], "clkTck": os.sysconf("SC_CLK_TCK"),
        })
    connect = result["idle"]["connect"]  # type: ignore[index]
    assert connect["ok"] == 40 and connect["failed"] == 0, connect
    latency = connect["latency_ms"]
    assert set(latency) == {"connect", "directory", "socket"}, latency
    for phase in latency.values():
        assert 0 < phase["p50"] <= phase["p90"] <= phase["p99"] <= phase["max"] + 0.1, latency
    assert latency["directory"]["max"] <= latency["connect"]["max"], latency
    assert latency["socket"]["max"] <= latency["connect"]["max"], latency
