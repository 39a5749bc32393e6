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

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import PreparedCodebooks
from .embedding import HeadContext
from .errors import InputTypeError

__all__ = ["ChunkScores", "Teacher", "TrainScores", "first_tokens", "fusable", "next_code_targets", "score_chunks",
           "train_scores"]

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
                 chunk_cells: int | None = None, distill_mask: torch.Tensor | None = None) -> ChunkScores:
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
        read = valid if distill_mask is None else valid & distill_mask[:, s:e]
        return ce, (kl * read).sum(), correct

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


# ---------------------------------------------------------------------------------------------- the fused scorer


@dataclass
class Teacher:
    """The frozen base model's view of a micro-batch, what the first-token distillation matches.

    hidden: ``[b, T, D]`` the base model's final hidden states at the text position of each code's last base
        token, for the ``b`` windows the teacher read.
    rows: ``[b]`` which windows of the ``[B, T]`` batch those are (``None``: all of them, ``b == B``).
    top_k: the teacher's distribution is kept as its ``top_k`` most likely next tokens plus one bucket for
        the rest (``0``: the whole distribution, the exact divergence).

    The bucketed divergence is the KL divergence between the two distributions coarsened to ``top_k + 1``
    outcomes (the teacher's top tokens, and "any other token"), so by the data-processing inequality it is
    never more than the exact one: ``0 <= KL_bucketed <= KL_exact``; the two are equal when the teacher puts
    no mass outside its top tokens.
    """

    hidden: torch.Tensor
    rows: torch.Tensor | None = None
    top_k: int = 64


@dataclass
class TrainScores:
    """What :func:`train_scores` returns: sums over the positions with a target (divide by their count).

    loss: ``cross_entropy + distill_weight * distillation``, the one differentiable output.  cross_entropy,
    distillation (``None`` without a teacher), hyper_correct, hyper_targets: detached, as in
    :class:`ChunkScores` (a hypertoken target is correct where it scores the highest logit).
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    distillation: torch.Tensor | None
    hyper_correct: torch.Tensor
    hyper_targets: torch.Tensor


def fusable(model: Any) -> bool:
    """Whether :func:`train_scores` can compute the head's gradients itself: a plain, frozen linear LM head
    (a head with trainable weights, LoRA on the head say, goes through :func:`score_chunks`)."""
    base = model.head.base
    return isinstance(base, nn.Linear) and not any(p.requires_grad for p in base.parameters())


def train_scores(model: Any, hidden: torch.Tensor, context: HeadContext, targets: torch.Tensor, *,
                 teacher: Teacher | None = None, first: tuple[torch.Tensor, torch.Tensor] | None = None,
                 distill_weight: float = 1.0, chunk_cells: int | None = None, fused: bool = True) -> TrainScores:
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
        chunk_cells: positions x ids scored at once (default: by device).
        fused: ``False`` scores through autograd instead (:func:`score_chunks`, the whole teacher
            distribution whatever ``teacher.top_k``), the reference the fused scorer is tested against.

    Returns:
        :class:`TrainScores`.
    """
    if teacher is not None and first is None:
        raise InputTypeError("train_scores: a teacher needs first= (first_tokens of the batch)")
    if not fused or not fusable(model):
        return _unfused(model, hidden, context, targets, teacher, first, distill_weight, chunk_cells)
    head = model.head
    V = model.codec.base_vocab_size
    plan = _Plan(weight=head.base.weight[:V], bias=None if head.base.bias is None else head.base.bias[:V],
                 context=context if head.scores_next_id else replace(context, candidates=None, candidate_ok=None),
                 targets=targets, teacher=teacher, first=first, distill_weight=float(distill_weight),
                 cap=getattr(model.base.config, "final_logit_softcapping", None) or None,
                 chunk_cells=chunk_cells or _CHUNK_CELLS["cpu" if hidden.device.type == "cpu" else "other"])
    cand = plan.context.candidates
    table = context.table
    loss, ce, kl, correct = _FusedHeadLoss.apply(hidden, table, cand, plan)
    return TrainScores(loss, ce, kl if teacher is not None else None, correct, (targets >= V).sum())


