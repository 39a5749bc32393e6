"""The incremental runtime: a batch of sequences read and written a code at a time.

A :class:`HyperSession` is everything a model needs to go on from where its sequences stand: each
row's LZW decoder, the growing per-row hypertoken tables (input and output vectors), the output vector
of the one new id that may legally come next, the KV cache and its mask, and the positions reached.
Codes are pushed into the decoders the moment they are chosen, so an invalid code never gets further;
the model reads them on the next :meth:`~HyperSession.advance`.  Each entry's output vector is computed
once, when it is installed (every installed id is scored at every step), and its input vector the first
time it is read (most entries never are).  An embedding never changes once installed, so the KV cache
stays valid while the codebooks grow.

:meth:`HyperModel.new_session <hypervocab.model.HyperModel.new_session>` makes one; generation
(:mod:`hypervocab.generation`), scoring and serving all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from .codec import DecoderState
from .embedding import HeadContext
from .errors import InputTypeError, InvalidCodeError, StateError, check_int
from .kv_cache import cache_argument, growing, merged_cache
from .positions import position_ids

if TYPE_CHECKING:
    from .model import HyperModel

__all__ = ["HyperSession", "attention_mask_of"]


def attention_mask_of(attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``[B, T]`` int64 mask (all 1 when ``None``), checked against the codes' shape."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.long, device=device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise InputTypeError(f"attention_mask must be [B, T] = {(B, T)} like the codes, got {got}")
    return attention_mask.long()


@dataclass(kw_only=True)  # 22 fields: built by name, never by position
class HyperSession:
    """Per-sequence state of a batch being generated or scored (row ``i`` is sequence ``index[i]``).

    Attributes:
        model: the :class:`~hypervocab.HyperModel` it runs.
        index: ``[B]`` which sequence of the original batch each row is.
        decoders: one :class:`~hypervocab.codec.DecoderState` per row (its codebook holds every code so far).
        books: per row, the phrase of each entry, in creation order.
        in_table / out_table: ``[B, capacity, D]`` input / output vectors of ids ``V + k``.
        lengths: ``[B, capacity]`` base tokens of each entry (0 where none).
        count: ``[B]`` entries installed.
        base_len / code_len: ``[B]`` base tokens / codes read by the model so far.
        cand / cand_ok: ``[B, D]`` and ``[B]``: the output vector of the one new id that may legally come next.
        mask: ``[B, S]`` what the KV cache holds (0 on padding).
        cache: the base model's KV cache (``None`` before the first read).
        unread: per row, codes chosen but not read by the model yet.
        seen: ``[B, V + C]`` codes seen, for a repetition penalty, or ``None``.
        in_ready: ``[B, capacity]`` whether an entry's input vector is computed.
        cand_phrase: per row, the phrase ``cand`` scores (or ``None``).
        tokens / history: per row, the base ids / the codes pushed so far (what prompt lookup drafts from).
        ahead: ``(code, base tokens)`` of each position the KV cache holds past ``mask``: drafts read by
            :meth:`read_ahead` and not yet accepted (:meth:`accept_ahead`) or dropped (:meth:`drop_ahead`).
        static: for a static session (:meth:`start` with ``max_length``), its fixed-shape decode step
            (:class:`~hypervocab.static_cache.StaticStep`); ``None`` for the ordinary dynamic one.
    """

    model: HyperModel
    index: np.ndarray
    decoders: list[DecoderState]
    books: list[list[tuple[int, ...]]]
    in_table: torch.Tensor
    out_table: torch.Tensor
    lengths: torch.Tensor
    count: np.ndarray
    base_len: np.ndarray
    code_len: np.ndarray
    cand: torch.Tensor
    cand_ok: torch.Tensor
    mask: torch.Tensor
    cache: Any
    unread: list[list[int]]
    seen: torch.Tensor | None
    in_ready: np.ndarray
    cand_phrase: list[tuple[int, ...] | None]
    tokens: list[list[int]]
    history: list[list[int]]
    ahead: list[tuple[int, int]] = field(default_factory=list)
    static: Any = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def start(cls, model: HyperModel, batch_size: int, *, max_length: int | None = None,
              compiled: bool | str | None = None) -> HyperSession:
        """``batch_size`` empty sequences (nothing read yet).

        max_length: make a static session of one sequence: a preallocated KV cache of this many codes and
        full-width tables, whose decode step can be compiled into a CUDA graph (see
        :mod:`hypervocab.static_cache`); compiled: compile that step (``True``, a ``torch.compile`` backend
        name, or ``None``: on a CUDA device).
        """
        B = check_int("batch_size", batch_size, minimum=1, error=InputTypeError)
        check_int("max_length", max_length, minimum=1, optional=True, error=InputTypeError)
        if max_length is not None and B != 1:
            raise InputTypeError(f"a static session holds one sequence (max_length given), got batch_size={B}")
        # nn.Module types its attributes loosely: these are the embedding's and the head's weight matrices
        w, w_out = cast(torch.Tensor, model.embedding.base.weight), cast(torch.Tensor, model.head.base.weight)
        dev, dt = w.device, w.dtype
        D_in, D_out = w.shape[1], w_out.shape[1]
        C = model.codec.max_codebook_size
        # a static session's tables never grow: the step sees the same tensors every time
        cap = min(C, 64) if max_length is None else C
        z = np.zeros(B, np.int64)
        def rows() -> list[Any]:
            return [[] for _ in range(B)]

        session = cls(model=model, index=np.arange(B), decoders=[model.codec.decoder_state() for _ in range(B)],
                      books=rows(), in_table=torch.zeros(B, cap, D_in, device=dev, dtype=dt),
                      out_table=torch.zeros(B, cap, D_out, device=dev, dtype=dt),
                      lengths=torch.zeros(B, cap, dtype=torch.long, device=dev), count=z, base_len=z.copy(),
                      code_len=z.copy(), cand=torch.zeros(B, D_out, device=dev, dtype=dt),
                      cand_ok=torch.zeros(B, dtype=torch.bool, device=dev),
                      mask=torch.zeros(B, 0, dtype=torch.long, device=dev), cache=None, unread=rows(), seen=None,
                      in_ready=np.zeros((B, cap), bool), cand_phrase=[None] * B, tokens=rows(), history=rows())
        if max_length is not None:
            from .static_cache import StaticStep

            session.static = StaticStep(model, B, max_length, session.out_table, session.cand, session.cand_ok,
                                        compiled=compiled)
            session.cache = session.static.cache
        return session

    @property
    def batch_size(self) -> int:
        return len(self.index)

    @property
    def device(self) -> torch.device:
        return self.in_table.device

    @property
    def _V(self) -> int:
        return self.model.codec.base_vocab_size

    def code_lengths(self, b: int, codes: list[int]) -> list[int]:
        """Base tokens each of ``codes`` (all defined in row ``b``) stands for."""
        V, book = self._V, self.books[b]
        return [1 if c < V else len(book[c - V]) for c in codes]

    # ------------------------------------------------------------------ pushing codes

    def append(self, codes: list[int]) -> list[list[int]]:
        """Push one chosen code per row (the decoding step): returns the base ids each stands for.

        The codes are not read by the model yet: the next :meth:`advance` reads them.
        """
        installed = DecoderState.push_batch(self.decoders, codes)
        V = self._V
        new = []
        for b, id_, phrase in installed:
            self.books[b].append(phrase)
            new.append((b, id_ - V, phrase))
        expansions = [[c] if c < V else list(self.books[b][c - V]) for b, c in enumerate(codes)]
        for row, exp, hist, c in zip(self.tokens, expansions, self.history, codes):
            row.extend(exp)
            hist.append(c)
        self._install(new)
        for row, c in zip(self.unread, codes):
            row.append(c)
        if self.seen is not None:
            self.seen[torch.arange(len(codes)), torch.as_tensor(codes)] = True
        return expansions

    def push(self, codes: np.ndarray, mask: np.ndarray) -> list[list[int]]:
        """Push ``[B, T]`` codes where ``mask`` is 1, all or nothing; returns each code's length in base tokens.

        Raises:
            InvalidCodeError: naming ``input_ids[b][t]``; every row's decoder is left as it was.
        """
        V = self._V
        snapshots = [d.copy() for d in self.decoders]
        new: list[tuple[int, int, tuple[int, ...]]] = []
        pushed: list[int] = []
        for b, dec in enumerate(self.decoders):
            row = codes[b][mask[b].astype(bool)]
            try:
                got = dec.push(row)
            except InvalidCodeError as e:
                self.decoders[:] = snapshots
                for i in range(b):  # the rows already pushed give back what they took
                    del self.books[i][len(snapshots[i]):]
                    del self.tokens[i][len(self.tokens[i]) - pushed[i]:]
                    del self.history[i][len(self.history[i]) - int(mask[i].sum()):]
                where = int(np.flatnonzero(mask[b])[e.position])
                raise InvalidCodeError(f"input_ids[{b}][{where}]: {e.reason}") from None
            pushed.append(len(got.ids))
            self.tokens[b].extend(got.ids.tolist())
            self.history[b].extend(row.tolist())
            for entry in got.installed:
                self.books[b].append(entry.phrase)
                new.append((b, entry.id - V, entry.phrase))
        lengths = [self.code_lengths(b, codes[b].tolist()) for b in range(len(self.decoders))]
        self._install(new)
        return lengths

    def _reserve(self, width: int) -> None:
        """Grow the tables to hold ``width`` entries (capacity doubles, so a step rarely copies)."""
        cap = self.in_table.shape[1]
        if width <= cap:
            return
        new = min(self.model.codec.max_codebook_size, max(width, 2 * cap))
        B = self.batch_size

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((B, new) + tuple(t.shape[2:]))
            out[:, :cap] = t
            return out

        self.in_table, self.out_table, self.lengths = grow(self.in_table), grow(self.out_table), grow(self.lengths)
        ready = np.zeros((B, new), bool)
        ready[:, :cap] = self.in_ready
        self.in_ready = ready

    def _install(self, new: list[tuple[int, int, tuple[int, ...]]]) -> None:
        """Output vectors of the entries just installed and of every row's legal next id: one encoder call.

        Every installed row is scored at every step, so its output vector is computed now; an entry
        that was last step's legal next id already has it.  Input vectors wait until an entry is
        first read (:meth:`_read_vectors`): most entries are never read.
        """
        C = self.model.codec.max_codebook_size
        counts = [len(d) for d in self.decoders]
        self.count = np.array(counts, np.int64)
        cands = [(b, p) for b, dec in enumerate(self.decoders) if (p := dec.next_phrase) is not None]
        # room for every entry plus the slot of the legal next id, which the head scores
        self._reserve(min(C, max(counts) + 1))
        dev = self.device
        reused = [(b, k) for b, k, p in new if p == self.cand_phrase[b]]
        fresh = [(b, k, p) for b, k, p in new if p != self.cand_phrase[b]]
        if reused:  # copy before the candidates are overwritten below
            rb = torch.as_tensor([b for b, _ in reused], device=dev)
            self.out_table[rb, torch.as_tensor([k for _, k in reused], device=dev)] = self.cand[rb]
        vout = self._output_vectors([p for _, _, p in fresh] + [p for _, p in cands])
        if fresh:
            self.out_table[torch.as_tensor([b for b, _, _ in fresh], device=dev),
                           torch.as_tensor([k for _, k, _ in fresh], device=dev)] = vout[: len(fresh)]
        if new:
            self.lengths[torch.as_tensor([b for b, _, _ in new], device=dev),
                         torch.as_tensor([k for _, k, _ in new], device=dev)] = torch.as_tensor(
                             [len(p) for _, _, p in new], device=dev)
        self.cand_ok.zero_()  # in place: a static session's step holds this tensor
        self.cand_phrase = [None] * len(counts)
        if cands:
            c_idx = torch.as_tensor([b for b, _ in cands], device=dev)
            self.cand[c_idx] = vout[len(fresh):]
            self.cand_ok[c_idx] = True
            for b, p in cands:
                self.cand_phrase[b] = p

    def _output_vectors(self, phrases: list[tuple[int, ...]]) -> torch.Tensor:
        """``[len(phrases), D]`` output vectors in the tables' dtype: one encoder call, each phrase encoded once."""
        if not phrases:
            return self.out_table.new_zeros(0, self.out_table.shape[-1])
        uniq: dict[tuple[int, ...], int] = {}
        slot = [uniq.setdefault(p, len(uniq)) for p in phrases]
        dev = self.device
        with torch.no_grad():
            vout = self.model.encode_outputs(_pad(list(uniq), self.model.codec.max_subtokens, dev))
        return vout.to(self.out_table.dtype)[torch.as_tensor(slot, device=dev)]

    def _read_vectors(self, codes: np.ndarray, mask: np.ndarray) -> None:
        """Input vectors of the hypertokens about to be read for the first time, in one encoder call."""
        V = self._V
        hit = (codes >= V) & (mask == 1)
        if not hit.any():
            return
        b_idx, t_idx = np.nonzero(hit)
        k_idx = codes[b_idx, t_idx] - V
        todo = ~self.in_ready[b_idx, k_idx]
        if not todo.any():
            return
        pairs = sorted(set(zip(b_idx[todo].tolist(), k_idx[todo].tolist())))
        dev = self.device
        with torch.no_grad():
            vin = self.model.encode_inputs(_pad([self.books[b][k] for b, k in pairs], self.model.codec.max_subtokens,
                                                dev))
        self.in_table[torch.as_tensor([b for b, _ in pairs], device=dev),
                      torch.as_tensor([k for _, k in pairs], device=dev)] = vin.to(self.in_table.dtype)
        self.in_ready[[b for b, _ in pairs], [k for _, k in pairs]] = True

    # ------------------------------------------------------------------ reading codes

    def read(self, codes: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """Read ``[B, T]`` codes (already pushed) through the model; the last position's logits ``[B, V + C]``.

        ``mask`` marks real codes (padding on the left), ``lengths`` their base tokens.
        """
        if self.ahead:
            raise StateError("drafts read ahead are pending: accept_ahead() or drop_ahead() first")
        count = torch.as_tensor(self.count, device=self.device)[:, None]
        return self._forward(codes, mask, lengths, count, self.cand[:, None], self.cand_ok[:, None], 1)[:, -1]

    def _forward(self, codes: np.ndarray, mask: np.ndarray, lengths: np.ndarray, visible: torch.Tensor,
                 cand: torch.Tensor, cand_ok: torch.Tensor, keep: int) -> torch.Tensor:
        """The model over ``[B, T]`` codes with the head seeing ``visible`` ``[B, K]`` rows and the candidates
        ``[B, K, D]`` / ``[B, K]`` at the last ``K = keep`` positions; their logits ``[B, K, V + C]``."""
        mask = np.asarray(mask, np.int64)
        if self.static is not None and self.mask.shape[1] + mask.shape[1] > self.static.max_length:
            raise StateError(f"this static session's cache holds {self.static.max_length} codes: reading "
                                 f"{mask.shape[1]} more after {self.mask.shape[1]} would overflow it")
        self._read_vectors(codes, mask)
        pos = position_ids(lengths, mask, self.model.config.position_mode, base_offset=self.base_len,
                           code_offset=self.code_len)
        self.base_len = self.base_len + (lengths * mask).sum(1)
        self.code_len = self.code_len + mask.sum(1)
        dev = self.device
        self.mask = torch.cat([self.mask, torch.as_tensor(mask, device=dev)], 1)
        if self.static is not None:
            return self._static_forward(codes, pos, visible, cand, cand_ok, keep)
        W = min(self.model.codec.max_codebook_size, int(visible.max()) + 1) if visible.numel() else 0
        model = self.model
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = growing(DynamicCache(config=model.base.config))
        out = model.forward_cached(torch.as_tensor(codes, device=dev), attention_mask=self.mask,
                                   position_ids=torch.as_tensor(pos, device=dev), cache=self.cache,
                                   table=self.in_table[:, :W],
                                   context=HeadContext(self.out_table[:, :W], visible, cand, cand_ok),
                                   logits_to_keep=keep)
        self.cache = getattr(out, cache_argument())
        for row in self.unread:
            row.clear()
        return out.logits

    def _static_forward(self, codes: np.ndarray, pos: np.ndarray, visible: torch.Tensor, cand: torch.Tensor,
                        cand_ok: torch.Tensor, keep: int) -> torch.Tensor:
        """:meth:`_forward` of a static session: a decode step through the (compiled) fixed-shape step, a
        prompt eagerly; both into the static cache, with the mask as long as the cache."""
        st, model, dev = self.static, self.model, self.device
        full = torch.zeros(self.batch_size, st.max_length, dtype=torch.long, device=dev)
        full[:, : self.mask.shape[1]] = self.mask
        codes_t, pos_t = torch.as_tensor(codes, device=dev), torch.as_tensor(pos, device=dev)
        for row in self.unread:
            row.clear()
        if codes.shape[1] == 1 and keep == 1:  # a decode step: the step's own context holds cand / cand_ok
            return st(model, codes_t, full, pos_t, visible[:, -1], self.in_table)[:, None]
        out = model.forward_cached(codes_t, attention_mask=full, position_ids=pos_t, cache=self.cache,
                                   table=self.in_table, context=HeadContext(self.out_table, visible, cand, cand_ok),
                                   logits_to_keep=keep)
        return out.logits

    # ------------------------------------------------------------------ reading drafts ahead (speculation)

    def read_ahead(self, draft: list[int]) -> torch.Tensor:
        """Read the one appended code and then ``draft``, in one forward, without committing to the draft.

        One row only (prompt lookup's setting).  Position ``j`` of the result is exactly what
        :meth:`advance` would give after the appended code and ``draft[:j]`` had been appended and read:
        the head of each position sees the entries installed up to it and its own legal next id.  The
        decoders, books and tables are left as if only the appended code had been read; the KV cache
        keeps the draft's positions (``ahead``) until :meth:`accept_ahead` takes them one at a time or
        :meth:`drop_ahead` drops the rest.  Returns ``[len(draft) + 1, V + C]`` logits.

        Raises:
            InvalidCodeError: a draft code is not valid where it stands (nothing is changed).
        """
        if self.ahead:
            raise StateError("drafts read ahead are pending: accept_ahead() or drop_ahead() first")
        if self.static is not None:
            raise StateError("read_ahead() needs the dynamic KV cache: a static session reads one code a step")
        if self.batch_size != 1 or len(self.unread[0]) != 1:
            raise StateError("read_ahead() runs on one row with exactly one appended, unread code")
        if not draft:
            return self.advance()
        V = self._V
        dec, book, n0 = self.decoders[0].copy(), self.books[0], int(self.count[0])
        visible, phrases, lengths = [n0], [], []
        new: list[tuple[int, tuple[int, ...]]] = []
        for j, c in enumerate(draft):
            try:
                got = dec.push(int(c))
            except InvalidCodeError as e:
                raise InvalidCodeError(f"draft[{j}]: {e.reason}") from None
            lengths.append(len(got.ids))
            new += [(e.id - V, e.phrase) for e in got.installed]
            visible.append(len(dec))
            phrases.append(dec.next_phrase)
        # the draft's entries and candidates get their output vectors in one encoder call
        dev = self.device
        self._reserve(min(self.model.codec.max_codebook_size, len(dec) + 1))
        vout = self._output_vectors([p for _, p in new] + [p for p in phrases if p is not None])
        if new:
            rows = torch.as_tensor([k for k, _ in new], device=dev)
            self.out_table[0, rows] = vout[: len(new)]
            self.lengths[0, rows] = torch.as_tensor([len(p) for _, p in new], device=dev)
        cand = self.cand[:, None].repeat(1, len(draft) + 1, 1)
        ok = self.cand_ok[:, None].repeat(1, len(draft) + 1)
        at = [j + 1 for j, p in enumerate(phrases) if p is not None]
        if at:
            cand[0, torch.as_tensor(at, device=dev)] = vout[len(new):]
        ok[0, 1:] = torch.as_tensor([p is not None for p in phrases], device=dev)
        x = self.unread[0][0]
        codes = np.array([[x] + [int(c) for c in draft]], np.int64)
        code_len = np.array([self.code_lengths(0, [x]) + lengths], np.int64)
        base_len, code_len0, width = self.base_len.copy(), self.code_len.copy(), self.mask.shape[1]
        book += [p for _, p in new]  # read the draft's hypertokens with their input vectors, then forget them
        try:
            logits = self._forward(codes, np.ones_like(codes), code_len, torch.as_tensor([visible], device=dev),
                                   cand, ok, len(draft) + 1)[0]
        finally:
            del book[n0:]
            # ids past n0 may stand for other phrases once the real codes come: forget what the draft put there
            # (a stale length would bar the legal next id from a budget; only installing sets them again)
            self.in_ready[0, n0:] = False
            self.lengths[0, n0:] = 0
        # only the appended code counts as read; the draft waits in the cache
        self.mask = self.mask[:, : width + 1]
        self.base_len, self.code_len = base_len + code_len[:, 0], code_len0 + 1
        self.ahead = list(zip((int(c) for c in draft), lengths))
        return logits

    def accept_ahead(self) -> None:
        """The code just appended is the next draft code: count its position, read ahead, as read."""
        if not self.ahead or self.unread[0] != [self.ahead[0][0]]:
            raise StateError("accept_ahead() needs the next draft code appended, and nothing else")
        n = self.ahead.pop(0)[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(1, 1)], 1)
        self.base_len, self.code_len = self.base_len + n, self.code_len + 1
        self.unread[0].clear()

    def drop_ahead(self) -> None:
        """Forget the draft positions not accepted: the KV cache is cut back to what was read."""
        if self.ahead:
            # a negative count removes that many positions, in every transformers version we support
            self.cache.crop(-len(self.ahead))
            self.ahead = []

    def feed(self, codes: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Push and read ``[B, T]`` codes, after any chosen but unread ones; the last position's logits.

        Any padding is allowed (left, right or inside): each row's codes are read flush right, so that
        the last position is every row's last code.  Returns ``(logits [B, V + C], new codes per row, base
        tokens they stand for per row)``.
        """
        mask = np.asarray(mask, np.int64)
        n_new, n_old = mask.sum(1), np.array([len(u) for u in self.unread], np.int64)
        if (n_new + n_old == 0).any():
            raise InputTypeError(f"row {int(np.argmin(n_new + n_old))} of attention_mask is all 0: "
                                 "every sequence needs at least one code")
        lengths = np.asarray(self.push(codes, mask), np.int64)
        new_base = (lengths * mask).sum(1)
        keep = mask.astype(bool)
        if not n_old.any() and _left_padded(mask):
            ids, m, ln = codes, mask, lengths
        else:
            seqs = [self.unread[b] + codes[b][keep[b]].tolist() for b in range(self.batch_size)]
            lens = [self.code_lengths(b, self.unread[b]) + lengths[b][keep[b]].tolist() for b in range(self.batch_size)]
            # a prompt keeps its width; a continuation is as wide as its longest row
            width = codes.shape[1] if not n_old.any() else max(len(q) for q in seqs)
            ids, m, ln = _flush_right(seqs, lens, width)
        if self.seen is not None:
            self.mark_seen(ids, m)
        return self.read(ids, m, ln), n_new, new_base

    def advance(self) -> torch.Tensor:
        """Read the codes :meth:`append` chose since the last read (one per row): the next logits ``[B, V + C]``."""
        n = {len(u) for u in self.unread}
        if n != {1}:
            raise StateError("advance() reads one appended code per row: append exactly one first")
        codes = np.array([[u[0]] for u in self.unread], np.int64)
        lengths = np.array([self.code_lengths(b, [int(c)]) for b, (c,) in enumerate(codes)], np.int64)
        return self.read(codes, np.ones_like(codes), lengths)

    def step(self, codes: list[int]) -> tuple[list[list[int]], torch.Tensor]:
        """One decoding step for every row: :meth:`append` ``codes``, then :meth:`advance`."""
        expansions = self.append(codes)
        return expansions, self.advance()

    def track_seen(self) -> None:
        """Start recording which codes each row has seen (for a repetition penalty)."""
        if self.seen is None:
            V, C = self._V, self.model.codec.max_codebook_size
            self.seen = torch.zeros(self.batch_size, V + C, dtype=torch.bool, device=self.device)

    def mark_seen(self, codes: np.ndarray, mask: np.ndarray) -> None:
        self.track_seen()
        seen = self.seen
        assert seen is not None  # track_seen made it
        for b in range(self.batch_size):
            seen[b, torch.as_tensor(codes[b][mask[b].astype(bool)], device=self.device)] = True

    # ------------------------------------------------------------------ rows

    def select(self, keep: np.ndarray) -> HyperSession:
        """The rows ``keep`` (positions in this batch) as a new session; the KV cache is narrowed in place."""
        idx = torch.as_tensor(keep, device=self.device)
        if self.cache is not None and len(keep) < self.batch_size:
            self.cache.batch_select_indices(idx)
        k = keep.tolist()
        return HyperSession(model=self.model, index=self.index[keep], decoders=[self.decoders[i] for i in k],
                            books=[self.books[i] for i in k], in_table=self.in_table[idx],
                            out_table=self.out_table[idx], lengths=self.lengths[idx], count=self.count[keep],
                            base_len=self.base_len[keep], code_len=self.code_len[keep], cand=self.cand[idx],
                            cand_ok=self.cand_ok[idx], mask=self.mask[idx], cache=self.cache,
                            unread=[self.unread[i] for i in k], seen=None if self.seen is None else self.seen[idx],
                            in_ready=self.in_ready[keep], cand_phrase=[self.cand_phrase[i] for i in k],
                            tokens=[self.tokens[i] for i in k], history=[self.history[i] for i in k])

    def detach(self, which: np.ndarray) -> HyperSession:
        """Copy the rows ``which`` out (their KV cache included) before this batch is narrowed."""
        out = HyperSession(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.cache = None
        part = out.select(which)
        if self.cache is not None:
            rows, S = torch.as_tensor(which), self.mask.shape[1]  # a static cache is longer than what it holds
            part.cache = [(layer.keys[rows][:, :, :S], layer.values[rows][:, :, :S])
                          if getattr(layer, "keys", None) is not None and layer.keys.numel() else None
                          for layer in self.cache.layers]
            part.static = None  # the copy is an ordinary dynamic session
        return part

    def compact(self) -> None:
        """Drop the KV-cache columns that no row reads (0 in every row's mask), e.g. once rows have left.

        The mask and the cache only ever grow by a column per step; a batch that rows join and leave
        (the server's) would otherwise keep every departed row's columns for as long as it runs.
        """
        if self.cache is None or self.ahead or isinstance(self.cache, list) or self.static is not None:
            return
        keep = self.mask.bool().any(0)
        if bool(keep.all()):
            return
        cols = keep.nonzero()[:, 0]
        self.mask = self.mask[:, cols]
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]

    @classmethod
    def concat(cls, parts: list[HyperSession]) -> HyperSession:
        """One session of the parts' rows, in the order given (how a request joins a running batch).

        Each part's mask and KV cache are padded on the right to the longest (padding is masked out, and
        positions are each row's own), so a row reads exactly what it would read alone.  The parts are
        consumed: use only the result.
        """
        if not isinstance(parts, list) or not parts or not all(isinstance(p, HyperSession) for p in parts):
            raise InputTypeError(f"parts must be a non-empty list of HyperSessions, got {parts!r:.80}")
        if any(p.static is not None for p in parts):
            raise StateError("a static session holds one sequence in a cache of its own: it can't join others")
        if any(p.ahead for p in parts):
            raise StateError("drafts read ahead are pending: drop_ahead() before joining sessions")
        n = 0
        for p in parts:
            p.index = np.arange(n, n + p.batch_size)
            n += p.batch_size
        return cls.merge(parts, n)

    @classmethod
    def merge(cls, parts: list[HyperSession], batch_size: int) -> HyperSession:
        """One session of ``batch_size`` sequences in their first order, from rows that stopped at different steps."""
        first = parts[0]
        B = batch_size
        if len(parts) == 1 and np.array_equal(first.index, np.arange(B)) and not isinstance(first.cache, list):
            return first
        order = np.argsort(np.concatenate([p.index for p in parts]))
        S = max(p.mask.shape[1] for p in parts)
        cap = max(p.in_table.shape[1] for p in parts)

        def cat(name: str, pad_to: int | None = None) -> torch.Tensor:
            ts = []
            for p in parts:
                t = getattr(p, name)
                if pad_to is not None and t.shape[1] < pad_to:
                    t = torch.cat([t, t.new_zeros((t.shape[0], pad_to - t.shape[1]) + tuple(t.shape[2:]))], 1)
                ts.append(t)
            return torch.cat(ts)[torch.as_tensor(order)]

        def lists(name: str) -> list:
            flat = [x for p in parts for x in getattr(p, name)]
            return [flat[i] for i in order.tolist()]

        def arrays(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])[order]

        seen = cat("seen") if all(p.seen is not None for p in parts) else None
        ready = np.zeros((B, cap), bool)
        for p in parts:
            ready[p.index, : p.in_ready.shape[1]] = p.in_ready
        return cls(model=first.model, index=np.arange(B), decoders=lists("decoders"), books=lists("books"),
                   in_table=cat("in_table", cap), out_table=cat("out_table", cap), lengths=cat("lengths", cap),
                   count=arrays("count"), base_len=arrays("base_len"), code_len=arrays("code_len"), cand=cat("cand"),
                   cand_ok=cat("cand_ok"), mask=cat("mask", S), cache=merged_cache([p.cache for p in parts], order, S),
                   unread=lists("unread"), seen=seen, in_ready=ready, cand_phrase=lists("cand_phrase"),
                   tokens=lists("tokens"), history=lists("history"))


def _pad(phrases: list[tuple[int, ...]], M: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor([list(p) + [-1] * (M - len(p)) for p in phrases], dtype=torch.long, device=device)


def _left_padded(mask: np.ndarray) -> bool:
    """Whether every row of ``mask`` is some 0s followed by 1s."""
    return bool((np.diff(mask.astype(np.int64), axis=1) >= 0).all())


def _flush_right(seqs: list[list[int]], lens: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[B, width]`` codes, mask and base lengths with each row's codes at the right end (padding on the left)."""
    B = len(seqs)
    ids, mask, out_len = np.zeros((B, width), np.int64), np.zeros((B, width), np.int64), np.ones((B, width), np.int64)
    for b, (s, ln) in enumerate(zip(seqs, lens)):
        if len(s):
            ids[b, width - len(s):], mask[b, width - len(s):], out_len[b, width - len(s):] = s, 1, ln
    return ids, mask, out_len
