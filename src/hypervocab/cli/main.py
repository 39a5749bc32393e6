"""``hypervocab`` command line.

* ``hypervocab demo``: the shipped model on three prompts, against its base model.
* ``hypervocab serve --model PATH_OR_NAME``: an OpenAI-compatible HTTP server with a playground.
* ``hypervocab compress PATH... --tokenizer NAME_OR_DIR``: how much text shrinks.
* ``hypervocab generate --model PATH_OR_NAME "prompt"``: generate with hypertokens coloured.
* ``hypervocab train --config RUN.yaml [--FIELD VALUE ...]``: uptrain a model.
* ``hypervocab plot RUN_DIR``: draw a training run's curves.
* ``hypervocab eval compression|bpb|speed|lm-eval ...``: what the model gains and loses (see ``cli/evaluate.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from .. import __version__
from ..codec import LZWCodec
from ..config import HyperConfig
from ..errors import ConfigError
from ..evaluation.compression import compression_report, format_markdown
from ..evaluation.speed import synchronize
from ..loading import load
from ..plots import plot_run
from ..streaming import HyperTextStreamer
from ..tokenizer import default_disabled_ids, load_tokenizer
from ..training.config import LoraSettings, TrainConfig
from .demo import add_demo_parser
from .evaluate import add_eval_parser, lm_eval_argv
from .options import add_device_options
from .serve import add_serve_parser


def _compress(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    disabled = default_disabled_ids(tok, protect_digits=not args.no_protect_digits)
    codec = LZWCodec(len(tok), args.max_codebook_size, args.max_subtokens, disabled_ids=disabled,
                     pad_id=tok.pad_token_id)
    rows = compression_report(args.paths, tok, codec, window=args.window, window_unit=args.window_unit,
                              pattern=args.glob or ["*"], exclude=args.exclude,
                              progress=not args.json and sys.stderr.isatty())
    if args.json:
        settings = {"tokenizer": args.tokenizer, "base_vocab_size": len(tok),
                    "max_codebook_size": codec.max_codebook_size, "max_subtokens": codec.max_subtokens,
                    "window": args.window, "window_unit": args.window_unit, "disabled_ids": len(codec.disabled_ids)}
        print(json.dumps({"settings": settings, "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(f"tokenizer {args.tokenizer} ({len(tok):,} ids, {len(codec.disabled_ids)} never merged), "
              f"C={codec.max_codebook_size}, M={codec.max_subtokens}, windows of {args.window} {args.window_unit}\n")
        print(format_markdown(rows))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from ..generation import GenerationOptions

    # the options are checked before the model loads; a code stands for at least one base token, so the
    # base-token budget bounds the codes too
    options = GenerationOptions(
        max_new_tokens=args.max_new_codes or args.max_new_tokens, max_new_base_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop_strings=tuple(args.stop or ()), allow_hypertokens=not args.no_hypertokens,
        prompt_lookup_num_tokens=args.prompt_lookup or None)
    model, htok = load(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype,
                       max_codebook_size=args.max_codebook_size, max_subtokens=args.max_subtokens)
    device = next(model.parameters()).device
    tok = htok.tokenizer
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    special = True
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"--chat: the tokenizer of {args.model!r} has no chat template")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
        special = False  # the template already holds them
    enc = htok(prompt, return_tensors="pt", add_special_tokens=special)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    color = not args.no_color and sys.stdout.isatty() or args.color
    streamer = HyperTextStreamer(tok, color=color)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, mask, options=options, tokenizer=tok, streamer=streamer,
                             return_dict_in_generate=True)
    synchronize(device)
    dt = time.perf_counter() - t0
    st = out.stats[0]
    line = (f"prompt {st.prompt_base_tokens} tokens in {st.prompt_codes} codes "
            f"({st.prompt_codes / max(st.prompt_base_tokens, 1):.2f} codes/token) | output {st.base_tokens} tokens in "
            f"{st.codes} codes, {st.hypertokens} hypertokens ({st.base_tokens_per_code:.2f} tokens/code) | "
            f"{dt:.2f} s, {st.base_tokens / dt if dt else 0:.1f} tokens/s | stop: {st.finish_reason}")
    if args.prompt_lookup:
        line += f" | drafts: {st.accepted_codes} of {st.draft_codes} codes kept"
    print(f"\x1b[2m{line}\x1b[0m" if color else line, file=sys.stderr)
    return 0


def _yaml_value(text: str) -> object:
    """A flag's value read as YAML, so numbers, booleans, null and lists work: ``--lora-target-modules [q_proj]``."""
    import yaml

    return yaml.safe_load(text)


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name in ("hyper", "lora", "data"):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            out[f.name] = _yaml_value(v) if f.name not in ("base_model", "output_dir", "cache_dir") else v
    hyper = {f.name: _yaml_value(getattr(args, "hyper_" + f.name)) for f in fields(HyperConfig)
             if getattr(args, "hyper_" + f.name, None) is not None}
    lora = {f.name: _yaml_value(getattr(args, "lora_" + f.name)) for f in fields(LoraSettings)
            if getattr(args, "lora_" + f.name, None) is not None}
    if hyper:
        out["hyper"] = hyper
    if args.no_lora:
        out["lora"] = None
    elif lora:
        out["lora"] = lora
    if args.data:
        out["data"] = list(args.data)
    return out


def _train(args: argparse.Namespace) -> int:
    overrides = _train_overrides(args)
    config = (TrainConfig.from_file(args.config, **overrides) if args.config
              else TrainConfig.from_dict({}, **overrides))
    from ..training.trainer import train  # torch and the training extras: only when training

    result = train(config)
    print(json.dumps(dict(result), indent=2))
    return 0


