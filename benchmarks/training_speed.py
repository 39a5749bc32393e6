#!/usr/bin/env python
"""Uptraining speed: base tokens per second of hypervocab training vs plain causal-LM LoRA training.

Same base model (SmolLM2-135M-Instruct, or its architecture with random weights: the speed is the same),
same LoRA (r=16 on every attention and MLP projection), same optimiser (AdamW), same precision, same batch
of ``--batch`` windows of ``--window`` positions, on the same real text (the largest standard-library
modules, tokenized with SmolLM2), on one ``--device``.

* plain: a PEFT model reading windows of ``--window`` base tokens, Hugging Face's own loss.
* hypervocab: the trainer's own step (``hypervocab.training``: micro-batches made ahead by loader
  processes, the objective with the distillation teacher and the reconstruction loss, chunked scoring),
  reading windows of ``--window`` codes (C=1024, M=4), which cover more base tokens.

Timed: whole optimiser steps after two warm-up steps, in blocks of ``--steps`` taking turns, the device
synchronised only at the ends of a block.  Reported: base tokens per second (median of the blocks), the
ratio hypervocab / plain, and the model FLOPs utilisation: the FLOPs a step computes (4 x parameters per
trained position, forward and backward, the frozen base weights getting no weight gradients; the attention's
12 x layers x width x context; 2 x parameters per base token the teacher reads) over the step time, against
the peak a large matrix product reaches on this device in the same precision (the best of a few).

    python benchmarks/training_speed.py                                  # CPU, about 5 minutes on 2 cores
    python benchmarks/training_speed.py --device cuda --batch 32 --window 1024 --compile
    python benchmarks/training_speed.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stdlib_ids(tok, n_tokens: int) -> list[list[int]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for f in sorted(lib.glob("*.py"), key=lambda p: -p.stat().st_size):
        ids = tok(f.read_text(encoding="utf-8"))["input_ids"]
        docs.append(ids)
        total += len(ids)
        if total >= n_tokens:
            return docs
    return docs


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on ``device`` in ``dtype`` (the best of 5 after a warm-up: a peak,
    and on a shared machine the median of a few runs moves with the neighbours' load)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(6):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(path: str, random_init: bool, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_init:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute precision (auto: what training picks, bfloat16 on a GPU or a CPU with AMX or "
                        "AVX512-BF16, else float32); trained weights stay float32")
    p.add_argument("--window", type=int, default=512, help="positions per window (default 512)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed block (default 3)")
    p.add_argument("--blocks", type=int, default=2, help="timed blocks of each run (default 2)")
    p.add_argument("--distill-weight", type=float, default=1.0, help="hypervocab's distillation weight (default 1)")
    p.add_argument("--phrase-weight", type=float, default=0.0,
                   help="hypervocab's phrase-ceiling weight (default 0: off)")
    p.add_argument("--distill-top-k", type=int, default=64,
                   help="teacher tokens kept by the distillation, 0 for the whole distribution (default 64)")
    p.add_argument("--distill-fraction", type=float, default=0.5,
                   help="share of each micro-batch's windows the teacher reads (default 0.5, the trainer's)")
    p.add_argument("--recon-entries", type=int, default=1024, help="entries the reconstruction loss reads (1024)")
    p.add_argument("--recon-negatives", type=int, default=4096,
                   help="sampled ids the reconstruction scores against, 0 for the whole vocabulary (default 4096)")
    p.add_argument("--unfused", action="store_true",
                   help="score through autograd (hypervocab.loss.score_chunks) instead of the fused scorer")
    p.add_argument("--loader-workers", type=int, default=2, help="hypervocab's loader processes (default 2)")
    p.add_argument("--compile", action="store_true", help="compile each decoder block (both runs)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights from the folder's config.json (no weights needed; same speed)")
    p.add_argument("--runs", default="plain,hyper", help="which runs to time (default: plain,hyper)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="a smoke run (small windows, 1 step per block), nothing kept")
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.batch, args.steps, args.blocks = 128, 2, 1, 1
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    from peft import LoraConfig, get_peft_model

    from hypervocab.loading import training_dtype

    dtype, why = training_dtype(args.dtype, device)
    print(f"computing in {str(dtype).replace('torch.', '')}: {why}", file=sys.stderr)

    from hypervocab import HyperConfig, HyperModel
    from hypervocab.tokenizer import load_tokenizer
    from hypervocab.training.batches import BatchMaker, micro_batches
    from hypervocab.training.config import TrainConfig
    from hypervocab.training.data import MixtureOrder, WindowSet
    from hypervocab.training.objective import Objective
    from hypervocab.training.trainer import compile_blocks

    if args.model is None:
        from assets import smollm2_model_dir

        args.model = str(smollm2_model_dir())
    tok = load_tokenizer(args.model)
    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    plain = get_peft_model(_load(args.model, args.random_init, dtype, device), LoraConfig(**lora)).train()
    hyper = HyperModel.from_base(_load(args.model, args.random_init, dtype, device), tok,
                                 HyperConfig(max_codebook_size=1024, max_subtokens=4))
    hyper.add_lora(LoraConfig(**lora))
    for model in (plain, hyper):
        for q in model.parameters():  # what the trainer does: trained weights and optimiser state in float32
            if q.requires_grad:
                q.data = q.data.float()
    if args.compile:
        for model in (plain, hyper):
            compile_blocks(model)
    cfg = TrainConfig(base_model=args.model, data=[args.model], output_dir="unused", window=args.window,
                      batch_size=args.batch, distill_weight=args.distill_weight, distill_top_k=args.distill_top_k,
                      phrase_weight=args.phrase_weight,
                      distill_fraction=args.distill_fraction, recon_entries=args.recon_entries,
                      recon_negatives=args.recon_negatives)
    objective = Objective(hyper, cfg, None if dtype == torch.float32 else dtype).to(device).train()
    objective.fused_scoring = not args.unfused
    L, B = args.window, args.batch
    total_steps = 2 + args.steps * args.blocks
    docs = stdlib_ids(tok, total_steps * B * L * 2)
    flat = np.concatenate([np.asarray(d + [tok.eos_token_id]) for d in docs])
    plain_windows = [flat[i: i + L] for i in range(0, len(flat) - L, L)]
    codes, n_base = [], []
    for d in docs:
        for w in hyper.codec.encode_windows(d + [tok.eos_token_id], L):
            if len(w.codes) == L:
                codes.append(w.codes)
                n_base.append(w.stop - w.start)
    n = len(codes)
    windows = WindowSet(np.stack(codes), np.stack(codes), np.full(n, L), np.asarray(n_base), np.zeros(n, np.int64))
    maker = BatchMaker(hyper.codec, position_mode="base", exact=True, score_next_id=True,
                       recon_entries=args.recon_entries, recon_negatives=args.recon_negatives,
                       teacher=args.distill_weight > 0 or args.phrase_weight > 0,
                       distill_fraction=args.distill_fraction)
    batches = iter(micro_batches(windows, MixtureOrder(windows, [1.0], 0), maker, batch_size=B, grad_accum=1,
                                 world=1, rank=0, seed=0, start_step=0, max_steps=total_steps,
                                 workers=args.loader_workers, pin=device.type == "cuda"))
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    opt_p = torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-4, **opt_kw)
    opt_h = torch.optim.AdamW([q for q in objective.parameters() if q.requires_grad], lr=1e-4, **opt_kw)
    plain_batches = iter(torch.as_tensor(np.stack(plain_windows[i * B: (i + 1) * B])) for i in range(total_steps))
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None

    def step_plain() -> int:
        ids = next(plain_batches).to(device, non_blocking=True)
        if autocast is None:
            loss = plain(input_ids=ids, labels=ids).loss
        else:
            with autocast():
                loss = plain(input_ids=ids, labels=ids).loss
        loss.backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=True)
        return int(ids.numel())

    def step_hyper() -> int:
        batch = next(batches).to(device)
        loss, _ = objective(batch)
        loss.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)
        return batch.base_tokens

    runs = [(name, fn) for name, fn in (("plain", step_plain), ("hyper", step_hyper)) if name in args.runs.split(",")]
    if not runs:
        raise SystemExit(f"--runs must name plain and/or hyper, got {args.runs!r}")
    warmup = {}
    for name, fn in runs:  # warm-up (and compilation)
        t = time.perf_counter()
        for _ in range(2):
            fn()
        _sync(device)
        warmup[name] = time.perf_counter() - t
    rates: dict[str, list[float]] = {name: [] for name, _ in runs}
    per_step: dict[str, list[float]] = {name: [] for name, _ in runs}
    for block in range(args.blocks):
        for name, fn in runs if block % 2 == 0 else runs[::-1]:
            _sync(device)
            t = time.perf_counter()
            tokens = sum(fn() for _ in range(args.steps))
            _sync(device)
            dt = time.perf_counter() - t
            rates[name].append(tokens / dt)
            per_step[name].append(dt / args.steps)
            print(f"  block {block} {name}: {dt / args.steps:.3f} s/step, {tokens / dt:,.0f} base tokens/s",
                  file=sys.stderr, flush=True)
    params = sum(q.numel() for q in plain.get_base_model().parameters())
    mcfg = plain.get_base_model().config
    attn = 12 * mcfg.num_hidden_layers * mcfg.hidden_size * L  # per position, causal context ~ L
    peak = peak_flops(device, dtype)
    base_per_step = float(np.mean(n_base[: B])) * B
    # FLOPs the step computes: the base weights are frozen, so no weight gradients (forward 2N, backward 2N per
    # trained position), the attention's forward and backward, and the teacher's forward (2N per base token read)
    flops = {"plain": (4 * params + attn) * B * L,
             "hyper": (4 * params + attn) * B * L
             + (2 * params * base_per_step * args.distill_fraction
                if args.distill_weight > 0 or args.phrase_weight > 0 else 0)}
    tokens = {"plain": B * L, "hyper": base_per_step}
    distill = (f"distill {args.distill_weight:g} (top {args.distill_top_k or 'all'}, "
               f"{args.distill_fraction:g} of windows)" if args.distill_weight > 0 else "no distillation")
    if args.phrase_weight > 0:
        distill += f", phrase ceiling {args.phrase_weight:g}"
    names = {"plain": "plain LoRA causal LM",
             "hyper": f"hypervocab uptraining (C=1024, M=4, {distill}, recon 0.1 on {args.recon_entries} entries "
                      f"vs {args.recon_negatives or 'all'} sampled ids{', unfused scoring' if args.unfused else ''})"}
    figures = {"args": {k: str(v) for k, v in vars(args).items()}, "rates": rates, "step_seconds": per_step,
               "warmup_seconds": warmup, "peak_flops": peak, "base_tokens_per_s": {}, "mfu": {}}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    figures["device"] = where
    figures["dtype_reason"] = why
    lines = [f"# training_speed ({where}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}"
             f"{', compiled' if args.compile else ''})", "", f"Compute dtype: {why}.", "",
             f"SmolLM2-135M-Instruct{' (random weights)' if args.random_init else ''}, LoRA r=16 on "
             f"{', '.join(TARGETS)}; batch {B} x {L} positions; stdlib Python; median of {args.blocks} blocks of "
             f"{args.steps} steps, the runs taking turns; peak {peak / 1e12:.1f} TFLOP/s measured by a matrix product.",
             "", "| run | base tokens per step | step time | base tokens/s | MFU |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in rates:
        step_s = statistics.median(per_step[name])
        rate = statistics.median(rates[name])
        figures["base_tokens_per_s"][name] = rate
        figures["mfu"][name] = flops[name] / step_s / peak
        lines.append(f"| {names[name]} | {tokens[name]:.0f} | {step_s:.3f} s | {rate:,.0f} | "
                     f"{figures['mfu'][name]:.1%} |")
    if len(rates) == 2:
        ratio = figures["base_tokens_per_s"]["hyper"] / figures["base_tokens_per_s"]["plain"]
        figures["ratio"] = ratio
        cost = statistics.median(per_step["hyper"]) / statistics.median(per_step["plain"])
        lines += ["", f"hypervocab / plain: **{ratio:.2f}x** base tokens per second; each window covers "
                      f"{base_per_step / (B * L):.2f}x the base tokens and a step costs {cost:.2f}x."]
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.quick and args.json is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "" if device.type == "cpu" else f"_{device.type}"
        (RESULTS / f"training_speed{suffix}.md").write_text(text + "\n")
        (RESULTS / f"training_speed{suffix}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