def _unfused(model: Any, hidden: torch.Tensor, context: HeadContext, targets: torch.Tensor, teacher: Teacher | None,
             first: tuple[torch.Tensor, torch.Tensor] | None, weight: float, cells: int | None) -> TrainScores:
    """:func:`train_scores` through autograd (:func:`score_chunks`, the exact divergence)."""
    t_hidden = mask = None
    if teacher is not None:
        t_hidden, mask = _full_rows(teacher, hidden.shape[0], targets)
    s = score_chunks(model, hidden, context, targets, teacher_hidden=t_hidden, first=first, chunk_cells=cells,
                     distill_mask=mask)
    loss = s.cross_entropy if s.distillation is None else s.cross_entropy + weight * s.distillation
    return TrainScores(loss, s.cross_entropy.detach(), None if s.distillation is None else s.distillation.detach(),
                       s.hyper_correct, s.hyper_targets)


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
    cap: float | None
    chunk_cells: int


class _FusedHeadLoss(torch.autograd.Function):
    """``(hidden, table, candidates) -> (loss, cross_entropy, distillation, hyper_correct)``; the gradients of
    ``loss`` are computed in the forward (:func:`train_scores`) and only scaled in the backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor | None,
                plan: _Plan) -> tuple[torch.Tensor, ...]:
        need = tuple(ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here, explicitly
            loss, ce, kl, correct, grads = _score(hidden, table, candidates, plan, need)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, kl, correct)
        return loss, ce, kl, correct

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if x is None else x * g.to(x.dtype) for x in ctx.saved_tensors) + (None,)


def _score(hidden: torch.Tensor, table: torch.Tensor, cand: torch.Tensor | None, plan: _Plan,
           need: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[Any]]:
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
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    rows_first = None if plan.first is None else plan.first[0][:, None, :]
    for s in range(0, T, step):
        e = min(T, s + step)
        h = hidden[:, s:e].to(cd)
        c_vec = None if cand is None else cand[:, s:e].to(cd)
        out = _chunk(h, tab, c_vec, plan, s, e, rows_first, grad)
        ce += out.ce
        kl += out.kl
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
    grads = [g_hidden, None if g_table is None else g_table.to(table.dtype),
             None if g_cand is None or cand is None else g_cand.to(cand.dtype)]
    return loss, ce, kl, correct, grads


@dataclass
class _Chunk:
    ce: torch.Tensor
    kl: torch.Tensor
    correct: torch.Tensor
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
    seen = cols < visible
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
    out = _Chunk(((lse - picked) * validf).sum(), lse.new_zeros(()), (valid & hyper_tgt & (picked >= top)).sum())
    inv = 1.0 / total  # [B, c]: probabilities are e / total
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
        _distil(out, e_base, e_hyper, inv, first, validf, plan, s, e, grad)
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
            validf: torch.Tensor, plan: _Plan, s: int, e: int, grad: bool) -> None:
    """Add the first-token distillation of one chunk to ``out``: its sum, and its gradient over the logits.

    With ``p`` the model's next-code distribution, ``m`` its first-token marginal and ``q`` the teacher's
    distribution over the same outcomes, ``d KL(q || m) / d z_c = p_c * (1 - q(o) / m(o))`` where ``o`` is
    the outcome code ``c`` falls in (its first token, or the rest bucket).
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
            out.gz_hyper = p_hyper * (validf.unsqueeze(-1) + w.unsqueeze(-1) * (1 - ratio.gather(-1, first)))
            out.gz_base = e_base.mul_((inv * validf).unsqueeze(-1)).add_(p_base.mul_(1 - ratio).mul_(w.unsqueeze(-1)))
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
    out.gz_hyper = p_hyper * (validf.unsqueeze(-1) + w.unsqueeze(-1) * (1 - ratio_of_row))
    # every base id outside the top tokens shares the rest bucket's factor; the top ones are written after
    out.gz_base = e_base.mul_((inv * (validf + w * (1 - ratio_rest))).unsqueeze(-1))
    out.gz_base.scatter_(-1, ids, p_top * (validf.unsqueeze(-1) + w.unsqueeze(-1) * (1 - ratio)))


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
