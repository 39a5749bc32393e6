#!/usr/bin/env python
"""The ablations of issue 25: arms of the same budget of base tokens, measured on the held-out files.

Every arm of ``ablation.yaml`` trains SmolLM2-135M-Instruct from the same start (fresh hyper-encoders and LoRA),
reads the same data in the same order (same seed) and stops at the same number of base tokens: its step count is
computed from the windows it will read, so an arm whose codec packs fewer base tokens per code (``max_subtokens``
2) takes more steps.  Each arm differs from the base recipe only in the fields it lists.

A run is resumable and may be split into parts: ``--max-minutes`` stops the arm in training after that long (it
saves a checkpoint), and the next call continues it.  A finished arm is measured once, on the held-out files of
``prepare_data.py``, and the figures are kept beside it:

* held-out bits per byte, hypervocab / base, per domain and in total, and the input codes per base token;
* ``eval generation``'s figures: greedy continuations of held-out python, docs and po prompts and of chat
  questions, judged by the base model (bits per byte of the written text against the base model's own, the
  distinct-4-gram ratio, base tokens per written code).

Then ``ablation.md``, ``ablation.json`` and ``ablation.png`` (the bits-per-byte ratio and the written text's
quality against codes per token, for every arm measured so far) go to ``--report``.

    nice -n 19 python recipes/smollm2-135m/ablation.py --arms no-distill --max-minutes 120
    python recipes/smollm2-135m/ablation.py --report-only          # the tables of what is measured
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HELDOUT = ROOT / ".cache" / "smollm2-data" / "heldout"
os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))


def read_plan(path: Path) -> dict[str, Any]:
    """``ablation.yaml``, checked: the base recipe, the budget, where runs go, and the arms."""
    plan = yaml.safe_load(path.read_text())
    if not isinstance(plan, dict) or not isinstance(plan.get("arms"), dict) or not plan["arms"]:
        raise SystemExit(f"{path}: needs base, budget_base_tokens, output_dir and a non-empty arms mapping")
    budget = plan.get("budget_base_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise SystemExit(f"{path}: budget_base_tokens must be an int >= 1, got {budget!r}")
    plan["base"] = (path.parent / plan["base"]).resolve()
    plan["output_dir"] = (ROOT / plan["output_dir"]).resolve()
    return plan


def arm_config(plan: dict[str, Any], name: str, steps: int | None, **extra: Any) -> Any:
    """The arm's TrainConfig (``steps``: its max_steps; ``None``: the base recipe's, before they are known)."""
    from hypervocab.training import TrainConfig

    overrides = dict(plan["arms"][name] or {})
    overrides.update(output_dir=str(plan["output_dir"] / name), cache_dir=str(plan["output_dir"] / "data"),
                     eval_every=0, save_every=20, **extra)
    if steps is not None:
        overrides["max_steps"] = steps
    return TrainConfig.from_file(plan["base"], **overrides)


def steps_for_budget(config: Any, budget: int) -> tuple[int, int]:
    """The fewest optimiser steps whose windows (in the trainer's own order) hold ``budget`` base tokens, and
    the base tokens they hold."""
    import numpy as np

    from hypervocab.tokenizer import HyperTokenizer, load_tokenizer
    from hypervocab.training.data import MixtureOrder, base_tokens_read, build_windows

    tok = load_tokenizer(config.base_model)
    codec = HyperTokenizer.from_base(tok, config.hyper).codec
    train_set, _ = build_windows(config.data, tok, codec, window=config.window, eval_fraction=config.eval_fraction,
                                 seed=config.seed, cache_dir=config.cache_dir, num_workers=config.num_workers,
                                 progress=sys.stderr.isatty())
    order = MixtureOrder(train_set, [d.weight for d in config.data], config.seed)
    per_step = config.batch_size * config.grad_accum
    steps = max(1, math.ceil(2 * budget / max(1.0, float(train_set.base_tokens.mean())) / per_step))
    while True:  # a generous guess at the steps needed, then the exact count
        tokens = base_tokens_read(train_set, order, draws_per_step=per_step, steps=steps)
        if tokens[-1] >= budget:
            n = int(np.searchsorted(tokens, budget)) + 1
            return n, int(tokens[n - 1])
        steps *= 2


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def trained_steps(run: Path) -> int:
    """The last step an arm logged (the trainer logs the last step of a run or part)."""
    return max((r["step"] for r in _metrics(run) if "lm_loss" in r), default=0)


def run_facts(run: Path, steps: int, tokens: int) -> dict[str, Any]:
    evals = [r["eval_loss"] for r in _metrics(run) if "eval_loss" in r]
    return {"steps": steps, "base_tokens_seen": tokens, "eval_loss": evals[-1] if evals else None}


def measure(run: Path, base_model: str, *, max_bytes: int, files: int, places: int, chat: int,
            new_tokens: int) -> dict[str, Any]:
    """The held-out figures of one trained arm (module docstring)."""
    import torch
    from evaluate_run import DOMAINS, heldout_texts

    from hypervocab.evaluation.likelihood import bits_per_byte_report
    from hypervocab.evaluation.quality import CHAT_QUESTIONS, chat_prompts, generation_report, text_prompts
    from hypervocab.loading import load

    t0 = time.perf_counter()
    model, htok = load(run, base_model=base_model, device="cpu", dtype="float32")
    tok = htok.tokenizer
    with torch.no_grad():
        bpb = bits_per_byte_report(model, tok, heldout_texts(HELDOUT, max_bytes), window=1024, stride=512)
    prompts = []
    for domain in ("python", "docs", "po"):
        paths = sorted((HELDOUT / domain).rglob(DOMAINS[domain]))[:files]
        prompts += text_prompts(domain, [(str(p), p.read_text(encoding="utf-8")) for p in paths], tok,
                                places=places, prompt_tokens=256)
    prompts += chat_prompts(tok, CHAT_QUESTIONS[:chat])
    written = generation_report(model, tok, prompts, max_new_tokens=new_tokens, lookup=False,
                                progress=sys.stderr.isatty())
    return {"bpb": bpb, "generation": [r.to_dict() for r in written.rows],
            "texts": [o.to_dict() for o in written.outputs], "seconds": time.perf_counter() - t0}


def _row(rows: list[dict[str, Any]], domain: str, system: str = "hypervocab") -> dict[str, Any] | None:
    return next((r for r in rows if r["domain"] == domain and r["system"] == system), None)


def summary(name: str, facts: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    """One arm's line of the table."""
    total = next(r for r in m["bpb"] if r["domain"] == "total")
    gen = m["generation"]
    domains = [r["domain"] for r in gen if r["system"] == "hypervocab" and r["domain"] != "total"]
    written = {d: _row(gen, d) for d in domains}
    ratios = [r["bits_per_byte_ratio"] for r in written.values() if r and r["bits_per_byte_ratio"] is not None]
    tot = _row(gen, "total")
    return {"arm": name, "steps": facts["steps"], "base_tokens": facts["base_tokens_seen"],
            "bpb_ratio": {r["domain"]: r["ratio"] for r in m["bpb"]},
            "codes_per_token": total["codes"] / total["tokens"],
            "written_bpb_ratio": {d: (r or {}).get("bits_per_byte_ratio") for d, r in written.items()},
            "written_bpb_ratio_total": tot and tot["bits_per_byte_ratio"],
            "written_worst": max(ratios) if ratios else None,
            "distinct_ratio": tot and tot["distinct_ratio"],
            "written_tokens_per_code": {d: (r or {}).get("base_tokens_per_code") for d, r in written.items()},
            "eval_loss": facts["eval_loss"]}


def markdown(plan: dict[str, Any], rows: list[dict[str, Any]], pending: list[str]) -> str:
    if not rows:
        return "No arm is measured yet.\n"
    bpb_domains = list(rows[0]["bpb_ratio"])
    gen_domains = list(rows[0]["written_bpb_ratio"])
    lines = [f"Every arm: SmolLM2-135M-Instruct from the same start, the same data in the same order, "
             f"{plan['budget_base_tokens']:,} base tokens (`recipes/smollm2-135m/ablation.yaml`; the base recipe is "
             f"`{plan['base'].name}`). Held-out files of `prepare_data.py`. *Read*: bits per byte of held-out text, "
             "hypervocab / base. *Written*: the base model's bits per byte of what the arm wrote (greedy, 64 base "
             "tokens), over the base model's own; goal ≤ 1.25 on every domain, distinct-4 ≥ 0.9, ≥ 1.3 base tokens "
             "per code on python.", "",
             "| arm | steps | base tokens | " + " | ".join(f"read {d}" for d in bpb_domains)
             + " | input codes/token | " + " | ".join(f"written {d}" for d in gen_domains)
             + " | written total | distinct-4 | tokens/code python | eval loss |",
             "| --- |" + " ---: |" * (len(bpb_domains) + len(gen_domains) + 7)]

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    for r in rows:
        lines.append(f"| {r['arm']} | {r['steps']} | {r['base_tokens']:,} | "
                     + " | ".join(f(r["bpb_ratio"][d]) for d in bpb_domains) + f" | {f(r['codes_per_token'])} | "
                     + " | ".join(f(r["written_bpb_ratio"].get(d), ".2f") for d in gen_domains)
                     + f" | {f(r['written_bpb_ratio_total'], '.2f')} | {f(r['distinct_ratio'], '.2f')} | "
                     f"{f(r['written_tokens_per_code'].get('python'), '.2f')} | {f(r['eval_loss'])} |")
    if pending:
        lines += ["", "Not yet trained to the budget: " + ", ".join(pending) + "."]
    lines += ["", "![ablation](ablation.png)"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from hypervocab.plots import figure

    fig = figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for r in rows:
        left.scatter(r["codes_per_token"], r["bpb_ratio"]["total"])
        left.annotate(r["arm"], (r["codes_per_token"], r["bpb_ratio"]["total"]), fontsize=8)
        if r["written_bpb_ratio_total"] is not None:
            right.scatter(r["codes_per_token"], r["written_bpb_ratio_total"])
            right.annotate(r["arm"], (r["codes_per_token"], r["written_bpb_ratio_total"]), fontsize=8)
    left.set(xlabel="input codes per base token (lower: more compression)",
             ylabel="held-out bits per byte / base", title="reading")
    right.axhline(1.25, color="grey", lw=0.8, ls="--")
    right.set(xlabel="input codes per base token", ylabel="written text: base-scored bits per byte / base's own",
              title="writing (goal: under the dashed line)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=HERE / "ablation.yaml", help="the arms (default: %(default)s)")
    p.add_argument("--arms", default=None, help="comma-separated arms to train and measure, in this order "
                                                "(default: every arm of the plan)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes in all (the arm in training saves; call again)")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the tables (and --with-shipped)")
    p.add_argument("--with-shipped", action="store_true",
                   help="add the shipped model (measured once the same way, kept with the runs) as a reference row")
    p.add_argument("--max-bytes", type=int, default=8000, help="held-out bytes per domain read (default 8000)")
    p.add_argument("--files", type=int, default=2, help="held-out files per domain written from (default 2)")
    p.add_argument("--places", type=int, default=3, help="prompts cut from each file (default 3)")
    p.add_argument("--chat", type=int, default=3, help="chat questions (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="base tokens written per prompt (default 64)")
    p.add_argument("--report", type=Path, default=ROOT / "reports" / "smollm2-135m" / "ablation",
                   help="where ablation.md/.json/.png go (default: %(default)s)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    plan = read_plan(args.plan)
    names = list(plan["arms"]) if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in plan["arms"]]
    if unknown:
        raise SystemExit(f"--arms: {', '.join(unknown)} not in {args.plan} (arms: {', '.join(plan['arms'])})")
    deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
    if not args.report_only:
        from hypervocab.training import train

        for name in names:
            run = plan["output_dir"] / name
            probe = arm_config(plan, name, None)
            steps, tokens = steps_for_budget(probe, plan["budget_base_tokens"])
            if trained_steps(run) < steps or not (run / "hypervocab_config.json").is_file():
                left = None if deadline is None else (deadline - time.time()) / 60
                if left is not None and left < 5:
                    print(f"ablation: no time left for {name}", file=sys.stderr)
                    break
                print(f"ablation: {name}: {steps} steps ({tokens:,} base tokens)", file=sys.stderr, flush=True)
                train(arm_config(plan, name, steps, max_minutes=left))
                if trained_steps(run) < steps:
                    print(f"ablation: {name} stopped at step {trained_steps(run)} of {steps}; call again to "
                          "continue", file=sys.stderr)
                    break
            out = run / f"ablation-eval-{args.max_bytes}-{args.files}x{args.places}-{args.chat}-{args.new_tokens}.json"
            if not out.is_file():
                m = measure(run, probe.base_model, max_bytes=args.max_bytes, files=args.files, places=args.places,
                            chat=args.chat, new_tokens=args.new_tokens)
                out.write_text(json.dumps({"facts": run_facts(run, steps, tokens), **m}) + "\n")
    rows, pending = [], []
    if args.with_shipped:
        from hypervocab.pretrained import shipped_dir

        path = plan["output_dir"] / f"shipped-eval-{args.max_bytes}-{args.files}x{args.places}-{args.chat}-" \
                                    f"{args.new_tokens}.json"
        if not path.is_file():
            probe = arm_config(plan, next(iter(plan["arms"])), None)
            path.write_text(json.dumps(measure(shipped_dir(), probe.base_model, max_bytes=args.max_bytes,
                                               files=args.files, places=args.places, chat=args.chat,
                                               new_tokens=args.new_tokens)) + "\n")
        facts = json.loads((shipped_dir() / "training_facts.json").read_text())
        evals = facts.get("eval_loss") or [[None, None]]
        rows.append(summary("shipped (reference)", {"steps": facts["steps"], "base_tokens_seen":
                                                    facts["base_tokens_seen"], "eval_loss": evals[-1][1]},
                            json.loads(path.read_text())))
    for name in plan["arms"]:
        run = plan["output_dir"] / name
        evals = sorted(run.glob(f"ablation-eval-{args.max_bytes}-{args.files}x{args.places}-{args.chat}-"
                                f"{args.new_tokens}.json")) if run.is_dir() else []
        if not evals:
            pending.append(name)
            continue
        measured = json.loads(evals[-1].read_text())
        rows.append(summary(name, measured["facts"], measured))
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "ablation.json").write_text(json.dumps({"plan": {k: str(v) if isinstance(v, Path) else v
                                                                    for k, v in plan.items()},
                                                           "arms": rows, "pending": pending}, indent=1) + "\n")
    if rows:
        plot(rows, args.report / "ablation.png")
    text = markdown(plan, rows, pending)
    (args.report / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
