"""``HyperConfig``: everything hypervocab adds to a base model, saved as JSON next to our weights."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from .codec import LZWCodec
from .errors import ConfigError, int_problem
from .version import __version__

__all__ = ["HyperConfig", "CONFIG_NAME", "bind_config", "default_disabled_ids"]

CONFIG_NAME = "hypervocab_config.json"


@dataclass
class HyperConfig:
    """Settings of a hypervocab model.

    Codec:
        max_codebook_size: ``C``, hypertokens per sequence (ids ``[V, V + C)``).
        max_subtokens: ``M``, the longest phrase a hypertoken stands for.
        base_vocab_size: ``V`` = ``len(tokenizer)``; filled in by :meth:`HyperModel.from_base`.
        disabled_ids: ids never merged; ``None`` means every special/added token, the pad id and
            (unless ``protect_digits=False``) every digit token, taken from the tokenizer.
        protect_digits: see ``disabled_ids``.
        pad_id: the padding id (taken from the tokenizer when ``None``).
    Hyper-encoders (docs/design.md section 7):
        encoder: ``"transformer"`` (pre-LN, learned positions over ``M``, residual from the first
            subtoken, zero-initialised output) or ``"mean"`` (parameter-free mean of the subtokens).
        encoder_layers, encoder_heads, encoder_dim (latent width, ``None`` = model width / 4, at most 256),
        encoder_ffn_mult: transformer sizes.
        tie_encoders: one encoder for both sides; the default (untied) has a second one for the output side.
    Encoder variants (what checkpoints of the public zip2zip format need, see :mod:`hypervocab.interop`; the
    defaults are the encoder described above):
        encoder_ffn_dim: feed-forward width (``None`` = ``encoder_ffn_mult`` x latent width).
        encoder_norm: ``"pre"`` or ``"post"`` LayerNorm placement in the blocks.
        encoder_bias: biases in the attention, feed-forward and projection layers.
        encoder_projection: project to the latent width and back (without it ``encoder_dim`` is the
            model width).
        encoder_positions: learned positions over ``M``.
        encoder_final_norm: a LayerNorm before pooling.
        encoder_pool: ``"valid"`` (mean over the phrase's subtokens), ``"all"`` (mean over all ``M``
            slots, padding slots holding the pad token's vector) or ``"last"`` (the last subtoken).
        encoder_causal: causal attention inside a phrase.
        encoder_residual: add the first subtoken's vector to the encoder's output.
    Model:
        codebook_mask: ``"exact"`` (position t scores only rows installed by codes <= t, plus the one new
            id that may legally come next; what inference does) or ``"none"`` (the whole sequence's table).
        score_next_id: score that one new id that may legally come next (the LZW "KwKwK" case) in cached
            steps and generation too.  ``False`` scores installed rows only, as the public zip2zip runtime
            does (it never writes that id); it needs ``codebook_mask="none"``, since an exact mask without
            it would hold such targets of canonical streams at ``-inf``.
        position_mode: ``"base"`` (a code sits at the base-stream index of its last base token) or
            ``"compressed"`` (one position per code).
    Provenance (filled in when saving): base_model_name_or_path, base_model_revision, hypervocab_version.
    """

    max_codebook_size: int = 2048
    max_subtokens: int = 4
    base_vocab_size: int | None = None
    disabled_ids: list[int] | None = None
    protect_digits: bool = True
    pad_id: int | None = None
    encoder: Literal["transformer", "mean"] = "transformer"
    encoder_layers: int = 2
    encoder_heads: int = 4
    encoder_dim: int | None = None
    encoder_ffn_mult: int = 4
    tie_encoders: bool = False
    encoder_ffn_dim: int | None = None
    encoder_norm: Literal["pre", "post"] = "pre"
    encoder_bias: bool = True
    encoder_projection: bool = True
    encoder_positions: bool = True
    encoder_final_norm: bool = True
    encoder_pool: Literal["valid", "all", "last"] = "valid"
    encoder_causal: bool = False
    encoder_residual: bool = True
    codebook_mask: Literal["exact", "none"] = "exact"
    score_next_id: bool = True
    position_mode: Literal["base", "compressed"] = "base"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    hypervocab_version: str = __version__

    def __post_init__(self) -> None:
        def check_int(name: str, lo: int, hi: int = 2**31 - 1, optional: bool = False) -> None:
            v = getattr(self, name)
            problem = int_problem(name, v, minimum=lo, maximum=hi, optional=optional)
            if problem:
                raise ConfigError(problem)
            if v is not None:
                setattr(self, name, int(v))  # a NumPy integer becomes a Python int: the config is saved as JSON

        def check_choice(name: str, choices: tuple) -> None:
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")

        check_int("max_codebook_size", 0)
        check_int("max_subtokens", 1, 64)
        check_int("base_vocab_size", 1, optional=True)
        check_int("pad_id", 0, optional=True)
        check_int("encoder_layers", 0, 64)
        check_int("encoder_heads", 1, 256)
        check_int("encoder_dim", 1, 1 << 16, optional=True)
        check_int("encoder_ffn_mult", 1, 64)
        check_int("encoder_ffn_dim", 1, 1 << 20, optional=True)
        check_choice("encoder", ("transformer", "mean"))
        check_choice("encoder_norm", ("pre", "post"))
        check_choice("encoder_pool", ("valid", "all", "last"))
        check_choice("codebook_mask", ("exact", "none"))
        check_choice("position_mode", ("base", "compressed"))
        for name in ("protect_digits", "tie_encoders", "encoder_bias", "encoder_projection", "encoder_positions",
                     "encoder_final_norm", "encoder_causal", "encoder_residual", "score_next_id"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.score_next_id and self.codebook_mask == "exact":
            raise ConfigError("score_next_id=False needs codebook_mask='none': with the exact mask, targets that "
                              "are the one new legal id would score -inf")
        if self.encoder_dim is not None and self.encoder_dim % self.encoder_heads:
            raise ConfigError(f"encoder_dim ({self.encoder_dim}) must be a multiple of encoder_heads "
                              f"({self.encoder_heads})")
        if self.disabled_ids is not None:
            ids = list(self.disabled_ids)
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0
                   or (self.base_vocab_size is not None and i >= self.base_vocab_size)]
            if bad:
                raise ConfigError(f"disabled_ids must be ints in [0, base_vocab_size), got {bad[0]!r}")
            self.disabled_ids = sorted(set(ids))
        if self.base_vocab_size is not None and self.pad_id is not None and self.pad_id >= self.base_vocab_size:
            raise ConfigError(f"pad_id must be below base_vocab_size={self.base_vocab_size}, got {self.pad_id}")

    @property
    def vocab_size(self) -> int:
        """``V + C``: the size of the logits."""
        if self.base_vocab_size is None:
            raise ConfigError("base_vocab_size is not set yet: build the model with HyperModel.from_base")
        return self.base_vocab_size + self.max_codebook_size

    def codec(self) -> LZWCodec:
        """The :class:`~hypervocab.LZWCodec` these settings describe."""
        if self.base_vocab_size is None or self.disabled_ids is None:
            raise ConfigError("the config is not bound to a tokenizer yet: use HyperModel.from_base or "
                              "HyperTokenizer.from_base")
        return LZWCodec(self.base_vocab_size, self.max_codebook_size, self.max_subtokens,
                        disabled_ids=self.disabled_ids, pad_id=self.pad_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown hypervocab config keys {unknown}: written by a newer hypervocab "
                              f"({data.get('hypervocab_version', '?')})?")
        return cls(**data)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hypervocab_version = __version__
        (directory / CONFIG_NAME).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HyperConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            public = (Path(directory) / "zip2zip_config.json").is_file()
            raise ConfigError(f"{str(directory)!r} holds no {CONFIG_NAME}: not a hypervocab checkpoint"
                              + (" (it is one of the public zip2zip format: hypervocab.load() reads it, as does "
                                 "hypervocab.interop.load_public_model())" if public else ""))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def bind_config(config: HyperConfig, tokenizer: Any, base: Any = None) -> HyperConfig:
    """A copy of ``config`` with ``V``, the disabled ids, the pad id and the base model's name filled in."""
    config = copy.deepcopy(config)
    V = len(tokenizer)
    if config.base_vocab_size is not None and config.base_vocab_size != V:
        raise ConfigError(f"the config says base_vocab_size={config.base_vocab_size} but the tokenizer has {V} ids")
    config.base_vocab_size = V
    if config.pad_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config.pad_id = pad
    if config.disabled_ids is None:
        config.disabled_ids = default_disabled_ids(tokenizer, protect_digits=config.protect_digits)
    if base is not None and config.base_model_name_or_path is None:
        name = getattr(getattr(base, "config", None), "_name_or_path", None) or getattr(base, "name_or_path", None)
        config.base_model_name_or_path = name or None
        config.base_model_revision = getattr(getattr(base, "config", None), "_commit_hash", None)
    config.__post_init__()
    return config


def default_disabled_ids(tokenizer: Any, *, protect_digits: bool = True) -> list[int]:
    """Ids that must never be merged: special and added tokens, the pad id, and (by default) digit tokens.

    Merging digits is what destroyed arithmetic in the zip2zip paper, so by default every token whose
    text contains a decimal digit is protected.

    Args:
        tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerBase``, or transformers' Mistral backend).
        protect_digits: also protect every token whose text contains a decimal digit.

    Returns:
        Sorted ids in ``[0, len(tokenizer))``.
    """
    V = len(tokenizer)
    ids = set(getattr(tokenizer, "all_special_ids", []))
    ids.update(_added_ids(tokenizer))
    if getattr(tokenizer, "pad_token_id", None) is not None:
        ids.add(tokenizer.pad_token_id)
    if protect_digits:
        texts = tokenizer.batch_decode([[i] for i in range(V)])
        ids.update(i for i, text in enumerate(texts) if any(ch.isdecimal() for ch in text))
    return sorted(i for i in ids if 0 <= i < V)


def _added_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens added to a tokenizer's vocabulary.

    ``added_tokens_decoder`` is a dict on most tokenizers; on transformers' ``MistralCommonBackend`` (Mistral's
    v3 and Tekken tokenizers) it is a method that raises ``NotImplementedError``: their control tokens are in
    ``all_special_ids``, read above.
    """
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if callable(added):
        try:
            added = added()
        except NotImplementedError:
            return set()
    return {int(i) for i in added} if isinstance(added, Mapping) else set()
