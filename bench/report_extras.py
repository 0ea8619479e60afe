"""Markdown tables for the roomshard-only parts of a results file (``doc["extras"]``).

Pure functions over the JSON ``compare.py`` writes (see ``extras.py``): the
directory's connects/s, the pause per move by room size, the drain rate and
the rebalance planner's time, each with the exact command that measured it
and the goal it is held to.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.summary import Goal
from bench.workloads import MAX_P99_MS, MIN_DELIVERED

#: The goals these parts are held to (docs/benchmarks/directory.md, docs/HANDOFF.md).
DIRECTORY_GOAL_PER_S = 2000
DIRECTORY_GOAL_P99_MS = 20.0
PAUSE_GOAL_MEMBERS = 100
PAUSE_GOAL_P99_MS = 100.0
DRAIN_GOAL_ROOMS_PER_S = 100.0
JS_CLIENT_GOAL_SESSIONS = 2_000
JS_CLIENT_GOAL_PER_S = 50_000


def nearest_rank(values: list[float], q: float) -> float:
    """The percentile ``bench/handoff.py`` prints (nearest rank), recomputed from its samples.

    (Its reconnect p50 is ``statistics.median``; the tables use the same, so
    they show what the script prints.)
    """
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def _result(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    return ((doc.get("extras") or {}).get(name) or {}).get("result")


def directory_goal(res: dict[str, Any] | None) -> Goal | None:
    existing = next((p for p in (res or {}).get("phases", []) if p["phase"] == "existing rooms"), None)
    if existing is None:
        return None
    return Goal(f">= {DIRECTORY_GOAL_PER_S:,} existing-room connects/s with p99 < "
                f"{DIRECTORY_GOAL_P99_MS:g} ms (directory on PostgreSQL)",
                f"{existing['connects_per_s']:,}/s, p99 {existing['p99_ms']:g} ms",
                existing["connects_per_s"] >= DIRECTORY_GOAL_PER_S
                and existing["p99_ms"] < DIRECTORY_GOAL_P99_MS)


def pause_goal(res: dict[str, Any] | None) -> Goal | None:
    row = next((r for r in (res or {}).get("pause", []) if r["members"] == PAUSE_GOAL_MEMBERS), None)
    if row is None:
        return None
    p99 = nearest_rank(row["pause_ms"], .99)
    return Goal(f"move pause p99 < {PAUSE_GOAL_P99_MS:g} ms for a {PAUSE_GOAL_MEMBERS}-member room",
                f"{p99:.1f} ms over {row['moves']} moves; with few moves the p99 is the max",
                p99 < PAUSE_GOAL_P99_MS)


def drain_goal(res: dict[str, Any] | None) -> Goal | None:
    d = (res or {}).get("drain")
    if not d:
        return None
    return Goal(f"drain >= {DRAIN_GOAL_ROOMS_PER_S:g} rooms/s", f"{d['rooms_per_s']:.0f} rooms/s",
                d["rooms_per_s"] >= DRAIN_GOAL_ROOMS_PER_S)


def js_client_sustained(step: dict[str, Any]) -> bool:
    """A rate the client kept up with, as ``bench/compare`` judges a rung: at least 99 % of
    the deliveries, p99 within 200 ms, and no send failed."""
    return (step["delivered_ratio"] >= MIN_DELIVERED and (step["p99_ms"] or 0) <= MAX_P99_MS
            and step["send_failures"] == 0)


def js_client_goal(res: dict[str, Any] | None) -> Goal | None:
    """The best deliveries/s of a rate the client kept up with."""
    steps = (res or {}).get("steps") or []
    if not steps or res is None:
        return None
    best = max((s["deliveries_per_s"] for s in steps if js_client_sustained(s)), default=0.0)
    return Goal(f"one Node process with the JavaScript client: {JS_CLIENT_GOAL_SESSIONS:,} sessions "
                f"get >= {JS_CLIENT_GOAL_PER_S:,} messages/s",
                f"{res['sessions']:,} sessions, {best:,.0f} deliveries/s sustained (>= 99 % "
                f"delivered, p99 <= {MAX_P99_MS:g} ms)",
                res["sessions"] >= JS_CLIENT_GOAL_SESSIONS and best >= JS_CLIENT_GOAL_PER_S)


def goals(doc: dict[str, Any]) -> list[Goal]:
    """The goals of the parts the results file has (for the report's goals table)."""
    found = (directory_goal(_result(doc, "directory")), pause_goal(_result(doc, "pause")),
             drain_goal(_result(doc, "drain")), js_client_goal(_result(doc, "js-client")))
    return [g for g in found if g is not None]


def _goal_line(g: Goal | None) -> list[str]:
    return [] if g is None else ["", f"Goal {g.text}: {_verdict(bool(g.met))} ({g.value})."]


def _head(title: str, rec: dict[str, Any], what: str) -> list[str]:
    lines = [f"### {title}", "", f"    {rec['command']}", "", what, ""]
    if "error" in rec and "result" not in rec:
        lines += [f"Not measured: {rec['error'].splitlines()[0][:300]}", ""]
    return lines


def directory_table(rec: dict[str, Any]) -> list[str]:
    res = rec.get("result")
    lines = _head("Directory: connects/s on PostgreSQL", rec, (
        "`POST /v1/rooms/{room}/connect` against two `roomshard directory` processes on one "
        "PostgreSQL: rooms that have an owner (one indexed query + a ticket), then rooms never "
        "seen (placement: an insert). Closed loop, every keep-alive connection sends back to back; "
        "one run. CPU per connect counts the directories and PostgreSQL with its backends."))
    if not res:
        return lines
    lines += [(f"{res['directories']} directories, {res['database']}, {res['concurrency']} "
              f"connections, {res['duration_s']:g} s per phase, {res['existing_rooms']:,} "
              "existing rooms."), "",
              ("| phase | connects/s | p50 ms | p90 ms | p99 ms | max ms | directories CPU µs/connect "
               "| PostgreSQL CPU µs/connect | load generator CPU | errors |"),
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for ph in res["phases"]:
        errors = ", ".join(f"{k}: {v}" for k, v in ph.get("errors", {}).items()) or "none"
        lines.append(
            f"| {ph['phase']} | {ph['connects_per_s']:,} | {ph['p50_ms']:g} | {ph['p90_ms']:g} "
            f"| {ph['p99_ms']:g} | {ph['max_ms']:g} | {ph.get('directories_cpu_us_per_connect', '–'):,} "
            f"| {ph.get('postgres_cpu_us_per_connect', '–'):,} | {ph['client_cpu_pct']}% | {errors} |")
    return [*lines, *_goal_line(directory_goal(res)), ""]


def store_pause_table(rec: dict[str, Any]) -> list[str]:
    return pause_table(rec, "Move pause with a message store (PostgreSQL)", (
        "As above, with every message of the room stored in PostgreSQL before it is broadcast "
        "(synchronous commits, fsync on): a freeze waits for the room's messages still on their "
        "way to the store (docs/STORE.md)."))


def publish_table(rec: dict[str, Any]) -> list[str]:
    res = rec.get("result")
    lines = _head("The server API: publishes/s", rec, (
        "`POST /v1/rooms/{room}/messages` with an API key against one `roomshard directory` and "
        "one shard, each publish answered once the shard gave it its seq and stored it; closed "
        "loop over keep-alive connections, one run. CPU per publish by process group."))
    if not res:
        return lines
    errors = ", ".join(f"{k}: {v}" for k, v in res.get("errors", {}).items()) or "none"
    cpu = ", ".join(f"{k} {v:,}" for k, v in res["cpu_us_per_publish"].items())
    lines += [("| store | connections | rooms | publishes/s | p50 ms | p99 ms | CPU µs per publish "
              "| errors |"), "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
              (f"| {res['store']} | {res['concurrency']} | {res['rooms']} "
               f"| {res['publishes_per_s']:,} | {res['p50_ms']:g} | {res['p99_ms']:g} | {cpu} "
               f"| {errors} |")]
    return [*lines, ""]


def pause_table(rec: dict[str, Any], title: str = "Move pause per room size",
                more: str = "") -> list[str]:
    res = rec.get("result")
    lines = _head(title, rec, more or (
        "One room with N real WebSocket members (one client process) and a history of the given "
        "length is moved "
        "back and forth between two shards (directory on SQLite). `pause_ms` is the directory's "
        "freeze request -> commit (the time the room takes no send); reconnect is from the move "
        "request to the last member's welcome on the new shard (client-bound for 1,000 members). "
        "Every reconnect after a move must be `recovered: true` or the run fails."))
    if not res:
        return lines
    lines += [("| members | history | moves | pause_ms p50 | pause_ms p99 | pause_ms max "
               "| reconnect p50 ms | reconnect p99 ms |"),
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in res["pause"]:
        p, r = row["pause_ms"], row["reconnect_ms"]
        lines.append(
            f"| {row['members']:,} | {row['history']:,} | {row['moves']} | {nearest_rank(p, .5):.1f} "
            f"| {nearest_rank(p, .99):.1f} | {max(p):.1f} | {statistics.median(r):,.0f} "
            f"| {nearest_rank(r, .99):,.0f} |")
    return [*lines, *_goal_line(pause_goal(res)), ""]


def drain_table(rec: dict[str, Any]) -> list[str]:
    res = rec.get("result")
    lines = _head("Drain rate", rec, (
        "Rooms with one real WebSocket member each, spread over three shards by the directory; the "
        "fullest instance is drained with `POST /v1/admin/instances/{iN}/drain` "
        "(docs/HANDOFF.md). rooms/s = rooms moved / wall time of the drain request."))
    d = res.get("drain") if res else None
    if not d:
        return lines
    p = d["pause_ms"] or [0.0]
    lines += [("| database | rooms | drained | failed | wall s | rooms/s | pause_ms p50 "
               "| pause_ms p99 | members back (not recovered) |"),
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
              (f"| {'PostgreSQL' if d['database'] == 'postgresql' else 'SQLite'} | {d['rooms']:,} "
               f"| {d['moved']}/{d['total']} | {d['failed']} | {d['wall_s']:.2f} "
               f"| {d['rooms_per_s']:.0f} | {nearest_rank(p, .5):.0f} | {nearest_rank(p, .99):.0f} "
               f"| {d.get('members_back', '–')} ({d.get('not_recovered', '–')}) |")]
    if d.get("cpu"):
        lines += ["", f"{d['cpu']}."]
    return [*lines, *_goal_line(drain_goal(res)), ""]


CASES = {"add_empty_instance": "add one empty instance", "skewed_third": "skewed (a third at 1.5x)"}


def planner_table(rec: dict[str, Any]) -> list[str]:
    res = rec.get("result")
    lines = _head("Rebalance planner", rec, (
        "`directory/domain/rebalance.py` `plan()` in one process: rooms weighted 1 + lognormal(1, 1) "
        "connections placed on the least loaded instance, then one empty instance added, or a "
        "third of the instances carrying 1.5x their share. Time is the best of the repeats."))
    if not res:
        return lines
    lines += ["| case | rooms | instances | max_moves | time | moves | lower bound | max/mean after |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in res["cases"]:
        capped = " (capped)" if c["moves"] >= c["max_moves"] else ""
        lines.append(f"| {CASES.get(c['case'], c['case'])} | {c['rooms']:,} | {c['instances']:,} "
                     f"| {c['max_moves']:,} | {c['seconds']:.2f} s | {c['moves']:,}{capped} "
                     f"| {c['lower_bound']:,} | {c['max_over_mean_after']:.3f} |")
    return [*lines, ""]


def js_client_table(rec: dict[str, Any]) -> list[str]:
    res = rec.get("result")
    lines = _head("The JavaScript client: deliveries/s in one Node process", rec, (
        "`js/bench/deliveries.mjs`: rooms x members sessions of the package's `connect()` in one "
        "Node process pinned to one core (the servers, a directory and one shard, on the other); "
        "per rate, messages sent through `session.send` round-robin over the rooms, and every "
        "`message` event counted. Latency from the send to the event."))
    if not res:
        return lines
    lines += [(f"{res['sessions']:,} sessions ({res['rooms']} rooms x {res['members']}), "
               f"{res['seconds']:g} s per rate."), "",
              ("| messages/s sent | deliveries/s | delivered | p50 ms | p99 ms | client CPU "
               "| event loop delay p99 ms | sustained |"),
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for st in res["steps"]:
        lines.append(f"| {st['sent_per_s']:,.0f} | {st['deliveries_per_s']:,.0f} "
                     f"| {st['delivered_ratio'] * 100:.2f} % | {st['p50_ms']:g} | {st['p99_ms']:g} "
                     f"| {st['client_cpu_util'] * 100:.0f} % | {st['event_loop_delay_p99_ms']:.0f} "
                     f"| {'yes' if js_client_sustained(st) else 'no'} |")
    return [*lines, *_goal_line(js_client_goal(res)), ""]


RENDERERS = (("directory", directory_table), ("pause", pause_table),
             ("store-pause", store_pause_table), ("publish", publish_table),
             ("drain", drain_table), ("planner", planner_table), ("js-client", js_client_table))


def render(doc: dict[str, Any]) -> list[str]:
    """Every part the results file has, in a fixed order; nothing when it has none."""
    ext = doc.get("extras") or {}
    if not ext:
        return []
    lines = [("The parts below measure roomshard alone. The same `bench/compare` runs each once, "
              "after the side-by-side workloads, from the same roomshard commit; their processes "
              "are not pinned to a CPU."), ""]
    for name, fn in RENDERERS:
        if name in ext:
            rec = ext[name]
            lines += [*fn(rec), (f"(This part took {rec.get('elapsed_seconds', 0):.0f} s; 1-minute "
                                 f"load average {rec.get('loadavg_before', 0):.2f} before, "
                                 f"{rec.get('loadavg_after', 0):.2f} after.)"), ""]
    return lines
