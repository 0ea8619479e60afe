"""Matplotlib plots of a results document (PNG, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import summary
from bench.workloads import workloads_of

COLORS = {
    "roomshard-1": "#d62728", "roomshard-2": "#ff9896", "socketio-1": "#1f77b4",
    "socketio-2-redis": "#aec7e8", "python-socketio": "#2ca02c", "bare-websockets": "#9467bd",
    "ws-node": "#7f7f7f", "roomshard-1-sqlite": "#e377c2", "roomshard-1-pg": "#8c564b",
}


def _targets(doc: dict[str, Any], workload: str) -> list[str]:
    seen = {r["target"] for r in doc["runs"] if r["workload"] == workload}
    return [t for t in COLORS if t in seen]


def latency_plot(doc: dict[str, Any], workload: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for target in _targets(doc, workload):
        for run in doc["runs"]:
            if run["target"] != target or run["workload"] != workload or "result" not in run:
                continue
            steps = run["result"].get("steps") or []
            pts = [(s["expected"] / s["send_seconds"], s["p99_ms"]) for s in steps if s["p99_ms"]]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", color=COLORS[target], alpha=0.8,
                        label=target if run["repeat"] == 0 else None)
    ax.axhline(200, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("offered deliveries/s")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_title(f"{workload}: p99 latency as the publish rate steps up (every repeat)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_plot(names: list[str], spreads: list[summary.Spread | None], title: str, ylabel: str,
             path: Path, scale: float = 1.0) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, heights, lo, hi, colors, labels = [], [], [], [], [], []
    for i, (name, s) in enumerate(zip(names, spreads)):
        if s is None:
            continue
        xs.append(i)
        heights.append(s.median * scale)
        lo.append((s.median - s.low) * scale)
        hi.append((s.high - s.median) * scale)
        colors.append(COLORS.get(name.split(" ")[0], "#333333"))
        labels.append(name)
    ax.bar(range(len(xs)), heights, yerr=[lo, hi], color=colors, capsize=4)
    ax.set_xticks(range(len(xs)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(doc: dict[str, Any], folder: Path, prefix: str) -> None:
    wl = workloads_of(doc)
    names: list[str] = []
    effs: list[summary.Spread | None] = []
    for workload in ("fanout", "bigroom"):
        if workload not in wl or not _targets(doc, workload):
            continue
        latency_plot(doc, workload, folder / f"{prefix}{workload}-latency.png")
        for target in _targets(doc, workload):
            s = summary.ladder(doc, target, workload, wl[workload].reference_rate)
            ref = wl[workload].reference_rate or 0
            names.append(f"{target} ({workload}, {ref * wl[workload].members // 1000}k/s)")
            effs.append(s.per_cpu_second_at_ref)
    bar_plot(names, effs, "deliveries per server CPU-second at the common rung (same load for all)",
             "deliveries / CPU-s", folder / f"{prefix}efficiency.png")
    idle_targets = _targets(doc, "idle")
    if not idle_targets:
        return
    bar_plot(idle_targets, [summary.idle(doc, t).rss_per_connection_bytes for t in idle_targets],
             "RSS per idle connection", "KiB", folder / f"{prefix}idle-rss.png", scale=1 / 1024)
