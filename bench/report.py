"""Turn a results file into markdown tables and PNG plots.

    python bench/report.py bench/results/full-XXXX.json [--docs]

Without ``--docs`` the tables go to ``bench/results/tmp/report-<profile>.md``
and the plots next to them (a quick run never overwrites the documented
numbers). With ``--docs`` (what a full ``bench/compare`` run does) the block
between the ``results:start``/``results:end`` markers of ``docs/BENCHMARKS.md``
is replaced and the plots are written to ``docs/benchmarks-*.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import capacity, report_extras, summary
from bench.summary import IdleSummary, LadderSummary, Spread
from bench.workloads import CONNECT_CONCURRENCY, workloads_of

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
CAPACITY_DOC = ROOT / "docs" / "CAPACITY.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
LABELS = {
    "roomshard-1": "roomshard, directory + 1 shard",
    "roomshard-2": "roomshard, directory + 2 shards",
    "socketio-1": "Socket.IO 4 (Node), 1 process",
    "socketio-2-redis": "Socket.IO 4, 2 processes + Redis adapter",
    "python-socketio": "python-socketio on uvicorn",
    "bare-websockets": "bare websockets.broadcast (Python ceiling)",
    "ws-node": "bare Node ws (load generator ceiling)",
    "roomshard-1-sqlite": "roomshard, 1 shard, every message stored in SQLite first",
    "roomshard-1-pg": "roomshard, 1 shard, every message stored in PostgreSQL first",
    "roomshard-1-2dirs-pg": "roomshard, 2 directories on PostgreSQL + 1 shard",
}
ORDER = list(LABELS)


def fmt(s: Spread | None, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    if s is None:
        return "–"
    f = f"{{:,.{digits}f}}"
    mid = f.format(s.median * scale)
    if s.n > 1:
        return f"{mid}{unit} ({f.format(s.low * scale)}–{f.format(s.high * scale)})"
    return f"{mid}{unit}"


def runs_of(doc: dict[str, Any], target: str, workload: str) -> int:
    return sum(1 for r in doc["runs"] if r["target"] == target and r["workload"] == workload)


def targets_in(doc: dict[str, Any], workload: str) -> list[str]:
    seen = {r["target"] for r in doc["runs"] if r["workload"] == workload}
    return [t for t in ORDER if t in seen]


def ladder_table(rows: list[LadderSummary], ref_deliveries: int,
                 label: dict[str, str] | None = None) -> list[str]:
    label = label or LABELS
    out = [
        ("| server | max sustained deliveries/s "
        f"| deliveries per server CPU-s at {ref_deliveries:,}/s (same load for all) "
        f"| p50 / p99 ms at {ref_deliveries:,}/s | deliveries per server CPU-s at max "
        "| p99 ms at max | server CPU at max | load gen CPU at max |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        note = ""
        if r.topped_out:
            note += " ≥"
        if r.loadgen_bound:
            note += " †"
        if r.errors and r.max_deliveries_per_s is None and not r.unsustained_repeats:
            out.append(f"| {label[r.target]} | not measured: {r.errors[0][:120]} | | | | | | |")
            continue
        if r.unsustained_repeats:
            # Say it when some repeat could not sustain even the lowest rung.
            note += (f" ({r.unsustained_repeats} repeat(s) sustained no rung, "
                     f"lowest offered {r.lowest_offered:,.0f}/s)")
        p50 = fmt(r.p50_ref_ms, digits=1)
        p99 = fmt(r.p99_ref_ms, digits=1)
        out.append(
            f"| {label[r.target]} | {fmt(r.max_deliveries_per_s)}{note} "
            f"| {fmt(r.per_cpu_second_at_ref)} | {p50} / {p99} "
            f"| {fmt(r.per_cpu_second_at_max)} | {fmt(r.p99_max_ms, digits=1)} "
            f"| {fmt(r.server_cpu_at_max, 100, unit='%')} | {fmt(r.loadgen_cpu_at_max, 100, unit='%')} |")
    return out


def idle_table(rows: list[IdleSummary], label: dict[str, str] | None = None) -> list[str]:
    label = label or LABELS
    out = [("| server | connections | RSS per idle connection | connects/s (1 load gen) "
            "| connects per server CPU-s | server / load gen CPU while connecting |"),
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.rss_per_connection_bytes is None:
            out.append(f"| {label[r.target]} | | not measured: {(r.errors or ['-'])[0][:120]} | | | |")
            continue
        bound = " (load gen bound)" if r.loadgen_bound else ""
        out.append(f"| {label[r.target]} | {r.connections:,} "
                   f"| {fmt(r.rss_per_connection_bytes, 1 / 1024, 1, ' KiB')} "
                   f"| {fmt(r.connects_per_s)}{bound} | {fmt(r.connects_per_server_cpu_second)} "
                   f"| {fmt(r.server_cpu_util, 100, unit='%')} / {fmt(r.loadgen_cpu_util, 100, unit='%')} |")
    return out


def scaling_table(fan: dict[str, LadderSummary]) -> list[str]:
    out = [("| setup | max sustained deliveries/s | vs 1 process "
           "| deliveries per CPU-s at the common rung | vs 1 process |"),
           "| --- | ---: | ---: | ---: | ---: |"]
    for one, two in (("roomshard-1", "roomshard-2"), ("socketio-1", "socketio-2-redis")):
        for name in (one, two):
            if name not in fan:
                out.append(f"| {LABELS[name]} | not measured | | | |")
                continue
            s = fan[name]
            base = fan.get(one)
            r1 = summary._ratio(s.max_deliveries_per_s, base.max_deliveries_per_s if base else None)
            r2 = summary._ratio(s.per_cpu_second_at_ref, base.per_cpu_second_at_ref if base else None)
            out.append(f"| {LABELS[name]} | {fmt(s.max_deliveries_per_s)}{' ≥' if s.topped_out else ''} "
                       f"| {'' if r1 is None else f'{r1:.2f}x'} | {fmt(s.per_cpu_second_at_ref)} "
                       f"| {'' if r2 is None else f'{r2:.2f}x'} |")
    return out


def store_table(fan: dict[str, LadderSummary], ref_deliveries: int) -> list[str]:
    """roomshard with a message store next to memory mode, at the common rung."""
    out = [(f"| setup | deliveries per shard CPU-s at {ref_deliveries:,}/s | vs memory "
            f"| p99 ms at {ref_deliveries:,}/s | database CPU ms per 1,000 deliveries "
            "| max sustained deliveries/s |"),
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    base = fan.get("roomshard-1")
    for name in ("roomshard-1", "roomshard-1-sqlite", "roomshard-1-pg"):
        if name not in fan:
            out.append(f"| {LABELS[name]} | not measured | | | | |")
            continue
        s = fan[name]
        r = summary._ratio(s.per_cpu_second_at_ref, base.per_cpu_second_at_ref if base else None)
        db = ("in the shard" if name == "roomshard-1-sqlite"
              else "–" if name == "roomshard-1" else fmt(s.database_cpu_ms_per_1k_at_ref, digits=1))
        out.append(f"| {LABELS[name]} | {fmt(s.per_cpu_second_at_ref)} "
                   f"| {'' if r is None else f'{r:.2f}x'} | {fmt(s.p99_ref_ms, digits=1)} "
                   f"| {db} | {fmt(s.max_deliveries_per_s)}{' ≥' if s.topped_out else ''} |")
    return out


def labels_with_runs(doc: dict[str, Any], workload: str) -> dict[str, str]:
    """Server labels, with '(N runs)' where a target ran fewer times than the profile's repeats."""
    out = dict(LABELS)
    for t in targets_in(doc, workload):
        n = runs_of(doc, t, workload)
        if n < doc["repeats"]:
            out[t] = f"{LABELS[t]} ({n} run{'s' if n > 1 else ''})"
    return out


