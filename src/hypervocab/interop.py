"""Checkpoints of the public zip2zip format, run by hypervocab.

Such a folder holds:

* ``zip2zip_config.json``: ``format_version`` (1 or 2), ``base_model_name_or_path`` (a hub name or a
  folder; ``"."`` means the folder itself is the base model, with its ``config.json``, weights and
  tokenizer), ``position_mode`` (``"compressed"`` or ``"base_token_end"``), ``encoder_type``
  (``"transformer"`` or ``"res_latent_attn"``), ``encoder`` (that encoder's sizes and flags) and
  ``compression`` (``initial_vocab_size``, ``max_codebook_size``, ``max_subtokens``, ``disabled_ids``);
* the hyper-encoders, ``zip2zip_encoders.safetensors`` (or ``encoders.safetensors``), as
  ``input_encoder.*`` / ``output_encoder.*`` tensors (no ``output_encoder`` when they are tied);
* the decoder's changes: a PEFT adapter (``adapter_config.json``), or a full ``model.safetensors``
  loaded over the base model, or nothing;
* optionally ``meta.pt``, training arguments whose ``encoder_causal`` / ``no_encoder_residual`` override
  the config's ``causal`` / ``residual`` flags (read without unpickling code: a file that needs it is refused).

How it maps onto a :class:`~hypervocab.HyperConfig`:

* ``initial_vocab_size`` is ``base_vocab_size``: hypertoken ``k`` is id ``initial_vocab_size + k`` in
  both runtimes.  Embedding rows past it (a padded vocabulary) are never read, so they are never scored
  either (the public runtime scores them after the hypertokens, ids it cannot read back).
* ``disabled_ids`` as they are; the pad id is the tokenizer's pad token, else its end-of-text token, as
  in the public runtime.
* ``position_mode``: ``"compressed"`` (one position per code) stays ``"compressed"``; ``"base_token_end"``
  (a code sits at the base index of its last token) is our ``"base"``.
* Masks: a full forward scores, at every position, every entry the sequence installs
  (``codebook_mask="none"``), and no step ever scores the one new id that may legally come next
  (``score_next_id=False``): the public runtime never writes it.
* ``"transformer"`` encoder: post-LN blocks without biases at the model width (no projections), learned
  positions when ``position_encoding`` is ``"learnable"``, no final norm, the mean over all ``M`` slots
  (a padding slot holds the pad token's vector and attends to nothing), no residual.
* ``"res_latent_attn"`` encoder: pre-LN blocks without biases, projections (without biases) when
  ``model_hidden_size`` differs from ``hidden_size``, learned positions, a final norm, the mean over the
  phrase (or its last subtoken when ``causal``, with causal attention), and the first subtoken's vector
  added when ``residual``.

Where the public runtime (0.2.0) is inconsistent, the checkpoint's own settings win: its ``generate``
loses ``"base_token_end"`` positions when the decoder has a PEFT adapter (they apply in its forward
only), and its plain forward numbers left-padded rows from the padding on; both runtimes agree wherever
it applies its settings.

Everything else is refused with a :class:`~hypervocab.errors.ConfigError` naming the file, the field and
the value: an encoder type we cannot run (``"attention"``), unknown fields, missing, extra or misshapen
tensors, a missing encoders file (the public runtime would go on with random encoders), base models whose
embedding or head the public runtime would replace by plain ones (Gemma's scaled embedding, LoRA on the
embedding or the head), and decoder weights it would silently skip (an adapter in a self-contained
checkpoint, ``model.safetensors`` next to an adapter, shards or ``.bin`` files instead of one
``model.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

from .config import CONFIG_NAME, HyperConfig
from .errors import ConfigError, check_int

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn
    from transformers import PreTrainedModel

    from .model import HyperModel
    from .tokenizer import HyperTokenizer


__all__ = [
    "PUBLIC_CONFIG_NAME",
    "PUBLIC_ENCODER_NAMES",
    "PublicCheckpoint",
    "is_public_checkpoint",
    "read_public_config",
    "public_hyper_config",
    "public_encoder_state",
    "load_public_model",
    "load_public_tokenizer",
]

PUBLIC_CONFIG_NAME = "zip2zip_config.json"
# the public loader looks for these in this order
PUBLIC_ENCODER_NAMES = ("zip2zip_encoders.safetensors", "encoders.safetensors")
DECODER_WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.pt"
ADAPTER_CONFIG_NAME = "adapter_config.json"

_FORMAT_VERSIONS = (1, 2)
_POSITION_MODES: dict[str, Literal["base", "compressed"]] = {"compressed": "compressed", "base_token_end": "base"}
_TOP_FIELDS = {"format_version", "base_model_name_or_path", "position_mode", "encoder_type", "encoder", "compression"}
_COMPRESSION_FIELDS = {"initial_vocab_size", "max_codebook_size", "max_subtokens", "disabled_ids"}
_COMMON_ENCODER_FIELDS = {"hidden_size", "tie_encoders", "position_encoding", "num_hidden_layers",
                          "intermediate_size", "num_heads"}
_ENCODER_FIELDS = {
    "transformer": _COMMON_ENCODER_FIELDS,
    "res_latent_attn": _COMMON_ENCODER_FIELDS | {"model_hidden_size", "causal", "residual"},
}
_UNSUPPORTED_ENCODERS = {
    # its forward takes one sequence's codebook [H, S], but the public runtime hands every encoder a
    # batch [B, H, S]: no checkpoint of it runs there, so there are no numbers to reproduce
    "attention": "the public runtime cannot run it either (it passes a batched codebook the encoder does not take)",
}


@dataclass(frozen=True)
class PublicCheckpoint:
    """The validated content of a ``zip2zip_config.json`` (and of ``meta.pt``, when present).

    base_model: where the base model and tokenizer are (``"."`` resolved to the folder itself).
    encoder: the ``encoder`` section, with ``causal`` / ``residual`` as ``meta.pt`` sets them.
    """

    directory: Path
    format_version: int
    base_model: str
    self_contained: bool
    position_mode: str
    encoder_type: str
    encoder: dict[str, Any]
    initial_vocab_size: int
    max_codebook_size: int
    max_subtokens: int
    disabled_ids: list[int]

    @property
    def config_path(self) -> Path:
        return self.directory / PUBLIC_CONFIG_NAME

    @property
    def tie_encoders(self) -> bool:
        return bool(self.encoder.get("tie_encoders", False))

    def encoder_file(self) -> Path:
        """The encoders' safetensors file; a :class:`ConfigError` when there is none."""
        for name in PUBLIC_ENCODER_NAMES:
            if (self.directory / name).is_file():
                return self.directory / name
        raise ConfigError(f"{str(self.directory)!r} has a {PUBLIC_CONFIG_NAME} but no "
                          f"{' or '.join(PUBLIC_ENCODER_NAMES)}: "
                          f"the hyper-encoders' weights are missing (hypervocab never replaces them by random ones)")


