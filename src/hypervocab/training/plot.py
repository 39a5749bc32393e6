"""``hypervocab plot RUN_DIR``: the curves of a training run's ``metrics.jsonl``, drawn to PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

__all__ = ["plot_run"]

# (metric, panel title): the panels drawn when the run logged them
PANELS = [
    (("lm_loss", "eval_loss"), "next-code loss"),
    (("recon_loss", "next_hyper_loss"), "auxiliary losses"),
    (("codes_per_token", "hyper_target_share", "hyper_accuracy"), "compression and hypertokens"),
    (("lr", "encoder_lr"), "learning rates"),
    (("base_tokens_per_s",), "base tokens per second"),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` into ``out`` (default ``run_dir/metrics.png``); returns the PNG's path."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no metrics.jsonl: give the output_dir of a training run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{str(path)!r} is empty: the run has not logged a step yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'hypervocab[train]'") from None
    panels = [(keys, title) for keys, title in PANELS if any(k in r for r in rows for k in keys)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
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
    out = Path(out) if out is not None else run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
