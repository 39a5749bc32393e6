"""Micro-batches made ready on the CPU ahead of the step, so a GPU never waits for the host.

Everything a step reads that NumPy or the codec computes (tracing the codes into codebooks, position
ids, the base-token text the teacher reads, the entries the reconstruction loss samples) is done here,
in DataLoader worker processes, into pinned tensors that are copied to the device without blocking.
What micro-batch ``k`` holds depends only on ``k`` (through :class:`~hypervocab.training.data.MixtureOrder`
and a generator seeded by it), never on the workers: a resumed run and a run of N processes read
exactly what one uninterrupted process reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from ..codebook import PreparedCodebooks
from ..codec import LZWCodec
from ..positions import position_ids
from .data import MixtureOrder, WindowSet

__all__ = ["BatchMaker", "MicroBatch", "micro_batches", "eval_batches", "reconstruction_candidates"]


@dataclass
class MicroBatch:
    """One micro-batch of windows, every tensor on the CPU (pinned) or on the device after :meth:`to`.

    input_ids / attention_mask / labels / position_ids: ``[B, T]``.
    codebooks: the :class:`~hypervocab.codebook.PreparedCodebooks` of ``input_ids``.
    base_tokens / codes: base tokens and codes the windows hold (plain ints, for the logs).
    recon_phrases: ``[n, M]`` entries sampled for the reconstruction loss (-1 padded), or ``None``.
    recon_ids: ``[K]`` sorted base ids the reconstruction scores against: every id of ``recon_phrases`` plus
        sampled others (``None``: the whole vocabulary); recon_offsets: ``[K]`` what each one's logit is raised by
        (0 for the phrases' own ids, ``log(others / drawn)`` for a drawn one, which stands for that many).
    base_ids / base_mask: ``[b, L]`` the text of the windows the teacher reads, as base ids (right-padded);
        base_codebooks their (empty) codebooks; code_end: ``[b, T]`` index into ``base_ids`` of each code's last
        base token; teacher_rows: ``[b]`` which windows those are (``None``: all ``B``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    codebooks: PreparedCodebooks
    base_tokens: int
    codes: int
    recon_phrases: torch.Tensor | None = None
    recon_ids: torch.Tensor | None = None
    recon_offsets: torch.Tensor | None = None
    base_ids: torch.Tensor | None = None
    base_mask: torch.Tensor | None = None
    base_codebooks: PreparedCodebooks | None = None
    code_end: torch.Tensor | None = None
    teacher_rows: torch.Tensor | None = None

    def _map(self, fn: Any) -> MicroBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), (torch.Tensor, PreparedCodebooks))})

    def to(self, device: torch.device | str) -> MicroBatch:
        """On ``device``; from pinned memory the copies do not block the host."""
        return self._map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> MicroBatch:
        return self._map(lambda x: x.pin_memory())


