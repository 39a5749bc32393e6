"""``hypervocab eval ...``: what a hypervocab model gains and loses, on the user's own model and text.

Every command prints a Markdown table, writes ``NAME.json`` and ``NAME.md`` into ``--out``, and with
``--plot`` a ``NAME.png`` chart.

* ``eval compression DOMAIN... --tokenizer T [--model M --generate N]``: input compression per domain and
  tokenizer; with a model, also its own continuations' base tokens per emitted code.
* ``eval bpb DOMAIN... --model M``: bits per byte of the model and of its base model, same bytes.
* ``eval generation DOMAIN... --model M``: what the model writes: greedy (and sampled) continuations of
  prompts cut from the files and of chat questions, by the base model and by hypervocab, each judged by the
  base model's bits per byte and its distinct-4-gram ratio; worse-than-base verdicts per domain.
* ``eval speed FILE... --model M``: prefill/decode speed and time to first token: base model, hypervocab,
  base model with prompt lookup decoding, and hypervocab with its own prompt lookup, on three workloads.
* ``eval lm-eval --model_args pretrained=M --tasks ...``: lm-evaluation-harness with ``--model hypervocab``.

A DOMAIN is ``PATH`` or ``NAME=PATH`` (a file or a folder, searched with ``--glob``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..codec import LZWCodec
from ..errors import ConfigError, check_int
from ..evaluation.compression import (
    CompressionRow,
    compression_report,
    format_generation_markdown,
    format_markdown,
    generation_compression,
)
from ..evaluation.speed import speed_report
from ..loading import DTYPES, load
from ..plots import plot_bits_per_byte, plot_compression
from ..textfiles import list_files, read_text_file
from ..tokenizer import default_disabled_ids, load_tokenizer
from .options import add_device_options


def _domains(specs: list[str], glob: list[str] | None, exclude: list[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if not Path(path).exists():
            raise ConfigError(f"domain {spec!r}: {path!r} does not exist (give PATH or NAME=PATH, a file or folder)")
        if name in out:
            raise ConfigError(f"domain {spec!r}: the name {name!r} is used twice (name them with NAME=PATH)")
        out[name] = list_files(path, glob or ["*"], exclude)
    return out


def _texts(files: list[Path], max_bytes: int | None, max_files: int | None) -> list[str]:
    """The text files in order until ``max_bytes`` (the file that crosses it is cut at a line)."""
    out: list[str] = []
    used = 0
    for f in files:
        if max_files is not None and len(out) >= max_files:
            break
        try:
            text = read_text_file(f)
        except OSError:
            continue
        if text is None or not text.strip():  # binary, not UTF-8 or blank
            continue
        if max_bytes is not None and used + len(text.encode()) > max_bytes:
            room = max_bytes - used
            text = text.encode()[:room].decode("utf-8", errors="ignore").rsplit("\n", 1)[0]
            if text.strip():
                out.append(text)
            break
        out.append(text)
        used += len(text.encode())
    return out


def _write(out_dir: str, name: str, payload: dict[str, Any], markdown: str) -> Path:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (d / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {d / (name + '.json')} and {d / (name + '.md')}", file=sys.stderr)
    return d


def _placement(model: Any) -> dict[str, str]:
    """Where the model ran, for the settings a report records: ``{"device": "cpu", "dtype": "float32"}``."""
    weight = next(model.parameters())
    return {"device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch.")}


# ------------------------------------------------------------------------------------------ compression


def _compression(args: argparse.Namespace) -> int:
    if not args.tokenizer and not args.model:
        raise ConfigError("eval compression needs --tokenizer (repeatable) or --model")
    check_int("--generate", args.generate, minimum=1, optional=True)
    domains = _domains(args.domains, args.glob, args.exclude)
    show = sys.stderr.isatty()
    settings: dict[str, Any] = {"window": args.window, "max_codebook_size": args.max_codebook_size,
                "max_subtokens": args.max_subtokens, "domains": {k: len(v) for k, v in domains.items()}}
    loaded = None
    if args.model:
        loaded = load(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype,
                      max_codebook_size=args.max_codebook_size, max_subtokens=args.max_subtokens)
        settings.update(_placement(loaded[0]))
    measured = [(name, load_tokenizer(name), None) for name in args.tokenizer or []]
    if loaded is not None:
        measured.append((args.model, loaded[1].tokenizer, loaded[0].codec))
    rows: list[dict[str, Any]] = []
    tables = []
    for name, tok, codec in measured:
        if codec is None:
            codec = LZWCodec(len(tok), args.max_codebook_size, args.max_subtokens,
                             disabled_ids=default_disabled_ids(tok, protect_digits=not args.no_protect_digits),
                             pad_id=tok.pad_token_id)
        mine = []
        for domain, files in domains.items():
            per_file = [r for r in compression_report(files, tok, codec, window=args.window, progress=show)
                        if r.path != "total"]
            mine.append(CompressionRow(domain, *(sum(getattr(r, k) for r in per_file)
                                                 for k in ("files", "bytes", "tokens", "codes", "hypertokens"))))
        tables.append(f"tokenizer `{name}` (C={codec.max_codebook_size}, M={codec.max_subtokens}, windows of "
                      f"{args.window} codes)\n\n" + format_markdown(mine))
        rows += [{"tokenizer": name, **r.to_dict()} for r in mine]
    generated: list[dict[str, Any]] = []
    if loaded is not None and args.generate:
        model, tok = loaded[0], loaded[1].tokenizer
        prompts: dict[str, Sequence[str]] = {}
        for domain, files in domains.items():
            texts = _texts(files, None, args.generate)
            prompts[domain] = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][: args.prompt_tokens])
                               for t in texts]
        gen_rows = generation_compression(model, tok, prompts, max_new_tokens=args.max_new_tokens, progress=show)
        generated = [g.to_dict() for g in gen_rows]
        tables.append(f"greedy continuations of {args.model} ({args.max_new_tokens} base tokens after the first "
                      f"{args.prompt_tokens} base tokens of up to {args.generate} files per domain)\n\n"
                      + format_generation_markdown(gen_rows))
    out = _write(args.out, "compression", {"settings": settings, "rows": rows, "generated": generated},
                 "\n\n".join(tables))
    if args.plot:
        print(f"wrote {plot_compression(rows, out / 'compression.png', generated=generated)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ bits per byte


def _bpb(args: argparse.Namespace) -> int:
    from ..evaluation.likelihood import bits_per_byte_report, format_bits_per_byte_markdown  # imports torch

    check_int("--max-bytes", args.max_bytes, minimum=1)
    domains = _domains(args.domains, args.glob, args.exclude)
    texts = {name: _texts(files, args.max_bytes, None) for name, files in domains.items()}
    empty = [name for name, t in texts.items() if not t]
    if empty:
        raise ConfigError(f"no UTF-8 text found for domain(s) {', '.join(empty)} (check the path and --glob)")
    model, htok = load(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype)
    rows = bits_per_byte_report(model, htok.tokenizer, texts, window=args.window, stride=args.stride,
                                progress=sys.stderr.isatty())
    settings = {"model": args.model, "base_model": model.config.base_model_name_or_path, "window": args.window,
                "stride": args.stride, "max_bytes": args.max_bytes, **_placement(model)}
    md = (f"`{args.model}` vs its base model, windows of {args.window} base tokens moving by {args.stride}, "
          f"strict scoring of the canonical codes\n\n" + format_bits_per_byte_markdown(rows))
    out = _write(args.out, "bpb", {"settings": settings, "rows": rows}, md)
    if args.plot:
        print(f"wrote {plot_bits_per_byte([r for r in rows if r['domain'] != 'total'], out / 'bpb.png')}",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ generation


def _generation(args: argparse.Namespace) -> int:
    from ..evaluation.quality import CHAT_QUESTIONS, chat_prompts, check_domains, generation_report, text_prompts

    check_int("--files", args.files, minimum=1)
    check_int("--places", args.places, minimum=1)
    check_int("--prompt-tokens", args.prompt_tokens, minimum=16)
    check_int("--prompt-lookup", args.prompt_lookup, minimum=0)
    check_int("--chat", args.chat, minimum=0, maximum=len(CHAT_QUESTIONS))
    check_int("--max-new-tokens", args.max_new_tokens, minimum=1)
    questions = list(CHAT_QUESTIONS[: args.chat]) + list(args.question)
    if not args.domains and not questions:
        raise ConfigError("eval generation needs a DOMAIN, --chat N or --question TEXT")
    domains = _domains(args.domains, args.glob, args.exclude)
    model, htok = load(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype)
    tok = htok.tokenizer
    by_domain = {}
    for name, files in domains.items():
        texts = []
        for f in files:
            if len(texts) == args.files:
                break
            text = read_text_file(f)
            if text is not None and text.strip():  # binary, not UTF-8 or blank files are passed over
                texts.append((str(f), text))
        by_domain[name] = text_prompts(name, texts, tok, places=args.places, prompt_tokens=args.prompt_tokens)
    check_domains(by_domain)
    prompts = [p for ps in by_domain.values() for p in ps] + chat_prompts(tok, questions)
    result = generation_report(model, tok, prompts, max_new_tokens=args.max_new_tokens, lookup=args.prompt_lookup > 0,
                               prompt_lookup_num_tokens=max(1, args.prompt_lookup), sample=args.sample,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                               ignore_eos=args.ignore_eos, progress=sys.stderr.isatty())
    result.settings.update(model=args.model, places=args.places, prompt_tokens=args.prompt_tokens)
    out = _write(args.out, "generation", result.to_dict(), result.to_markdown())
    if args.plot:
        print(f"wrote {result.plot(out / 'generation.png')}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ speed


def _speed(args: argparse.Namespace) -> int:
    files = {w: getattr(args, w) for w in ("edit", "document", "free") if getattr(args, w)}
    if not files:
        raise ConfigError("eval speed needs files for at least one workload: --edit, --document or --free")
    check_int("--prompt-lookup", args.prompt_lookup, minimum=1)
    model, htok = load(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype)
    result = speed_report(model, htok.tokenizer, files, max_prompt_tokens=args.max_prompt_tokens,
                          max_new_base_tokens=args.max_new_tokens,
                          prompt_lookup_num_tokens=args.prompt_lookup, repeats=args.repeats,
                          cache_implementation=args.cache, progress=sys.stderr.isatty())
    payload = result.to_dict()
    payload["settings"] = {**payload.get("settings", {}), "model": args.model}
    out = _write(args.out, "speed", payload, result.to_markdown())
    if args.plot:
        print(f"wrote {result.plot(out / 'speed.png')}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ lm-eval


def _lm_eval(args: argparse.Namespace) -> int:
    from ..evaluation.harness import main as harness_main  # lm-eval: an optional extra, heavy to import

    return harness_main(lm_eval_argv(args.rest))


def lm_eval_argv(rest: Sequence[str]) -> list[str]:
    """lm-eval's own arguments for ``hypervocab eval lm-eval REST``.

    ``--model hypervocab`` is added unless REST names a model (or asks for help or a listing); ``--dtype X``
    (one of :data:`~hypervocab.loading.DTYPES`) becomes ``--model_args dtype=X``.  ``--device`` is lm-eval's
    own flag and reaches the model as its ``device`` argument; without it the model runs where
    :func:`hypervocab.load` puts it (CUDA when available, else the CPU).

    Raises:
        ConfigError: ``--dtype`` without a value, or with one that is not allowed.
    """
    rest = list(rest)
    if "--help" in rest or "-h" in rest or rest[:1] == ["ls"]:
        return rest
    out: list[str] = []
    dtype = None
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--dtype" or arg.startswith("--dtype="):
            value = arg.partition("=")[2] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else None)
            if value not in DTYPES:
                raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {value!r}")
            dtype = value
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    rest = out + (["--model_args", f"dtype={dtype}"] if dtype is not None else [])
    if "--model" in rest:
        return rest
    if rest[:1] == ["run"]:
        return ["run", "--model", "hypervocab", *rest[1:]]
    return ["--model", "hypervocab", *rest]


def add_eval_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="measure compression, bits per byte, written text, speed, or run lm-eval",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    es = e.add_subparsers(dest="eval_command", required=True)

    def common(p: argparse.ArgumentParser, *, files: bool = True) -> None:
        p.add_argument("--base-model", default=None, help="the base model's folder or hub id, instead of the one "
                       "the checkpoint names")
        if files:
            p.add_argument("--glob", action="append", default=None, help="files inside folders, e.g. '*.py'; "
                           "repeatable (default: all text files)")
            p.add_argument("--exclude", action="append", default=[], help="skip files or folders with this name")
        p.add_argument("--out", default="eval-results", help="folder for NAME.json / NAME.md / NAME.png "
                       "(default eval-results)")
        p.add_argument("--plot", action="store_true", help="also draw a PNG chart")
        add_device_options(p)

    c = es.add_parser("compression", help="input (and generated) compression per domain and tokenizer",
                      description="Bytes per token, codes per base token and hypertoken share of input text, per "
                      "domain and tokenizer; with --model and --generate, base tokens per code of the model's own "
                      "greedy continuations.")
    c.add_argument("domains", nargs="+", metavar="DOMAIN", help="PATH or NAME=PATH (file or folder)")
    c.add_argument("--tokenizer", action="append", default=None, help="a tokenizer (hub name, folder or .gguf); "
                   "repeatable")
    c.add_argument("--model", default=None, help="a hypervocab checkpoint ('default': the shipped one): its tokenizer "
                   "and codec are measured too")
    c.add_argument("--generate", type=int, default=None, metavar="N",
                   help="with --model: continue the first N files of each domain and measure the output")
    c.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in base tokens (default 256)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="base tokens to write per prompt, a hypertoken "
                   "counting as the base tokens it stands for (default 128)")
    c.add_argument("--window", type=int, default=2048, help="codes per window, fresh codebook each (default 2048)")
    c.add_argument("--max-codebook-size", type=int, default=2048, help="C for --tokenizer (default 2048)")
    c.add_argument("--max-subtokens", type=int, default=4, help="M for --tokenizer (default 4)")
    c.add_argument("--no-protect-digits", action="store_true", help="allow digit tokens inside hypertokens")
    common(c)
    c.set_defaults(func=_compression)

    b = es.add_parser("bpb", help="bits per byte of a hypervocab model and of its base model",
                      description="Bits per byte and byte perplexity of a hypervocab model and of its base model "
                      "(LoRA off) on exactly the same bytes: each text in sliding windows of base tokens, every "
                      "token scored once; the hypervocab model is scored strictly on the canonical codes.")
    b.add_argument("domains", nargs="+", metavar="DOMAIN", help="PATH or NAME=PATH (file or folder)")
    b.add_argument("--model", required=True, help="a hypervocab checkpoint folder ('default': the shipped one)")
    b.add_argument("--window", type=int, default=1024, help="window in base tokens (default 1024)")
    b.add_argument("--stride", type=int, default=512, help="new tokens scored per window (default 512)")
    b.add_argument("--max-bytes", type=int, default=200_000, help="text per domain, in bytes (default 200000)")
    common(b)
    b.set_defaults(func=_bpb)

    g = es.add_parser("generation", help="what the model writes, judged by the base model, against the base model",
                      description="Greedy (and with --sample, sampled) continuations of prompts cut from your files "
                      "(--places cuts per file, each the --prompt-tokens base tokens before it) and of chat "
                      "questions, by the base model (LoRA off), by hypervocab and by hypervocab with its prompt "
                      "lookup.  Per output and per domain: the base model's bits per byte of the output given the "
                      "prompt, the distinct-4-gram ratio, base tokens per code and the text; a domain's text is "
                      "'worse' than the base model's past 1.25x its bits per byte or under 0.9x its distinct-4-gram "
                      "ratio.")
    g.add_argument("domains", nargs="*", metavar="DOMAIN", help="PATH or NAME=PATH (file or folder)")
    g.add_argument("--model", required=True, help="a hypervocab checkpoint folder ('default': the shipped one)")
    g.add_argument("--files", type=int, default=2, help="files per domain (default 2)")
    g.add_argument("--places", type=int, default=3, help="prompts cut from each file (default 3)")
    g.add_argument("--prompt-tokens", type=int, default=256, help="base tokens of each prompt (default 256)")
    g.add_argument("--chat", type=int, default=2, metavar="N", help="also answer the first N built-in chat "
                   "questions (at most 6; default 2; 0 for none)")
    g.add_argument("--question", action="append", default=[], metavar="TEXT", help="a chat question of yours; "
                   "repeatable")
    g.add_argument("--max-new-tokens", type=int, default=64, help="base tokens each system writes at most "
                   "(default 64)")
    g.add_argument("--ignore-eos", action="store_true", help="write --max-new-tokens whatever (default: stop at "
                   "end-of-sequence)")
    g.add_argument("--prompt-lookup", type=int, default=10, metavar="K",
                   help="also write with hypervocab's prompt lookup, drafting up to K codes (default 10; 0 skips it)")
    g.add_argument("--sample", action="store_true", help="also sample from both models")
    g.add_argument("--temperature", type=float, default=0.7, help="with --sample (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.9, help="with --sample (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="with --sample: prompt k uses seed + k (default 0)")
    common(g)
    g.set_defaults(func=_generation)

    sp = es.add_parser("speed", help="prefill/decode speed: base, hypervocab, prompt lookup decoding, both",
                       description="Time to first token, prefill and decode throughput in base tokens per second "
                       "of the base model (Hugging Face greedy), the hypervocab model, the base model with "
                       "prompt lookup decoding, and hypervocab with its own prompt lookup (drafts of codes), on "
                       "the same prompts of three workloads built from your files: "
                       "editing a code file, answering from a document, free continuation. Medians of --repeats "
                       "runs, the systems taking turns.")
    sp.add_argument("--edit", action="append", default=[], metavar="FILE", help="a code file to edit; repeatable")
    sp.add_argument("--document", action="append", default=[], metavar="FILE",
                    help="a document to answer from; repeatable")
    sp.add_argument("--free", action="append", default=[], metavar="FILE", help="a file to continue; repeatable")
    sp.add_argument("--model", required=True, help="a hypervocab checkpoint folder ('default': the shipped one)")
    sp.add_argument("--max-prompt-tokens", type=int, default=1024, help="prompt length cap in base tokens "
                    "(default 1024)")
    sp.add_argument("--max-new-tokens", type=int, default=128, help="base tokens every system writes (default 128)")
    sp.add_argument("--prompt-lookup", type=int, default=10, metavar="K",
                    help="prompt lookup's draft length: K tokens for the base model, K codes for hypervocab "
                         "(default 10)")
    sp.add_argument("--repeats", type=int, default=3, help="timed runs per prompt and system (default 3)")
    sp.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="KV cache of base and hypervocab greedy: 'static' preallocates it and, on a GPU, compiles "
                    "the decode step into CUDA graphs, for both (default dynamic)")
    common(sp, files=False)
    sp.set_defaults(func=_speed)

    h = es.add_parser("lm-eval", help="lm-evaluation-harness with --model hypervocab", add_help=False,
                      description="Runs lm-eval's own command line with the hypervocab model type registered; "
                      "every argument goes to lm-eval (see `hypervocab eval lm-eval --help`).")
    h.add_argument("rest", nargs=argparse.REMAINDER)
    h.set_defaults(func=_lm_eval)
