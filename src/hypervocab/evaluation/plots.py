"""PNG charts of evaluation results (matplotlib, imported only when a chart is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_compression", "plot_bits_per_byte"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("charts need matplotlib: pip install 'hypervocab[train]'") from None
    return plt


def _bars(ax: Any, groups: Sequence[str], series: dict[str, Sequence[float]], fmt: str) -> None:
    n = len(series)
    width = 0.8 / max(n, 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.legend(fontsize=8)


def plot_compression(rows: Sequence[dict[str, Any]], path: str | Path, *,
                     generated: Sequence[dict[str, Any]] = ()) -> Path:
    """Codes per base token by domain (one bar per tokenizer); with ``generated``, a second panel of
    base tokens per emitted code.  Rows are the dicts of ``eval compression``'s JSON."""
    plt = _pyplot()
    panels = 2 if generated else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
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
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bits_per_byte(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Bits per byte of the base model and the hypervocab model side by side, by domain."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    domains = [r["domain"] for r in rows]
    _bars(ax, domains, {"base model": [r["base_bits_per_byte"] for r in rows],
                        "hypervocab": [r["hypervocab_bits_per_byte"] for r in rows]}, "{:.3f}")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("held-out bits per byte, same bytes")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
