"""``hypervocab`` command line: ``hypervocab compress PATH... --tokenizer NAME_OR_DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .. import __version__


def _compress(args: argparse.Namespace) -> int:
    from ..codec import LZWCodec
    from ..evaluation.compression import compression_report, format_markdown
    from ..tokenizer import default_disabled_ids, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    disabled = default_disabled_ids(tok, protect_digits=not args.no_protect_digits)
    codec = LZWCodec(len(tok), args.max_codebook_size, args.max_subtokens, disabled_ids=disabled,
                     pad_id=tok.pad_token_id)
    rows = compression_report(args.paths, tok, codec, window=args.window, window_unit=args.window_unit,
                              pattern=args.glob or ["*"], exclude=args.exclude, progress=not args.json and sys.stderr.isatty())
    if args.json:
        settings = {"tokenizer": args.tokenizer, "base_vocab_size": len(tok), "max_codebook_size": codec.max_codebook_size,
                    "max_subtokens": codec.max_subtokens, "window": args.window, "window_unit": args.window_unit,
                    "disabled_ids": len(codec.disabled_ids)}
        print(json.dumps({"settings": settings, "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(f"tokenizer {args.tokenizer} ({len(tok):,} ids, {len(codec.disabled_ids)} never merged), "
              f"C={codec.max_codebook_size}, M={codec.max_subtokens}, windows of {args.window} {args.window_unit}\n")
        print(format_markdown(rows))
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # our errors subclass these: say it in one line
        print(f"hypervocab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
