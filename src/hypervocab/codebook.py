"""The codebook of one sequence: which base-token phrase each hypertoken id stands for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import InputTypeError, InvalidCodeError, InvalidTokenError

if TYPE_CHECKING:
    import torch

    from .codec import LZWCodec

__all__ = ["Codebook", "CodebookBatch", "Entry", "PreparedCodebooks", "next_candidates"]


class Entry(NamedTuple):
    """One hypertoken: its id (``>= base_vocab_size``) and the base ids it stands for."""

    id: int
    phrase: tuple[int, ...]


class Codebook:
    """The hypertokens one sequence defined, in creation order.

    Entry ``k`` has id ``base_vocab_size + k``.  ``phrases`` is ``[n, M]`` int64,
    each row a phrase padded with ``-1``; ``lengths`` is ``[n]``.  Base ids are
    their own phrase, so ``codebook[id]`` works for any id the sequence may use.
    """

    __slots__ = ("base_vocab_size", "phrases", "lengths")

    def __init__(self, phrases: np.ndarray, base_vocab_size: int, lengths: np.ndarray | None = None) -> None:
        phrases = np.asarray(phrases, dtype=np.int64)
        if phrases.ndim != 2:
            raise InputTypeError(f"phrases must be a [n, max_subtokens] array, got shape {phrases.shape}")
        self.phrases = phrases
        self.base_vocab_size = int(base_vocab_size)
        self.lengths = (phrases >= 0).sum(axis=1).astype(np.int64) if lengths is None else np.asarray(lengths, np.int64)

    @property
    def max_subtokens(self) -> int:
        """``M``: the longest phrase a hypertoken may stand for."""
        return self.phrases.shape[1]

    @property
    def ids(self) -> range:
        """The hypertoken ids defined, in creation order."""
        return range(self.base_vocab_size, self.base_vocab_size + len(self))

    def __len__(self) -> int:
        return self.phrases.shape[0]

    def __contains__(self, id: object) -> bool:
        return isinstance(id, (int, np.integer)) and bool(0 <= id < self.base_vocab_size + len(self))

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def phrase(self, id: int) -> tuple[int, ...]:
        """The base ids that ``id`` stands for (a base id stands for itself)."""
        id = int(id)
        if 0 <= id < self.base_vocab_size:
            return (id,)
        k = id - self.base_vocab_size
        if not 0 <= k < len(self):
            raise InvalidCodeError(
                f"id {id} is not in this codebook: it holds ids [0, {self.base_vocab_size + len(self)}) "
                f"(base ids below {self.base_vocab_size}, then {len(self)} hypertokens)"
            )
        return tuple(int(x) for x in self.phrases[k, : self.lengths[k]])

    __getitem__ = phrase

    def code_lengths(self, codes: np.ndarray) -> np.ndarray:
        """How many base ids each code of ``codes`` (any shape, all defined here) stands for."""
        codes = np.asarray(codes, dtype=np.int64)
        out = np.ones(codes.shape, dtype=np.int64)
        hyper = codes >= self.base_vocab_size
        out[hyper] = self.lengths[codes[hyper] - self.base_vocab_size]
        return out

    def entries(self) -> list[Entry]:
        """Every hypertoken as an :class:`Entry`, in creation order."""
        return [Entry(i, self.phrase(i)) for i in self.ids]

    def to_dict(self) -> dict[int, list[int]]:
        """``{hypertoken id: [base ids]}``."""
        return {i: list(self.phrase(i)) for i in self.ids}

    def to_array(self, *, pad_value: int = -1) -> np.ndarray:
        """The phrases as a new ``[n, M]`` int64 array, padded with ``pad_value``."""
        out = self.phrases.copy()
        if pad_value != -1:
            out[out < 0] = pad_value
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codebook):
            return NotImplemented
        return self.base_vocab_size == other.base_vocab_size and np.array_equal(self.phrases, other.phrases)

    def __reduce__(self) -> tuple[type[Codebook], tuple[np.ndarray, int, np.ndarray]]:
        return (Codebook, (self.phrases, self.base_vocab_size, self.lengths))

    def __repr__(self) -> str:
        shown = ", ".join(f"{i}: {list(self.phrase(i))}" for i in list(self.ids)[:4])
        more = ", ..." if len(self) > 4 else ""
        return f"Codebook({len(self)} hypertokens {{{shown}{more}}})"


class CodebookBatch:
    """Everything a model forward needs to know about a ``[B, T]`` batch of codes, as NumPy arrays.

    Built once per batch (in a DataLoader worker if you like: it pickles) by
    :meth:`from_codes`; :class:`~hypervocab.HyperModel` builds it itself when
    it is not given.

    Attributes:
        phrases: ``[N, M]`` every entry of every row, row by row, padded with ``-1``.
        entry_row: ``[N]`` the batch row of each entry; entry_slot: ``[N]`` its index in that row's codebook.
        counts: ``[B]`` entries per row.
        n_after: ``[B, T]`` entries installed after reading codes ``<= t``.
        candidates: ``[B, T, M]`` the phrase the next new id would stand for if written right after
            position ``t`` (the "KwKwK" case: pending phrase + its first id), or all ``-1`` when no new
            id may follow ``t``.
        lengths: ``[B, T]`` base tokens each code stands for.
    """

    __slots__ = ("phrases", "entry_row", "entry_slot", "counts", "n_after", "candidates", "lengths")

    def __init__(self, phrases: np.ndarray, entry_row: np.ndarray, entry_slot: np.ndarray, counts: np.ndarray,
                 n_after: np.ndarray, candidates: np.ndarray, lengths: np.ndarray) -> None:
        self.phrases, self.entry_row, self.entry_slot = phrases, entry_row, entry_slot
        self.counts, self.n_after, self.candidates, self.lengths = counts, n_after, candidates, lengths

    @classmethod
    def from_codes(cls, codec: LZWCodec, codes: np.ndarray | torch.Tensor) -> CodebookBatch:
        """Decode ``codes`` ``[B, T]`` with ``codec`` (an :class:`~hypervocab.LZWCodec`) and collect the tables."""
        books, n_after, pending = codec.trace_batch(codes)
        codes = np.asarray(codes.detach().cpu().numpy() if hasattr(codes, "detach") else codes, dtype=np.int64)
        B, T = codes.shape
        C, M = codec.max_codebook_size, codec.max_subtokens
        counts = np.array([len(b) for b in books], dtype=np.int64)
        phrases = np.concatenate([b.phrases for b in books]) if B else np.zeros((0, M), np.int64)
        entry_row = np.repeat(np.arange(B, dtype=np.int64), counts)
        entry_slot = np.concatenate([np.arange(n, dtype=np.int64) for n in counts]) if B else np.zeros(0, np.int64)
        lengths = (np.stack([book.code_lengths(row) for book, row in zip(books, codes)]) if B
                   else np.ones((0, T), np.int64))
        return cls(phrases, entry_row, entry_slot, counts, n_after, next_candidates(pending, n_after, C), lengths)

    def __reduce__(self) -> tuple[type[CodebookBatch], tuple[np.ndarray, ...]]:
        return (CodebookBatch, tuple(getattr(self, k) for k in self.__slots__))

    def unique_candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct candidate phrases ``[U, M]`` and, per position, the index of its own ``[B, T]``
        (``-1`` where no new id may follow): many positions share one, and each is encoded once."""
        ok = self.candidates[..., 0] >= 0
        index = np.full(ok.shape, -1, dtype=np.int64)
        if not ok.any():
            return np.zeros((0, self.candidates.shape[-1]), np.int64), index
        unique, inverse = np.unique(self.candidates[ok], axis=0, return_inverse=True)
        index[ok] = inverse.reshape(-1)
        return unique, index


