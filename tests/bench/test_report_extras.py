"""The roomshard-only parts of bench/compare: how they run and how the report renders them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import extras, report, report_extras

FIXTURE = Path(__file__).parent / "fixtures" / "extras-quick.json"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def doc() -> dict[str, Any]:
    data = json.loads(FIXTURE.read_text())
    return {"extras": data["extras"]}


def test_every_part_renders_a_table_with_its_exact_command(doc: dict[str, Any]) -> None:
    """Each part's section quotes the command that measured it and a table of its numbers."""
    text = "\n".join(report_extras.render(doc))
    for name in ("directory", "pause", "drain", "planner"):
        assert f"    {doc['extras'][name]['command']}" in text
    assert "| existing rooms | 671 | 11.15 | 18.85 | 27.94 |" in text
    assert "| 20 | 50 | 4 | 47.8 | 61.5 | 61.5 | 565 | 661 |" in text
    assert "| PostgreSQL | 30 | 25/25 | 0 | 3.32 | 8 | 1179 | 1643 | 25 (0) |" in text
    assert "| skewed (a third at 1.5x) | 10,000 | 100 | 100 | 0.07 s | 100 (capped) | 282 |" in text


def test_goals_are_judged_on_the_measured_numbers(doc: dict[str, Any]) -> None:
    """The directory and drain goals read 'not met' for numbers below them, 'met' above."""
    text = "\n".join(report_extras.render(doc))
    assert ("Goal >= 2,000 existing-room connects/s with p99 < 20 ms (directory on PostgreSQL): "
            "**not met** (671/s, p99 27.94 ms).") in text
    assert "Goal drain >= 100 rooms/s: **not met** (8 rooms/s)." in text
    fast = copy.deepcopy(doc)
    fast["extras"]["drain"]["result"]["drain"]["rooms_per_s"] = 150.0
    assert "Goal drain >= 100 rooms/s: met (150 rooms/s)." in "\n".join(report_extras.render(fast))


def test_the_pause_goal_is_read_at_100_members(doc: dict[str, Any]) -> None:
    """The pause goal line appears only when a 100-member room was measured, from its p99."""
    assert "Goal move pause" not in "\n".join(report_extras.render(doc))
    rows = doc["extras"]["pause"]["result"]["pause"]
    rows.append({**rows[-1], "members": 100, "pause_ms": [20.0, 30.0, 120.0]})
    assert "100-member room: **not met** (120.0 ms over 4 moves; with few" in "\n".join(report_extras.render(doc))


def test_the_report_lists_these_goals_in_its_goals_table(doc: dict[str, Any]) -> None:
    """report.render puts the directory and drain goals in 'The project's goals' with their verdicts."""
    full = {**doc, "profile": "quick", "repeats": 1, "step_seconds": 1.5, "started_at": "fixture",
            "command": "bench/compare --quick", "server_cpus": "1", "loadgen_cpu": "0",
            "environment": {"cpus": 2, "cpu_model": "fixture", "kernel": "fixture",
                            "git_commit": "fixture", "versions": {}}, "runs": []}
    text = report.render(full)
    assert "### The project's goals" in text
    assert "| drain >= 100 rooms/s | 8 rooms/s | **no** |" in text
    assert "| >= 2,000 existing-room connects/s with p99 < 20 ms (directory on PostgreSQL) " \
           "| 671/s, p99 27.94 ms | **no** |" in text
    assert text.index("### The project's goals") < text.index("### Directory: connects/s on PostgreSQL")


def test_a_failed_part_says_not_measured_with_its_error(doc: dict[str, Any]) -> None:
    """A part that failed renders its command and the error instead of a table."""
    rec = doc["extras"]["drain"]
    del rec["result"]
    rec["error"] = "timed out after 420 s"
    text = "\n".join(report_extras.render(doc))
    assert "Not measured: timed out after 420 s" in text
    assert "| PostgreSQL |" not in text


def test_no_extras_renders_nothing() -> None:
    """A results file from before these parts (or a --workloads run without them) adds no section."""
    assert report_extras.render({"runs": []}) == []


def test_the_capacity_model_takes_the_directory_cost_from_the_same_run(doc: dict[str, Any]) -> None:
    """The directory part's CPU per connect replaces the constants of docs/benchmarks/directory.md."""
    measured = report.measured_directory(doc)
    assert measured is not None
    assert (measured.cpu_us_per_connect, measured.cpu_us_per_new_room,
            measured.postgres_us_per_new_room) == (1044, 1885, 561)
    assert doc["extras"]["directory"]["command"] in measured.source
    assert report.measured_directory({"extras": {}}) is None


def test_a_part_runs_its_script_with_json_output() -> None:
    """extras.run runs the script from the tree and keeps its --json document."""
    part = extras.Extra("planner", ("bench/planner.py", "--rooms", "300", "--instances", "3",
                                    "--repeat", "1"), timeout_s=60)
    rec = extras.run(part, ROOT)
    assert "error" not in rec, rec
    assert [c["instances"] for c in rec["result"]["cases"]] == [4, 4, 3, 3]
    assert rec["command"] == "python bench/planner.py --rooms 300 --instances 3 --repeat 1"


def test_a_part_over_its_time_is_interrupted_so_it_can_clean_up(tmp_path: Path) -> None:
    """On timeout the script gets SIGINT (its finally blocks run) and the record says so."""
    script = tmp_path / "bench" / "forever.py"
    script.parent.mkdir()
    marker = tmp_path / "cleaned-up"
    script.write_text(
        "import signal, sys\n"
        "try:\n    signal.pause()\n"
        f"finally:\n    open({str(marker)!r}, 'w').write('yes')\n")
    # Long enough for the interpreter to start and enter the try block on a loaded
    # machine (a SIGINT before that ends it with no finally to run).
    rec = extras.run(extras.Extra("forever", ("bench/forever.py",), timeout_s=4), tmp_path)
    assert rec["error"].startswith("timed out after 4 s")
    assert marker.read_text() == "yes"
    assert "result" not in rec


def test_a_target_run_fewer_times_says_so_in_its_row() -> None:
    """Rows of targets measured fewer times than the profile's repeats carry their run count."""
    doc = {"repeats": 3, "runs": [{"target": "roomshard-1", "workload": "fanout"}] * 3
           + [{"target": "ws-node", "workload": "fanout"}] * 2}
    labels = report.labels_with_runs(doc, "fanout")
    assert labels["ws-node"] == f"{report.LABELS['ws-node']} (2 runs)"
    assert labels["roomshard-1"] == report.LABELS["roomshard-1"]
