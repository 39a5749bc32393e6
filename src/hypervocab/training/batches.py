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

__all__ = ["BatchMaker", "MicroBatch", "micro_batches", "eval_batches"]


@dataclass
class MicroBatch:
    """One micro-batch of windows, every tensor on the CPU (pinned) or on the device after :meth:`to`.

    input_ids / attention_mask / labels / position_ids: ``[B, T]``.
    codebooks: the :class:`~hypervocab.codebook.PreparedCodebooks` of ``input_ids``.
    base_tokens / codes: base tokens and codes the windows hold (plain ints, for the logs).
    recon_phrases: ``[n, M]`` entries sampled for the reconstruction loss (-1 padded), or ``None``.
    base_ids / base_mask: ``[B, L]`` the windows' text as base ids (right-padded), for the teacher; base_codebooks
        their (empty) codebooks; code_end: ``[B, T]`` index into ``base_ids`` of each code's last base token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    codebooks: PreparedCodebooks
    base_tokens: int
    codes: int
    recon_phrases: torch.Tensor | None = None
    base_ids: torch.Tensor | None = None
    base_mask: torch.Tensor | None = None
    base_codebooks: PreparedCodebooks | None = None
    code_end: torch.Tensor | None = None

    def _map(self, fn: Any) -> MicroBatch:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), (torch.Tensor, PreparedCodebooks))})

    def to(self, device: torch.device | str) -> MicroBatch:
        """On ``device``; from pinned memory the copies do not block the host."""
        return self._map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> MicroBatch:
        return self._map(lambda x: x.pin_memory())


class BatchMaker:
    """Turns window indices into a :class:`MicroBatch`; small and picklable, it runs in the loader workers.

    Args:
        codec: the model's codec.
        position_mode / exact / score_next_id: from the model's :class:`~hypervocab.HyperConfig`.
        recon_entries: entries sampled per micro-batch for the reconstruction loss (0: none, -1: all).
        teacher: also give the base-id view of the windows (for the distillation).
    """

    def __init__(self, codec: LZWCodec, *, position_mode: str, exact: bool, score_next_id: bool,
                 recon_entries: int, teacher: bool) -> None:
        self.codec = codec
        self.position_mode = position_mode
        self.exact = exact
        self.score_next_id = score_next_id
        self.recon_entries = recon_entries
        self.teacher = teacher

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
        if self.teacher:
            mb = self._with_base_view(mb)
        return mb

    def _with_base_view(self, mb: MicroBatch) -> MicroBatch:
        codes = mb.input_ids.numpy()
        mask = mb.attention_mask.numpy()
        rows = self.codec.decode_batch(codes, attention_mask=mask, num_threads=1)
        L = max(1, max(len(r) for r in rows))
        base = np.zeros((len(rows), L), dtype=np.int64)
        base_mask = np.zeros((len(rows), L), dtype=np.int64)
        for b, r in enumerate(rows):
            base[b, : len(r)] = r
            base_mask[b, : len(r)] = 1
        lengths = mb.codebooks.lengths.numpy() * mask
        code_end = np.maximum(np.cumsum(lengths, axis=1) - 1, 0)
        return replace(mb, base_ids=torch.from_numpy(base), base_mask=torch.from_numpy(base_mask),
                       base_codebooks=PreparedCodebooks.base_only(base, base_vocab_size=self.codec.base_vocab_size,
                                                                  max_subtokens=self.codec.max_subtokens),
                       code_end=torch.from_numpy(code_end))


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
