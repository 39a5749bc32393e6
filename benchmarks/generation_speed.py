#!/usr/bin/env python
"""Generation speed of a HyperModel against its plain base model: stepping, prefill, free generation.

Every row uses the same SmolLM2-135M-Instruct weights and the same bytes.  Texts
are real Python files of the standard library (the largest ``*.py`` files,
sorted by size, one per batch row), cut to their first ``--prompt-tokens`` +
``--step-tokens`` SmolLM2 base tokens.  The hypervocab model
(``HyperConfig(max_codebook_size=2048, max_subtokens=4)``, encoders as
initialised: speed does not depend on training) reads the LZW compression of the
same base tokens; its prompt is the codes that cover the first
``--prompt-tokens`` base tokens.

Measured (``time.perf_counter``, torch CPU float32, medians over ``--repeats`` runs
after one warm-up; the two prefills take turns, and the two models' steps are
interleaved one by one, so that the machine's drift hits both alike):

1. teacher-forced stepping with the KV cache, one code per step, through the
   rest of the text (``model.generate(code, past=..., max_new_tokens=0)``) vs the
   base model stepping through its base tokens (``base(ids, past_key_values=...)``):
   the per-step time ratio (median step) and the time to get through the whole
   text, at batch 1 and ``--batch``;
2. prefill of the compressed prompt (``generate(..., max_new_tokens=0)``, decoder
   and encoders included) vs the base prompt (``base(ids, logits_to_keep=1)``);
3. free greedy generation of ``--free-tokens`` base tokens after the batch-1
   prompt, in base tokens per second (``base.generate`` vs ``model.generate`` with
   ``max_new_base_tokens``).  An untrained model rarely writes hypertokens, so
   this row shows the overhead; the gain needs an uptrained model.

Then a profile (cProfile) of ``--profile-steps`` generation steps says where a
step's time goes.  Results go to stdout and ``benchmarks/results/generation_speed.md`` / ``.json``.

    python benchmarks/generation_speed.py              # the full run (about 10 minutes on 2 cores)
    python benchmarks/generation_speed.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hypervocab.loading import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = ROOT / "benchmarks" / "results"


def build_models(model_dir: str, C: int, M: int) -> tuple[Any, Any, Any]:
    """(base tokenizer, plain base model, HyperModel over its own copy of the base), on the CPU in float32."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # a plain causal LM: hypervocab.load wraps it with fresh encoders (speed does not depend on training)
    hyper, htok = load(model_dir, device="cpu", dtype="float32", max_codebook_size=C, max_subtokens=M)
    return htok.tokenizer, base, hyper


