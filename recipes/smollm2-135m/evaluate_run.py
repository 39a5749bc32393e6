#!/usr/bin/env python
"""Quick quality check of a training run against its base model, on the held-out files of ``prepare_data.py``.

For a run folder (``hypervocab train``'s ``output_dir``, or a checkpoint in it) it measures:

* held-out bits per byte, hypervocab / base, per domain and in total (strict canonical scoring,
  :func:`hypervocab.evaluation.likelihood.bits_per_byte_report`);
* the first-token divergence: KL of the model's next-code distribution summed onto first base tokens
  from the base model's next-token distribution, nats per code
  (:func:`hypervocab.evaluation.likelihood.first_token_divergence`);
* greedy continuations of the demo's three prompts (:mod:`hypervocab.evaluation.quality`): distinct 4-gram
  ratio and the base model's bits per byte of what the hypervocab model and the base model wrote, and the texts.

Writes nothing unless ``--out FILE.json``; prints a Markdown summary.  On CPU, ``--max-bytes 8000`` takes a
few minutes; the report uses ``recipes/smollm2-135m/report.py``.

    python recipes/smollm2-135m/evaluate_run.py .cache/runs/smollm2-135m --max-bytes 8000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hypervocab.cli.demo import demo_prompts
from hypervocab.evaluation.quality import GenerationPrompt, generation_report
from hypervocab.loading import DTYPES, load

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / ".cache" / "smollm2-data" / "heldout"
DOMAINS = {"python": "*.py", "docs": "*.rst.txt", "json": "*.json", "po": "*.po"}


def heldout_texts(root: Path, max_bytes: int) -> dict[str, list[str]]:
    """Up to ``max_bytes`` of each domain's held-out files, whole files in sorted order (as ``eval bpb`` reads them)."""
    out: dict[str, list[str]] = {}
    for domain, pattern in DOMAINS.items():
        texts, used = [], 0
        for path in sorted((root / domain).rglob(pattern)):
            text = path.read_text(encoding="utf-8")
            if used + len(text.encode()) > max_bytes:
                if not texts:  # the first file alone is too big: its head
                    texts.append(text.encode()[:max_bytes].decode("utf-8", "ignore"))
                break
            texts.append(text)
            used += len(text.encode())
        if texts:
            out[domain] = texts
    return out


def evaluate(run: str | Path, *, base_model: str | Path, heldout: Path = HELDOUT, max_bytes: int = 8000,
             window: int = 1024, stride: int = 512, new_tokens: int = 80, device: str = "cpu",
             dtype: str = "float32") -> dict[str, Any]:
    """Every figure of the module docstring for the model in ``run`` (a folder ``hypervocab.load`` reads)."""
    import torch

    from hypervocab.evaluation.likelihood import bits_per_byte_report, first_token_divergence  # imports torch

    t0 = time.perf_counter()
    model, htok = load(run, base_model=base_model, device=device, dtype=dtype)
    tok = htok.tokenizer
    texts = heldout_texts(heldout, max_bytes)
    with torch.no_grad():
        bpb = bits_per_byte_report(model, tok, texts, window=window, stride=stride)
        drift = first_token_divergence(model, tok, [t for ts in texts.values() for t in ts][:8], window=window)
    prompts = [GenerationPrompt("demo", title, tok(prompt, add_special_tokens=special)["input_ids"])
               for title, prompt, special in demo_prompts(tok)]
    written = generation_report(model, tok, prompts, max_new_tokens=new_tokens, lookup=False).outputs
    samples = []
    for p in prompts:
        hyper, base = (next(o for o in written if o.source == p.source and o.system == s)
                       for s in ("hypervocab", "base"))
        samples.append({"prompt": p.source, "hypervocab_distinct4": hyper.distinct_4, "base_distinct4": base.distinct_4,
                        "hypervocab_bits_per_byte": hyper.bits_per_byte, "base_bits_per_byte": base.bits_per_byte,
                        "hypervocab_text": hyper.text, "base_text": base.text, "tokens": hyper.new_tokens})
    return {"run": str(run), "bpb": bpb, "first_token_kl": drift["kl_per_code"], "samples": samples,
            "seconds": time.perf_counter() - t0}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"### {result['run']}", "", "| domain | base bits/byte | hypervocab bits/byte | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for r in result["bpb"]:
        lines.append(f"| {r['domain']} | {r['base_bits_per_byte']:.4f} | {r['hypervocab_bits_per_byte']:.4f} | "
                     f"{r['ratio']:.3f} |")
    lines += ["", f"first-token KL from the base model: {result['first_token_kl']:.3f} nats per code", "",
              "| prompt | distinct 4-grams, hypervocab | base |", "| --- | ---: | ---: |"]
    for s in result["samples"]:
        lines.append(f"| {s['prompt'].split(' (')[0]} | {s['hypervocab_distinct4']:.2f} | {s['base_distinct4']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a hypervocab checkpoint folder (a run's output_dir)")
    parser.add_argument("--base-model", default=None, help="the base model folder (default: the converted SmolLM2)")
    parser.add_argument("--heldout", type=Path, default=HELDOUT, help="prepare_data.py's held-out folder")
    parser.add_argument("--max-bytes", type=int, default=8000, help="held-out bytes per domain (default 8000)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="model dtype (default float32; auto: bfloat16 on a GPU that has it)")
    parser.add_argument("--new-tokens", type=int, default=80, help="base tokens per greedy sample (default 80)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))
    if args.base_model is None:
        from hypervocab.pretrained import smollm2_base_dir

        args.base_model = str(smollm2_base_dir())
    result = evaluate(args.run, base_model=args.base_model, heldout=args.heldout, max_bytes=args.max_bytes,
                      device=args.device, dtype=args.dtype, new_tokens=args.new_tokens)
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