def reconstruction_candidates(phrases: np.ndarray, vocab_size: int, negatives: int,
                              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids a sampled reconstruction softmax scores against, sorted, and their logit offsets.

    Every id of ``phrases`` (``[n, M]``, -1 padded) with offset 0, and up to ``negatives`` of the other ids of
    ``[0, vocab_size)``, drawn uniformly without replacement, each with offset ``log(others / drawn)``: a drawn
    id stands for that many, so the softmax's normaliser estimates the full one (the sampled-softmax correction).

    >>> ids, off = reconstruction_candidates(np.array([[3, 1, -1]]), 10, 4, np.random.default_rng(0))
    >>> len(ids), sorted(set(np.round(off.numpy(), 3).tolist()))    # 1 and 3, then 4 of the other 8: log(8 / 4)
    (6, [0.0, 0.693])
    """
    own = np.unique(phrases[phrases >= 0])
    draw = rng.choice(vocab_size, size=min(vocab_size, negatives + len(own)), replace=False)
    others = draw[~np.isin(draw, own)][:negatives]
    ids = np.concatenate([own, others]).astype(np.int64)
    offsets = np.zeros(len(ids), np.float32)
    if len(others):
        offsets[len(own):] = np.log((vocab_size - len(own)) / len(others))
    order = np.argsort(ids)
    return torch.from_numpy(ids[order]), torch.from_numpy(offsets[order])


class BatchMaker:
    """Turns window indices into a :class:`MicroBatch`; small and picklable, it runs in the loader workers.

    Args:
        codec: the model's codec.
        position_mode / exact / score_next_id: from the model's :class:`~hypervocab.HyperConfig`.
        recon_entries: entries sampled per micro-batch for the reconstruction loss (0: none, -1: all).
        recon_negatives: base ids sampled per micro-batch, beyond the entries' own, that the reconstruction
            scores against (0: the whole vocabulary).
        teacher: also give the base-id view of the windows (for the distillation).
        distill_fraction: the share of each micro-batch's windows the teacher reads (at least one).
    """

    def __init__(self, codec: LZWCodec, *, position_mode: str, exact: bool, score_next_id: bool,
                 recon_entries: int, teacher: bool, recon_negatives: int = 0, distill_fraction: float = 1.0) -> None:
        self.codec = codec
        self.position_mode = position_mode
        self.exact = exact
        self.score_next_id = score_next_id
        self.recon_entries = recon_entries
        self.recon_negatives = recon_negatives
        self.teacher = teacher
        self.distill_fraction = distill_fraction

    def make(self, windows: WindowSet, idx: np.ndarray, rng: np.random.Generator | None) -> MicroBatch:
        """The windows ``idx`` of ``windows``; ``rng`` samples the reconstruction entries (``None``: no sample)."""
        batch = windows.batch(idx)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prep = PreparedCodebooks.from_codes(self.codec, ids, exact=self.exact, score_next_id=self.score_next_id)
        mb = MicroBatch(ids, mask, batch["labels"], position_ids(prep.lengths, mask, self.position_mode), prep,
                        int(windows.base_tokens[idx].sum()), int(windows.n_codes[idx].sum()))
        if rng is not None and self.recon_entries and prep.phrases.shape[0]:
            # distinct entries: a phrase many windows share counts once
            unique = np.unique(prep.phrases.numpy(), axis=0)
            if 0 < self.recon_entries < len(unique):
                unique = unique[np.sort(rng.choice(len(unique), self.recon_entries, replace=False))]
            mb.recon_phrases = torch.from_numpy(unique)
            if self.recon_negatives:
                mb.recon_ids, mb.recon_offsets = reconstruction_candidates(
                    unique, self.codec.base_vocab_size, self.recon_negatives, rng)
        if self.teacher:
            read = None
            B = len(idx)
            n = min(B, max(1, round(self.distill_fraction * B)))
            if rng is not None and n < B:
                read = np.sort(rng.choice(B, n, replace=False))
            mb = self._with_base_view(mb, read)
        return mb

    def _with_base_view(self, mb: MicroBatch, read: np.ndarray | None) -> MicroBatch:
        codes = mb.input_ids.numpy()
        mask = mb.attention_mask.numpy()
        if read is not None:
            codes, mask = codes[read], mask[read]
        rows = self.codec.decode_batch(codes, attention_mask=mask, num_threads=1)
        L = max(1, max(len(r) for r in rows))
        base = np.zeros((len(rows), L), dtype=np.int64)
        base_mask = np.zeros((len(rows), L), dtype=np.int64)
        for b, r in enumerate(rows):
            base[b, : len(r)] = r
            base_mask[b, : len(r)] = 1
        lengths = mb.codebooks.lengths.numpy()
        lengths = (lengths if read is None else lengths[read]) * mask
        code_end = np.maximum(np.cumsum(lengths, axis=1) - 1, 0)
        return replace(mb, base_ids=torch.from_numpy(base), base_mask=torch.from_numpy(base_mask),
                       base_codebooks=PreparedCodebooks.base_only(base, base_vocab_size=self.codec.base_vocab_size,
                                                                  max_subtokens=self.codec.max_subtokens),
                       code_end=torch.from_numpy(code_end),
                       teacher_rows=None if read is None else torch.from_numpy(read.astype(np.int64)))


class _TrainSet(torch.utils.data.Dataset):
    """Micro-batch ``k`` (``k = step * grad_accum + micro``) of process ``rank``."""

    def __init__(self, windows: WindowSet, order: MixtureOrder, maker: BatchMaker, *, batch_size: int,
                 grad_accum: int, world: int, rank: int, seed: int, length: int) -> None:
        self.windows, self.order, self.maker = windows, order, maker
        self.B, self.A, self.world, self.rank = batch_size, grad_accum, world, rank
        self.seed, self.length = seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> MicroBatch:
        step, micro = divmod(int(k), self.A)
        g = micro * self.world + self.rank  # the global micro-batch of this step
        idx = self.order.indices(step * self.A * self.world * self.B + g * self.B, self.B)
        # seeded by the global micro-batch: N processes sample what one process with N x A samples
        return self.maker.make(self.windows, idx, np.random.default_rng([self.seed, step, g]))


class _EvalSet(torch.utils.data.Dataset):
    def __init__(self, windows: WindowSet, maker: BatchMaker, batch_size: int, n: int) -> None:
        self.windows, self.maker, self.B, self.n = windows, maker, batch_size, n

    def __len__(self) -> int:
        return -(-self.n // self.B)

    def __getitem__(self, k: int) -> MicroBatch:
        return self.maker.make(self.windows, np.arange(k * self.B, min(self.n, (k + 1) * self.B)), None)


def _loader(dataset: torch.utils.data.Dataset, indices: range, *, workers: int, pin: bool) -> Any:
    """Items ``indices`` of ``dataset`` in order, ``workers`` processes making them ahead (0: in this process)."""
    options: dict[str, Any] = {"batch_size": None, "sampler": indices, "num_workers": workers, "pin_memory": pin}
    if workers:
        options["prefetch_factor"] = 4
    return torch.utils.data.DataLoader(dataset, **options)


def micro_batches(windows: WindowSet, order: MixtureOrder, maker: BatchMaker, *, batch_size: int, grad_accum: int,
                  world: int, rank: int, seed: int, start_step: int, max_steps: int, workers: int,
                  pin: bool) -> Any:
    """This process's micro-batches from ``start_step`` to ``max_steps``, ``grad_accum`` per step, in order."""
    data = _TrainSet(windows, order, maker, batch_size=batch_size, grad_accum=grad_accum, world=world, rank=rank,
                     seed=seed, length=max_steps * grad_accum)
    return _loader(data, range(start_step * grad_accum, max_steps * grad_accum), workers=workers, pin=pin)


def eval_batches(windows: WindowSet, maker: BatchMaker, *, batch_size: int, n: int, workers: int, pin: bool) -> Any:
    """The first ``n`` windows of ``windows`` in batches of ``batch_size``."""
    data = _EvalSet(windows, maker, batch_size, min(n, len(windows)))
    return _loader(data, range(len(data)), workers=min(workers, 1), pin=pin)
