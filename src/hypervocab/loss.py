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

A third, optional (``phrase_weight``), bounds each hypertoken by its whole phrase: the **phrase ceiling**.
The first-token distillation says how much mass the codes starting with a token may share, not how it is
shared, and a model trained on it alone gives a hypertoken about its first token's probability whatever
its tail (docs/training.md, "What the model writes").  The teacher's probability of the phrase, read along
the text, caps it (:func:`phrase_ceiling`); the model pays for the mass it puts above the cap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import PreparedCodebooks
from .embedding import HeadContext
from .errors import InputTypeError

__all__ = ["ChunkScores", "Teacher", "TrainScores", "first_tokens", "fusable", "next_code_targets", "phrase_ceiling",
           "row_phrases", "score_chunks", "train_scores"]

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
    phrase: the phrase ceiling's excess mass (:func:`phrase_excess`; ``None`` unless asked for).
    """

    cross_entropy: torch.Tensor
    distillation: torch.Tensor | None
    hyper_correct: torch.Tensor
    hyper_targets: torch.Tensor
    phrase: torch.Tensor | None = None


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


def row_phrases(codebooks: PreparedCodebooks, width: int) -> torch.Tensor:
    """``[B, width, M]`` the base tokens of every table row, ``-1`` padded (all ``-1`` where no entry)."""
    B, _ = codebooks.shape
    M = codebooks.phrases.shape[1] if codebooks.phrases.ndim == 2 else 0
    rows = codebooks.phrases.new_full((B, width, M), -1)
    if codebooks.phrases.shape[0] and width:
        rows = rows.index_put((codebooks.entry_row, codebooks.entry_slot), codebooks.phrases)
    return rows


def phrase_ceiling(phrases: torch.Tensor, next_tokens: torch.Tensor, next_logp: torch.Tensor) -> torch.Tensor:
    """``[B, c, W]`` log of an upper bound on the teacher's probability that the text goes on with each row's phrase.

    Only the text itself is needed: the teacher's log-probability ``l_i`` of each of the next base tokens
    ``x_i`` as they are.  A row whose phrase matches the next ``m`` tokens and then differs (or ends):

    * matches all of its ``k`` tokens: ``log P(phrase) = l_1 + ... + l_k``, exact;
    * differs at token ``m + 1``: its token there is not ``x_{m+1}``, so its probability is at most
      ``1 - exp(l_{m+1})``, and ``log P(phrase) <= l_1 + ... + l_m + log(1 - exp(l_{m+1}))``;
    * differs where the text is unknown (past the window's end, ``x = -1``): the bound stops there.

    The canonical target is the longest matching row, whose probability of being the next code is at most
    its phrase's; every row's is at most this bound.

    Args:
        phrases: ``[B, W, M]`` the rows' base tokens, ``-1`` padded (:func:`row_phrases`).
        next_tokens: ``[B, c, M]`` the next ``M`` base tokens after each position, ``-1`` where unknown.
        next_logp: ``[B, c, M]`` the teacher's log-probability of each of them (anything where unknown).

    Example, the text going on ``7 8 9`` with probabilities ``0.5, 0.5, 0.9``::

        row (7, 8)  -> log(0.5 * 0.5)         matches both tokens
        row (7, 5)  -> log(0.5 * (1 - 0.5))   differs at the second: at most the rest of its mass
        row (3,)    -> log(1 - 0.5)

    >>> import torch
    >>> rows = torch.tensor([[[7, 8], [7, 5], [3, -1]]])
    >>> ceiling = phrase_ceiling(rows, torch.tensor([[[7, 8]]]), torch.tensor([[[0.5, 0.5]]]).log())
    >>> [round(x, 3) for x in ceiling.exp().flatten().tolist()]
    [0.25, 0.25, 0.5]
    """
    M = min(phrases.shape[-1], next_tokens.shape[-1])
    if M == 0:
        return next_logp.new_zeros(next_tokens.shape[:2] + phrases.shape[1:2])
    phrases, next_tokens, next_logp = phrases[..., :M], next_tokens[..., :M], next_logp[..., :M].float()
    known = next_tokens >= 0
    lp = torch.where(known, next_logp, 0.0)
    # an unknown next token never matches (a row pads with -1 too)
    nxt = torch.where(known, next_tokens, -2)
    matches = (phrases[:, None] == nxt[:, :, None]).to(torch.int32).cumprod(-1).sum(-1)  # [B, c, W]
    length = (phrases >= 0).sum(-1)[:, None]  # [B, 1, W]
    prefix = torch.cat([lp.new_zeros(lp.shape[:2] + (1,)), lp.cumsum(-1)], -1)  # [B, c, M + 1]
    ceiling = prefix.gather(-1, matches.long())
    at = matches.clamp(max=M - 1).long()
    differs = (matches < length) & known.gather(-1, at)
    # log(1 - exp(l)) without cancelling for l near 0; a certain token (l = 0) leaves a ceiling of 0: floored
    l_at = lp.gather(-1, at).clamp(max=-1e-7)
    rest = torch.where(l_at > -0.6931, torch.log(-torch.expm1(l_at)), torch.log1p(-l_at.exp()))
    return torch.where(differs, ceiling + rest, ceiling).clamp_min(-80.0)


def phrase_excess(logp: torch.Tensor, ceiling: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, c]`` the model's mass over its phrase ceiling: ``sum_r p_r * log(p_r / U_r)`` over the rows with
    ``p_r > U_r`` (``mask`` ``[B, c, W]``: the rows that count), from the rows' log-probabilities ``logp``."""
    # masked first: a row scored -inf would make 0 * inf, and NaN gradients through torch.where
    over = torch.where(mask, logp - ceiling, 0.0)
    live = over > 0
    return torch.where(live, torch.where(live, logp, 0.0).exp() * over, 0.0).sum(-1)


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
                 chunk_cells: int | None = None, distill_mask: torch.Tensor | None = None,
                 phrases: torch.Tensor | None = None,
                 next_text: tuple[torch.Tensor, torch.Tensor] | None = None) -> ChunkScores:
    """Score ``hidden`` against ``targets`` without materialising all the logits, through autograd.

    The exact reference: the whole teacher distribution, every quantity a differentiable tensor op (the
    evaluation's first-token divergence reads it; training uses :func:`train_scores`, which computes the
    same cross-entropy, and the same divergence with ``Teacher(top_k=0)``, several times faster).

    Args:
        model: the :class:`~hypervocab.HyperModel` whose head scores.
        hidden: ``[B, T, D]`` final hidden states (``HyperOutput.hidden_states``).
        context: ``HyperOutput.head_context`` of the same call.
        targets: ``[B, T]`` next codes (:func:`next_code_targets`), ``-100`` where there is none.
        teacher_hidden: ``[B, T, D]`` the base model's final hidden states at the text position of each code's
            last base token; with it the distillation is computed.
        first: :func:`first_tokens` of the batch (needed with ``teacher_hidden``).
        chunk_cells: positions x ids scored at once (default: by device).
        distill_mask: ``[B, T]`` bool, the positions distilled (default: every position with a target).
        phrases: ``[B, W, M]`` (:func:`row_phrases`) and next_text: ``([B, T, M] next base tokens, their
            teacher log-probabilities)``: with both, the phrase ceiling's excess (:func:`phrase_excess`) at the
            distilled positions.

    Returns:
        :class:`ChunkScores`.  Under autograd each chunk is checkpointed: the backward scores it again.
    """
    B, T, _ = hidden.shape
    V = model.codec.base_vocab_size
    width = V + model.codec.max_codebook_size
    cells = chunk_cells or _CHUNK_CELLS["cpu" if hidden.device.type == "cpu" else "other"]
    step = max(1, cells // max(1, B * width))
    grad = torch.is_grad_enabled() and hidden.requires_grad

    with_phrase = phrases is not None and next_text is not None

    def chunk(h: torch.Tensor, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # few passes over the [B, c, V + C] chunk: it is the memory traffic, not the matmul, that costs here
        ctx = context.positions(s, e)
        tgt = targets[:, s:e]
        valid = tgt != IGNORE_INDEX
        logp = model.score(h, ctx).float().log_softmax(-1)  # [B, c, V + C]
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ce = -(picked * valid).sum()
        zero = ce.new_zeros(())
        with torch.no_grad():
            correct = ((logp.argmax(-1) == tgt) & (tgt >= V)).sum()
        read = valid if distill_mask is None else valid & distill_mask[:, s:e]
        phrase = zero
        if with_phrase:
            assert phrases is not None and next_text is not None
            W = phrases.shape[1]
            ceiling = phrase_ceiling(phrases, next_text[0][:, s:e], next_text[1][:, s:e])
            rows = torch.arange(W, device=h.device) < ctx.visible[..., None]  # the rows, not the new id's column
            phrase = (phrase_excess(logp[..., V: V + W], ceiling, rows & read[..., None])).sum()
        if teacher_hidden is None:
            return ce, zero, correct, phrase
        assert first is not None, "score_chunks: teacher_hidden needs first= (first_tokens of the batch)"
        marg = _marginal(logp.exp(), V, first[0], first[1][:, s:e], ctx.visible)
        with torch.no_grad():
            teacher = model.score(teacher_hidden[:, s:e], None).float().log_softmax(-1)
        kl = (teacher.exp() * (teacher - marg.clamp_min(1e-30).log())).sum(-1)  # [B, c]
        return ce, (kl * read).sum(), correct, phrase

    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    phrase_total = hidden.new_zeros((), dtype=torch.float32)
    correct_total = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, T, step):
        e = min(T, s + step)
        if grad:
            ce, kl, correct, phrase = torch.utils.checkpoint.checkpoint(chunk, hidden[:, s:e], s, e,
                                                                        use_reentrant=False)
        else:
            ce, kl, correct, phrase = chunk(hidden[:, s:e], s, e)
        ce_total = ce_total + ce
        kl_total = kl_total + kl
        phrase_total = phrase_total + phrase
        correct_total = correct_total + correct
    hyper_targets = (targets >= V).sum()
    return ChunkScores(ce_total, kl_total if teacher_hidden is not None else None, correct_total, hyper_targets,
                       phrase_total if with_phrase else None)


# ---------------------------------------------------------------------------------------------- the fused scorer


@dataclass
class Teacher:
    """The frozen base model's view of a micro-batch, what the first-token distillation matches.

    hidden: ``[b, T, D]`` the base model's final hidden states at the text position of each code's last base
        token, for the ``b`` windows the teacher read.
    rows: ``[b]`` which windows of the ``[B, T]`` batch those are (``None``: all of them, ``b == B``).
    top_k: the teacher's distribution is kept as its ``top_k`` most likely next tokens plus one bucket for
        the rest (``0``: the whole distribution, the exact divergence).
    next_tokens / next_logp: ``[b, T, M]`` the next ``M`` base tokens of the text after each code (``-1``
        where unknown) and the teacher's log-probability of each, for the phrase ceiling (``None``: not read).

    The bucketed divergence is the KL divergence between the two distributions coarsened to ``top_k + 1``
    outcomes (the teacher's top tokens, and "any other token"), so by the data-processing inequality it is
    never more than the exact one: ``0 <= KL_bucketed <= KL_exact``; the two are equal when the teacher puts
    no mass outside its top tokens.
    """

    hidden: torch.Tensor
    rows: torch.Tensor | None = None
    top_k: int = 64
    next_tokens: torch.Tensor | None = None
    next_logp: torch.Tensor | None = None


@dataclass
class TrainScores:
    """What :func:`train_scores` returns: sums over the positions with a target (divide by their count).

    loss: ``cross_entropy + distill_weight * distillation + phrase_weight * phrase``, the one differentiable
    output.  cross_entropy, distillation (``None`` without a teacher), hyper_correct, hyper_targets, phrase
    (``None`` unless computed): detached, as in :class:`ChunkScores` (a hypertoken target is correct where it
    scores the highest logit).
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    distillation: torch.Tensor | None
    hyper_correct: torch.Tensor
    hyper_targets: torch.Tensor
    phrase: torch.Tensor | None = None


def fusable(model: Any) -> bool:
    """Whether :func:`train_scores` can compute the head's gradients itself: a plain, frozen linear LM head
    (a head with trainable weights, LoRA on the head say, goes through :func:`score_chunks`)."""
    base = model.head.base
    return isinstance(base, nn.Linear) and not any(p.requires_grad for p in base.parameters())


def train_scores(model: Any, hidden: torch.Tensor, context: HeadContext, targets: torch.Tensor, *,
                 teacher: Teacher | None = None, first: tuple[torch.Tensor, torch.Tensor] | None = None,
                 distill_weight: float = 1.0, phrases: torch.Tensor | None = None, phrase_weight: float = 0.0,
                 chunk_cells: int | None = None, fused: bool = True) -> TrainScores:
    """The next-code cross-entropy and the first-token distillation, with their gradients, in one pass.

    Each chunk of positions is scored once: the logits are made (one matmul in the compute dtype, float32
    after it), their log-sum-exp taken, and the gradient of the loss with respect to them written over them
    in place (softmax minus one-hot, plus the distillation's term), then turned into the gradients of the
    hidden states, the output vectors and the candidate vectors by one more matmul.  Those gradients are
    kept (``[B, T, D]`` and ``[B, W, D]``, small) and the logits dropped: the backward pass only scales
    them, never scoring a chunk again, and the ``[B, c, V + C]`` logits never meet autograd.

    Args:
        model: the :class:`~hypervocab.HyperModel` whose head scores (see :func:`fusable`; otherwise this
            falls back to :func:`score_chunks`, exact, slower).
        hidden: ``[B, T, D]`` final hidden states; context: the forward's ``head_context``; targets: ``[B, T]``
            next codes (:func:`next_code_targets`).
        teacher: the base model's hidden states (:class:`Teacher`): with it the distillation is computed.
        first: :func:`first_tokens` of the batch (needed with a teacher).
        distill_weight: the distillation's weight in ``loss``.
        phrases: ``[B, W, M]`` the table rows' base tokens (:func:`row_phrases`) and phrase_weight: with a
            teacher that read the text's next tokens (``Teacher.next_tokens``), the phrase ceiling's excess
            (:func:`phrase_excess`) at the positions the teacher read, times ``phrase_weight``, joins ``loss``.
        chunk_cells: positions x ids scored at once (default: by device).
        fused: ``False`` scores through autograd instead (:func:`score_chunks`, the whole teacher
            distribution whatever ``teacher.top_k``), the reference the fused scorer is tested against.

    Returns:
        :class:`TrainScores`.
    """
    if teacher is not None and first is None:
        raise InputTypeError("train_scores: a teacher needs first= (first_tokens of the batch)")
    if phrase_weight and (teacher is None or teacher.next_tokens is None or teacher.next_logp is None
                          or phrases is None):
        raise InputTypeError("train_scores: phrase_weight needs phrases= (row_phrases of the batch) and a teacher "
                             "with next_tokens and next_logp")
    if not phrase_weight:
        phrases = None
    if not fused or not fusable(model):
        return _unfused(model, hidden, context, targets, teacher, first, distill_weight, chunk_cells, phrases,
                        phrase_weight)
    head = model.head
    V = model.codec.base_vocab_size
    plan = _Plan(weight=head.base.weight[:V], bias=None if head.base.bias is None else head.base.bias[:V],
                 context=context if head.scores_next_id else replace(context, candidates=None, candidate_ok=None),
                 targets=targets, teacher=teacher, first=first, distill_weight=float(distill_weight),
                 phrases=phrases, phrase_weight=float(phrase_weight),
                 next_text=None if phrases is None or teacher is None else _full_next(teacher, hidden.shape[0]),
                 cap=getattr(model.base.config, "final_logit_softcapping", None) or None,
                 chunk_cells=chunk_cells or _CHUNK_CELLS["cpu" if hidden.device.type == "cpu" else "other"])
    cand = plan.context.candidates
    table = context.table
    loss, ce, kl, correct, phrase = _FusedHeadLoss.apply(hidden, table, cand, plan)
    return TrainScores(loss, ce, kl if teacher is not None else None, correct, (targets >= V).sum(),
                       phrase if phrases is not None else None)


def _unfused(model: Any, hidden: torch.Tensor, context: HeadContext, targets: torch.Tensor, teacher: Teacher | None,
             first: tuple[torch.Tensor, torch.Tensor] | None, weight: float, cells: int | None,
             phrases: torch.Tensor | None, phrase_weight: float) -> TrainScores:
    """:func:`train_scores` through autograd (:func:`score_chunks`, the exact divergence)."""
    t_hidden = mask = next_text = None
    if teacher is not None:
        t_hidden, mask = _full_rows(teacher, hidden.shape[0], targets)
        if phrases is not None:
            next_text = _full_next(teacher, hidden.shape[0])
    s = score_chunks(model, hidden, context, targets, teacher_hidden=t_hidden, first=first, chunk_cells=cells,
                     distill_mask=mask, phrases=phrases, next_text=next_text)
    loss = s.cross_entropy if s.distillation is None else s.cross_entropy + weight * s.distillation
    if s.phrase is not None:
        loss = loss + phrase_weight * s.phrase
    return TrainScores(loss, s.cross_entropy.detach(), None if s.distillation is None else s.distillation.detach(),
                       s.hyper_correct, s.hyper_targets, None if s.phrase is None else s.phrase.detach())


def _full_next(teacher: Teacher, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's next tokens and their log-probabilities as ``[B, T, M]`` (``-1``: unknown, in rows it
    did not read)."""
    tokens, logp = teacher.next_tokens, teacher.next_logp
    assert tokens is not None and logp is not None
    if teacher.rows is None:
        return tokens, logp
    full_t = tokens.new_full((B,) + tuple(tokens.shape[1:]), -1)
    full_t[teacher.rows] = tokens
    full_l = logp.new_zeros((B,) + tuple(logp.shape[1:]))
    full_l[teacher.rows] = logp
    return full_t, full_l


def _full_rows(teacher: Teacher, B: int, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's hidden states as ``[B, T, D]`` (zeros where it read nothing) and the ``[B, T]`` mask of
    the positions it read (``None``: all)."""
    if teacher.rows is None:
        return teacher.hidden, None
    full = teacher.hidden.new_zeros((B,) + tuple(teacher.hidden.shape[1:]))
    full[teacher.rows] = teacher.hidden
    mask = torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
    mask[teacher.rows] = True
    return full, mask


@dataclass
class _Plan:
    """Everything :class:`_FusedHeadLoss` reads besides the three tensors it differentiates."""

    weight: torch.Tensor  # [V, D] the head's matrix (frozen, in the compute dtype)
    bias: torch.Tensor | None
    context: HeadContext
    targets: torch.Tensor
    teacher: Teacher | None
    first: tuple[torch.Tensor, torch.Tensor] | None
    distill_weight: float
    phrases: torch.Tensor | None  # [B, W, M] the rows' phrases, with next_text: the phrase ceiling
    phrase_weight: float
    next_text: tuple[torch.Tensor, torch.Tensor] | None  # [B, T, M] next base tokens, their teacher log-probs
    cap: float | None
    chunk_cells: int


class _FusedHeadLoss(torch.autograd.Function):
    """``(hidden, table, candidates) -> (loss, cross_entropy, distillation, hyper_correct, phrase)``; the
    gradients of ``loss`` are computed in the forward (:func:`train_scores`) and only scaled in the backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor | None,
                plan: _Plan) -> tuple[torch.Tensor, ...]:
        need = tuple(ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here, explicitly
            loss, ce, kl, correct, phrase, grads = _score(hidden, table, candidates, plan, need)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, kl, correct, phrase)
        return loss, ce, kl, correct, phrase

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if x is None else x * g.to(x.dtype) for x in ctx.saved_tensors) + (None,)


def _score(hidden: torch.Tensor, table: torch.Tensor, cand: torch.Tensor | None, plan: _Plan,
           need: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            list[Any]]:
    B, T, D = hidden.shape
    W = plan.weight
    V, cd = W.shape[0], W.dtype
    width = table.shape[1]
    step = max(1, plan.chunk_cells // max(1, B * (V + width)))
    grad = any(need)
    tab = table.to(cd)
    g_hidden = torch.empty(B, T, D, dtype=hidden.dtype, device=hidden.device) if need[0] else None
    g_table = torch.zeros(B, width, D, dtype=torch.float32, device=hidden.device) if need[1] else None
    g_cand = (torch.zeros(cand.shape, dtype=torch.float32, device=hidden.device)
              if cand is not None and need[2] else None)
    ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
    kl = torch.zeros((), dtype=torch.float32, device=hidden.device)
    phrase = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    rows_first = None if plan.first is None else plan.first[0][:, None, :]
    for s in range(0, T, step):
        e = min(T, s + step)
        h = hidden[:, s:e].to(cd)
        c_vec = None if cand is None else cand[:, s:e].to(cd)
        out = _chunk(h, tab, c_vec, plan, s, e, rows_first, grad)
        ce += out.ce
        kl += out.kl
        phrase += out.phrase
        correct += out.correct
        if not grad:
            continue
        gz_base, gz_hyper, at = out.gz_base, out.gz_hyper, out.at
        assert gz_base is not None and gz_hyper is not None  # made whenever grad
        gh = torch.matmul(gz_base.to(cd), W).float()  # [B, c, D]
        if width:
            g_rows = gz_hyper if at is None else gz_hyper.masked_fill(at, 0.0)
            gh += torch.bmm(g_rows.to(cd), tab).float()
            if g_table is not None:
                g_table += torch.bmm(g_rows.transpose(1, 2), h.float())
            if at is not None:
                assert c_vec is not None  # a candidate column exists only with candidate vectors
                g_logit = (gz_hyper * at).sum(-1, keepdim=True)  # [B, c, 1] the candidate's logit
                gh += g_logit * c_vec.float()
                if g_cand is not None:
                    g_cand[:, s:e] = g_logit * h.float()
        if g_hidden is not None:
            g_hidden[:, s:e] = gh
    loss = ce + plan.distill_weight * kl if plan.teacher is not None else ce.clone()
    if plan.phrases is not None:
        loss = loss + plan.phrase_weight * phrase
    grads = [g_hidden, None if g_table is None else g_table.to(table.dtype),
             None if g_cand is None or cand is None else g_cand.to(cand.dtype)]
    return loss, ce, kl, correct, phrase, grads


@dataclass
class _Chunk:
    ce: torch.Tensor
    kl: torch.Tensor
    correct: torch.Tensor
    phrase: torch.Tensor
    gz_base: torch.Tensor | None = None  # [B, c, V]   d loss / d base logits
    gz_hyper: torch.Tensor | None = None  # [B, c, W]  d loss / d hypertoken logits
    at: torch.Tensor | None = None  # [B, c, W] bool: the column that holds the candidate's logit


def _chunk(h: torch.Tensor, tab: torch.Tensor, c_vec: torch.Tensor | None, plan: _Plan, s: int, e: int,
           rows_first: torch.Tensor | None, grad: bool) -> _Chunk:
    """One chunk of positions ``s .. e - 1``: the sums, and (``grad``) the gradient of the loss over the logits."""
    ctx, cap = plan.context, plan.cap
    B, c, _ = h.shape
    width = tab.shape[1]
    V = plan.weight.shape[0]
    z_base = _linear(h, plan.weight, plan.bias).float()  # [B, c, V]
    z_hyper = torch.bmm(h, tab.transpose(1, 2)).float() if width else z_base.new_zeros(B, c, 0)
    cols = torch.arange(width, device=h.device)
    visible = ctx.visible[:, s:e, None]
    rows_seen = seen = cols < visible
    at = None
    if c_vec is not None and width:
        assert ctx.candidate_ok is not None  # set together with candidates
        at = (cols == visible) & ctx.candidate_ok[:, s:e, None]
        z_hyper = torch.where(at, (h.float() * c_vec.float()).sum(-1, keepdim=True), z_hyper)
        seen = seen | at
    slope_base = slope_hyper = None
    if cap:  # soft-capped logits (Gemma 2): d cap*tanh(z/cap) / dz = 1 - tanh^2
        z_base = torch.tanh(z_base.div_(cap))
        z_hyper = torch.tanh(z_hyper / cap)
        if grad:
            slope_base, slope_hyper = 1 - z_base * z_base, 1 - z_hyper * z_hyper
        z_base, z_hyper = z_base.mul_(cap), z_hyper * cap
    z_hyper = z_hyper.masked_fill(~seen, float("-inf"))
    tgt = plan.targets[:, s:e]
    valid = tgt != IGNORE_INDEX
    hyper_tgt = tgt >= V
    picked = z_base.gather(-1, tgt.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    if width:
        picked_h = z_hyper.gather(-1, (tgt - V).clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(hyper_tgt, picked_h, picked)
        top = torch.maximum(z_base.amax(-1), z_hyper.amax(-1))
    else:
        top = z_base.amax(-1)
    e_base = z_base.sub_(top.unsqueeze(-1)).exp_()  # in place: the logits are not needed any more
    e_hyper = (z_hyper - top.unsqueeze(-1)).exp()
    total = e_base.sum(-1) + e_hyper.sum(-1)
    lse = top + total.log()
    validf = valid.float()
    out = _Chunk(((lse - picked) * validf).sum(), lse.new_zeros(()), (valid & hyper_tgt & (picked >= top)).sum(),
                 lse.new_zeros(()))
    inv = 1.0 / total  # [B, c]: probabilities are e / total
    soft, extra = validf, None  # the factor of p in d loss / d z, and what the phrase ceiling adds on the rows
    if plan.phrases is not None and plan.next_text is not None and plan.teacher is not None and width:
        read = validf if plan.teacher.rows is None else validf * _row_mask(plan.teacher, B, validf)
        ceiling = phrase_ceiling(plan.phrases, plan.next_text[0][:, s:e], plan.next_text[1][:, s:e])
        over = z_hyper - lse.unsqueeze(-1) - ceiling  # log p_r - log U_r
        live = rows_seen & (read > 0).unsqueeze(-1) & (over > 0)
        p_rows = e_hyper * inv.unsqueeze(-1)
        out.phrase = torch.where(live, p_rows * over, 0.0).sum()
        if grad:  # d sum_r p_r log(p_r / U_r) / d z_c = [c live] p_c (l_c + 1) - p_c * sum_r p_r (l_r + 1)
            a = torch.where(live, p_rows * (over + 1), 0.0)
            soft = validf - plan.phrase_weight * a.sum(-1)
            extra = a.mul_(plan.phrase_weight)
    if plan.teacher is None:
        if grad:
            out.gz_base = e_base.mul_((validf * inv).unsqueeze(-1))
            out.gz_hyper = e_hyper * (validf * inv).unsqueeze(-1)
    else:
        assert rows_first is not None and plan.first is not None
        # the first base token of every scored column: the row's own, the candidate's where it sits
        first = rows_first.expand(B, c, width)
        first = (torch.where(at, plan.first[1][:, s:e, None].clamp(min=0), first) if at is not None
                 else first.contiguous())
        _distil(out, e_base, e_hyper, inv, first, validf, soft, plan, s, e, grad)
        if extra is not None and out.gz_hyper is not None:
            out.gz_hyper += extra
    if grad:
        gz_base, gz_hyper = out.gz_base, out.gz_hyper
        assert gz_base is not None and gz_hyper is not None  # made above whenever grad
        base_hot = (valid & ~hyper_tgt).float()
        gz_base.scatter_add_(-1, tgt.clamp(0, V - 1).unsqueeze(-1), -base_hot.unsqueeze(-1))
        if width:
            gz_hyper.scatter_add_(-1, (tgt - V).clamp(0, width - 1).unsqueeze(-1),
                                  -(valid & hyper_tgt).float().unsqueeze(-1))
        if slope_base is not None and slope_hyper is not None:
            gz_base.mul_(slope_base)
            out.gz_hyper = gz_hyper * slope_hyper
        out.at = at
    return out


def _distil(out: _Chunk, e_base: torch.Tensor, e_hyper: torch.Tensor, inv: torch.Tensor, first: torch.Tensor,
            validf: torch.Tensor, soft: torch.Tensor, plan: _Plan, s: int, e: int, grad: bool) -> None:
    """Add the first-token distillation of one chunk to ``out``: its sum, and its gradient over the logits.

    With ``p`` the model's next-code distribution, ``m`` its first-token marginal and ``q`` the teacher's
    distribution over the same outcomes, ``d KL(q || m) / d z_c = p_c * (1 - q(o) / m(o))`` where ``o`` is
    the outcome code ``c`` falls in (its first token, or the rest bucket).  ``soft`` ``[B, c]``: the
    factor of ``p_c`` the other losses give (the cross-entropy's ``1`` at a target, less the phrase
    ceiling's share).
    """
    B, c, width = e_hyper.shape
    teacher = plan.teacher
    assert teacher is not None
    ids, q, rest = _teacher_chunk(plan, s, e, B)  # [B, c, k] (None: every id), [B, c, k or V], [B, c]
    read = validf if teacher.rows is None else validf * _row_mask(teacher, B, validf)
    w = plan.distill_weight * read  # [B, c]
    p_hyper = e_hyper * inv.unsqueeze(-1)
    tiny = 1e-30
    if ids is None:  # the whole distribution: the marginal over every base token
        p_base = e_base * inv.unsqueeze(-1)
        marg = p_base.scatter_add(-1, first, p_hyper).clamp_min_(tiny)
        out.kl = ((torch.xlogy(q, q) - q * marg.log()).sum(-1) * read).sum()
        if grad:
            ratio = q / marg
            out.gz_hyper = p_hyper * (soft.unsqueeze(-1) + w.unsqueeze(-1) * (1 - ratio.gather(-1, first)))
            out.gz_base = e_base.mul_((inv * soft).unsqueeze(-1)).add_(p_base.mul_(1 - ratio).mul_(w.unsqueeze(-1)))
        return
    k = ids.shape[-1]
    p_top = e_base.gather(-1, ids) * inv.unsqueeze(-1)  # [B, c, k] the base ids among the teacher's top tokens
    # which hypertoken rows start with one of the teacher's top tokens, and with which (slot k: the rest)
    order, perm = ids.sort(-1)
    pos = torch.searchsorted(order, first).clamp_(max=k - 1)
    hit = order.gather(-1, pos) == first
    slot = torch.where(hit, perm.gather(-1, pos), k)
    hyper_mass = p_top.new_zeros(B, c, k + 1).scatter_add_(-1, slot, p_hyper)
    marg = (p_top + hyper_mass[..., :k]).clamp_min(tiny)
    # the rest bucket summed from its own members (1 - the top's mass would cancel to rounding noise)
    e_base.scatter_(-1, ids, 0.0)
    marg_rest = (e_base.sum(-1) * inv + hyper_mass[..., k]).clamp_min(tiny)
    out.kl = (((torch.xlogy(q, q) - q * marg.log()).sum(-1) + torch.xlogy(rest, rest) - rest * marg_rest.log())
              * read).sum()
    if not grad:
        return
    ratio, ratio_rest = q / marg, rest / marg_rest
    ratio_of_row = torch.where(hit, ratio.gather(-1, slot.clamp(max=k - 1)), ratio_rest.unsqueeze(-1))
    out.gz_hyper = p_hyper * (soft.unsqueeze(-1) + w.unsqueeze(-1) * (1 - ratio_of_row))
    # every base id outside the top tokens shares the rest bucket's factor; the top ones are written after
    out.gz_base = e_base.mul_((inv * (soft + w * (1 - ratio_rest))).unsqueeze(-1))
    out.gz_base.scatter_(-1, ids, p_top * (soft.unsqueeze(-1) + w.unsqueeze(-1) * (1 - ratio)))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of ``[B, c, D]`` as one ``[B * c, D]`` matrix product: a slice of positions is not
    contiguous, and ``F.linear`` would then run a batched product with the weight broadcast, twice as slow."""
    B, c, D = x.shape
    return F.linear(x.reshape(B * c, D), weight, bias).view(B, c, -1)


def _row_mask(teacher: Teacher, B: int, like: torch.Tensor) -> torch.Tensor:
    mask = like.new_zeros(B, 1)
    mask[teacher.rows] = 1.0
    return mask


def _teacher_chunk(plan: _Plan, s: int, e: int, B: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The teacher's next-token distribution at positions ``s .. e - 1`` of every row: ``(ids, q, rest)``.

    Top-k: ``ids`` ``[B, c, k]`` its most likely tokens, ``q`` their probabilities, ``rest`` ``[B, c]`` the mass
    of every other token.  Whole (``top_k=0``): ``ids`` is ``None``, ``q`` ``[B, c, V]``, ``rest`` zeros.
    Rows the teacher did not read get probability 0 everywhere (they are not distilled).
    """
    teacher = plan.teacher
    assert teacher is not None
    W = plan.weight
    with torch.no_grad():
        z = _linear(teacher.hidden[:, s:e].to(W.dtype), W, plan.bias).float()  # [b, c, V]
        if plan.cap:
            z = torch.tanh(z.div_(plan.cap)).mul_(plan.cap)
        if teacher.top_k:
            k = min(teacher.top_k, z.shape[-1])
            e_z = z.sub_(z.amax(-1, keepdim=True)).exp_()  # in place: a few passes, no [b, c, V] temporaries
            total = e_z.sum(-1, keepdim=True)
            values, ids = e_z.topk(k, -1, sorted=False)
            q = values / total
            # the rest's mass from its own members (1 - the top's mass would cancel to rounding noise)
            rest = (e_z.scatter_(-1, ids, 0.0).sum(-1, keepdim=True) / total).squeeze(-1)
        else:
            ids, q = None, z.softmax(-1)
            rest = q.new_zeros(q.shape[:2])
    if teacher.rows is None:
        return ids, q, rest
    c = e - s
    full_q = q.new_zeros((B, c, q.shape[-1]))
    full_q[teacher.rows] = q
    full_rest = rest.new_zeros((B, c))
    full_rest[teacher.rows] = rest
    full_ids = None
    if ids is not None:  # rows not read: any distinct ids (their probabilities are 0)
        full_ids = torch.arange(ids.shape[-1], device=ids.device).expand(B, c, -1).clone()
        full_ids[teacher.rows] = ids
    return full_ids, full_q, full_rest