def _plot(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0


def _add_train_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="uptrain a causal LM into a hypervocab model",
                       description="Uptrain a Hugging Face causal LM (LoRA + hyper-encoders) on local text. Settings "
                       "come from --config (YAML or JSON); every setting is also a flag that overrides the file. "
                       "Values are read as YAML (numbers, true/false, null, [lists]).")
    t.add_argument("--config", help="a YAML or JSON file of training settings")
    for f in fields(TrainConfig):
        if f.name in ("hyper", "lora", "data"):
            continue
        default = "" if f.default is MISSING else f" (default {f.default})"
        t.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                       help=f"{f.name}{default}")
    t.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="a data source (file or folder); repeatable; replaces the file's data list")
    for f in fields(HyperConfig):
        if f.name in ("base_vocab_size", "base_model_name_or_path", "base_model_revision", "hypervocab_version"):
            continue
        t.add_argument("--hyper-" + f.name.replace("_", "-"), dest="hyper_" + f.name, default=None, metavar="VALUE",
                       help=f"hyper.{f.name}")
    for f in fields(LoraSettings):
        t.add_argument("--lora-" + f.name.replace("_", "-"), dest="lora_" + f.name, default=None, metavar="VALUE",
                       help=f"lora.{f.name}")
    t.add_argument("--no-lora", action="store_true", help="train the hyper-encoders only")
    t.set_defaults(func=_train)

    pl = sub.add_parser("plot", help="draw a training run's curves to PNG",
                        description="Read RUN_DIR/metrics.jsonl and draw the loss terms, compression, hypertoken "
                        "accuracy, learning rates and speed to a PNG.")
    pl.add_argument("run_dir", help="the output_dir of a training run")
    pl.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/metrics.png)")
    pl.set_defaults(func=_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypervocab", description="Inference-time adaptive vocabulary for "
                                     "Hugging Face causal language models.")
    parser.add_argument("--version", action="version", version=f"hypervocab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compress", help="report how much text shrinks with hypertokens",
                       description="Tokenize files or folders and report bytes per token before and after LZW "
                       "hypertokens, codes per base token, and the share of codes that are hypertokens.")
    p.add_argument("paths", nargs="+", help="files or folders (folders are searched recursively)")
    p.add_argument("--tokenizer", required=True,
                   help="a Hugging Face tokenizer: hub name, folder, or path to a .gguf file")
    p.add_argument("--max-codebook-size", type=int, default=2048, help="hypertokens per window (default 2048)")
    p.add_argument("--max-subtokens", type=int, default=4, help="longest phrase of a hypertoken (default 4)")
    p.add_argument("--window", type=int, default=2048, help="window length, fresh codebook each (default 2048)")
    p.add_argument("--window-unit", choices=["codes", "tokens"], default="codes",
                   help="count windows in codes, as in training (default), or in base tokens")
    p.add_argument("--glob", action="append", default=None,
                   help="which files inside folders, e.g. '*.py'; repeat for several (default: all text files)")
    p.add_argument("--exclude", action="append", default=[],
                   help="skip files or folders with this name (a glob) inside folders; repeatable")
    p.add_argument("--no-protect-digits", action="store_true", help="allow digit tokens inside hypertokens")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_compress)

    g = sub.add_parser("generate", help="generate text, hypertokens coloured, with a stats line",
                       description="Generate from a prompt with a hypervocab model (a checkpoint folder) or a plain "
                       "Hugging Face causal LM (wrapped with untrained encoders). Text written by hypertokens is "
                       "coloured; a stats line on stderr reports codes, base tokens and speed.")
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    g.add_argument("--model", default="default", help="a hypervocab checkpoint folder, a Hugging Face model "
                   "name/folder, or 'default' (the shipped model, the default)")
    g.add_argument("--base-model", default=None, help="the base model's folder or hub id, instead of the one the "
                   "checkpoint names")
    g.add_argument("--max-new-tokens", type=int, default=128, help="base tokens to write at most, a hypertoken "
                   "counting as the base tokens it stands for (default 128)")
    g.add_argument("--max-new-codes", type=int, default=None, help="also stop after this many codes (decoding "
                   "steps; default: no limit but --max-new-tokens)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), else sample")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely codes")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="as in Hugging Face (default 1.0: none)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop once the output contains this; repeatable")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--no-hypertokens", action="store_true",
                   help="write base tokens only (the prompt is still compressed)")
    g.add_argument("--max-codebook-size", type=int, default=2048, help="C for a plain model (default 2048)")
    g.add_argument("--max-subtokens", type=int, default=4, help="M for a plain model (default 4)")
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="speculative decoding: draft up to K codes from the context and check them in one "
                        "forward (same greedy output, faster on text that repeats; default 0: off)")
    g.add_argument("--no-color", action="store_true", help="never colour (default: colour on a terminal)")
    g.add_argument("--color", action="store_true", help="colour even when stdout is not a terminal")
    add_device_options(g)
    g.set_defaults(func=_generate)
    _add_train_parser(sub)
    add_eval_parser(sub)
    add_demo_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "lm-eval"]:  # everything after it is lm-eval's own, --help included
        try:
            lm_argv = lm_eval_argv(argv[2:])
        except ValueError as e:
            print(f"hypervocab eval lm-eval: error: {e}", file=sys.stderr)
            return 2
        from ..evaluation.harness import main as harness_main  # lm-eval: an optional extra, heavy to import

        return harness_main(lm_argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # our errors subclass these: say it in one line
        print(f"hypervocab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
