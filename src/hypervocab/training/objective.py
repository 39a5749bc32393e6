"""What a micro-batch is trained on: next codes, the base model as teacher, and two auxiliary heads.

* ``lm_loss``: cross-entropy of the next code over ``V + C`` ids, scored a chunk of positions at a time
  with its gradient computed on the spot (:func:`hypervocab.loss.train_scores`), never holding the whole
  batch's logits and never scoring a chunk twice.
* ``distill_loss`` (``distill_weight``): KL divergence of the model's next-code distribution, summed onto
  the first base token of each code, from the frozen base model's next-token distribution at the same
  text position, kept as its ``distill_top_k`` most likely tokens and one bucket for the rest.  The
  teacher is the same weights with the adapter off and no hypertokens: it costs one forward without
  gradients over the base tokens of the windows it reads (a ``distill_fraction`` of them).
* ``phrase_loss`` (``phrase_weight``): the phrase ceiling.  The teacher's log-probability of each next
  base token of the text, read along it, bounds the probability of every table row's phrase
  (:func:`hypervocab.loss.phrase_ceiling`); the model pays ``p log(p / bound)`` for each row it gives
  more.  It costs the teacher's logits at every base position of the windows it reads (no gradients).
* ``recon_loss`` (``recon_weight``): a small head recovers an entry's base tokens from its input
  embedding, on up to ``recon_entries`` distinct entries of the micro-batch, scored against the
  micro-batch's own subtokens plus ``recon_negatives`` ids drawn from the rest (a sampled softmax with the
  usual correction: never the ``[N, M, V]`` logits).
* ``next_hyper_loss`` (``next_hyper_weight``): whether the next code is a hypertoken, from the hidden state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import Teacher, first_tokens, next_code_targets, row_phrases, train_scores
from .batches import MicroBatch
from .config import TrainConfig

__all__ = ["NextHyperHead", "Objective", "ReconstructionHead"]

# entries whose [M, V] logits are scored at once by the reconstruction loss (each chunk checkpointed)
_RECON_CHUNK = 256


class ReconstructionHead(nn.Module):
    """Recovers the ``M`` base tokens of an entry from its input embedding (the auxiliary loss).

    One query per slot maps the embedding to a vector scored against the base
    embedding matrix, so the head stays small however large ``V`` is.
    """

    def __init__(self, dim: int, max_subtokens: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or min(dim, 256)
        self.max_subtokens = max_subtokens
        self.slots = nn.Linear(dim, max_subtokens * hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def _sum(self, embeddings: torch.Tensor, phrases: torch.Tensor, table: torch.Tensor,
             offsets: torch.Tensor | None) -> torch.Tensor:
        N, M = phrases.shape
        h = self.out(self.norm(self.slots(embeddings).view(N, self.max_subtokens, -1)[:, :M]))  # [N, M, D]
        logits = (h @ table.t()).float()  # [N, M, V] (or [N, M, K] over sampled candidates)
        if offsets is not None:
            logits = logits + offsets
        return F.cross_entropy(logits.reshape(N * M, -1), phrases.reshape(-1), ignore_index=-1, reduction="sum")

    def loss(self, embeddings: torch.Tensor, phrases: torch.Tensor, table: torch.Tensor, *,
             candidates: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``embeddings`` [N, D], ``phrases`` [N, M] (-1 padded), ``table`` [V, D] -> mean cross-entropy per token.

        ``candidates`` ``[K]`` (sorted base ids holding every id of ``phrases``) and ``offsets`` ``[K]``: a sampled
        softmax over those rows of ``table`` alone, each logit raised by its offset.  An id drawn to stand for
        ``n`` ids gets ``log n`` (the sampled-softmax correction), so that the normaliser estimates the full
        one; with every id a candidate and no offsets it is the full loss.  Chunks of entries are
        checkpointed, so the ``[N, M, V]`` (or ``[N, M, K]``) logits never exist at once.
        """
        count = (phrases >= 0).sum().clamp(min=1)
        if candidates is not None:  # targets renumbered into the candidate rows
            phrases = torch.where(phrases >= 0, torch.searchsorted(candidates, phrases.clamp(min=0)), -1)
            table = table[candidates]
        grad = torch.is_grad_enabled()
        total = embeddings.new_zeros((), dtype=torch.float32)
        for s in range(0, len(phrases), _RECON_CHUNK):
            args = (embeddings[s: s + _RECON_CHUNK], phrases[s: s + _RECON_CHUNK], table, offsets)
            total = total + (torch.utils.checkpoint.checkpoint(self._sum, *args, use_reentrant=False) if grad
                             else self._sum(*args))
        return total / count


