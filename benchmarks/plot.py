"""Figures from the JSON of ``benchmarks/compare.py`` or ``benchmarks/federated.py``.

    python benchmarks/plot.py benchmarks/results/compare.json --out docs/img [--link 50mbit]
    python benchmarks/plot.py benchmarks/results/federated.json --out docs/img

writes ``compare_memory.png`` (device peak memory per method), ``compare_bytes.png`` (bytes up and down
per training sample, log scale; methods that train on the device send nothing and are labelled so) and
``compare_time_to_accuracy.png`` (validation accuracy against simulated time, one panel per device
profile, for one link); a preset other than ``small`` names its files after it (``compare_bf16_memory.png``).
From a federated JSON: ``federated_accuracy.png`` (accuracy on the pooled held-out set
against simulated time, one line per method; centralised PAE has no clock and is a horizontal line) and
``federated_arrivals.png`` (uploads landing per virtual-time bin, and each class's share of the shared model's
training steps in that bin against its share of the pooled data).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

COLORS = [f"C{i}" for i in range(10)]


def _color(methods: list[str], method: str) -> str:
    return COLORS[methods.index(method) % len(COLORS)]


def _label_missing(ax: Axes, x: float, y: float, text: str) -> None:
    ax.text(x, y, text, ha="center", va="bottom", fontsize=8, color="0.3")


def _method_axis(ax: Axes, methods: list[str]) -> None:
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.4)


def plot_memory(rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Bar per method: device peak RSS in MB; a failed method is labelled, not dropped."""
    methods = list(rows)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for x, m in enumerate(methods):
        mb = rows[m].get("device_peak_rss_mb")
        if mb is None:
            _label_missing(ax, x, 0, "failed" if "error" in rows[m] else "not measured")
            continue
        ax.bar(x, mb, color=_color(methods, m))
        ax.text(x, mb, f"{mb:,.0f}", ha="center", va="bottom", fontsize=8)
    _method_axis(ax, methods)
    ax.set_ylim(0, 1.1 * max((r.get("device_peak_rss_mb") or 0 for r in rows.values()), default=0) or 1)
    ax.set_ylabel("device peak RSS (MB)")
    ax.set_title("Device peak memory")
    fig.savefig(path, dpi=120)
    return path