def render(doc: dict[str, Any], plot_dir: Path | None = None, plot_prefix: str = "") -> str:
    wl = workloads_of(doc)
    env = doc["environment"]
    fewer = ", fewer where a row says so" if any(
        runs_of(doc, r["target"], r["workload"]) < doc["repeats"] for r in doc["runs"]) else ""
    lines = [
        f"Measured {doc['started_at']} with `{doc['command'].strip()}` "
        f"(profile `{doc['profile']}`, {doc['repeats']} repeat(s){fewer}, "
        f"{doc['step_seconds']} s per step, "
        f"roomshard at commit `{doc.get('roomshard_commit', env['git_commit'])}`, {env['cpus']} x {env['cpu_model']}, kernel {env['kernel']}; "
        f"servers on CPU {doc['server_cpus']}, load generator on CPU {doc['loadgen_cpu']}; "
        f"whole run {doc.get('elapsed_seconds', 0):.0f} s). Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        ("Cells are the median over repeats with the min–max spread in parentheses. "
        "≥: the ladder never failed in some repeat, so the max is a lower bound. "
        "†: the load generator used ≥ 85% of its core at the max step, so the server "
        "may have had more to give."),
        "",
    ]
    loads = [r["loadavg_before"][0] for r in doc["runs"]] + [r["loadavg_after"][0] for r in doc["runs"]]
    if loads:
        lines += [(f"1-minute load average during the run: {min(loads):.2f}–{max(loads):.2f} "
                  "(2 = both cores busy; the benchmark itself accounts for up to 2)."), ""]
    fan: dict[str, LadderSummary] = {}
    for name, title in (("fanout", "Fan-out: 100 rooms x 20 members"),
                        ("bigroom", "One big room: 1 room x 1,000 members"),
                        ("store", ("Messages one shard sequences (and stores): 2,000 rooms x 1 "
                                  "member, deliveries/s = messages/s"))):
        if name not in wl:
            continue
        w = wl[name]
        rows = [summary.ladder(doc, t, name, w.reference_rate) for t in targets_in(doc, name)]
        if not rows:
            continue
        if name == "fanout":
            fan = {r.target: r for r in rows}
        ref = (w.reference_rate or 0) * w.members
        lines += [f"### {title}", "",
                  (f"Publish rate stepped through {', '.join(map(str, w.rates))} messages/s "
                  f"(x{w.members} deliveries each)."), "", *ladder_table(rows, ref, labels_with_runs(doc, name)), ""]
    idle_rows = [summary.idle(doc, t) for t in targets_in(doc, "idle")]
    if idle_rows:
        w = wl["idle"]
        lines += [f"### Idle connections: {w.connections:,} in {w.rooms} rooms of {w.members}", "",
                  ("(server RSS with all connected − RSS before the first connection) / connections, "
                  "summed over the target's processes (roomshard: directory + shard). Connects/s: "
                  f"end to end, {CONNECT_CONCURRENCY} at a time (roomshard: the directory's answer, "
                  "the handshake, the welcome); the CPU columns are over the connects, summed over "
                  "the target's processes: the server's cost per connect whichever core was the limit."), "",
                  *idle_table(idle_rows, labels_with_runs(doc, "idle")), ""]
    if any(t in fan for t in ("roomshard-1-sqlite", "roomshard-1-pg")):
        ref = (wl["fanout"].reference_rate or 0) * wl["fanout"].members
        lines += ["### With a message store (fan-out workload)", "",
                  ("Every message is stored (one transaction per batch: group commit) before "
                  "it is broadcast and acked. SQLite runs inside the shard process (its CPU is "
                  "the shard's); PostgreSQL runs beside it, pinned to the same CPU, with "
                  "synchronous commits and fsync on, its CPU reported apart."), "",
                  *store_table(fan, ref), ""]
    if fan:
        lines += ["### 1 vs 2 processes (fan-out workload)", "",
                  ("Every server process of a target shares CPU 1 (the load generator needs CPU 0), "
                  "so two processes get no more CPU than one: this shows the cost of splitting, "
                  "not the gain of a second core."), "", *scaling_table(fan), ""]
    all_goals = (summary.goals(fan, {r.target: r for r in idle_rows}) if fan else []) \
        + report_extras.goals(doc)
    if all_goals:
        lines += ["### The project's goals", "", "| goal | measured | met? |", "| --- | --- | --- |"]
        for g in all_goals:
            met = "not measured" if g.met is None else ("yes" if g.met else "**no**")
            lines.append(f"| {g.text} | {g.value} | {met} |")
        lines.append("")
    lines += report_extras.render(doc)
    if plot_dir is not None:
        lines += ["### Plots", ""]
        for name, alt in (("fanout-latency", "p99 latency vs offered deliveries/s, fan-out"),
                          ("bigroom-latency", "p99 latency vs offered deliveries/s, one big room"),
                          ("efficiency", "deliveries per server CPU-second at the common rung"),
                          ("idle-rss", "RSS per idle connection")):
            if (plot_dir / f"{plot_prefix}{name}.png").exists():
                lines.append(f"![{alt}]({plot_prefix}{name}.png)")
        lines.append("")
    return "\n".join(lines)


