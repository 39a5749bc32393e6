#!/usr/bin/env python
"""Training-step and forward speed of a HyperModel on compressed text against its plain base model.

Both rows of a text use the same SmolLM2-135M-Instruct weights and the same
bytes: the text is cut to its first ``--n-tokens`` SmolLM2 base tokens; the
base model runs on those base ids, the hypervocab model
(``HyperConfig(max_codebook_size=2048, max_subtokens=4)``) on their LZW
compression ``model.codec.encode(ids)`` (fewer positions, plus the codec and
hyper-encoder overhead).

Texts:

  * Python code: ``sysconfig.get_paths()["stdlib"] + "/argparse.py"``.
  * English prose: ``/usr/share/common-licenses/GPL-3`` (else the other files
    in ``/usr/share/common-licenses/``, concatenated, sorted by name).

Timed (``time.perf_counter``, torch CPU float32, ``torch.set_num_threads``
threads, median of ``--repeats`` runs after one warm-up, base and hypervocab
taking turns):

  * step: ``out = m(ids, labels=ids); out.loss.backward()``, grads zeroed
    (``zero_grad(set_to_none=True)``) before every run.  Fairness rule: the
    backward work is of the same kind in both rows -- ``requires_grad=True`` on
    every base parameter (a full backward through the base model).  HyperModel
    freezes its base on wrapping, so the base parameters are unfrozen again
    after wrapping; the hyper row also trains its hyper-encoders, which is part
    of its real cost.
  * forward: ``m(ids)`` under ``torch.no_grad()``.

For the hypervocab model the no-grad forward is also broken down: the
``CodebookBatch.from_codes`` trace alone, ``model.encode_entries`` on the
codebook's phrases alone, and (``codebook_mask="exact"``) the output encoder
on the distinct per-position candidate phrases (``CodebookBatch.unique_candidates``); the rest is the transformer
+ head.

The table goes to stdout and, with the raw numbers, to
``benchmarks/results/forward_speed.md`` / ``.json``.

    python benchmarks/forward_speed.py                 # default: 2048 tokens, 3 repeats
    python benchmarks/forward_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hypervocab.loading import load

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = ROOT / "benchmarks" / "results"


def time_median(fn: Callable[[], Any], repeats: int,
                before: Callable[[], Any] | None = None) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up; ``before`` runs untimed before each."""
    times: list[float] = []
    for i in range(repeats + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    return statistics.median(times), times


def paired_median(fa: Callable[[], Any], fb: Callable[[], Any], repeats: int, label: str,
                  before: Callable[[], Any] | None = None) -> tuple[float, list[float], float, list[float]]:
    """Median seconds of ``fa`` and ``fb``, taking turns (a, b, a, b, ...) after one warm-up of each.

    Taking turns matters on a shared machine: a slow spell hits both rows alike.
    """
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats + 1):
        for fn, out in ((fa, ta), (fb, tb)):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            if i:
                out.append(time.perf_counter() - t0)
        print(f"  {label}: run {i}/{repeats}" + (" (warm-up)" if not i else ""), file=sys.stderr, flush=True)
    return statistics.median(ta), ta, statistics.median(tb), tb


def prose_text() -> tuple[str, str]:
    """English prose: GPL-3 if present, else every common-licenses file concatenated."""
    gpl = pathlib.Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():
        return str(gpl), gpl.read_text(encoding="utf-8", errors="replace")
    folder = gpl.parent
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise SystemExit(f"no prose text: {folder} is empty or missing")
    return str(folder) + "/*", "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def code_text() -> tuple[str, str]:
    """Python code: the standard library's argparse.py."""
    path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    return str(path), path.read_text(encoding="utf-8")


