"""Hyper-encoders: one vector for a hypertoken from the vectors of the base tokens it stands for.

Input side: the vectors are the base model's input embeddings of the phrase
(through its own embedding module, so models that scale embeddings, such as
Gemma, get the same scale).  Output side: the rows of the LM-head matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["HyperEncoder", "MeanHyperEncoder", "TransformerHyperEncoder", "build_encoder", "encoder_options"]


class HyperEncoder(nn.Module):
    """Maps ``[N, M, D]`` subtoken vectors and a ``[N, M]`` validity mask to ``[N, D]``."""

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.to(x.dtype).unsqueeze(-1)  # [N, M, 1]
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


class MeanHyperEncoder(HyperEncoder):
    """Parameter-free: the mean of the valid subtoken vectors."""

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``vectors`` [N, M, D], ``mask`` [N, M] bool -> [N, D]."""
        return _masked_mean(vectors, mask)


class _Block(nn.Module):
    """A transformer block over the (at most M) subtokens of each phrase.

    ``norm="pre"`` (ours) normalises each sublayer's input; ``"post"`` normalises each residual sum,
    as the public zip2zip runtime's ``transformer`` encoder does.  ``causal`` lets a subtoken attend
    only to itself and the subtokens before it.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, *, norm: str = "pre", bias: bool = True,
                 causal: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.post_norm = norm == "post"
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim, bias=bias), nn.GELU(), nn.Linear(ffn_dim, dim, bias=bias))

    def _attend(self, x: torch.Tensor, mask: torch.Tensor, silence_padding: bool) -> torch.Tensor:
        N, M, d = x.shape
        q, k, v = self.qkv(x).view(N, M, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # padding keys are hidden; every phrase has at least one valid subtoken (its first), so no row is
        # all-masked, causal or not, and no attention kernel can turn a row into NaN
        attn_mask = mask[:, None, None, :]
        if self.causal:
            attn_mask = attn_mask & torch.ones(M, M, dtype=torch.bool, device=x.device).tril()
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(N, M, d)
        if silence_padding:
            # a padding slot reads nothing (what a pairwise mask gives): needed only where padding is pooled
            attn = attn.masked_fill(~mask.unsqueeze(-1), 0.0)
        return self.proj(attn)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, silence_padding: bool = False) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self._attend(x, mask, silence_padding))
            return self.norm2(x + self.ffn(x))
        x = x + self._attend(self.norm1(x), mask, silence_padding)
        return x + self.ffn(self.norm2(x))


class TransformerHyperEncoder(HyperEncoder):
    """A transformer over the phrase, pooled, added to the first subtoken's vector.

    ``in_proj`` maps the model width ``D`` to a latent width ``d`` (learned
    positions over ``M`` added), ``layers`` blocks run, a final LayerNorm and a
    mean over valid positions pool, and ``out_proj`` maps back to ``D``.  The
    output projection starts at zero, so a new hypertoken starts out as its
    first subtoken (the measured fix for a start loss of ~70 instead of ~4).

    The keyword options describe the variants that checkpoints of the public
    zip2zip format use (:mod:`hypervocab.interop`); their defaults are the
    encoder above:

    * ``ffn_dim``: the feed-forward width (default ``ffn_mult * d``);
    * ``norm``: ``"pre"`` or ``"post"`` LayerNorm placement in the blocks;
    * ``bias``: biases in the attention, feed-forward and projection layers;
    * ``projection``: ``in_proj``/``out_proj`` (without them ``d`` must equal ``D``);
    * ``positions``: the learned positions; ``final_norm``: the LayerNorm before pooling;
    * ``pool``: ``"valid"`` (mean over the phrase's subtokens), ``"all"`` (mean over all ``M``
      slots, padding included: a padding slot holds the pad token's vector and attends to
      nothing) or ``"last"`` (the last valid subtoken);
    * ``causal``: causal attention inside the phrase; ``residual``: add the first subtoken's vector.
    """

    def __init__(self, model_dim: int, max_subtokens: int, *, dim: int | None = None, layers: int = 2,
                 heads: int = 4, ffn_mult: int = 4, ffn_dim: int | None = None, norm: str = "pre",
                 bias: bool = True, projection: bool = True, positions: bool = True, final_norm: bool = True,
                 pool: str = "valid", causal: bool = False, residual: bool = True) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ConfigError(f"encoder norm must be 'pre' or 'post', got {norm!r}")
        if pool not in _POOLS:
            raise ConfigError(f"encoder pool must be one of {', '.join(map(repr, _POOLS))}, got {pool!r}")
        if projection:
            # a quarter of the model width (at most 256) keeps the encoders a few percent of the forward
            dim = dim or max(heads, min(model_dim // 4, 256))
        else:
            dim = dim or model_dim
            if dim != model_dim:
                raise ConfigError(f"an encoder without projections works at the model width {model_dim}, "
                                  f"got encoder_dim={dim}")
        if dim % heads:
            heads = math.gcd(dim, heads)
        self.pool = pool
        self.residual = residual
        self.in_proj = nn.Linear(model_dim, dim, bias=bias) if projection else None
        self.positions = nn.Parameter(torch.randn(max_subtokens, dim) * 0.02) if positions else None
        self.blocks = nn.ModuleList(_Block(dim, heads, ffn_dim or ffn_mult * dim, norm=norm, bias=bias, causal=causal)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim) if final_norm else None
        self.out_proj = nn.Linear(dim, model_dim, bias=bias) if projection else None
        if self.out_proj is not None:
            nn.init.zeros_(self.out_proj.weight)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``vectors`` [N, M, D], ``mask`` [N, M] bool (valid subtokens first) -> [N, D]."""
        M = vectors.shape[1]
        x = vectors if self.in_proj is None else self.in_proj(vectors)
        if self.positions is not None:
            x = x + self.positions[:M]
        silence = self.pool == "all"
        for block in self.blocks:
            x = block(x, mask, silence_padding=silence)
        if self.norm is not None:
            x = self.norm(x)
        if self.pool == "valid":
            pooled = _masked_mean(x, mask)
        elif self.pool == "all":
            pooled = x.mean(1)
        else:
            last = mask.sum(1).clamp(min=1) - 1
            pooled = x[torch.arange(x.shape[0], device=x.device), last]
        if self.out_proj is not None:
            pooled = self.out_proj(pooled)
        return vectors[:, 0] + pooled if self.residual else pooled


