#!/usr/bin/env python
"""Why the model writes hypertokens badly: what it believed at every code it wrote, against the base model.

For held-out prompts (code, prose, chat) the hypervocab model writes greedily; then every code it wrote is
looked at twice, teacher-forced:

* by the hypervocab model: the probability ``q(c)`` it gave the code it chose, and its *first-token
  marginal* ``m(t) = q(t) + sum q(e)`` over the entries ``e`` visible there that start with ``t`` (what
  distillation trains to equal the base model's next-token distribution);
* by the base model, on the same base tokens: ``P(phrase)``, the product of its probabilities of the
  code's base tokens, and ``P(first)``, that of its first one, and whether each token is its own greedy
  choice.

If hypertoken logits were calibrated, ``q(h)`` would track ``P(phrase)`` (a phrase is as likely as all of
its tokens).  Printed: per kind of code (base token / hypertoken) the median log-probabilities, how often the
first token and the whole phrase agree with the base model's greedy choice, and how often the choice would
differ under the *marginal-first* rule (pick the first base token by ``m``, then the most probable code
starting with it); and the base model's bits per byte of what the model wrote, with hypertokens and when
allowed base ids only (``allow_hypertokens=False``: it still reads the prompt's hypertokens).

    python recipes/smollm2-135m/diagnose_writing.py --files 3 --out reports/smollm2-135m/diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".cache" / "smollm2-data" / "heldout"


def analyse(model: Any, tok: Any, prompt_ids: list[int], new_codes: list[int]) -> list[dict[str, Any]]:
    """One record per written code (see the module docstring)."""
    import torch

    codec = model.codec
    V = codec.base_vocab_size
    prompt_codes = [int(c) for c in codec.encode(prompt_ids)]
    state = codec.decoder_state()
    state.push(prompt_codes)
    book = state.codebook
    phrases: dict[int, tuple[int, ...]] = {V + k: tuple(int(x) for x in book.phrases[k, : book.lengths[k]])
                                           for k in range(len(book))}
    codes = prompt_codes + list(new_codes)
    with torch.no_grad():
        logits = model(torch.tensor([codes])).logits[0].float()
    base_ids = list(prompt_ids)
    records = []
    per_code = []
    for i, c in enumerate(new_codes):
        pos = len(prompt_codes) + i - 1
        visible = dict(phrases)
        nxt = state.next_phrase
        if nxt is not None:
            visible[state.next_id] = nxt
        phrase = (c,) if c < V else visible[c]
        per_code.append((pos, c, phrase, visible, len(base_ids)))
        decoded = state.push(c)
        for e in decoded.installed:
            phrases[e.id] = tuple(int(x) for x in e.phrase)
        base_ids += [int(x) for x in decoded.ids]
    with torch.no_grad(), model.disable_adapter():
        blogits = model.base(input_ids=torch.tensor([base_ids])).logits[0].float()
    blogp = torch.log_softmax(blogits, -1)
    for pos, c, phrase, visible, start in per_code:
        logq = torch.log_softmax(logits[pos, : V + codec.max_codebook_size], -1)
        q = logq.exp()
        marginal = q[:V].clone()
        for e, p in visible.items():
            if e < logq.shape[0]:
                marginal[p[0]] += q[e]
        t_star = int(marginal.argmax())
        group = [t_star] + [e for e, p in visible.items() if p[0] == t_star]
        rule = max(group, key=lambda e: float(q[e]))
        steps = [blogp[start - 1 + j] for j in range(len(phrase))]
        logp_tokens = [float(s[t]) for s, t in zip(steps, phrase)]
        records.append({
            "hyper": c >= V, "length": len(phrase), "logq": float(logq[c]),
            "log_p_phrase": sum(logp_tokens), "log_p_first": logp_tokens[0],
            "log_m_first": math.log(max(float(marginal[phrase[0]]), 1e-30)),
            "first_is_base_greedy": int(steps[0].argmax()) == phrase[0],
            "phrase_is_base_greedy": all(int(s.argmax()) == t for s, t in zip(steps, phrase)),
            "first_is_marginal_argmax": t_star == phrase[0],
            "marginal_rule_same": rule == c,
            "text": tok.decode(list(phrase)),
        })
    return records


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for kind in ("base token", "hypertoken"):
        rs = [r for r in records if r["hyper"] == (kind == "hypertoken")]
        if not rs:
            continue

        def med(k: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(r[k] for r in rs)

        def share(k: str, rs: list[dict[str, Any]] = rs) -> float:
            return sum(bool(r[k]) for r in rs) / len(rs)

        out[kind] = {"codes": len(rs), "median_length": med("length"), "median_log_q": med("logq"),
                     "median_log_p_phrase": med("log_p_phrase"), "median_log_p_first": med("log_p_first"),
                     "median_log_m_first": med("log_m_first"),
                     "mean_log_q_minus_log_p_phrase": statistics.fmean(r["logq"] - r["log_p_phrase"] for r in rs),
                     "first_is_base_greedy": share("first_is_base_greedy"),
                     "phrase_is_base_greedy": share("phrase_is_base_greedy"),
                     "first_is_marginal_argmax": share("first_is_marginal_argmax"),
                     "marginal_rule_same": share("marginal_rule_same")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="hypervocab checkpoint (default: the shipped one)")
    p.add_argument("--base-model", default=None, help="base model folder (default: the converted SmolLM2)")
    p.add_argument("--heldout", type=Path, default=DATA, help="prepare_data.py's held-out folder")
    p.add_argument("--files", type=int, default=4, help="files per domain (default 4)")
    p.add_argument("--places", type=int, default=2, help="prompts per file (default 2)")
    p.add_argument("--new-tokens", type=int, default=64, help="base tokens written per prompt (default 64)")
    p.add_argument("--out", type=Path, default=None, help="write the records and the summary as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))
    import torch
    from tqdm.auto import tqdm

    from hypervocab import load
    from hypervocab.evaluation.quality import CHAT_QUESTIONS, base_bits, chat_prompts, text_prompts
    from hypervocab.pretrained import smollm2_base_dir

    model, htok = load(args.model, base_model=args.base_model or str(smollm2_base_dir()), device="cpu")
    tok = htok.tokenizer
    prompts = []
    for domain, pattern in (("python", "*.py"), ("docs", "*.rst.txt")):
        files = sorted((args.heldout / domain).rglob(pattern))[: args.files]
        prompts += text_prompts(domain, [(f.name, f.read_text()) for f in files], tok, places=args.places)
    prompts += chat_prompts(tok, CHAT_QUESTIONS)
    records = []
    # the base model's bits per byte of what was written: with hypertokens, and by the same model allowed to
    # write base ids only (it still reads the prompt's hypertokens): is reading or writing broken?
    written = {"hypervocab": [0.0, 0], "hypervocab, base ids only": [0.0, 0]}
    for prompt in tqdm(prompts, desc="diagnose", unit="prompt"):
        codes = torch.tensor([[int(c) for c in model.codec.encode(prompt.ids)]])
        for name, allow in (("hypervocab", True), ("hypervocab, base ids only", False)):
            with torch.no_grad():
                out = model.generate(codes, torch.ones_like(codes), max_new_tokens=args.new_tokens,
                                     max_new_base_tokens=args.new_tokens, return_dict_in_generate=True,
                                     allow_hypertokens=allow)
            nll, n_bytes = base_bits(model, tok, prompt.ids, out.new_base_ids[0])
            written[name][0] += nll
            written[name][1] += n_bytes
            if allow:
                for r in analyse(model, tok, prompt.ids, list(out.new_codes[0])):
                    records.append({"domain": prompt.domain, "source": prompt.source, **r})
    result = {"written_bits_per_byte": {k: n / math.log(2) / b for k, (n, b) in written.items()},
              "summary": summary(records),
              "by_domain": {d: summary([r for r in records if r["domain"] == d])
                            for d in dict.fromkeys(r["domain"] for r in records)}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps({**result, "records": records}, indent=0) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