def bench_text(name: str, source: str, text: str, tok: Any, base: torch.nn.Module, model: Any,
               n_tokens: int, repeats: int) -> dict[str, Any]:
    """Time one text through both models; returns the raw numbers."""
    from hypervocab.codebook import CodebookBatch

    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:n_tokens]])
    if ids.shape[1] < n_tokens:
        print(f"warning: {name} has only {ids.shape[1]} base tokens", file=sys.stderr)
    codes = torch.tensor(np.asarray(model.codec.encode(ids[0].numpy()), dtype=np.int64)[None])
    assert np.array_equal(np.asarray(model.codec.decode(codes[0].numpy())), ids[0].numpy()), "codec round trip"

    def base_step() -> None:
        base(ids, labels=ids).loss.backward()

    def hyper_step() -> None:
        model(codes, labels=codes).loss.backward()

    def base_fwd() -> None:
        with torch.no_grad():
            base(ids)

    def hyper_fwd() -> None:
        with torch.no_grad():
            model(codes)

    def zero() -> None:
        base.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)

    base_step_s, base_step_all, hyper_step_s, hyper_step_all = paired_median(base_step, hyper_step, repeats,
                                                                             f"{name}, step", zero)
    zero()
    base_fwd_s, base_fwd_all, hyper_fwd_s, hyper_fwd_all = paired_median(base_fwd, hyper_fwd, repeats,
                                                                         f"{name}, forward")

    # breakdown of the hyper forward (no grad)
    cb = CodebookBatch.from_codes(model.codec, codes)
    trace_s, _ = time_median(lambda: CodebookBatch.from_codes(model.codec, codes), repeats)
    phrases = torch.as_tensor(cb.phrases)

    def enc_entries() -> None:
        with torch.no_grad():
            model.encode_entries(phrases)

    entries_s, _ = time_median(enc_entries, repeats)
    cand = cb.candidates[cb.candidates[..., 0] >= 0]
    cand_s = 0.0
    if model.config.codebook_mask == "exact" and len(cand):
        def enc_cand() -> None:  # what the forward does: the output side, each distinct phrase once
            with torch.no_grad():
                unique, _ = cb.unique_candidates()
                model.encode_outputs(torch.as_tensor(unique, device=codes.device))
        cand_s, _ = time_median(enc_cand, repeats)

    return {
        "text": name, "source": source, "base_tokens": int(ids.shape[1]), "codes": int(codes.shape[1]),
        "codes_per_token": codes.shape[1] / ids.shape[1], "codebook_entries": int(len(cb.phrases)),
        "candidate_phrases": int(len(cand)),
        "base_step_ms": base_step_s * 1e3, "hyper_step_ms": hyper_step_s * 1e3,
        "step_ratio": hyper_step_s / base_step_s,
        "base_fwd_ms": base_fwd_s * 1e3, "hyper_fwd_ms": hyper_fwd_s * 1e3,
        "fwd_ratio": hyper_fwd_s / base_fwd_s,
        "trace_ms": trace_s * 1e3, "encode_entries_ms": entries_s * 1e3, "encode_candidates_ms": cand_s * 1e3,
        "rest_ms": (hyper_fwd_s - trace_s - entries_s - cand_s) * 1e3,
        "raw_s": {"base_step": base_step_all, "hyper_step": hyper_step_all,
                  "base_fwd": base_fwd_all, "hyper_fwd": hyper_fwd_all},
    }


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown report."""
    out = [f"# forward_speed ({meta['n_tokens']} base tokens, median of {meta['repeats']}, "
           f"{meta['threads']} threads, CPU float32, torch {meta['torch']})", "",
           "| text | base tokens | codes | codes/token | base step ms | hyper step ms | step hyper/base "
           "| base fwd ms | hyper fwd ms | fwd hyper/base |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['text']} | {r['base_tokens']} | {r['codes']} | {r['codes_per_token']:.3f} "
                   f"| {r['base_step_ms']:.1f} | {r['hyper_step_ms']:.1f} | {r['step_ratio']:.2f} "
                   f"| {r['base_fwd_ms']:.1f} | {r['hyper_fwd_ms']:.1f} | {r['fwd_ratio']:.2f} |")
    out += ["", "Hyper forward breakdown (no grad, ms; rest = hyper fwd - the others = transformer + head + glue):",
            "", "| text | entries | candidates | trace (from_codes) | encode_entries(entries) "
            "| output encoder(candidates) | rest | hyper fwd |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['text']} | {r['codebook_entries']} | {r['candidate_phrases']} | {r['trace_ms']:.1f} "
                   f"| {r['encode_entries_ms']:.1f} | {r['encode_candidates_ms']:.1f} | {r['rest_ms']:.1f} "
                   f"| {r['hyper_fwd_ms']:.1f} |")
    out += ["", "Sources: " + "; ".join(f"{r['text']}: `{r['source']}`" for r in rows), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--n-tokens", type=int, default=2048, help="base tokens per text (default 2048)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-save", action="store_true", help="print only, write nothing under benchmarks/results")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from assets import smollm2_model_dir
    from transformers import AutoModelForCausalLM

    path = smollm2_model_dir()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base.train(False)
    for p in base.parameters():
        p.requires_grad_(True)
    # a plain causal LM: hypervocab.load wraps its own copy with fresh encoders, on the CPU in float32
    model, htok = load(path, device="cpu", dtype="float32", max_codebook_size=2048, max_subtokens=4)
    tok = htok.tokenizer
    model.train(False)
    for p in model.base.parameters():  # the fairness rule: full backward through the base in both rows
        p.requires_grad_(True)

    rows = []
    for name, (source, text) in (("Python code", code_text()), ("English prose", prose_text())):
        rows.append(bench_text(name, source, text, tok, base, model, args.n_tokens, args.repeats))
    meta = {"n_tokens": args.n_tokens, "repeats": args.repeats, "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "config": {"max_codebook_size": 2048, "max_subtokens": 4, "encoder": model.config.encoder,
                       "codebook_mask": model.config.codebook_mask}}
    report = render(rows, meta)
    print(report)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "forward_speed.md").write_text(report)
        (RESULTS / "forward_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