def plot_bytes(rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Bytes up and down per training sample per method, log y. Zero cannot sit on a log axis: a method
    that sends nothing is labelled ``0 (on device)`` and a zero direction ``0``."""
    methods = list(rows)
    values = [rows[m].get(k) for m in methods for k in ("bytes_up_per_sample", "bytes_down_per_sample")]
    positive = [v for v in values if v]
    floor = min(positive) / 10 if positive else 1.0
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_yscale("log")
    width = 0.38
    for x, m in enumerate(methods):
        up, down = rows[m].get("bytes_up_per_sample"), rows[m].get("bytes_down_per_sample")
        if "error" in rows[m] or up is None or down is None:
            _label_missing(ax, x, floor * 1.5, "failed" if "error" in rows[m] else "not measured")
        elif up == down == 0:
            _label_missing(ax, x, floor * 1.5, "0 (on device)")
        else:
            for dx, v, hatch in ((-width / 2, up, None), (width / 2, down, "//")):
                if v:
                    ax.bar(x + dx, v, width, color=_color(methods, m), hatch=hatch, edgecolor="k")
                    ax.text(x + dx, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7, rotation=90)
                else:
                    _label_missing(ax, x + dx, floor * 1.5, "0")
    ax.legend(
        handles=[
            Patch(facecolor="w", edgecolor="k", label="up"),
            Patch(facecolor="w", edgecolor="k", hatch="//", label="down"),
        ],
        fontsize=8,
    )
    ax.set_ylim(floor, 30 * max(positive, default=floor))  # room for the value labels
    _method_axis(ax, methods)
    ax.set_ylabel("bytes per training sample (log)")
    ax.set_title("Bytes on the link per training sample")
    fig.savefig(path, dpi=120)
    return path


def plot_time_to_accuracy(report: Mapping[str, Any], link: str, path: Path) -> Path:
    """Validation accuracy against simulated time, one panel per device profile, one line per method."""
    curves = report["curves"]
    profiles = report["settings"]["profiles"]
    target = report["settings"]["target_acc"]
    methods = list(report["rows"])
    fig = Figure(figsize=(4.5 * len(curves), 4), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (profile, by_link) in zip(axes, curves.items()):
        if link not in by_link:
            raise ValueError(f"no link {link!r} in the JSON; it has {sorted(by_link)}")
        for m, points in by_link[link].items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [100 * y for y in ys], marker="o", color=_color(methods, m), label=m)
        ax.axhline(100 * target, color="k", linestyle="--", linewidth=1, label=f"target {100 * target:.0f}%")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("simulated time (s, log)")
        ax.set_title(f"{profile} (x{profiles[profile]['factor']:.2g} this CPU), {link}", fontsize=9)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("Time to accuracy (simulated from the measured run)")
    fig.savefig(path, dpi=120)
    return path


def plot_federated_accuracy(report: Mapping[str, Any], path: Path) -> Path:
    """Pooled held-out accuracy against simulated time per method (log time); the target dashed."""
    methods = list(report["methods"])
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for m, entry in report["methods"].items():
        curve = [r for r in entry.get("curve") or [] if r.get("val_acc") is not None and r.get("t") is not None]
        if entry.get("status") != "ran":
            continue
        if m == "centralized_pae" or not curve:
            ax.axhline(100 * entry["val_acc"], color=_color(methods, m), linestyle=":", label=f"{m} (no clock)")
            continue
        ax.plot([max(r["t"], 1e-3) for r in curve], [100 * r["val_acc"] for r in curve], marker=".",
                color=_color(methods, m), label=m)
    ax.axhline(100 * report["target_acc"], color="k", linestyle="--", linewidth=1,
               label=f"target {100 * report['target_acc']:.0f}%")
    ax.set_xscale("log")
    ax.set_xlabel("simulated time (s, log)")
    ax.set_ylabel("accuracy on the pooled held-out set (%)")
    alpha = (report.get("partition") or {}).get("alpha")
    ax.set_title(f"Fed MobiLLM, preset {report['preset']}: {report['devices']} devices, Dirichlet({alpha})",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_federated_arrivals(report: Mapping[str, Any], path: Path) -> Path:
    """Top: samples landing per virtual-time bin. Bottom: each class's share of the sample-steps the shared model
    trained on in that bin (stacked), with the pooled data's shares as the reference on the right."""
    tl = report["methods"]["fed_mobillm"]["timeline"]
    edges, shares = tl["bin_edges_s"], tl["class_share"]
    mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    width = edges[1] - edges[0] if len(edges) > 1 else 1.0
    names = report.get("class_names") or [f"class {c}" for c in range(len(tl["pooled_class_share"]))]
    fig = Figure(figsize=(8, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))
    top.bar(mids, tl["arrived_samples"], width=0.9 * width, color="0.5")
    top.set_ylabel("samples uploaded")
    top.set_title("Arrivals and what the shared model trained on (Fed MobiLLM, virtual clock)", fontsize=10)
    base = [0.0] * len(mids)
    for c, name in enumerate(names):
        ys = [100 * row[c] for row in shares]
        bottom.bar(mids, ys, width=0.9 * width, bottom=base, color=COLORS[c % len(COLORS)], label=name)
        base = [b + y for b, y in zip(base, ys)]
    ref = 0.0
    for c, share in enumerate(tl["pooled_class_share"]):
        bottom.bar(edges[-1] + width, 100 * share, width=0.9 * width, bottom=ref, color=COLORS[c % len(COLORS)],
                   hatch="//", edgecolor="w")
        ref += 100 * share
    bottom.text(edges[-1] + width, 101, "pooled", ha="center", fontsize=8)
    bottom.set_ylim(0, 108)
    bottom.set_ylabel("share of training steps (%)")
    bottom.set_xlabel("simulated time (s)")
    bottom.legend(fontsize=8, ncols=min(len(names), 5), loc="lower left")
    fig.savefig(path, dpi=120)
    return path


def plot_federated(report: Mapping[str, Any], out: Path) -> list[Path]:
    """The federated benchmark's two figures into ``out``; the files written. The ``small`` preset's keep their
    names; another preset's carry it (``federated_medium_accuracy.png``)."""
    out.mkdir(parents=True, exist_ok=True)
    preset = report.get("preset", "small")
    name = "federated" if preset == "small" else f"federated_{preset}"
    paths = [plot_federated_accuracy(report, out / f"{name}_accuracy.png")]
    if (report["methods"].get("fed_mobillm") or {}).get("timeline"):
        paths.append(plot_federated_arrivals(report, out / f"{name}_arrivals.png"))
    return paths


def plot(report: Mapping[str, Any], out: Path, link: str = "50mbit") -> list[Path]:
    """Write the figures of a compare (three) or federated (two) JSON into ``out``; the files written."""
    if "methods" in report and "preset" in report:
        return plot_federated(report, out)
    out.mkdir(parents=True, exist_ok=True)
    # the small preset's figures keep their names; another preset's carry it: compare_bf16_memory.png, ...
    preset = report.get("preset", "small")
    name = "compare" if preset == "small" else f"compare_{preset}"
    return [
        plot_memory(report["rows"], out / f"{name}_memory.png"),
        plot_bytes(report["rows"], out / f"{name}_bytes.png"),
        plot_time_to_accuracy(report, link, out / f"{name}_time_to_accuracy.png"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path, help="the output of benchmarks/compare.py or benchmarks/federated.py")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--link", default="50mbit", help="the link of the time-to-accuracy figure")
    args = p.parse_args()
    for path in plot(json.loads(args.json.read_text()), args.out, args.link):
        print(path)


if __name__ == "__main__":
    main()
