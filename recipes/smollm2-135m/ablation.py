#!/usr/bin/env python
"""Ablation of the first-token distillation: the same run with and without it, on the same tokens.

Every arm starts from the same SmolLM2-135M-Instruct with fresh hyper-encoders and LoRA, reads exactly the
same micro-batches (same seed, same data, same steps) and differs only in ``distill_weight``.  Each trained
arm, and the untrained start, is then measured by ``evaluate_run.py`` on the held-out files: bits per byte
against the base model, the first-token KL from the base model, and the distinct 4-gram ratio of greedy
continuations of the demo's prompts.  Writes ``ablation.md``, ``ablation.json`` and ``ablation.png``.

    python recipes/smollm2-135m/ablation.py                          # CPU scale: about 1.5 hours on 2 cores
    python recipes/smollm2-135m/ablation.py --steps 200              # continues the same runs to 200 steps
    python recipes/smollm2-135m/ablation.py --steps 400 --batch 32 --window 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))

from evaluate_run import evaluate  # noqa: E402


def _arms(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        name, _, weight = part.partition(":")
        out[name] = float(weight)
    return out


def _untrained(run: Path, base_model: str, hyper: dict[str, Any]) -> Path:
    """The start every arm shares: fresh encoders, no adapter."""
    from transformers import AutoModelForCausalLM

    from hypervocab import HyperConfig, HyperModel
    from hypervocab.tokenizer import load_tokenizer

    if not (run / "hypervocab_config.json").is_file():
        tok = load_tokenizer(base_model)
        model = HyperModel.from_base(AutoModelForCausalLM.from_pretrained(base_model), tok, HyperConfig(**hyper))
        model.save_pretrained(run)
    return run


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    from hypervocab.plots import figure

    fig = figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    names = list(results)
    domains = [r["domain"] for r in next(iter(results.values()))["bpb"]]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        axes[0].bar([d + i * width for d in range(len(domains))], [r["ratio"] for r in results[name]["bpb"]], width,
                    label=name)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_xticks([d + width * (len(names) - 1) / 2 for d in range(len(domains))], domains)
    axes[0].set_title("held-out bits per byte / base (lower is better)")
    axes[0].legend()
    axes[1].bar(names, [results[n]["first_token_kl"] for n in names], color="tab:orange")
    axes[1].set_title("first-token KL from the base model (nats/code)")
    prompts = [s["prompt"].split(" (")[0] for s in next(iter(results.values()))["samples"]]
    for i, name in enumerate(names):
        axes[2].bar([p + i * width for p in range(len(prompts))],
                    [s["hypervocab_distinct4"] for s in results[name]["samples"]], width, label=name)
    axes[2].plot([p + width * (len(names) - 1) / 2 for p in range(len(prompts))],
                 [s["base_distinct4"] for s in next(iter(results.values()))["samples"]], "k_", ms=30, mew=2,
                 label="base model")
    axes[2].set_xticks([p + width * (len(names) - 1) / 2 for p in range(len(prompts))], prompts, fontsize=8)
    axes[2].set_title("distinct 4-grams of greedy output")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=HERE / "train.yaml", help="the base training config")
    p.add_argument("--arms", default="no-distill:0,distill:1", help="name:distill_weight,... (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per arm (default 60)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--window", type=int, default=256, help="codes per window (default 256)")
    p.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (default 2e-4)")
    p.add_argument("--encoder-lr", type=float, default=3e-4, help="encoder learning rate (default 3e-4)")
    p.add_argument("--eval-bytes", type=int, default=6000, help="held-out bytes per domain (default 6000)")
    p.add_argument("--recon-entries", type=int, default=256, help="reconstruction entries per micro-batch (256)")
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "ablation", help="runs and results")
    p.add_argument("--report", type=Path, default=ROOT / "reports" / "smollm2-135m",
                   help="where ablation.md/.json/.png go")
    args = p.parse_args(argv)

    from hypervocab.training import TrainConfig, train

    base = TrainConfig.from_file(args.config)
    results: dict[str, dict[str, Any]] = {}
    hyper = base.to_dict()["hyper"]

    def measured(run: Path, steps: int) -> dict[str, Any]:
        """evaluate_run's figures for ``run`` at ``steps``, kept beside it (a longer run is measured again)."""
        path = run / f"ablation-eval-{steps}-{args.eval_bytes}.json"
        if not path.is_file():
            path.write_text(json.dumps(evaluate(run, base_model=base.base_model, max_bytes=args.eval_bytes)) + "\n")
        return json.loads(path.read_text())

    results["untrained"] = measured(_untrained(args.out / "untrained", base.base_model, hyper), 0)
    curves = {}
    for name, weight in _arms(args.arms).items():
        run = args.out / name
        config = TrainConfig.from_file(args.config, output_dir=str(run), max_steps=args.steps, batch_size=args.batch,
                                       window=args.window, lr=args.lr, encoder_lr=args.encoder_lr, warmup_steps=10,
                                       distill_weight=weight, save_every=20, eval_every=0, log_every=5,
                                       recon_entries=args.recon_entries, cache_dir=str(args.out / "data"),
                                       lora={"r": 16, "alpha": 32})
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if line] if (run / "metrics.jsonl").is_file() else []
        done = max((r["step"] for r in logged if "lm_loss" in r), default=0)
        if done < args.steps or not (run / "hypervocab_config.json").is_file():
            train(config)  # resumes from the newest checkpoint: a longer --steps continues a shorter ablation
        results[name] = measured(run, args.steps)
        curves[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'samples'})}", file=sys.stderr)
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "ablation.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results, "curves": curves}, indent=1) + "\n")
    _plot(results, args.report / "ablation.png")
    lines = [f"Same start, same {args.steps} steps of {args.batch} x {args.window} codes, same seed; "
             f"LoRA r=16, lr {args.lr}, encoder lr {args.encoder_lr}. Held-out: {args.eval_bytes:,} bytes per domain.",
             "", "| arm | " + " | ".join(f"{r['domain']} bpb ratio" for r in results["untrained"]["bpb"])
             + " | first-token KL | distinct-4 code / chat / summary | final lm_loss | final recon_loss |",
             "| --- |" + " ---: |" * (len(results["untrained"]["bpb"]) + 4)]
    base_d = " / ".join(f"{s['base_distinct4']:.2f}" for s in results["untrained"]["samples"])
    for name, r in results.items():
        last = [c for c in curves.get(name, []) if "lm_loss" in c]
        tail = (f"{last[-1]['lm_loss']:.3f} | {last[-1].get('recon_loss', float('nan')):.3f}" if last else "- | -")
        lines.append(f"| {name} | " + " | ".join(f"{b['ratio']:.3f}" for b in r["bpb"])
                     + f" | {r['first_token_kl']:.3f} | "
                     + " / ".join(f"{s['hypervocab_distinct4']:.2f}" for s in r["samples"]) + f" | {tail} |")
    lines += ["", f"The base model's own distinct-4 on the same prompts: {base_d}.", "",
              "![ablation](ablation.png)"]
    (args.report / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