def measured_directory(doc: dict[str, Any]) -> capacity.DirectoryMeasured | None:
    """The directory's CPU per connect from this run's ``directory`` part, when it has one."""
    rec = (doc.get("extras") or {}).get("directory") or {}
    phases = {p["phase"]: p for p in (rec.get("result") or {}).get("phases", [])}
    old, new = phases.get("existing rooms"), phases.get("new rooms")
    key = "directories_cpu_us_per_connect"
    if not old or not new or key not in old or key not in new:
        return None
    return capacity.DirectoryMeasured(
        cpu_us_per_connect=old[key], cpu_us_per_new_room=new[key],
        postgres_us_per_new_room=new.get("postgres_cpu_us_per_connect", 0),
        source=f"`{rec['command']}` in the same run")


def capacity_block(doc: dict[str, Any]) -> str | None:
    """The measured inputs and extrapolated scenarios of docs/CAPACITY.md."""
    fan = summary.ladder(doc, "roomshard-1", "fanout", workloads_of(doc)["fanout"].reference_rate)
    idle = summary.idle(doc, "roomshard-1")
    if fan.per_cpu_second_at_max is None or fan.max_deliveries_per_s is None \
            or idle.rss_per_connection_bytes is None or idle.connects_per_s is None:
        return None
    # Plan with the low-rate figure: at one message per user every 30 s a connection gets
    # well under one frame per loop turn, so nothing coalesces (the max rung's figure does).
    planning = fan.per_cpu_second_at_ref or fan.per_cpu_second_at_max
    inputs = capacity.Inputs(
        deliveries_per_cpu_second=planning.median,
        max_deliveries_per_s=fan.max_deliveries_per_s.median,
        rss_per_connection=idle.rss_per_connection_bytes.median,
        directory=measured_directory(doc) or capacity.DIRECTORY)
    a = capacity.Assumptions()
    plan = capacity.per_shard(inputs, a)
    dir_source = (inputs.directory.source if inputs.directory is not capacity.DIRECTORY
                  else "[benchmarks/directory.md](benchmarks/directory.md)")
    lines = [
        (f"Measured by `{doc['command'].strip()}` at {doc['started_at']} (roomshard commit `{doc.get('roomshard_commit', doc['environment']['git_commit'])}`), "
        "one shard process on one core of a 2-core machine, medians over repeats:"), "",
        "| measured input | value |", "| --- | ---: |",
        (f"| deliveries per shard CPU-second (fan-out 100 x 20) at {workloads_of(doc)['fanout'].reference_rate * 20:,}/s, "
         f"the planning figure | {fmt(planning)} |"),
        f"| deliveries per shard CPU-second at the max sustained step (frames coalesce; not planned with) | {fmt(fan.per_cpu_second_at_max)} |",
        f"| max sustained deliveries/s, one shard on one core{' (≥: the load generator limited it)' if fan.loadgen_bound or fan.topped_out else ''} | {fmt(fan.max_deliveries_per_s)} |",
        f"| RSS per idle connection (shard + directory) | {fmt(idle.rss_per_connection_bytes, 1 / 1024, 1, ' KiB')} |",
        f"| connects/s end to end (directory + shard on one core, 1 load generator, {CONNECT_CONCURRENCY} at a time) | {fmt(idle.connects_per_s)} |",
        f"| connects per server CPU-second (directory + shard) | {fmt(idle.connects_per_server_cpu_second)} |",
        (f"| directory CPU per connect, existing room / new room; PostgreSQL CPU per new room | "
        f"{inputs.directory.cpu_us_per_connect:g} / {inputs.directory.cpu_us_per_new_room:g} µs; "
        f"{inputs.directory.postgres_us_per_new_room:g} µs (from {dir_source}) |"),
        "",
        (f"**Planning assumptions (not measured):** shards planned at {a.cpu_headroom:.0%} of their "
        f"measured CPU capacity, {a.shard_memory_bytes / 1024**3:g} GiB of RAM per shard for "
        f"connections, rooms of {a.room_size}, one message per user every "
        f"{a.seconds_between_messages:g} s, directory replicas at {a.directory_headroom:.0%} of "
        "their measured rate."), "",
        "| per shard (one core), planned | extrapolated value |", "| --- | ---: |",
        f"| deliveries/s | {plan.deliveries_per_s:,.0f} |",
        (f"| connections | {plan.connections:,} (memory allows {int(a.shard_memory_bytes / inputs.rss_per_connection):,}; "
        f"`max_connections` defaults to {capacity.SHARD_MAX_CONNECTIONS:,}) |"), "",
    ]
    for sc in (capacity.shards_scenario(inputs, a, 100),
               capacity.connections_scenario(inputs, a, 1_000_000),
               capacity.rooms_created_scenario(inputs, a, 10_000),
               capacity.reconnect_scenario(inputs, a)):
        lines += [f"#### {sc.name} (extrapolated)", "", "| | |", "| --- | --- |",
                  *(f"| {k} | {v} |" for k, v in sc.rows), ""]
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else f"# {path.stem}\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="results JSON -> markdown tables and PNG plots")
    parser.add_argument("results")
    parser.add_argument("--docs", action="store_true",
                        help="update docs/BENCHMARKS.md, its plots and docs/CAPACITY.md")
    args = parser.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    from bench import plots

    if args.docs:
        plots.write_all(doc, ROOT / "docs", "benchmarks-")
        write_block(DOC, render(doc, ROOT / "docs", "benchmarks-"))
        print(f"[report] updated {DOC}", file=sys.stderr)
        cap = capacity_block(doc)
        if cap is not None:
            write_block(CAPACITY_DOC, cap)
            print(f"[report] updated {CAPACITY_DOC}", file=sys.stderr)
    else:
        out = ROOT / "bench" / "results" / "tmp"
        out.mkdir(parents=True, exist_ok=True)
        plots.write_all(doc, out, f"{doc['profile']}-")
        md = out / f"report-{doc['profile']}.md"
        cap = capacity_block(doc)
        md.write_text(render(doc, out, f"{doc['profile']}-")
                      + ("\n## Capacity inputs\n\n" + cap if cap else ""))
        print(f"[report] wrote {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