def is_public_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` is a checkpoint of the public zip2zip format (and not one of ours)."""
    directory = Path(directory)
    return (directory / PUBLIC_CONFIG_NAME).is_file() and not (directory / CONFIG_NAME).is_file()


# ---------------------------------------------------------------------------------------------- reading the config


@overload
def _int_field(path: Path, name: str, value: Any, lo: int, *, optional: Literal[False] = False) -> int: ...


@overload
def _int_field(path: Path, name: str, value: Any, lo: int, *, optional: bool) -> int | None: ...


def _int_field(path: Path, name: str, value: Any, lo: int, *, optional: bool = False) -> int | None:
    return check_int(f"{path}: field '{name}'", value, minimum=lo, optional=optional)


def _bool_field(path: Path, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: field '{name}' must be true or false, got {value!r}")
    return value


def _section(path: Path, name: str, value: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: field '{name}' must be an object, got {value!r}")
    unknown = sorted(set(value) - known)
    if unknown:
        where = f"'{name}.{unknown[0]}'" if name else f"'{unknown[0]}'"
        raise ConfigError(f"{path}: unknown field {where} (value {value[unknown[0]]!r}): written by a zip2zip "
                          f"version hypervocab does not know")
    return value


def read_public_config(directory: str | Path) -> PublicCheckpoint:
    """Read and check ``zip2zip_config.json`` (and ``meta.pt``) in ``directory``.

    Raises:
        ConfigError: the file is missing or not JSON, or a field is unknown, missing or out of range;
            the message names the file, the field and the value.
    """
    directory = Path(directory)
    path = directory / PUBLIC_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{str(directory)!r} holds no {PUBLIC_CONFIG_NAME}: not a zip2zip checkpoint")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    data = _section(path, "", data, _TOP_FIELDS)

    version = data.get("format_version", 1)
    if version not in _FORMAT_VERSIONS or isinstance(version, bool):
        raise ConfigError(f"{path}: field 'format_version' must be one of {list(_FORMAT_VERSIONS)}, got {version!r}")
    base = data.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: field 'base_model_name_or_path' must name the base model, got {base!r}")
    position_mode = data.get("position_mode", "compressed")
    if position_mode not in _POSITION_MODES:
        raise ConfigError(f"{path}: field 'position_mode' must be one of {sorted(_POSITION_MODES)}, "
                          f"got {position_mode!r}")

    kind = data.get("encoder_type")
    if kind in _UNSUPPORTED_ENCODERS:
        raise ConfigError(f"{path}: field 'encoder_type' is {kind!r}, which hypervocab does not run: "
                          f"{_UNSUPPORTED_ENCODERS[kind]}")
    if kind not in _ENCODER_FIELDS:
        raise ConfigError(f"{path}: field 'encoder_type' must be one of {sorted(_ENCODER_FIELDS)}, got {kind!r}")
    encoder = dict(_section(path, "encoder", data.get("encoder"), _ENCODER_FIELDS[kind]))
    _int_field(path, "encoder.hidden_size", encoder.get("hidden_size"), 1)
    heads = _int_field(path, "encoder.num_heads", encoder.get("num_heads"), 1)
    _int_field(path, "encoder.num_hidden_layers", encoder.get("num_hidden_layers"), 0)
    _int_field(path, "encoder.intermediate_size", encoder.get("intermediate_size"), 1, optional=True)
    if encoder["hidden_size"] % heads:
        raise ConfigError(f"{path}: field 'encoder.num_heads' ({heads}) must divide encoder.hidden_size "
                          f"({encoder['hidden_size']})")
    encoder["tie_encoders"] = _bool_field(path, "encoder.tie_encoders", encoder.get("tie_encoders", False))
    if kind == "transformer":
        if encoder.get("position_encoding") not in ("learnable", None):
            raise ConfigError(f"{path}: field 'encoder.position_encoding' must be \"learnable\" or null, "
                              f"got {encoder['position_encoding']!r}")
    else:
        _int_field(path, "encoder.model_hidden_size", encoder.get("model_hidden_size"), 1, optional=True)
        encoder["causal"] = _bool_field(path, "encoder.causal", encoder.get("causal", False))
        encoder["residual"] = _bool_field(path, "encoder.residual", encoder.get("residual", True))

    comp = _section(path, "compression", data.get("compression"), _COMPRESSION_FIELDS)
    V = _int_field(path, "compression.initial_vocab_size", comp.get("initial_vocab_size"), 1)
    C = _int_field(path, "compression.max_codebook_size", comp.get("max_codebook_size"), 0)
    M = _int_field(path, "compression.max_subtokens", comp.get("max_subtokens"), 1)
    disabled = comp.get("disabled_ids")
    if disabled is None:
        disabled = []
    if not isinstance(disabled, list):
        raise ConfigError(f"{path}: field 'compression.disabled_ids' must be a list of ids, got {disabled!r}")
    bad = [i for i in disabled if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < V]
    if bad:
        raise ConfigError(f"{path}: field 'compression.disabled_ids' holds {bad[0]!r}, not an id in "
                          f"[0, initial_vocab_size={V})")

    self_contained = base == "."
    ckpt = PublicCheckpoint(directory, version, str(directory) if self_contained else base, self_contained,
                            position_mode, kind, encoder, V, C, M, list(disabled))
    if kind == "res_latent_attn":
        _apply_meta(ckpt)
    return ckpt


def _apply_meta(ckpt: PublicCheckpoint) -> None:
    """``meta.pt``'s training arguments override ``causal`` / ``residual``, as the public loader does."""
    path = ckpt.directory / META_NAME
    if not path.is_file():
        return
    import argparse
    import contextlib

    import torch

    # never unpickle arbitrary objects: plain containers (and argparse namespaces, where torch can allow them)
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we cannot know what the file says
        raise ConfigError(f"{path} cannot be read without running the code it pickles ({type(e).__name__}); its "
                          f"training arguments may change encoder.causal / encoder.residual, so hypervocab "
                          f"will not guess them (remove the file if zip2zip_config.json is right)") from None
    if not isinstance(meta, dict):  # the public loader reads nothing from such a file either
        return
    args = meta.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not args:
        return
    if not isinstance(args, dict):
        raise ConfigError(f"{path}: field 'args' must be a dict of training arguments, got {type(args).__name__}")
    ckpt.encoder["causal"] = bool(args.get("encoder_causal", False))
    ckpt.encoder["residual"] = not bool(args.get("no_encoder_residual", False))


# ---------------------------------------------------------------------------------------------- conversion


class _EncoderVariant(TypedDict):
    """The :class:`~hypervocab.HyperConfig` fields that say which variant of our encoder a public one is."""

    encoder_norm: Literal["pre", "post"]
    encoder_bias: bool
    encoder_projection: bool
    encoder_positions: bool
    encoder_final_norm: bool
    encoder_pool: Literal["valid", "all", "last"]
    encoder_causal: bool
    encoder_residual: bool


def public_hyper_config(ckpt: PublicCheckpoint, *, pad_id: int | None,
                        base_model_name_or_path: str | None = None) -> HyperConfig:
    """The :class:`~hypervocab.HyperConfig` that runs ``ckpt`` exactly (see the module's docstring)."""
    enc = ckpt.encoder
    hidden = enc["hidden_size"]
    ffn = enc.get("intermediate_size") or 4 * hidden
    if ckpt.encoder_type == "transformer":
        variant = _EncoderVariant(encoder_norm="post", encoder_bias=False, encoder_projection=False,
                                  encoder_positions=enc.get("position_encoding") == "learnable",
                                  encoder_final_norm=False, encoder_pool="all", encoder_causal=False,
                                  encoder_residual=False)
    else:
        latent = enc.get("model_hidden_size") not in (None, hidden)
        variant = _EncoderVariant(encoder_norm="pre", encoder_bias=False, encoder_projection=latent,
                                  encoder_positions=True, encoder_final_norm=True,
                                  encoder_pool="last" if enc["causal"] else "valid",
                                  encoder_causal=enc["causal"], encoder_residual=enc["residual"])
    try:
        return HyperConfig(
            max_codebook_size=ckpt.max_codebook_size, max_subtokens=ckpt.max_subtokens,
            base_vocab_size=ckpt.initial_vocab_size, disabled_ids=list(ckpt.disabled_ids), protect_digits=False,
            pad_id=pad_id, encoder="transformer", encoder_layers=enc["num_hidden_layers"],
            encoder_heads=enc["num_heads"], encoder_dim=hidden, encoder_ffn_dim=ffn,
            tie_encoders=enc["tie_encoders"], codebook_mask="none", score_next_id=False,
            position_mode=_POSITION_MODES[ckpt.position_mode], base_model_name_or_path=base_model_name_or_path,
            **variant)
    except ConfigError as e:
        raise ConfigError(f"{ckpt.config_path}: cannot be run by hypervocab: {e}") from None


def _model_width(ckpt: PublicCheckpoint) -> int:
    """The model width the encoders of ``ckpt`` read and write."""
    return ckpt.encoder.get("model_hidden_size") or ckpt.encoder["hidden_size"]


def _source_names(ckpt: PublicCheckpoint, ours: str) -> tuple[str, ...]:
    """The public tensor name(s) our parameter ``ours`` is made of (several are concatenated on dim 0)."""
    parts = ours.split(".")
    if parts[0] == "blocks":
        i, rest = parts[1], ".".join(parts[2:])
        if ckpt.encoder_type == "transformer":
            table = {"qkv.weight": ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
                     "proj.weight": ("attention.o_proj.weight",), "ffn.0.weight": ("mlp.fc1.weight",),
                     "ffn.2.weight": ("mlp.fc2.weight",),
                     "norm1.weight": ("post_attention_layernorm.weight",),
                     "norm1.bias": ("post_attention_layernorm.bias",),
                     "norm2.weight": ("post_mlp_layernorm.weight",), "norm2.bias": ("post_mlp_layernorm.bias",)}
        else:
            table = {"qkv.weight": ("wq.weight", "wk.weight", "wv.weight"), "proj.weight": ("wo.weight",),
                     "ffn.0.weight": ("w1.weight",), "ffn.2.weight": ("w2.weight",), "norm1.weight": ("norm1.weight",),
                     "norm1.bias": ("norm1.bias",), "norm2.weight": ("norm2.weight",), "norm2.bias": ("norm2.bias",)}
        return tuple(f"layers.{i}.{name}" for name in table[rest])
    return {"positions": ("pos_embed.weight",), "in_proj.weight": ("proj_in.weight",),
            "out_proj.weight": ("proj_out.weight",), "norm.weight": ("norm.weight",),
            "norm.bias": ("norm.bias",)}[ours]


def public_encoder_state(ckpt: PublicCheckpoint, tensors: dict[str, torch.Tensor], side: str,
                         module: nn.Module, *, file: Path) -> dict[str, torch.Tensor]:
    """Our ``module``'s state dict, made from the public ``{side}.*`` tensors of ``file``.

    Raises:
        ConfigError: a tensor is missing, has the wrong shape, or is one our encoder has no place for.
    """
    import torch

    prefix = side + "."
    theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not theirs:
        raise ConfigError(f"{file}: no '{prefix}*' tensors, but {PUBLIC_CONFIG_NAME} says the encoders are "
                          f"{'tied' if ckpt.tie_encoders else 'not tied'}: the {side} is missing")
    used: set[str] = set()
    state = {}
    for name, param in module.state_dict().items():
        sources = _source_names(ckpt, name)
        parts = []
        for src in sources:
            if src not in theirs:
                raise ConfigError(f"{file}: tensor '{prefix}{src}' is missing; {PUBLIC_CONFIG_NAME} "
                                  f"(encoder_type {ckpt.encoder_type!r}, {_sizes(ckpt)}) needs it")
            parts.append(theirs[src])
            used.add(src)
        value = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if tuple(value.shape) != tuple(param.shape):
            got = ", ".join(f"'{prefix}{s}' {tuple(p.shape)}" for s, p in zip(sources, parts))
            raise ConfigError(f"{file}: tensor {got} does not fit {PUBLIC_CONFIG_NAME} (encoder_type "
                              f"{ckpt.encoder_type!r}, {_sizes(ckpt)}), which needs {_expected(param, len(parts))}")
        state[name] = value
    extra = sorted(set(theirs) - used)
    if extra:
        raise ConfigError(f"{file}: unexpected tensor '{prefix}{extra[0]}': {PUBLIC_CONFIG_NAME} (encoder_type "
                          f"{ckpt.encoder_type!r}, {_sizes(ckpt)}) has no place for it")
    return state


def _sizes(ckpt: PublicCheckpoint) -> str:
    keys = ("hidden_size", "model_hidden_size", "num_hidden_layers", "num_heads", "intermediate_size",
            "position_encoding")
    sizes = [f"{k}={ckpt.encoder[k]!r}" for k in keys if ckpt.encoder.get(k) is not None]
    return ", ".join(sizes + [f"max_subtokens={ckpt.max_subtokens}"])


def _expected(param: torch.Tensor, n: int) -> str:
    shape = tuple(param.shape)
    if n == 1:
        return str(shape)
    return " and ".join([str((shape[0] // n,) + shape[1:])] * n)


# ---------------------------------------------------------------------------------------------- loading


def _pad_id(tokenizer: Any) -> int | None:
    # the public runtime's rule: the pad token, else the end-of-text token
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _load_base_tokenizer(ckpt: PublicCheckpoint) -> Any:
    from .tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(ckpt.base_model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ckpt.config_path}: field 'base_model_name_or_path' is "
                          f"{'.' if ckpt.self_contained else ckpt.base_model!r}, where no tokenizer could be "
                          f"loaded: {e}") from None
    if len(tokenizer) > ckpt.initial_vocab_size:
        raise ConfigError(f"{ckpt.config_path}: field 'compression.initial_vocab_size' is "
                          f"{ckpt.initial_vocab_size}, but the tokenizer has {len(tokenizer)} ids: its ids past "
                          f"that would read as hypertokens")
    if _pad_id(tokenizer) is None:
        raise ConfigError(f"the tokenizer of {ckpt.base_model!r} has neither a pad nor an end-of-text token: "
                          f"the public format pads phrases with one")
    return tokenizer


def _ignored_weights(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path}: decoder weights the public runtime would ignore ({why}); hypervocab cannot tell "
                       f"which decoder was meant")


def _load_decoder_changes(ckpt: PublicCheckpoint,
                          base_model: PreTrainedModel | PeftModel) -> tuple[PreTrainedModel | PeftModel, bool]:
    """The base model with the checkpoint's adapter or full weights, and whether full weights replaced it.

    The public loader's order: a self-contained checkpoint is its own base model; otherwise a PEFT
    adapter if there is one, else ``model.safetensors`` over the base model, else the base model as it
    is.  Decoder weights that order would skip are refused rather than skipped.
    """
    d = ckpt.directory
    adapter_files = [n for n in (ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin")
                     if (d / n).is_file()]
    if ckpt.self_contained:
        if adapter_files:
            raise _ignored_weights(d / adapter_files[0], "a self-contained checkpoint is read as its base model alone")
        return base_model, False
    path = d / DECODER_WEIGHTS_NAME
    if (d / ADAPTER_CONFIG_NAME).is_file():
        if path.is_file():
            raise _ignored_weights(path, f"it loads the adapter of {ADAPTER_CONFIG_NAME} instead")
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(d)), False
    if not path.is_file():
        ignored = adapter_files + [n for n in ("model.safetensors.index.json", "pytorch_model.bin",
                                               "pytorch_model.bin.index.json") if (d / n).is_file()]
        if ignored:
            raise _ignored_weights(d / ignored[0], f"it reads only {ADAPTER_CONFIG_NAME} adapters or a single "
                                                   f"{DECODER_WEIGHTS_NAME}")
        return base_model, False
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    result = base_model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"{path}: tensor '{result.unexpected_keys[0]}' is not a weight of the base model "
                          f"{ckpt.base_model!r} ({type(base_model).__name__})")
    # a missing key is fine only when it is tied to a loaded one (the LM head of tied models)
    params = dict(base_model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in tensors if k in params}
    missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
    if missing:
        raise ConfigError(f"{path}: tensor '{missing[0]}' is missing: a full decoder must hold every weight "
                          f"(the public runtime would keep the base model's, a mix of two models)")
    return base_model, True


def _check_plain_modules(ckpt: PublicCheckpoint, model: PreTrainedModel | PeftModel) -> None:
    """The public runtime swaps the embedding and head for plain ones over the same weight: refuse what that changes."""
    from torch import nn

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding:
        raise ConfigError(f"the base model {ckpt.base_model!r} reads ids with a {type(emb).__name__}; the public "
                          f"zip2zip runtime replaces it by a plain embedding lookup of its weight (dropping any "
                          f"scaling or adapter), which hypervocab does not reproduce")
    if type(head) is not nn.Linear:
        raise ConfigError(f"the base model {ckpt.base_model!r} scores ids with a "
                          f"{type(head).__name__ if head is not None else 'missing LM head'}; the public zip2zip "
                          f"runtime replaces it by a plain linear layer over its weight (dropping any adapter), "
                          f"which hypervocab does not reproduce")
    widths = {"input": emb.weight.shape[1], "output": head.weight.shape[1]}
    want = _model_width(ckpt)
    for side, width in widths.items():
        if width != want:
            field = "model_hidden_size" if ckpt.encoder.get("model_hidden_size") else "hidden_size"
            raise ConfigError(f"{ckpt.config_path}: field 'encoder.{field}' is {want}, but the base model's "
                              f"{side} vectors have width {width}")
    rows = emb.weight.shape[0]
    if ckpt.initial_vocab_size > rows:
        raise ConfigError(f"{ckpt.config_path}: field 'compression.initial_vocab_size' is {ckpt.initial_vocab_size}, "
                          f"but the base model's embedding has only {rows} rows")


def load_public_model(directory: str | Path, *, base_model: PreTrainedModel | PeftModel | None = None,
                      **base_kwargs: Any) -> HyperModel:
    """Load a checkpoint of the public zip2zip format as a :class:`~hypervocab.HyperModel`.

    :func:`hypervocab.load` calls this for such a folder; ``HyperModel.from_pretrained`` reads only
    hypervocab's own format.  A model loaded here saves (``save_pretrained``) in hypervocab's format.

    Args:
        directory: the checkpoint's folder.
        base_model: the base model, already loaded (otherwise from ``base_model_name_or_path``);
            the checkpoint's adapter or full weights are applied to it.
        base_kwargs: for ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``...).

    Raises:
        ConfigError: anything the folder holds that hypervocab cannot run exactly.
    """
    from safetensors.torch import load_file

    from .model import HyperModel

    ckpt = read_public_config(directory)
    encoder_file = ckpt.encoder_file()  # before loading a model: a missing file is the cheapest error
    tokenizer = _load_base_tokenizer(ckpt)
    if base_model is None:
        from transformers import AutoModelForCausalLM

        base_model = AutoModelForCausalLM.from_pretrained(ckpt.base_model, **base_kwargs)
    base_model, replaced = _load_decoder_changes(ckpt, base_model)
    _check_plain_modules(ckpt, base_model)
    # full decoder weights are not the named base model: leave no name a re-saved checkpoint could pair with
    config = public_hyper_config(ckpt, pad_id=_pad_id(tokenizer),
                                 base_model_name_or_path=None if replaced else ckpt.base_model)
    model = HyperModel(base_model, config)
    tensors = load_file(str(encoder_file))
    sides = [("input_encoder", model.input_encoder)]
    if not ckpt.tie_encoders:  # tied: the public loader ignores any output_encoder.* tensors, and so do we
        sides.append(("output_encoder", model.output_encoder))
    for side, module in sides:
        module.load_state_dict(public_encoder_state(ckpt, tensors, side, module, file=encoder_file), strict=True)
    return model


def load_public_tokenizer(directory: str | Path) -> HyperTokenizer:
    """The :class:`~hypervocab.HyperTokenizer` of a public zip2zip checkpoint: its base tokenizer and codec settings."""
    from .tokenizer import HyperTokenizer

    ckpt = read_public_config(directory)
    tokenizer = _load_base_tokenizer(ckpt)
    return HyperTokenizer(tokenizer, public_hyper_config(ckpt, pad_id=_pad_id(tokenizer),
                                                         base_model_name_or_path=ckpt.base_model))