_POOLS = ("valid", "all", "last")


def build_encoder(kind: str, model_dim: int, max_subtokens: int, *, dim: int | None, layers: int, heads: int,
                  ffn_mult: int, **variant: Any) -> HyperEncoder:
    """The encoder a :class:`~hypervocab.HyperConfig` asks for.

    ``variant`` holds the :class:`TransformerHyperEncoder` keyword options (``ffn_dim``, ``norm``, ``bias``,
    ``projection``, ``positions``, ``final_norm``, ``pool``, ``causal``, ``residual``); see
    :func:`encoder_options` for the ones a config gives.
    """
    if kind == "mean":
        return MeanHyperEncoder()
    return TransformerHyperEncoder(model_dim, max_subtokens, dim=dim, layers=layers, heads=heads, ffn_mult=ffn_mult,
                                   **variant)


def encoder_options(config: Any) -> dict[str, Any]:
    """The :func:`build_encoder` keyword arguments a :class:`~hypervocab.HyperConfig` describes."""
    return dict(dim=config.encoder_dim, layers=config.encoder_layers, heads=config.encoder_heads,
                ffn_mult=config.encoder_ffn_mult, ffn_dim=config.encoder_ffn_dim, norm=config.encoder_norm,
                bias=config.encoder_bias, projection=config.encoder_projection, positions=config.encoder_positions,
                final_norm=config.encoder_final_norm, pool=config.encoder_pool, causal=config.encoder_causal,
                residual=config.encoder_residual)
