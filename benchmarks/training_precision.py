#!/usr/bin/env python
"""bfloat16 against float32 training: the same run twice, compared by held-out loss.

Two uptraining runs that differ only in ``dtype`` (same model, data, seed, schedule and batches): the
compute, and the frozen base weights, in bfloat16 in one, in float32 in the other; the trained weights and
AdamW's state are float32 in both.  Printed: the held-out next-code loss of each at every evaluation and
the ratio bfloat16 / float32 at the end (goal: within 2%).

The default model is a small random Llama over the real SmolLM2 tokenizer (the trainer's test model, wide
enough to learn): on a CPU without AMX or AVX512-BF16, bfloat16 matrix products are emulated and a 135M
model would take hours.  Where the hardware has them, give the real model with ``--model``.

    python benchmarks/training_precision.py                      # tiny Llama, 200 steps, about 10 minutes here
    python benchmarks/training_precision.py --model .cache/smollm2-135m-instruct --window 256 --batch 4
    python benchmarks/training_precision.py --steps 20 --quick   # a smoke run, nothing kept
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = ROOT / "benchmarks" / "results"


def tiny_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama of width 64 over the SmolLM2 vocabulary, weights of std 0.5 (so its frozen tied head
    spreads the logits and LoRA can lower the loss), saved with its tokenizer."""
    import torch
    import transformers

    from hypervocab.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(str(tokenizer_dir))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        initializer_range=0.5)).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    return folder


def stdlib_sample(folder: Path, n_files: int) -> Path:
    """The ``n_files`` first standard-library modules by name of 4-40 kB: a fixed, real, varied corpus."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    chosen = [p for p in sorted(lib.glob("*.py")) if 4_000 <= p.stat().st_size <= 40_000][:n_files]
    folder.mkdir(parents=True, exist_ok=True)
    for p in chosen:
        shutil.copy(p, folder / p.name)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model folder (default: a tiny random Llama, made here)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps of each run (default 200)")
    p.add_argument("--window", type=int, default=64, help="codes per window (default 64)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--files", type=int, default=60, help="standard-library modules read (default 60)")
    p.add_argument("--quick", action="store_true", help="nothing is written to benchmarks/results")
    args = p.parse_args(argv)

    from assets import smollm2_tokenizer_dir

    from hypervocab.training import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="hypervocab-precision-"))
    try:
        model = args.model or str(tiny_model(work / "model", smollm2_tokenizer_dir()))
        data = stdlib_sample(work / "data", args.files)
        curves, seconds = {}, {}
        for dtype in ("float32", "bfloat16"):
            out = work / dtype
            config = TrainConfig(
                base_model=model, data=[str(data)], output_dir=str(out), dtype=dtype, window=args.window,
                batch_size=args.batch, max_steps=args.steps, warmup_steps=max(1, args.steps // 20), lr=3e-3,
                encoder_lr=3e-3, eval_fraction=0.15, eval_every=max(1, args.steps // 4), eval_batches=4,
                save_every=0, log_every=max(1, args.steps // 20), loader_workers=0, seed=0,
                hyper={"max_codebook_size": 256, "max_subtokens": 4}, cache_dir=str(work / "cache"),
                lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]})
            t = time.perf_counter()
            train(config, progress=sys.stderr.isatty())
            seconds[dtype] = time.perf_counter() - t
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            curves[dtype] = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
        steps = sorted(curves["float32"])
        final = curves["bfloat16"][steps[-1]] / curves["float32"][steps[-1]]
        lines = [f"# training_precision ({Path(model).name if args.model else 'tiny random Llama, width 64'}, "
                 f"{args.steps} steps, batch {args.batch} x {args.window} codes, {args.files} stdlib modules)", "",
                 "| step | eval loss float32 | eval loss bfloat16 | bfloat16 / float32 |",
                 "| ---: | ---: | ---: | ---: |"]
        for s in steps:
            a, b = curves["float32"][s], curves["bfloat16"][s]
            lines.append(f"| {s} | {a:.4f} | {b:.4f} | {b / a:.4f} |")
        lines += ["", f"At step {steps[-1]}: bfloat16 / float32 = **{final:.4f}** (goal: within 2%, "
                      f"{'met' if abs(final - 1) <= 0.02 else 'NOT met'}); run times {seconds['float32']:.0f} s "
                      f"(float32) and {seconds['bfloat16']:.0f} s (bfloat16) on this machine."]
        text = "\n".join(lines)
        print(text)
        if not args.quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "training_precision.md").write_text(text + "\n")
            (RESULTS / "training_precision.json").write_text(json.dumps(
                {"curves": curves, "ratio": final, "seconds": seconds, "args": vars(args)}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
