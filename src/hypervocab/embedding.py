"""The base model's input embedding and LM head, wrapped to know hypertoken ids.

Both wrappers hold the original module (same weights, no copies) and read the
current batch's hypertoken tables from a context that :class:`HyperModel` sets
around each call of the base model.  Outside such a call they behave exactly
like the modules they wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .errors import InvalidCodeError

__all__ = ["HyperEmbedding", "HyperHead", "HeadContext"]

# rows of the base logits computed at once: bounds the temporaries next to the one [B, T, V + C] tensor
_ROWS_PER_CHUNK = 512


class HyperEmbedding(nn.Module):
    """Input embedding over ``V + C`` ids: base ids go through the base module, hypertokens read ``table``.

    ``table`` is ``[B, W, D]``: row ``k`` of sequence ``b`` is the embedding of id ``V + k``.
    """

    def __init__(self, base: nn.Module, base_vocab_size: int) -> None:
        super().__init__()
        self.base = base
        self.base_vocab_size = base_vocab_size
        self.table: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # Hugging Face code reads embeddings.weight for dtype and device
        return cast(torch.Tensor, self.base.weight)  # the wrapped embedding's weight (nn.Module types it loosely)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:  # weight tying assigns it
        self.base.weight = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, T] -> [B, T, D].

        Inside a :class:`HyperModel` call (``table`` set) nothing here waits for the device: the ids were
        checked before, and a table of width 0 says they are all base ids.
        """
        V = self.base_vocab_size
        table = self.table
        if table is None:
            if bool((input_ids >= V).any()):  # outside a HyperModel call: one check, then the plain module
                raise InvalidCodeError(f"ids >= {V} are hypertokens: call the HyperModel, not the base model "
                                       f"directly")
            return self.base(input_ids)
        if table.shape[1] == 0:
            return self.base(input_ids)
        hyper = input_ids >= V
        out = self.base(input_ids.masked_fill(hyper, 0))
        idx = (input_ids - V).clamp(min=0, max=table.shape[1] - 1)
        rows = torch.gather(table, 1, idx.unsqueeze(-1).expand(-1, -1, table.shape[-1]))
        return torch.where(hyper.unsqueeze(-1), rows.to(out.dtype), out)


@dataclass
class HeadContext:
    """What the head needs for one call: per-sequence output vectors and which rows each position sees.

    table: ``[B, W, D]`` output vectors of ids ``V .. V + W - 1``.
    visible: ``[B, T]`` rows ``< visible[b, t]`` are scored at position ``t``; the rest get ``-inf``.
    candidates: ``[B, T, D]`` output vector of the new id that may legally follow position ``t``
        (scored at row ``visible[b, t]``), or ``None``.
    candidate_ok: ``[B, T]`` bool, where a candidate exists.
    capture: the head computes no logits: it keeps its input ``[B, T, D]`` in ``hidden`` and returns a
        ``[B, T, 0]`` tensor (training scores the hidden states itself, a chunk at a time).
    """

    table: torch.Tensor
    visible: torch.Tensor
    candidates: torch.Tensor | None = None
    candidate_ok: torch.Tensor | None = None
    capture: bool = False
    hidden: torch.Tensor | None = None

    def positions(self, start: int, stop: int) -> HeadContext:
        """The context of positions ``start .. stop - 1`` alone (what scoring a chunk of hidden states reads)."""
        cut = (lambda x: None if x is None else x[:, start:stop])
        return HeadContext(self.table, self.visible[:, start:stop], cut(self.candidates), cut(self.candidate_ok))


class HyperHead(nn.Module):
    """LM head over ``V + C`` ids: logits ``[base logits for ids < V] ++ [C hypertoken logits]``."""

    scores_next_id = True  # the one new id that may legally come next is scored (HeadContext.candidates)

    def __init__(self, base: nn.Module, base_vocab_size: int, max_codebook_size: int) -> None:
        super().__init__()
        self.base = base
        self.base_vocab_size = base_vocab_size
        self.max_codebook_size = max_codebook_size
        self.context: HeadContext | None = None

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base.weight)  # the wrapped head's weight (nn.Module types it loosely)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        self.base.weight = value

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, T, D] -> logits [B, T, V + C]; rows not visible are ``-inf``."""
        V, C = self.base_vocab_size, self.max_codebook_size
        B, T, D = hidden.shape
        ctx = self.context
        if ctx is not None and ctx.capture:
            ctx.hidden = hidden
            return hidden.new_zeros(B, T, 0)
        if torch.is_grad_enabled() and ctx is not None and C and ctx.table.shape[1]:
            return self._training_forward(hidden, ctx)
        flat_h = hidden.reshape(B * T, D)
        first = self.base(flat_h[:_ROWS_PER_CHUNK])[:, :V]
        out = first.new_empty(B * T, V + C)
        out[: len(first), :V] = first
        for s in range(_ROWS_PER_CHUNK, B * T, _ROWS_PER_CHUNK):  # one [B, T, V + C] tensor, small temporaries
            out[s: s + _ROWS_PER_CHUNK, :V] = self.base(flat_h[s: s + _ROWS_PER_CHUNK])[:, :V]
        out = out.view(B, T, V + C)
        if C == 0:
            return out
        if ctx is None or ctx.table.shape[1] == 0:
            out[..., V:] = float("-inf")
            return out
        hyper = self._hyper_logits(hidden, ctx)
        W = hyper.shape[-1]
        out[..., V: V + W] = hyper.to(out.dtype)
        if W < C:
            out[..., V + W:] = float("-inf")
        return out

    def _hyper_logits(self, hidden: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        """``[B, T, W]`` logits of the first ``W`` hypertoken rows, ``-inf`` where a row is not visible."""
        T = hidden.shape[1]
        W = min(ctx.table.shape[1], self.max_codebook_size)
        visible_n = ctx.visible[:, -T:].unsqueeze(-1)
        hyper = torch.bmm(hidden, ctx.table[:, :W].transpose(1, 2).to(hidden.dtype))  # [B, T, W]
        cols = torch.arange(W, device=hidden.device).view(1, 1, W)
        visible = cols < visible_n
        if ctx.candidates is not None:
            assert ctx.candidate_ok is not None  # set together with candidates
            # the legal new id right after t sits at row visible[b, t]
            cand_logit = (hidden * ctx.candidates[:, -T:].to(hidden.dtype)).sum(-1)  # [B, T]
            at = (cols == visible_n) & ctx.candidate_ok[:, -T:].unsqueeze(-1)
            hyper = torch.where(at, cand_logit.unsqueeze(-1), hyper)
            visible = visible | at
        return hyper.masked_fill(~visible, float("-inf"))

    def _training_forward(self, hidden: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        """With gradients: one concatenation, whose backward is free views (the in-place writes of the
        inference path would copy the whole [B, T, V + C] gradient once per write)."""
        V, C = self.base_vocab_size, self.max_codebook_size
        base = self.base(hidden)[..., :V]
        hyper = self._hyper_logits(hidden, ctx).to(base.dtype)
        parts = [base, hyper]
        if hyper.shape[-1] < C:
            parts.append(hyper.new_full(hyper.shape[:2] + (C - hyper.shape[-1],), float("-inf")))
        return torch.cat(parts, -1)