class NextHyperHead(nn.Module):
    """Predicts from the last hidden state whether the next code is a hypertoken (optional auxiliary loss)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


class Objective(nn.Module):
    """The model and the auxiliary heads as one module whose forward computes a micro-batch's losses.

    FSDP gathers a unit's weights only inside that unit's forward, and the losses read weights outside
    the decoder layers (the encoders, the embedding matrix, the aux heads): making the whole objective
    the root unit keeps every read inside one forward.
    """

    fused_scoring = True  # False: score through autograd (hypervocab.loss.score_chunks), for comparisons

    def __init__(self, model: Any, config: TrainConfig, autocast: torch.dtype | None) -> None:
        super().__init__()
        D = model.embedding.base.weight.shape[1]
        self.model = model
        self.aux = nn.ModuleDict({"recon": ReconstructionHead(D, model.codec.max_subtokens),
                                  "next_hyper": NextHyperHead(model.head.base.weight.shape[1])})
        self.config = config
        self.autocast = autocast

    def forward(self, batch: MicroBatch, *, train: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss and its terms (detached tensors, summed where noted: never read back here).

        ``train=False`` (evaluation): the next-code loss alone.  Terms: ``lm_loss``, ``distill_loss``,
        ``recon_loss``, ``next_hyper_loss`` (means), ``targets`` / ``hyper_targets`` / ``hyper_correct``
        (counts).
        """
        if self.autocast is None:
            return self._losses(batch, self.config, train)
        # the compute in bfloat16 (or float16); the trainable weights and their optimiser state stay float32
        with torch.autocast(batch.input_ids.device.type, dtype=self.autocast):
            return self._losses(batch, self.config, train)

    def _losses(self, batch: MicroBatch, cfg: TrainConfig, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self.model
        V = model.codec.base_vocab_size
        out = model(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids,
                    codebooks=batch.codebooks, compute_logits=False)
        hidden, context = out.hidden_states, out.head_context
        targets = next_code_targets(batch.labels, batch.attention_mask)
        n = (targets != -100).sum()
        teacher = first = phrases = None
        if train and (cfg.distill_weight > 0 or cfg.phrase_weight > 0):
            teacher = self._teacher(batch)
            first = first_tokens(batch.codebooks, context.table.shape[1])
            if cfg.phrase_weight > 0:
                phrases = row_phrases(batch.codebooks, context.table.shape[1])
        weight, phrase_weight = cfg.distill_weight, cfg.phrase_weight
        if batch.teacher_rows is not None:  # the teacher read some windows: their divergence stands for all
            weight *= batch.input_ids.shape[0] / batch.teacher_rows.shape[0]
            phrase_weight *= batch.input_ids.shape[0] / batch.teacher_rows.shape[0]
        scores = train_scores(model, hidden, context, targets, teacher=teacher, first=first, distill_weight=weight,
                              phrases=phrases, phrase_weight=phrase_weight if phrases is not None else 0.0,
                              fused=self.fused_scoring)
        loss = scores.loss / n.clamp(min=1)  # the next-code loss, plus the weighted distillation
        terms = {"lm_loss": scores.cross_entropy / n.clamp(min=1), "targets": n,
                 "hyper_targets": scores.hyper_targets, "hyper_correct": scores.hyper_correct}
        if not train:
            return loss, terms
        # means over the positions the teacher read (all of them unless distill_fraction < 1)
        read = n if batch.teacher_rows is None else (targets[batch.teacher_rows] != -100).sum()
        if scores.distillation is not None and cfg.distill_weight > 0:
            terms["distill_loss"] = scores.distillation / read.clamp(min=1)
        if scores.phrase is not None:
            terms["phrase_loss"] = scores.phrase / read.clamp(min=1)
        if cfg.recon_weight > 0 and batch.recon_phrases is not None:
            phrases = batch.recon_phrases
            recon = self.aux["recon"].loss(model.encode_inputs(phrases), phrases, model.embedding.base.weight,
                                           candidates=batch.recon_ids, offsets=batch.recon_offsets)
            loss = loss + cfg.recon_weight * recon
            terms["recon_loss"] = recon.detach()
        if cfg.next_hyper_weight > 0:
            valid = targets[:, :-1] != -100
            logit = self.aux["next_hyper"](hidden[:, :-1].float())
            # a mean over the valid positions, written without boolean indexing (which reads the count back)
            bce = F.binary_cross_entropy_with_logits(logit, (targets[:, :-1] >= V).float(), reduction="none")
            nh = (bce * valid).sum() / valid.sum().clamp(min=1)
            loss = loss + cfg.next_hyper_weight * nh
            terms["next_hyper_loss"] = nh.detach()
        return loss, terms

    def _teacher(self, batch: MicroBatch) -> Teacher:
        """The base model's final hidden state at each code's last base token, in the windows it reads."""
        model = self.model
        with torch.no_grad(), model.disable_adapter():
            out = model(batch.base_ids, batch.base_mask, codebooks=batch.base_codebooks, compute_logits=False)
        full = out.hidden_states
        h = full.gather(1, batch.code_end.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        teacher = Teacher(h, batch.teacher_rows, top_k=self.config.distill_top_k)
        if self.config.phrase_weight > 0:
            teacher.next_tokens, teacher.next_logp = self._next_text(full, batch)
        return teacher

    def _next_text(self, hidden: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``[b, T, M]`` the next ``M`` base tokens after each code of the windows the teacher read (``-1`` past
        the text) and the teacher's log-probability of each, from its ``[b, L, D]`` hidden states."""
        assert batch.base_ids is not None and batch.base_mask is not None and batch.code_end is not None
        model = self.model
        ids, mask = batch.base_ids, batch.base_mask
        b, L = ids.shape
        M = model.codec.max_subtokens
        # log P(x[n + 1] | x[..n]) at every base position n, a chunk of positions at a time (no [b, L, V] logits)
        step = max(1, (1 << 24) // max(1, b * model.codec.base_vocab_size))
        logp = hidden.new_zeros((b, L), dtype=torch.float32)
        with torch.no_grad():
            for s in range(0, L - 1, step):
                e = min(L - 1, s + step)
                z = model.score(hidden[:, s:e], None).float()
                logp[:, s:e] = z.gather(-1, ids[:, s + 1: e + 1].unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)
        at = batch.code_end.unsqueeze(-1) + torch.arange(1, M + 1, device=ids.device)  # [b, T, M]
        inside = at < L
        at_c = at.clamp(max=L - 1)
        tokens = torch.where(inside & (mask.gather(1, at_c.flatten(1)).view_as(at) > 0),
                             ids.gather(1, at_c.flatten(1)).view_as(at), -1)
        lp = logp.gather(1, (at_c - 1).flatten(1)).view_as(at)
        return tokens, lp
