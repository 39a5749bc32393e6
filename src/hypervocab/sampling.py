"""Choosing the next code of each sequence from a step's logits: penalties, budgets, greedy or sampled."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .session import HyperSession
from .speculative import accept_draft

if TYPE_CHECKING:
    from .generation import GenerationOptions

__all__ = ["CodeSampler"]


class CodeSampler:
    """Turns a step's logits ``[B, V + C]`` into one code per row of a :class:`~hypervocab.session.HyperSession`.

    options: a :class:`~hypervocab.generation.GenerationOptions` (its sampling fields: do_sample,
    temperature, top_k, top_p, repetition_penalty (on codes the session has seen, when it tracks them),
    allow_hypertokens, logit_bias, whose ids are checked against ``V`` by the options' own
    ``check_vocab``).  generator: for reproducible sampling.

    A step is :meth:`scores` (what the session allows: penalty, budget, then :meth:`restrict`), then
    :meth:`pick`.  A batch whose rows each have their own sampler (the server's) is masked once by a
    plain sampler, and each row's sampler penalizes, restricts and picks its own row.
    """

    def __init__(self, V: int, options: GenerationOptions, *, generator: torch.Generator | None = None) -> None:
        o = options
        self.V, self.do_sample, self.temperature = V, o.do_sample, float(o.temperature)
        self.top_k, self.top_p, self.penalty = o.top_k, o.top_p, float(o.repetition_penalty)
        self.allow_hypertokens, self.generator = o.allow_hypertokens, generator
        self._bias = o.logit_bias
        self.logit_bias: torch.Tensor | None = None  # [V], made on the device of the first scores

    def __call__(self, logits: torch.Tensor, session: HyperSession, budget: np.ndarray | None = None) -> list[int]:
        """One code per row; ``budget``: ``[B]`` base tokens each row may still write (longer codes are barred)."""
        return self.pick(self.scores(logits, session, budget))

    def pick(self, scores: torch.Tensor) -> list[int]:
        """One code per row of masked ``scores`` ``[B, V + C]``: the argmax, or a sample."""
        if not self.do_sample:
            return scores.argmax(-1).tolist()
        return torch.multinomial(self.probabilities(scores), 1, generator=self.generator)[:, 0].tolist()

    def choose_draft(self, logits: torch.Tensor, session: HyperSession, budget: np.ndarray | None,
                     draft: int) -> int:
        """The code of one row (``logits`` ``[1, V + C]``) where a draft proposes ``draft``.

        Greedy: the argmax, as :meth:`__call__`.  Sampling: the speculative rule
        (:func:`~hypervocab.speculative.accept_draft`), so the code has the distribution ordinary
        sampling gives.
        """
        scores = self.scores(logits, session, budget)
        if not self.do_sample:
            return int(scores[0].argmax())
        return accept_draft(self.probabilities(scores)[0], draft, self.generator)

    def scores(self, logits: torch.Tensor, session: HyperSession, budget: np.ndarray | None) -> torch.Tensor:
        """The logits after the penalty and the masks (float32): what greedy decoding takes the argmax of."""
        V = self.V
        logits = self.penalize(logits.float(), session.seen)
        if self.allow_hypertokens and budget is not None:
            # a hypertoken longer than what is left of the base-token budget may not be chosen
            W = session.lengths.shape[1]
            left = torch.as_tensor(budget, device=logits.device)
            logits[:, V: V + W] = logits[:, V: V + W].masked_fill(session.lengths > left[:, None], float("-inf"))
            at = torch.as_tensor(session.count, device=logits.device)
            cand_len = torch.as_tensor([len(d.pending) + 1 for d in session.decoders], device=logits.device)
            bad = session.cand_ok & (cand_len > left)
            if bad.any():
                r = bad.nonzero()[:, 0]
                logits[r, V + at[r]] = float("-inf")
        return self.restrict(logits)

    def penalize(self, scores: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The repetition penalty on the codes ``seen`` (``[B, V + C]`` bool; ``None``: not tracked)."""
        if self.penalty == 1.0 or seen is None:
            return scores
        scaled = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, scaled, scores)

    def restrict(self, scores: torch.Tensor) -> torch.Tensor:
        """This sampler's own changes to float32 ``scores`` ``[B, V + C]`` (in place): bias, base ids only."""
        V = self.V
        if self._bias:
            if self.logit_bias is None or self.logit_bias.device != scores.device:
                self.logit_bias = torch.zeros(V, device=scores.device)
                self.logit_bias[torch.as_tensor(list(self._bias), dtype=torch.long, device=scores.device)] = \
                    torch.as_tensor(list(self._bias.values()), device=scores.device)
            scores[:, :V] += self.logit_bias.to(scores.dtype)
        if not self.allow_hypertokens:
            scores[:, V:] = float("-inf")
        return scores

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V + C]`` sampling distribution of masked logits (temperature, top-k, top-p)."""
        logits = logits / self.temperature
        if self.top_k:
            k = min(self.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            drop[:, 0] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return logits.softmax(-1)