@dataclass
class PreparedCodebooks:
    """A ``[B, T]`` batch's codebook facts as tensors, everything a forward reads, made ahead on the CPU.

    A forward given these never waits for the host: the ids were checked and traced when these were made
    (in a DataLoader worker, say), and ``width`` is a plain int.  Move them with :meth:`to` (pinned first
    with :meth:`pin_memory` for an asynchronous copy).

    Attributes:
        phrases: ``[N, M]`` every entry of every row, padded with ``-1``.
        entry_row / entry_slot: ``[N]`` the batch row and table row of each entry.
        visible: ``[B, T]`` table rows scored at each position (rows ``< visible``).
        candidates: ``[U, M]`` the distinct phrases of the one new id that may follow a position.
        candidate_index: ``[B, T]`` which candidate follows each position, ``-1`` where none may.
        lengths: ``[B, T]`` base tokens each code stands for.
        width: table rows the batch needs.
    """

    phrases: torch.Tensor
    entry_row: torch.Tensor
    entry_slot: torch.Tensor
    visible: torch.Tensor
    candidates: torch.Tensor
    candidate_index: torch.Tensor
    lengths: torch.Tensor
    width: int

    @classmethod
    def from_batch(cls, cb: CodebookBatch, *, max_codebook_size: int, exact: bool = True,
                   score_next_id: bool = True) -> PreparedCodebooks:
        """Tensors of a :class:`CodebookBatch`.

        exact: position ``t`` scores only the rows installed by codes ``<= t`` (``codebook_mask="exact"``),
            else every row of its sequence; score_next_id: also the one new id that may come next
            (exact only).
        """
        import torch

        B, T = cb.n_after.shape
        M = cb.phrases.shape[1]
        needed = max(int(cb.counts.max(initial=0)), int(cb.n_after.max(initial=0)) + int(exact))
        visible = cb.n_after if exact else np.repeat(cb.counts[:, None], T, axis=1)
        if exact and score_next_id:
            candidates, index = cb.unique_candidates()
        else:
            candidates, index = np.zeros((0, M), np.int64), np.full((B, T), -1, np.int64)
        t = (lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)))
        return cls(t(cb.phrases), t(cb.entry_row), t(cb.entry_slot), t(visible), t(candidates), t(index),
                   t(cb.lengths), min(max_codebook_size, needed))

    @classmethod
    def from_codes(cls, codec: Any, codes: Any, *, exact: bool = True, score_next_id: bool = True) -> PreparedCodebooks:
        """Trace ``codes`` ``[B, T]`` (checked on the way: an invalid code raises) with ``codec`` (an
        :class:`~hypervocab.LZWCodec`) and keep the tensors."""
        return cls.from_batch(CodebookBatch.from_codes(codec, codes), max_codebook_size=codec.max_codebook_size,
                              exact=exact, score_next_id=score_next_id)

    @classmethod
    def base_only(cls, ids: Any, *, base_vocab_size: int, max_subtokens: int) -> PreparedCodebooks:
        """For ``[B, L]`` base ids read as they are (no hypertoken, no codebook): what a forward of the plain
        base model's view of a text reads.  Every id must be in ``[0, base_vocab_size)``."""
        import torch

        arr = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
        if arr.ndim != 2:
            raise InputTypeError(f"ids must be a [batch, length] array, got shape {tuple(arr.shape)}")
        bad = (arr < 0) | (arr >= base_vocab_size)
        if bad.any():
            b, t = (int(x) for x in np.argwhere(bad)[0])
            raise InvalidTokenError(f"ids[{b}][{t}] = {int(arr[b, t])} is not a base id: they are [0, "
                                    f"{base_vocab_size})")
        B, L = arr.shape
        z = torch.zeros
        return cls(z(0, max_subtokens, dtype=torch.long), z(0, dtype=torch.long), z(0, dtype=torch.long),
                   z(B, L, dtype=torch.long), z(0, max_subtokens, dtype=torch.long), torch.full((B, L), -1),
                   torch.ones(B, L, dtype=torch.long), 0)

    def _map(self, fn: Any) -> PreparedCodebooks:
        return PreparedCodebooks(**{f.name: (fn(v) if f.name != "width" else v)
                                    for f in fields(self) for v in [getattr(self, f.name)]})

    def to(self, device: Any, *, non_blocking: bool = False) -> PreparedCodebooks:
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PreparedCodebooks:
        return self._map(lambda x: x.pin_memory())

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, T)``."""
        B, T = self.visible.shape
        return B, T


def next_candidates(pending: np.ndarray, n_after: np.ndarray, max_codebook_size: int) -> np.ndarray:
    """The phrase the next new id stands for if it is written right after each position.

    It may come next when the codebook has room and ``0 < |P| < M``, and then it
    means ``P + P[0]`` (the LZW "KwKwK" case).  ``pending`` is ``[..., M]``
    (padded with -1) and ``n_after`` the entries installed at each position;
    returns ``[..., M]``, all ``-1`` where no new id may follow.
    """
    M = pending.shape[-1]
    plen = (pending >= 0).sum(-1)
    legal = (n_after < max_codebook_size) & (plen > 0) & (plen < M)
    out = np.full(pending.shape, -1, dtype=np.int64)
    idx = np.nonzero(legal)
    out[idx] = pending[idx]
    out[idx + (plen[idx],)] = pending[idx + (0,)]
    return out
