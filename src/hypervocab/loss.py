"""Next-code losses, scored a chunk of positions at a time.

The logits of a training batch are ``[B, T, V + C]``: at batch 32, window 1024 and SmolLM2's 49k ids
that is 1.6G numbers, more than the rest of the step put together.  Here they never exist whole: the
hidden states are scored a chunk of positions at a time, under activation checkpointing, so the
backward pass scores each chunk again instead of keeping it.

Two losses come out of one scoring:

* the cross-entropy of the next code over ``V + C`` ids (what the model is trained on), and
* the **first-token distillation**: a code's first base token is the next base token of the text, so
  the model's next-code distribution, summed over the codes that start with each base token, is a
  next-token distribution.  It is matched (KL divergence) to the frozen base model's next-token
  distribution at the same text position, which keeps the uptrained model's knowledge where the base
  model put it and stops every hypertoken from adding its first token's probability on top of that
  token's own (a built-in pull towards repeating the context, since entries only exist for phrases
  the context already holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .codebook import PreparedCodebooks
from .embedding import HeadContext

__all__ = ["ChunkScores", "first_tokens", "next_code_targets", "score_chunks"]

IGNORE_INDEX = -100
# positions x ids of float32 logits scored at once (a few such tensors live together): about 200 MB on a
# CPU, where memory bandwidth is scarce, and 800 MB on a GPU, where big kernels pay
_CHUNK_CELLS = {"cpu": 1 << 26, "other": 1 << 28}


@dataclass
class ChunkScores:
    """Sums over the positions with a target (``!= -100``); divide by their count for means.

    cross_entropy: the next-code cross-entropy.  distillation: the KL divergence of the model's first-token
    marginal from the teacher's next-token distribution (``None`` without a teacher).  hyper_correct /
    hyper_targets: positions whose target is a hypertoken, and how many of them the argmax gets right.
    """

    cross_entropy: torch.Tensor
    distillation: torch.Tensor | None
    hyper_correct: torch.Tensor
    hyper_targets: torch.Tensor


def next_code_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` target of each position: the next code where it is real and labelled, else ``-100``."""
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return target


def first_tokens(codebooks: PreparedCodebooks, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first base token of every table row, ``[B, width]`` (0 where no entry), and of the new id that
    may follow each position, ``[B, T]`` (``-1`` where none may)."""
    B, T = codebooks.shape
    rows = codebooks.visible.new_zeros(B, width)
    if codebooks.phrases.shape[0] and width:
        rows = rows.index_put((codebooks.entry_row, codebooks.entry_slot), codebooks.phrases[:, 0])
    index = codebooks.candidate_index
    if codebooks.candidates.shape[0]:
        cand = torch.where(index >= 0, codebooks.candidates[index.clamp(min=0), 0], -1)
    else:
        cand = torch.full_like(index, -1)
    return rows, cand


def _marginal(probs: torch.Tensor, V: int, rows_first: torch.Tensor, cand_first: torch.Tensor,
              visible: torch.Tensor) -> torch.Tensor:
    """``[B, c, V]`` probability of each first base token: base ids plus every hypertoken row that starts with it."""
    B, c, _ = probs.shape
    W = rows_first.shape[1]
    marg = probs[..., :V]
    if not W:
        return marg
    first = rows_first[:, None, :].expand(B, c, W)
    # the new id that may follow a position sits at row visible[b, t]; rows past it score -inf (probability 0)
    at = visible.clamp(max=W - 1).unsqueeze(-1)
    own = torch.where(cand_first >= 0, cand_first, first.gather(-1, at).squeeze(-1))
    first = first.scatter(-1, at, own.unsqueeze(-1))
    return marg.scatter_add(-1, first, probs[..., V: V + W])


def score_chunks(model: Any, hidden: torch.Tensor, context: HeadContext, targets: torch.Tensor, *,
                 teacher_hidden: torch.Tensor | None = None, first: tuple[torch.Tensor, torch.Tensor] | None = None,
                 chunk_cells: int | None = None) -> ChunkScores:
    """Score ``hidden`` against ``targets`` without materialising all the logits.

    Args:
        model: the :class:`~hypervocab.HyperModel` whose head scores.
        hidden: ``[B, T, D]`` final hidden states (``HyperOutput.hidden_states``).
        context: ``HyperOutput.head_context`` of the same call.
        targets: ``[B, T]`` next codes (:func:`next_code_targets`), ``-100`` where there is none.
        teacher_hidden: ``[B, T, D]`` the base model's final hidden states at the text position of each code's
            last base token; with it the distillation is computed.
        first: :func:`first_tokens` of the batch (needed with ``teacher_hidden``).
        chunk_cells: positions x ids scored at once (default: by device).

    Returns:
        :class:`ChunkScores`.  Under autograd each chunk is checkpointed: the backward scores it again.
    """
    B, T, _ = hidden.shape
    V = model.codec.base_vocab_size
    width = V + model.codec.max_codebook_size
    cells = chunk_cells or _CHUNK_CELLS["cpu" if hidden.device.type == "cpu" else "other"]
    step = max(1, cells // max(1, B * width))
    grad = torch.is_grad_enabled() and hidden.requires_grad

    def chunk(h: torch.Tensor, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # few passes over the [B, c, V + C] chunk: it is the memory traffic, not the matmul, that costs here
        ctx = context.positions(s, e)
        tgt = targets[:, s:e]
        valid = tgt != IGNORE_INDEX
        logp = model.score(h, ctx).float().log_softmax(-1)  # [B, c, V + C]
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ce = -(picked * valid).sum()
        with torch.no_grad():
            correct = ((logp.argmax(-1) == tgt) & (tgt >= V)).sum()
        if teacher_hidden is None:
            return ce, ce.new_zeros(()), correct
        assert first is not None, "score_chunks: teacher_hidden needs first= (first_tokens of the batch)"
        marg = _marginal(logp.exp(), V, first[0], first[1][:, s:e], ctx.visible)
        with torch.no_grad():
            teacher = model.score(teacher_hidden[:, s:e], None).float().log_softmax(-1)
        kl = (teacher.exp() * (teacher - marg.clamp_min(1e-30).log())).sum(-1)  # [B, c]
        return ce, (kl * valid).sum(), correct

    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    correct_total = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, T, step):
        e = min(T, s + step)
        if grad:
            ce, kl, correct = torch.utils.checkpoint.checkpoint(chunk, hidden[:, s:e], s, e, use_reentrant=False)
        else:
            ce, kl, correct = chunk(hidden[:, s:e], s, e)
        ce_total = ce_total + ce
        kl_total = kl_total + kl
        correct_total = correct_total + correct
    hyper_targets = (targets >= V).sum()
    return ChunkScores(ce_total, kl_total if teacher_hidden is not None else None, correct_total, hyper_targets)
