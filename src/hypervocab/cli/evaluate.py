"""``hypervocab eval ...``: what a hypervocab model gains and loses, on the user's own model and text.

Every command prints a Markdown table, writes ``NAME.json`` and ``NAME.md`` into ``--out``, and with
``--plot`` a ``NAME.png`` chart.

* ``eval compression DOMAIN... --tokenizer T [--model M --generate N]``: input compression per domain and
  tokenizer; with a model, also its own continuations' base tokens per emitted code.
* ``eval bpb DOMAIN... --model M``: bits per byte of the model and of its base model, same bytes.
* ``eval speed FILE... --model M``: prefill/decode speed and time to first token: base model, hypervocab,
  and base model with prompt lookup decoding, on three workloads.
* ``eval lm-eval --model_args pretrained=M --tasks ...``: lm-evaluation-harness with ``--model hypervocab``.

A DOMAIN is ``PATH`` or ``NAME=PATH`` (a file or a folder, searched with ``--glob``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _domains(specs: list[str], glob: list[str] | None, exclude: list[str]) -> dict[str, list[Path]]:
    from ..evaluation.compression import collect_files

    out: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if not Path(path).exists():
            raise ConfigError(f"domain {spec!r}: {path!r} does not exist (give PATH or NAME=PATH, a file or folder)")
        if name in out:
            raise ConfigError(f"domain {spec!r}: the name {name!r} is used twice (name them with NAME=PATH)")
        out[name] = collect_files(Path(path), glob or ["*"], exclude)
    return out


def _texts(files: list[Path], max_bytes: int | None, max_files: int | None) -> list[str]:
    """UTF-8 text files in order until ``max_bytes`` (the file that crosses it is cut at a line)."""
    out, used = [], 0
    for f in files:
        if max_files is not None and len(out) >= max_files:
            break
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
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


def _positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


# ------------------------------------------------------------------------------------------ compression


def _compression(args: argparse.Namespace) -> int:
    from ..codec import LZWCodec
    from ..evaluation.compression import (CompressionRow, compression_report, format_generation_markdown,
                                          format_markdown, generation_compression)
    from ..tokenizer import default_disabled_ids, load_tokenizer
    from .main import load_model

    if not args.tokenizer and not args.model:
        raise ConfigError("eval compression needs --tokenizer (repeatable) or --model")
    _positive("--generate", args.generate, allow_none=True)
    domains = _domains(args.domains, args.glob, args.exclude)
    show = sys.stderr.isatty()
    settings = {"window": args.window, "max_codebook_size": args.max_codebook_size,
                "max_subtokens": args.max_subtokens, "domains": {k: len(v) for k, v in domains.items()}}
    model = htok = None
    if args.model:
        model, htok = load_model(args.model, max_codebook_size=args.max_codebook_size,
                                 max_subtokens=args.max_subtokens, base_model=args.base_model)
    measured = [(name, load_tokenizer(name), None) for name in args.tokenizer or []]
    if model is not None:
        measured.append((args.model, htok.tokenizer, model.codec))
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
    if model is not None and args.generate:
        prompts = {}
        tok = htok.tokenizer
        for domain, files in domains.items():
            texts = _texts(files, None, args.generate)
            prompts[domain] = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][: args.prompt_tokens])
                               for t in texts]
        gen_rows = generation_compression(model, tok, prompts, max_new_tokens=args.max_new_tokens, progress=show)
        generated = [g.to_dict() for g in gen_rows]
        tables.append(f"greedy continuations of {args.model} ({args.max_new_tokens} codes after the first "
                      f"{args.prompt_tokens} base tokens of up to {args.generate} files per domain)\n\n"
                      + format_generation_markdown(gen_rows))
    out = _write(args.out, "compression", {"settings": settings, "rows": rows, "generated": generated},
                 "\n\n".join(tables))
    if args.plot:
        from ..evaluation.plots import plot_compression

        print(f"wrote {plot_compression(rows, out / 'compression.png', generated=generated)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ bits per byte


def _bpb(args: argparse.Namespace) -> int:
    from ..evaluation.likelihood import bits_per_byte_report, format_bits_per_byte_markdown
    from .main import load_model

    _positive("--max-bytes", args.max_bytes)
    domains = _domains(args.domains, args.glob, args.exclude)
    texts = {name: _texts(files, args.max_bytes, None) for name, files in domains.items()}
    empty = [name for name, t in texts.items() if not t]
    if empty:
        raise ConfigError(f"no UTF-8 text found for domain(s) {', '.join(empty)} (check the path and --glob)")
    model, htok = load_model(args.model, base_model=args.base_model)
    rows = bits_per_byte_report(model, htok.tokenizer, texts, window=args.window, stride=args.stride,
                                progress=sys.stderr.isatty())
    settings = {"model": args.model, "base_model": model.config.base_model_name_or_path, "window": args.window,
                "stride": args.stride, "max_bytes": args.max_bytes}
    md = (f"`{args.model}` vs its base model, windows of {args.window} base tokens moving by {args.stride}, "
          f"strict scoring of the canonical codes\n\n" + format_bits_per_byte_markdown(rows))
    out = _write(args.out, "bpb", {"settings": settings, "rows": rows}, md)
    if args.plot:
        from ..evaluation.plots import plot_bits_per_byte

        print(f"wrote {plot_bits_per_byte([r for r in rows if r['domain'] != 'total'], out / 'bpb.png')}",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ speed


def _speed(args: argparse.Namespace) -> int:
    from ..evaluation.speed import speed_report
    from .main import load_model

    files = {w: getattr(args, w) for w in ("edit", "document", "free") if getattr(args, w)}
    if not files:
        raise ConfigError("eval speed needs files for at least one workload: --edit, --document or --free")
    model, htok = load_model(args.model, base_model=args.base_model)
    result = speed_report(model.eval(), htok.tokenizer, files, max_prompt_tokens=args.max_prompt_tokens,
                          max_new_base_tokens=args.max_new_tokens,
                          prompt_lookup_num_tokens=args.prompt_lookup_num_tokens, repeats=args.repeats,
                          progress=sys.stderr.isatty())
    payload = result.to_dict()
    payload["settings"] = {**payload.get("settings", {}), "model": args.model}
    out = _write(args.out, "speed", payload, result.to_markdown())
    if args.plot:
        print(f"wrote {result.plot(out / 'speed.png')}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ lm-eval


def _lm_eval(args: argparse.Namespace) -> int:
    from ..evaluation.harness import main as harness_main

    return harness_main(["--model", "hypervocab", *args.rest])


def add_eval_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="measure compression, bits per byte, speed, or run lm-eval",
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
    c.add_argument("--max-new-tokens", type=int, default=128, help="codes to generate per prompt (default 128)")
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

    sp = es.add_parser("speed", help="prefill/decode speed: base, hypervocab, prompt lookup decoding",
                       description="Time to first token, prefill and decode throughput in base tokens per second "
                       "of the base model (Hugging Face greedy), the hypervocab model, and the base model with "
                       "prompt lookup decoding, on the same prompts of three workloads built from your files: "
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
    sp.add_argument("--prompt-lookup-num-tokens", type=int, default=10, help="prompt lookup's candidate length "
                    "(default 10)")
    sp.add_argument("--repeats", type=int, default=3, help="timed runs per prompt and system (default 3)")
    common(sp, files=False)
    sp.set_defaults(func=_speed)

    h = es.add_parser("lm-eval", help="lm-evaluation-harness with --model hypervocab", add_help=False,
                      description="Runs lm-eval's own command line with the hypervocab model type registered; "
                      "every argument goes to lm-eval (see `hypervocab eval lm-eval --help`).")
    h.add_argument("rest", nargs=argparse.REMAINDER)
    h.set_defaults(func=_lm_eval)