def texts(tok: Any, n: int, tokens: int) -> list[list[int]]:
    """The first ``tokens`` base ids of the ``n`` largest stdlib modules (all long enough)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"), key=lambda p: -p.stat().st_size)
    out = []
    for f in files:
        ids = tok(f.read_text(encoding="utf-8"))["input_ids"]
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == n:
            return out
    raise SystemExit(f"not enough stdlib files with {tokens} tokens")


def split(model: Any, ids: list[int], prompt_tokens: int) -> tuple[list[int], list[int]]:
    """The codes of ``ids`` cut where the first ``prompt_tokens`` base tokens are covered."""
    codes, book = model.codec.encode(ids, return_codebook=True)
    lengths = np.cumsum(book.code_lengths(codes))
    cut = int(np.searchsorted(lengths, prompt_tokens)) + 1
    return codes[:cut].tolist(), codes[cut:].tolist()


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = torch.tensor(r), 1
    return ids, mask


class Run:
    """One teacher-forced pass of both models over a batch: prefill, then every step timed."""

    def __init__(self, tok: Any, base: Any, hyper: Any, ids: list[list[int]], prompt_tokens: int) -> None:
        self.base, self.hyper = base, hyper
        self.base_prompt = torch.tensor([r[:prompt_tokens] for r in ids])
        self.base_steps = torch.tensor([r[prompt_tokens:] for r in ids])
        parts = [split(hyper, r, prompt_tokens) for r in ids]
        self.prompt, self.prompt_mask = left_pad([p for p, _ in parts], hyper.config.pad_id)
        self.steps = [s for _, s in parts]
        self.codes_prompt = sum(len(p) for p, _ in parts)
        self.codes_steps = sum(len(s) for s in self.steps)

    def run(self, hyper_first: bool) -> dict[str, dict[str, Any]]:
        """Both prefills, then the steps of both models interleaved one by one (so drift hits both alike)."""
        from transformers import DynamicCache

        res: dict[str, dict[str, Any]] = {"base": {"steps": []}, "hyper": {"steps": []}}
        cache = DynamicCache(config=self.base.config)
        state: Any = None

        def prefill_base() -> None:
            t0 = time.perf_counter()
            with torch.no_grad():
                self.base(self.base_prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            res["base"]["prefill"] = time.perf_counter() - t0

        def prefill_hyper() -> None:
            nonlocal state
            t0 = time.perf_counter()
            state = self.hyper.generate(self.prompt, self.prompt_mask, max_new_tokens=0, return_dict_in_generate=True)
            res["hyper"]["prefill"] = time.perf_counter() - t0

        for fn in (prefill_hyper, prefill_base) if hyper_first else (prefill_base, prefill_hyper):
            fn()
        nb, nh = self.base_steps.shape[1], max(len(s) for s in self.steps)
        for t in range(max(nb, nh)):
            if t < nb:
                s0 = time.perf_counter()
                with torch.no_grad():
                    self.base(self.base_steps[:, t: t + 1], past_key_values=cache, use_cache=True)
                res["base"]["steps"].append(time.perf_counter() - s0)
            if t < nh:
                # rows whose text has ended read a masked pad: the batch steps until the longest is done
                code = torch.tensor([[s[t] if t < len(s) else 0] for s in self.steps])
                mask = torch.tensor([[int(t < len(s))] for s in self.steps])
                s0 = time.perf_counter()
                state = self.hyper.generate(code, mask, past=state, max_new_tokens=0, return_dict_in_generate=True)
                res["hyper"]["steps"].append(time.perf_counter() - s0)
        for side in res.values():
            side["total"] = sum(side["steps"])
        return res


def free_generation(tok: Any, base: Any, hyper: Any, ids: list[int], n: int) -> dict[str, Any]:
    codes = hyper.codec.encode(ids).tolist()
    with torch.no_grad():
        t0 = time.perf_counter()
        out_b = base.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_h = hyper.generate(torch.tensor([codes]), max_new_tokens=n, max_new_base_tokens=n, eos_token_id=[],
                           return_dict_in_generate=True)
    th = time.perf_counter() - t0
    st = out_h.stats[0]
    return {"base_s": tb, "hyper_s": th, "base_tokens_base": int(out_b.shape[1] - len(ids)),
            "base_tokens_hyper": st.base_tokens, "codes_hyper": st.codes, "hypertokens": st.hypertokens}


def profile(hyper: Any, prompt: torch.Tensor, steps: int) -> list[tuple[str, float]]:
    """Where the time of ``steps`` greedy generation steps goes (cumulative seconds per part)."""
    hyper.generate(prompt, max_new_tokens=2)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    hyper.generate(prompt, max_new_tokens=steps, eos_token_id=[])
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def cum(file: str, func: str) -> list[float]:
        """Cumulative seconds of every function ``func`` of ``file``, in line order."""
        return [v[3] for (f, line, name), v in sorted(stats.items(), key=lambda kv: kv[0][1])
                if f.endswith(file) and name == func]

    emb = cum("embedding.py", "forward")  # HyperEmbedding.forward comes first in the file, then HyperHead.forward
    return [
        ("whole generate() call", max(cum("generation.py", "generate"), default=0.0)),
        ("reading codes (HyperSession.read): the base model's forward, all layers", sum(cum("session.py", "read"))),
        ("  of which the LM head over V + C ids", emb[1] if len(emb) > 1 else 0.0),
        ("  of which the input embedding with hypertoken lookups", emb[0] if emb else 0.0),
        ("pushing chosen codes (HyperSession.append): decoder states and their new vectors",
         sum(cum("session.py", "append"))),
        ("hyper-encoders: the prompt's entries, then each step's new entries and next legal id",
         sum(cum("session.py", "_install"))),
        ("choosing codes (greedy or sampling)", sum(cum("sampling.py", "__call__"))),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Hugging Face model folder (default: the cached SmolLM2-135M)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="base tokens of the prompt at batch 1")
    p.add_argument("--batch-prompt-tokens", type=int, default=512, help="base tokens of each prompt at --batch")
    p.add_argument("--step-tokens", type=int, default=256, help="base tokens stepped through after the prompt")
    p.add_argument("--batch", type=int, default=8, help="the larger batch size (default 8)")
    p.add_argument("--free-tokens", type=int, default=48, help="base tokens of free generation")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each row (default 3)")
    p.add_argument("--profile-steps", type=int, default=24, help="generation steps profiled")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small texts, one repeat, no files written")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt_tokens, args.batch_prompt_tokens, args.step_tokens = 128, 64, 16
        args.free_tokens, args.repeats, args.profile_steps, args.batch = 8, 1, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.model is None:
        from assets import smollm2_model_dir

        args.model = str(smollm2_model_dir())
    tok, base, hyper = build_models(args.model, 2048, 4)
    batches = {1: args.prompt_tokens, args.batch: args.batch_prompt_tokens}
    runs = {B: Run(tok, base, hyper, texts(tok, B, n + args.step_tokens), n) for B, n in batches.items()}
    free_ids = texts(tok, 1, args.prompt_tokens)[0]
    results: dict[int, dict[str, list]] = {B: {"base": [], "hyper": []} for B in runs}
    free: list[dict[str, Any]] = []
    for r in range(args.repeats + 1):  # run 0 is the warm-up
        for B, run in runs.items():
            got = run.run(hyper_first=bool(r % 2))
            for side in ("base", "hyper"):
                if r:
                    results[B][side].append(got[side])
                print(f"  run {r} batch {B} {side}: prefill {got[side]['prefill']:.2f} s, {len(got[side]['steps'])} "
                      f"steps {got[side]['total']:.2f} s", file=sys.stderr, flush=True)
        got = free_generation(tok, base, hyper, free_ids, args.free_tokens)
        if r:
            free.append(got)
    lines = [f"# generation_speed ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})",
             "", f"SmolLM2-135M-Instruct, C=2048, M=4; stdlib Python files; medians of {args.repeats} runs "
             "(prefills taking turns, steps interleaved).", "",
             "| what | batch | base | hypervocab | ratio | goal |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    summary: dict[str, Any] = {"args": vars(args), "batches": {}}
    for B, run in runs.items():
        res = results[B]
        step_b = statistics.median(t for x in res["base"] for t in x["steps"])
        step_h = statistics.median(t for x in res["hyper"] for t in x["steps"])
        tot_b = statistics.median(x["total"] for x in res["base"])
        tot_h = statistics.median(x["total"] for x in res["hyper"])
        pre_b = statistics.median(x["prefill"] for x in res["base"])
        pre_h = statistics.median(x["prefill"] for x in res["hyper"])
        nb = run.base_steps.shape[1]
        nh = len(res["hyper"][0]["steps"])
        lines += [
            f"| step time (ms), teacher-forced | {B} | {step_b * 1e3:.1f} | {step_h * 1e3:.1f} | "
            f"{step_h / step_b:.3f}x | <= 1.10 {'PASS' if step_h / step_b <= 1.10 else 'FAIL'} |",
            f"| whole text: {B} x {args.step_tokens} base tokens (s) | {B} | {tot_b:.2f} ({nb} steps) | {tot_h:.2f} "
            f"({nh} steps) | {tot_b / tot_h:.2f}x faster | >= 1.3 {'PASS' if tot_b / tot_h >= 1.3 else 'FAIL'} |",
            f"| prefill (s): {run.base_prompt.numel()} base tokens vs {run.codes_prompt} codes | {B} | {pre_b:.2f} | "
            f"{pre_h:.2f} | {pre_b / pre_h:.2f}x faster | >= 1.3 {'PASS' if pre_b / pre_h >= 1.3 else 'FAIL'} |",
        ]
        summary["batches"][B] = {"step_base_s": step_b, "step_hyper_s": step_h, "total_base_s": tot_b,
                                 "total_hyper_s": tot_h, "prefill_base_s": pre_b, "prefill_hyper_s": pre_h,
                                 "base_steps": nb, "hyper_steps": nh, "prompt_base_tokens": run.base_prompt.numel(),
                                 "prompt_codes": run.codes_prompt, "step_codes": run.codes_steps}
    fb = statistics.median(x["base_s"] for x in free)
    fh = statistics.median(x["hyper_s"] for x in free)
    f0 = free[0]
    tps_b, tps_h = f0["base_tokens_base"] / fb, f0["base_tokens_hyper"] / fh
    lines.append(f"| free generation, base tokens/s (untrained encoders: {f0['hypertokens']} of "
                 f"{f0['codes_hyper']} codes were hypertokens) | 1 | {tps_b:.2f} | {tps_h:.2f} | "
                 f"{tps_h / tps_b:.2f}x | "
                 "needs an uptrained model |")
    summary["free"] = free
    print("\n".join(lines), flush=True)  # the timings first: the profile below takes a while
    prof = profile(hyper, runs[1].prompt[:, :256], args.profile_steps)
    whole = prof[0][1] or 1.0
    lines += ["", f"Where the time of one `generate()` call goes (cProfile, {args.profile_steps} greedy steps after a "
              "256-code prompt, cumulative):", "", "| part | seconds | share |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {sec:.3f} | {sec / whole:.1%} |" for name, sec in prof]
    summary["profile"] = prof
    text = "\n".join(lines)
    print("\n".join(lines[-len(prof) - 4:]))
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "generation_speed.md").write_text(text + "\n")
        (RESULTS / "generation_speed.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
