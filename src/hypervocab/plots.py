"""Every chart hypervocab draws, as PNG: evaluation results and a training run's curves.

matplotlib is imported only when a chart is drawn (``import hypervocab`` stays light), and only
its Agg canvas is used: no GUI backend is needed and the caller's pyplot state is left alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["figure", "plot_compression", "plot_bits_per_byte", "plot_decode_speed", "plot_generation_quality",
           "plot_run", "RUN_PANELS"]

INSTALL_HINT = "charts need matplotlib: pip install 'hypervocab[train]'"

# (metrics, panel title): the panels of a training run's chart, drawn when the run logged them
RUN_PANELS = [
    (("lm_loss", "eval_loss"), "next-code loss"),
    (("recon_loss", "next_hyper_loss"), "auxiliary losses"),
    (("codes_per_token", "hyper_target_share", "hyper_accuracy"), "compression and hypertokens"),
    (("lr", "encoder_lr"), "learning rates"),
    (("base_tokens_per_s",), "base tokens per second"),
]


def figure(**kwargs: Any) -> Any:
    """A new matplotlib ``Figure`` on the Agg canvas (``kwargs`` go to ``Figure``, e.g. ``figsize``).

    Raises:
        ImportError: matplotlib is not installed (the message says what to install).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | PathLike[str], dpi: int) -> Path:
    out = Path(path)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _bars(ax: Any, groups: Sequence[str], series: dict[str, Sequence[float]], fmt: str) -> None:
    n = len(series)
    width = 0.8 / max(n, 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.legend(fontsize=8)


def plot_compression(rows: Sequence[dict[str, Any]], path: str | PathLike[str], *,
                     generated: Sequence[dict[str, Any]] = ()) -> Path:
    """Codes per base token by domain (one bar per tokenizer); with ``generated``, a second panel of
    base tokens per emitted code.  Rows are the dicts of ``eval compression``'s JSON."""
    panels = 2 if generated else 1
    fig = figure(figsize=(6 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)
    domains = list(dict.fromkeys(r["path"] for r in rows))
    tokenizers = list(dict.fromkeys(r["tokenizer"] for r in rows))
    value = {(r["tokenizer"], r["path"]): r["codes_per_token"] for r in rows}
    _bars(axes[0][0], domains, {t: [value.get((t, d), 0.0) for d in domains] for t in tokenizers}, "{:.2f}")
    axes[0][0].set_ylabel("codes per base token (lower is better)")
    axes[0][0].set_title("input compression")
    axes[0][0].axhline(1.0, color="grey", lw=0.8, ls="--")
    if generated:
        ax = axes[0][1]
        _bars(ax, [g["domain"] for g in generated], {"generated": [g["base_tokens_per_code"] for g in generated]},
              "{:.2f}")
        ax.set_ylabel("base tokens per emitted code (higher is better)")
        ax.set_title("the model's own output")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    return _save(fig, path, 120)


def plot_bits_per_byte(rows: Sequence[dict[str, Any]], path: str | PathLike[str]) -> Path:
    """Bits per byte of the base model and the hypervocab model side by side, by domain."""
    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    domains = [r["domain"] for r in rows]
    _bars(ax, domains, {"base model": [r["base_bits_per_byte"] for r in rows],
                        "hypervocab": [r["hypervocab_bits_per_byte"] for r in rows]}, "{:.3f}")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("held-out bits per byte, same bytes")
    fig.tight_layout()
    return _save(fig, path, 120)


def plot_decode_speed(rows: Sequence[Mapping[str, Any]], path: str | PathLike[str], *, systems: Sequence[str],
                      labels: Mapping[str, str] | None = None, model: str = "model") -> Path:
    """Decode throughput per workload, one bar per system (in the order of ``systems``), labelled with
    the speed-up against base.  Rows are the dicts of ``eval speed``'s JSON rows."""
    labels = labels or {}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    systems = [s for s in systems if any(r["system"] == s for r in rows)]
    fig = figure(figsize=(1.2 + 2.2 * len(workloads), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        found = [next((r for r in rows if r["workload"] == w and r["system"] == system), None) for w in workloads]
        values = [(r["decode_tokens_per_s"] or 0.0) if r is not None else 0.0 for r in found]
        xs = [k + (i - (len(systems) - 1) / 2) * width for k in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=labels.get(system, system))
        ax.bar_label(bars, labels=["" if r is None or r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x"
                                   for r in found], fontsize=7)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("decode throughput (base tokens/s)")
    ax.set_title(f"{model}: decode speed (labels: vs base)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, 110)


def plot_generation_quality(rows: Sequence[Mapping[str, Any]], path: str | PathLike[str], *,
                            model: str = "model") -> Path:
    """``eval generation``'s two figures per domain, one bar per system: the base model's bits per byte of
    what each system wrote (left) and its distinct-4-gram ratio (right), each bar of a hypervocab system
    labelled with its ratio to the base model's and the worse-than-base thresholds drawn as dashes."""
    from .evaluation.quality import MAX_BPB_RATIO, MIN_DISTINCT_RATIO

    domains = list(dict.fromkeys(r["domain"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig = figure(figsize=(2.0 + 2.6 * len(domains), 7.0))
    width = 0.8 / max(len(systems), 1)
    panels = (("bits_per_byte", "bits_per_byte_ratio", "bits/byte under the base model (lower is better)",
               MAX_BPB_RATIO), ("distinct_4", "distinct_ratio", "distinct-4-gram ratio (higher is better)",
                                MIN_DISTINCT_RATIO))
    for k, (key, ratio, label, limit) in enumerate(panels):
        ax = fig.add_subplot(2, 1, k + 1)
        for i, system in enumerate(systems):
            found = [next((r for r in rows if r["domain"] == d and r["system"] == system), None) for d in domains]
            values = [(r[key] or 0.0) if r is not None else 0.0 for r in found]
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(domains))]
            bars = ax.bar(xs, values, width, label=system)
            ax.bar_label(bars, labels=["" if r is None or r[ratio] is None else f"{r[ratio]:.2f}x" for r in found],
                         fontsize=7)
            if system.startswith("base"):  # the threshold its hypervocab bars are held to, over them
                judged = next((j for j in range(i + 1, len(systems)) if systems[j].startswith("base")), len(systems))
                for x, v in zip(xs, values):
                    ax.hlines(v * limit, x - width / 2, x + width * (judged - i - 0.5), colors="grey",
                              linestyles="dashed", linewidth=0.8)
        ax.set_xticks(range(len(domains)), domains)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if k == 0:
            ax.set_title(f"{model}: what it writes (labels: vs base; dashes: {MAX_BPB_RATIO}x / "
                         f"{MIN_DISTINCT_RATIO}x the base model)", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, 110)


def plot_run(run_dir: str | PathLike[str], out: str | PathLike[str] | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` (a training run's log) into ``out`` (default ``run_dir/metrics.png``):
    one panel per group of :data:`RUN_PANELS` the run logged, against the step; returns the PNG's path."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no metrics.jsonl: give the output_dir of a training run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{str(path)!r} is empty: the run has not logged a step yet")
    panels = [(keys, title) for keys, title in RUN_PANELS if any(k in r for r in rows for k in keys)]
    fig = figure(figsize=(8, 2.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (keys, title) in zip(axes[:, 0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, label=k)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, run_dir / "metrics.png" if out is None else out, 110)
