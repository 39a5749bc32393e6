#!/usr/bin/env python
"""Uptraining speed: base tokens per second of hypervocab training vs plain causal-LM LoRA training.

Same base model (SmolLM2-135M-Instruct), same LoRA (r=16 on every attention and
MLP projection), same optimiser (AdamW), same batch of ``--batch`` windows of
``--window`` positions, on the same real text (the largest standard-library
modules, tokenized with SmolLM2).  The plain run reads windows of ``--window``
base tokens; the hypervocab run reads windows of ``--window`` codes
(``LZWCodec.encode_windows``, C=2048, M=4), which cover more base tokens, and
pays for the hyper-encoders and the reconstruction loss (weight 0.1): a step of
the hypervocab trainer (``hypervocab.training.trainer``) exactly.

Timed: whole optimiser steps (forward, backward, AdamW), the two runs taking
turns step by step after one warm-up step each; the median step time gives base
tokens per second.

    python benchmarks/training_speed.py                # about 5 minutes on 2 cores
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=512, help="positions per window (default 512)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each run (default 6)")
    p.add_argument("--quick", action="store_true", help="a smoke run (small windows, 2 steps), nothing written")
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.batch, args.steps = 128, 2, 2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assets import smollm2_model_dir
    from hypervocab import HyperConfig, HyperModel
    from hypervocab.training.config import TrainConfig
    from hypervocab.training.trainer import NextHyperHead, ReconstructionHead, _micro_step

    path = str(smollm2_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora).train()
    hyper = HyperModel.from_base(AutoModelForCausalLM.from_pretrained(path), tok,
                                 HyperConfig(max_codebook_size=2048, max_subtokens=4))
    hyper.add_lora(LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    hyper.train()
    D = hyper.embedding.base.weight.shape[1]
    aux = torch.nn.ModuleDict({"recon": ReconstructionHead(D, 4), "next_hyper": NextHyperHead(D)})
    cfg = TrainConfig(base_model=path, data=[path], output_dir="unused", window=args.window, batch_size=args.batch)
    L, B = args.window, args.batch
    need = (args.steps + 1) * B * L * 4 // 2
    docs = stdlib_ids(tok, need)
    flat = np.concatenate([np.asarray(d + [tok.eos_token_id]) for d in docs])
    plain_windows = [flat[i: i + L] for i in range(0, len(flat) - L, L)]
    hyper_windows = []
    for d in docs:
        for w in hyper.codec.encode_windows(d + [tok.eos_token_id], L):
            if len(w.codes) == L:
                hyper_windows.append((w.codes, w.stop - w.start))
    opt_p = torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=1e-4)
    opt_h = torch.optim.AdamW([q for q in hyper.parameters() if q.requires_grad] + list(aux.parameters()), lr=1e-4)

    def step_plain(i: int) -> int:
        ids = torch.as_tensor(np.stack(plain_windows[i * B: (i + 1) * B]))
        plain(input_ids=ids, labels=ids).loss.backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=True)
        return int(ids.numel())

    def step_hyper(i: int) -> int:
        chunk = hyper_windows[i * B: (i + 1) * B]
        ids = torch.as_tensor(np.stack([c for c, _ in chunk]))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss, _ = _micro_step(hyper, aux, cfg, batch, torch.Generator().manual_seed(i), torch.device("cpu"))
        loss.backward()
        opt_h.step()
        opt_h.zero_grad(set_to_none=True)
        return sum(n for _, n in chunk)

    times: dict[str, list[float]] = {"plain": [], "hyper": []}
    tokens: dict[str, list[int]] = {"plain": [], "hyper": []}
    for i in range(args.steps + 1):
        for name, fn in (("plain", step_plain), ("hyper", step_hyper)) if i % 2 == 0 else (
                ("hyper", step_hyper), ("plain", step_plain)):
            t0 = time.perf_counter()
            n = fn(i)
            dt = time.perf_counter() - t0
            print(f"  step {i} {name}: {dt:.2f} s, {n} base tokens", file=sys.stderr, flush=True)
            if i:
                times[name].append(dt)
                tokens[name].append(n)
    tp = statistics.median(times["plain"])
    th = statistics.median(times["hyper"])
    np_tok, nh_tok = statistics.mean(tokens["plain"]), statistics.mean(tokens["hyper"])
    rate_p, rate_h = np_tok / tp, nh_tok / th
    lines = [f"# training_speed ({torch.get_num_threads()} threads, torch {torch.__version__})", "",
             f"SmolLM2-135M-Instruct, LoRA r=16 on {', '.join(TARGETS)}; batch {B} x {L} positions; stdlib Python; "
             f"median of {args.steps} steps, the runs taking turns.", "",
             "| run | base tokens per step | step time | base tokens/s |", "| --- | ---: | ---: | ---: |",
             f"| plain LoRA causal LM | {np_tok:.0f} | {tp:.2f} s | {rate_p:.0f} |",
             f"| hypervocab uptraining (C=2048, M=4, recon 0.1) | {nh_tok:.0f} | {th:.2f} s | {rate_h:.0f} |", "",
             f"hypervocab / plain: **{rate_h / rate_p:.2f}x** base tokens per second (goal >= 1.2: "
             f"{'PASS' if rate_h / rate_p >= 1.2 else 'FAIL'}); each window covers {nh_tok / np_tok:.2f}x the base "
             f"tokens and a step costs {th / tp:.2f}x."]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "training_speed.md").write_text(text + "\n")
        (RESULTS / "training_speed.json").write_text(json.dumps(
            {"args": vars(args), "times": times, "tokens": tokens, "ratio": rate_h / rate_p}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
