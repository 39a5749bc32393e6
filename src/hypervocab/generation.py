"""Generation with a live vocabulary: KV-cached, batched, greedy or sampled, streamed.

Every sequence of a batch carries its own LZW decoder state.  A code is pushed
into that decoder the moment it is chosen (so an invalid code can never get
further).  Each entry's vectors are computed once, batched across the
sequences, and cached in preallocated per-sequence tables: the output vector
when the entry is installed (every installed id is scored at every step; the one
new id that may legally come next is scored too, and its vector is kept for when
it is installed), the input vector the first time the entry is read (most
entries never are).  Rows of a table not installed yet score ``-inf``, so they
cannot be sampled.  The model only sees a code on the next step, through its KV cache;
after the last step the final codes are chosen but not yet read, which is what
lets a later call continue exactly where this one stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .codebook import Codebook
from .codec import DecoderState
from .embedding import HeadContext
from .errors import ConfigError, InputTypeError, InvalidCodeError, TokenTypeError
from .positions import position_ids

if TYPE_CHECKING:
    from .model import HyperModel

__all__ = [
    "GenerationOutput",
    "GenerationState",
    "HyperTextStreamer",
    "IncrementalDetokenizer",
    "SequenceStats",
    "encode_continuation",
    "generate",
]


# ---------------------------------------------------------------------------------------------- results


@dataclass
class SequenceStats:
    """What one sequence of a :func:`generate` call cost and produced.

    codes: codes emitted (decoding steps); base_tokens: base tokens they stand for;
    hypertokens: how many of the codes were hypertokens; prompt_codes / prompt_base_tokens: the
    same for what this call read; finish_reason: ``"eos"``, ``"stop_string"``, ``"length"``
    (``max_new_tokens`` codes) or ``"base_budget"`` (``max_new_base_tokens``).
    """

    codes: int = 0
    base_tokens: int = 0
    hypertokens: int = 0
    prompt_codes: int = 0
    prompt_base_tokens: int = 0
    finish_reason: str = "length"

    @property
    def base_tokens_per_code(self) -> float:
        return self.base_tokens / self.codes if self.codes else 0.0


@dataclass
class GenerationOutput:
    """What :meth:`HyperModel.generate` returns with ``return_dict_in_generate=True``.

    sequences: ``[B, T + n]`` the codes read by this call followed by the new ones (padded on the
        right with the pad id where a sequence stopped early).
    new_codes / new_base_ids: per sequence, the codes emitted and the base tokens they stand for.
    stats: per sequence, a :class:`SequenceStats`.
    codebooks: per sequence, the final :class:`~hypervocab.Codebook` (with ``output_codebooks=True``).
    logits: with ``output_logits=True``, one ``[B, V + C]`` float tensor per decoding step: the raw
        scores each code was chosen from (after reading the input first), ``-inf`` rows for sequences
        already finished.  With ``max_new_tokens=0`` it holds only the scores after reading the input.
    state: pass it as ``past=`` to a later call to continue every sequence without re-reading it.
    """

    sequences: torch.Tensor
    new_codes: list[list[int]]
    new_base_ids: list[list[int]]
    stats: list[SequenceStats]
    state: GenerationState
    codebooks: list[Codebook] | None = None
    logits: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass
class _Rows:
    """Per-sequence state of the sequences still being generated (row ``i`` is sequence ``index[i]``).

    in_table / out_table: ``[B, capacity, D]`` vectors of ids ``V + k``; lengths: ``[B, capacity]`` base
    tokens of each entry (0 where none); count: ``[B]`` entries installed; cand / cand_ok: ``[B, D]`` and
    ``[B]`` the output vector of the one new id that may legally come next; mask: ``[B, S]`` what the KV
    cache holds; seen: ``[B, V + C]`` codes seen (for the repetition penalty) or ``None``.
    """

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
    seen: torch.Tensor | None = None
    in_ready: np.ndarray | None = None  # [B, capacity] bool: input vector computed (on first read)
    cand_phrase: list[tuple[int, ...] | None] | None = None  # each row's legal next phrase, scored by cand

    def take(self, keep: np.ndarray) -> _Rows:
        """The rows ``keep`` (positions in this batch), as a new batch; the cache is narrowed in place."""
        idx = torch.as_tensor(keep, device=self.in_table.device)
        if self.cache is not None and len(keep) < len(self.index):
            self.cache.batch_select_indices(idx)
        k = keep.tolist()
        return _Rows(self.index[keep], [self.decoders[i] for i in k], [self.books[i] for i in k],
                     self.in_table[idx], self.out_table[idx], self.lengths[idx], self.count[keep],
                     self.base_len[keep], self.code_len[keep], self.cand[idx], self.cand_ok[idx], self.mask[idx],
                     self.cache, [self.unread[i] for i in k], None if self.seen is None else self.seen[idx],
                     self.in_ready[keep], [self.cand_phrase[i] for i in k])


@dataclass
class GenerationState:
    """Where every sequence of a batch stands after :func:`generate`: decoders, KV cache, hypertoken tables.

    Pass it (or the :class:`GenerationOutput` holding it) as ``past=`` to continue.  It is consumed by
    that call: continue from each state once.
    """

    rows: _Rows
    used: bool = field(default=False, repr=False)

    @property
    def decoders(self) -> list[DecoderState]:
        """The sequences' decoder states (their codebooks hold every code chosen so far)."""
        return self.rows.decoders

    @property
    def batch_size(self) -> int:
        return len(self.rows.index)


# ---------------------------------------------------------------------------------------------- the session


class _Session:
    """The loop's machinery: pushing codes, computing new vectors, stepping the model."""

    def __init__(self, model: HyperModel) -> None:
        self.model = model
        codec = model.codec
        self.V, self.C, self.M = codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens
        w = model.embedding.base.weight
        self.device, self.dtype = w.device, w.dtype
        self.D_in, self.D_out = w.shape[1], model.head.base.weight.shape[1]
        self.position_mode = model.config.position_mode

    # ---------------------------------------------------------------- state

    def empty(self, B: int) -> _Rows:
        dev, dt = self.device, self.dtype
        cap = min(self.C, 64)
        return _Rows(np.arange(B), [self.model.codec.decoder_state() for _ in range(B)], [[] for _ in range(B)],
                     torch.zeros(B, cap, self.D_in, device=dev, dtype=dt),
                     torch.zeros(B, cap, self.D_out, device=dev, dtype=dt),
                     torch.zeros(B, cap, dtype=torch.long, device=dev), np.zeros(B, np.int64), np.zeros(B, np.int64),
                     np.zeros(B, np.int64), torch.zeros(B, self.D_out, device=dev, dtype=dt),
                     torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, 0, dtype=torch.long, device=dev),
                     None, [[] for _ in range(B)], None, np.zeros((B, cap), bool), [None] * B)

    def _reserve(self, rows: _Rows, width: int) -> None:
        """Grow the tables to hold ``width`` entries (capacity doubles, so a step rarely copies)."""
        cap = rows.in_table.shape[1]
        if width <= cap:
            return
        new = min(self.C, max(width, 2 * cap))
        B = len(rows.index)

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((B, new) + tuple(t.shape[2:]))
            out[:, :cap] = t
            return out

        rows.in_table, rows.out_table, rows.lengths = grow(rows.in_table), grow(rows.out_table), grow(rows.lengths)
        ready = np.zeros((B, new), bool)
        ready[:, :cap] = rows.in_ready
        rows.in_ready = ready

    # ---------------------------------------------------------------- pushing codes

    def push_one(self, rows: _Rows, codes: list[int]) -> list[list[int]]:
        """Push one code per row (the hot path); returns the base ids each stands for."""
        installed = DecoderState.push_batch(rows.decoders, codes)
        V = self.V
        new = []
        for b, id_, phrase in installed:
            rows.books[b].append(phrase)
            new.append((b, id_ - V, phrase))
        expansions = [[c] if c < V else list(rows.books[b][c - V]) for b, c in enumerate(codes)]
        self._install(rows, new)
        return expansions

    def push_many(self, rows: _Rows, codes: np.ndarray, mask: np.ndarray) -> list[list[int]]:
        """Push ``[B, T]`` codes where ``mask`` is 1, all or nothing; returns each code's length in base tokens."""
        V = self.V
        snapshots = [d.copy() for d in rows.decoders]
        new, lengths = [], []
        for b, dec in enumerate(rows.decoders):
            row = codes[b][mask[b].astype(bool)]
            try:
                got = dec.push(row)
            except InvalidCodeError as e:
                rows.decoders[:] = snapshots
                where = int(np.flatnonzero(mask[b])[e.position])
                raise InvalidCodeError(f"input_ids[{b}][{where}]: {e.reason}") from None
            for e in got.installed:
                rows.books[b].append(e.phrase)
                new.append((b, e.id - V, e.phrase))
        for b in range(len(rows.decoders)):
            book = rows.books[b]
            lengths.append([1 if c < V else len(book[c - V]) for c in codes[b].tolist()])
        self._install(rows, new)
        return lengths

    def _install(self, rows: _Rows, new: list[tuple[int, int, tuple[int, ...]]]) -> None:
        """Output vectors of the entries just installed and of every row's legal next id: one encoder call.

        Every installed row is scored at every step, so its output vector is computed now; an entry
        that was last step's legal next id already has it.  Input vectors wait until an entry is
        first read (:meth:`_read_vectors`): most entries are never read.
        """
        M, C = self.M, self.C
        counts = [len(d) for d in rows.decoders]
        rows.count = np.array(counts, np.int64)
        cands: list[tuple[int, tuple[int, ...]]] = []
        for b, dec in enumerate(rows.decoders):
            p = dec.pending
            if 0 < len(p) < M and counts[b] < C:
                cands.append((b, p + (p[0],)))
        # room for every entry plus the slot of the legal next id, which the head scores
        self._reserve(rows, min(C, max(counts) + 1))
        dev = self.device
        reused = [(b, k) for b, k, p in new if p == rows.cand_phrase[b]]
        fresh = [(b, k, p) for b, k, p in new if p != rows.cand_phrase[b]]
        if reused:  # copy before the candidates are overwritten below
            rb = torch.as_tensor([b for b, _ in reused], device=dev)
            rows.out_table[rb, torch.as_tensor([k for _, k in reused], device=dev)] = rows.cand[rb]
        out_phrases = [p for _, _, p in fresh] + [p for _, p in cands]
        uniq: dict[tuple[int, ...], int] = {}
        slot = [uniq.setdefault(p, len(uniq)) for p in out_phrases]
        if uniq:
            with torch.no_grad():
                vout = self.model.encode_outputs(_pad(list(uniq), M, dev)).to(self.dtype)[
                    torch.as_tensor(slot, device=dev)]
        if fresh:
            rows.out_table[torch.as_tensor([b for b, _, _ in fresh], device=dev),
                           torch.as_tensor([k for _, k, _ in fresh], device=dev)] = vout[: len(fresh)]
        if new:
            rows.lengths[torch.as_tensor([b for b, _, _ in new], device=dev),
                         torch.as_tensor([k for _, k, _ in new], device=dev)] = torch.as_tensor(
                             [len(p) for _, _, p in new], device=dev)
        rows.cand_ok = torch.zeros(len(counts), dtype=torch.bool, device=dev)
        rows.cand_phrase = [None] * len(counts)
        if cands:
            c_idx = torch.as_tensor([b for b, _ in cands], device=dev)
            rows.cand[c_idx] = vout[len(fresh):]
            rows.cand_ok[c_idx] = True
            for b, p in cands:
                rows.cand_phrase[b] = p

    def _read_vectors(self, rows: _Rows, codes: np.ndarray, mask: np.ndarray) -> None:
        """Input vectors of the hypertokens about to be read for the first time, in one encoder call."""
        V = self.V
        hit = (codes >= V) & (mask == 1)
        if not hit.any():
            return
        b_idx, t_idx = np.nonzero(hit)
        k_idx = codes[b_idx, t_idx] - V
        todo = ~rows.in_ready[b_idx, k_idx]
        if not todo.any():
            return
        pairs = sorted(set(zip(b_idx[todo].tolist(), k_idx[todo].tolist())))
        with torch.no_grad():
            vin = self.model.encode_inputs(_pad([rows.books[b][k] for b, k in pairs], self.M, self.device))
        dev = self.device
        rows.in_table[torch.as_tensor([b for b, _ in pairs], device=dev),
                      torch.as_tensor([k for _, k in pairs], device=dev)] = vin.to(self.dtype)
        rows.in_ready[[b for b, _ in pairs], [k for _, k in pairs]] = True

    # ---------------------------------------------------------------- reading codes

    def forward(self, rows: _Rows, codes: torch.Tensor, mask: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
        """Read ``[B, T]`` codes (already pushed) through the model; returns the last position's logits ``[B, V + C]``."""
        mask_np = mask.cpu().numpy().astype(np.int64)
        self._read_vectors(rows, codes.cpu().numpy(), mask_np)
        pos = position_ids(lengths, mask_np, self.position_mode, base_offset=rows.base_len, code_offset=rows.code_len)
        rows.base_len = rows.base_len + (lengths * mask_np).sum(1)
        rows.code_len = rows.code_len + mask_np.sum(1)
        rows.mask = torch.cat([rows.mask, mask.to(rows.mask.device)], 1)
        W = min(self.C, int(rows.count.max(initial=0)) + 1)
        model = self.model
        emb, head = model.embedding, model.head
        emb.table = rows.in_table[:, :W]
        head.context = HeadContext(rows.out_table[:, :W], torch.as_tensor(rows.count, device=self.device)[:, None],
                                   rows.cand[:, None], rows.cand_ok[:, None])
        if rows.cache is None:
            from transformers import DynamicCache

            rows.cache = DynamicCache(config=model.base.config)
        try:
            out = model.base(input_ids=codes, attention_mask=rows.mask, position_ids=torch.as_tensor(
                pos, device=self.device), past_key_values=rows.cache, use_cache=True, logits_to_keep=1)
        finally:
            emb.table, head.context = None, None
        rows.cache = out.past_key_values
        return out.logits[:, -1]


def _pad(phrases: list[tuple[int, ...]], M: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor([list(p) + [-1] * (M - len(p)) for p in phrases], dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------- choosing codes


class _Chooser:
    """Turns a step's logits into codes: penalties, masks, greedy or sampling."""

    def __init__(self, V: int, *, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                 repetition_penalty: float, allow_hypertokens: bool, generator: torch.Generator | None) -> None:
        self.V, self.do_sample, self.temperature = V, do_sample, temperature
        self.top_k, self.top_p, self.penalty = top_k, top_p, repetition_penalty
        self.allow_hypertokens, self.generator = allow_hypertokens, generator

    def __call__(self, logits: torch.Tensor, rows: _Rows, budget: np.ndarray | None) -> list[int]:
        """``logits`` [B, V + C] -> one code per row."""
        V = self.V
        logits = logits.float()
        if self.penalty != 1.0 and rows.seen is not None:
            scaled = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(rows.seen, scaled, logits)
        if not self.allow_hypertokens:
            logits[:, V:] = float("-inf")
        elif budget is not None:
            # a hypertoken longer than what is left of the base-token budget may not be chosen
            W = rows.lengths.shape[1]
            too_long = rows.lengths > torch.as_tensor(budget, device=logits.device)[:, None]
            logits[:, V: V + W] = logits[:, V: V + W].masked_fill(too_long, float("-inf"))
            at = torch.as_tensor(rows.count, device=logits.device)
            cand_len = torch.as_tensor([len(d.pending) + 1 for d in rows.decoders], device=logits.device)
            bad = rows.cand_ok & (cand_len > torch.as_tensor(budget, device=logits.device))
            if bad.any():
                r = bad.nonzero()[:, 0]
                logits[r, V + at[r]] = float("-inf")
        if not self.do_sample:
            return logits.argmax(-1).tolist()
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
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].tolist()


# ---------------------------------------------------------------------------------------------- detokenizer


class IncrementalDetokenizer:
    """Text from a growing list of base tokens, emitted as soon as it is final.

    A hypertoken gives several tokens at once, and byte-level tokens may need the next token to form a
    character: :meth:`push` returns only the text that no later token can change.

    >>> detok = IncrementalDetokenizer(tokenizer)       # doctest: +SKIP
    >>> detok.push([40, 1044]) + detok.push([1107]) + detok.flush()  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # decode from here: a few tokens of context, so word-initial spaces come out right
        self._done = 0  # tokens whose text was emitted
        self._emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Add base tokens; returns the new final text (possibly empty)."""
        ids = ids.reshape(-1).tolist() if hasattr(ids, "reshape") else list(ids)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i for i in ids):
            bad = next(i for i in ids if not (isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i))
            raise TokenTypeError(f"ids must be base token ids (ints >= 0), got {bad!r}")
        self.ids.extend(int(i) for i in ids)
        prefix = self._decode(self.ids[self._start: self._done])
        text = self._decode(self.ids[self._start:])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""  # a character is still incomplete
        new = text[len(prefix):]
        self._start, self._done = self._done, len(self.ids)
        self._emitted += new
        return new

    def flush(self) -> str:
        """Whatever is left, final or not (the stream has ended)."""
        prefix = self._decode(self.ids[self._start: self._done])
        text = self._decode(self.ids[self._start:])
        self._start = self._done = len(self.ids)
        new = text[len(prefix):]
        self._emitted += new
        return new

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._emitted


class HyperTextStreamer:
    """A streamer for :meth:`HyperModel.generate` that prints text as soon as it is final.

    Like ``transformers.TextStreamer``, with one addition: the text a hypertoken wrote (a code that
    stands for several base tokens) can be coloured, so you see the adaptive vocabulary at work.

    Args:
        tokenizer: the base Hugging Face tokenizer.
        file: where to write (default ``sys.stdout``); ``None`` only collects into :attr:`text`.
        color: wrap hypertoken text in ANSI colours.
        skip_prompt: do not print the prompt (the first ``put``).
    """

    def __init__(self, tokenizer: Any, *, file: Any = "stdout", color: bool = True, skip_prompt: bool = True,
                 skip_special_tokens: bool = True) -> None:
        import sys

        self.file = sys.stdout if file == "stdout" else file
        self.color, self.skip_prompt = color, skip_prompt
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._prompt_seen = False
        self.pieces: list[tuple[str, bool]] = []  # (text, written by a hypertoken)

    def put(self, value: torch.Tensor | Sequence[int]) -> None:
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self._write(self.detok.push(ids), len(ids) > 1)  # push checks the ids

    def end(self) -> None:
        self._write(self.detok.flush(), False)
        if self.file is not None:
            self.file.write("\n")
            self.file.flush()

    def _write(self, text: str, hyper: bool) -> None:
        if not text:
            return
        self.pieces.append((text, hyper))
        if self.file is not None:
            self.file.write(f"\x1b[36m{text}\x1b[0m" if hyper and self.color else text)
            self.file.flush()

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


# ---------------------------------------------------------------------------------------------- checks


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _check_options(V: int, max_new_tokens: Any, max_new_base_tokens: Any, do_sample: Any, temperature: Any,
                   top_k: Any, top_p: Any, repetition_penalty: Any, eos_token_id: Any, stop_strings: Any,
                   tokenizer: Any, streamer: Any, seed: Any, generator: Any) -> tuple[list[int], list[str]]:
    _check_int("max_new_tokens", max_new_tokens, 0)
    _check_int("max_new_base_tokens", max_new_base_tokens, 1, optional=True)
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
    for name, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    _check_int("top_k", top_k, 0, optional=True)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else eos_token_id
    if not isinstance(eos, (list, tuple)) or not all(
            isinstance(e, (int, np.integer)) and not isinstance(e, bool) and 0 <= e < V for e in eos):
        raise ConfigError(f"eos_token_id must be a base id in [0, {V}) or a list of them, got {eos_token_id!r}")
    stops = [] if stop_strings is None else [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop_strings must be a non-empty str or a list of them, got {stop_strings!r}")
    if stops and tokenizer is None:
        raise ConfigError("stop_strings needs tokenizer= (a Hugging Face tokenizer) to read the text")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise ConfigError(f"streamer must have put() and end() methods, got {type(streamer).__name__}")
    if seed is not None and generator is not None:
        raise ConfigError("give seed= or generator=, not both")
    _check_int("seed", seed, 0, optional=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return [int(e) for e in eos], list(stops)


def _default_eos(model: HyperModel) -> list[int] | int | None:
    for cfg in (getattr(model.base, "generation_config", None), getattr(model.base, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


# ---------------------------------------------------------------------------------------------- the loop


def generate(
    model: HyperModel,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    past: GenerationState | GenerationOutput | None = None,
    max_new_tokens: int = 20,
    max_new_base_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    allow_hypertokens: bool = True,
    return_dict_in_generate: bool = False,
    output_codebooks: bool = False,
    output_logits: bool = False,
) -> torch.Tensor | GenerationOutput:
    """See :meth:`HyperModel.generate`."""
    V, C = model.codec.base_vocab_size, model.codec.max_codebook_size
    eos, stops = _check_options(V, max_new_tokens, max_new_base_tokens, do_sample, temperature, top_k, top_p,
                                repetition_penalty, _default_eos(model) if eos_token_id is None else eos_token_id,
                                stop_strings, tokenizer, streamer, seed, generator)
    if isinstance(past, GenerationOutput):
        past = past.state
    if past is not None and not isinstance(past, GenerationState):
        raise InputTypeError(f"past must be a GenerationOutput or GenerationState, got {type(past).__name__}")
    if past is not None and past.used:
        raise InputTypeError("this past state was already continued once: continue from the newer output")
    session = _Session(model)
    B = past.batch_size if past is not None else None
    if input_ids is None:
        if past is None:
            raise InputTypeError("input_ids is required (the codes from HyperTokenizer), unless past= is given")
        input_ids = torch.zeros(B, 0, dtype=torch.long, device=session.device)
    ids = model._check_ids(input_ids)
    if B is not None and ids.shape[0] != B:
        raise InputTypeError(f"input_ids has {ids.shape[0]} rows but past holds {B} sequences")
    B, T = ids.shape
    if B == 0:
        raise InputTypeError("input_ids has no rows")
    mask = model._new_mask(attention_mask, None, B, T, input_ids.device).to(session.device)
    if streamer is not None and B > 1:
        raise ConfigError(f"a streamer shows one sequence: input_ids has {B} rows, give one")
    gen = generator if generator is not None else (torch.Generator().manual_seed(seed) if seed is not None else None)
    chooser = _Chooser(V, do_sample=do_sample, temperature=float(temperature), top_k=top_k, top_p=top_p,
                       repetition_penalty=float(repetition_penalty), allow_hypertokens=allow_hypertokens,
                       generator=gen)

    with torch.no_grad():
        if past is None:
            if T == 0:
                raise InputTypeError("input_ids is empty: give at least one code to start from")
            rows = session.empty(B)
            prompt_mask = mask.cpu().numpy()
            if (prompt_mask.sum(1) == 0).any():
                raise InputTypeError(f"row {int(np.argmin(prompt_mask.sum(1)))} of attention_mask is all 0: "
                                     "every sequence needs at least one code")
            feed, feed_mask = ids, prompt_mask
            lengths = np.asarray(session.push_many(rows, ids, prompt_mask), np.int64)
            if not _left_padded(prompt_mask):
                # right (or inner) padding: the model must read each row's codes flush right, so that the
                # last position is every row's last code; the codes themselves are what they were
                feed, feed_mask, lengths = _left_align(ids, prompt_mask, lengths)
            prompt_base = [int((lengths[b] * prompt_mask[b]).sum()) for b in range(B)]
        else:
            past.used = True
            rows = past.rows
            new_mask = mask.cpu().numpy()
            new_lengths = session.push_many(rows, ids, new_mask)
            prompt_base = [int(sum(n * m for n, m in zip(new_lengths[b], new_mask[b]))) for b in range(B)]
            # the codes chosen last time but not read yet come first
            feed, feed_mask, lengths = _prepend_unread(rows, ids, new_mask, new_lengths, session)
        if chooser.penalty != 1.0:
            rows.seen = torch.zeros(B, V + C, dtype=torch.bool, device=session.device) if rows.seen is None else rows.seen
            for b in range(B):
                rows.seen[b, torch.as_tensor(feed[b][feed_mask[b].astype(bool)], device=session.device)] = True
        stats = [SequenceStats(prompt_codes=int(feed_mask[b].sum()) - len(rows.unread[b]),
                               prompt_base_tokens=prompt_base[b]) for b in range(B)]
        for r in rows.unread:
            r.clear()
        new_codes: list[list[int]] = [[] for _ in range(B)]
        new_base: list[list[int]] = [[] for _ in range(B)]
        if streamer is not None:
            streamer.put(torch.as_tensor([sum((rows.books[0][c - V] if c >= V else (c,) for c in
                                               ids[0][mask[0].cpu().numpy().astype(bool)].tolist()), ())]))
        done_rows: list[_Rows] = []
        stop_len = max((len(s) for s in stops), default=0)
        eos_set = set(eos)
        scores: list[torch.Tensor] = []
        if feed.shape[1] > 0:
            logits = session.forward(rows, torch.as_tensor(feed, device=session.device),
                                     torch.as_tensor(feed_mask, device=session.device), lengths)
            if output_logits:
                scores.append(logits.float().clone())
        elif max_new_tokens > 0:  # continuing with nothing new to read: the last logits were not kept
            raise InputTypeError("nothing to read: give input_ids to continue from, or generate more codes in "
                                 "the previous call")
        step = 0
        while max_new_tokens > 0 and len(rows.index):
            budget = None
            if max_new_base_tokens is not None:
                budget = np.array([max_new_base_tokens - len(new_base[i]) for i in rows.index], np.int64)
            codes = chooser(logits, rows, budget)
            expansions = session.push_one(rows, codes)
            step += 1
            finished = np.zeros(len(rows.index), bool)
            for i, (b, c, exp) in enumerate(zip(rows.index.tolist(), codes, expansions)):
                new_codes[b].append(c)
                new_base[b].extend(exp)
                rows.unread[i].append(c)
                st = stats[b]
                st.codes += 1
                st.base_tokens += len(exp)
                st.hypertokens += c >= V
                if c in eos_set:
                    st.finish_reason, finished[i] = "eos", True
                elif stops and any(s in tokenizer.decode(new_base[b][-(4 * stop_len + 2 * session.M):])
                                   for s in stops):
                    st.finish_reason, finished[i] = "stop_string", True
                elif max_new_base_tokens is not None and len(new_base[b]) >= max_new_base_tokens:
                    st.finish_reason, finished[i] = "base_budget", True
                elif step >= max_new_tokens:
                    st.finish_reason, finished[i] = "length", True
            if streamer is not None:
                streamer.put(torch.as_tensor(expansions[0]))
            if rows.seen is not None:
                rows.seen[torch.arange(len(codes)), torch.as_tensor(codes)] = True
            if finished.any():
                # sequences that are done stop costing: their state leaves the batch
                done_rows.append(_detach(rows, np.flatnonzero(finished)))
                keep = np.flatnonzero(~finished)
                if not len(keep):
                    rows = None
                    break
                rows = rows.take(keep)
                codes = [codes[i] for i in keep.tolist()]
            logits = session.forward(rows, torch.as_tensor(codes, device=session.device)[:, None],
                                     torch.ones(len(codes), 1, dtype=torch.long, device=session.device),
                                     np.array([[len(rows.books[i][c - V]) if c >= V else 1]
                                               for i, c in enumerate(codes)], np.int64))
            rows.unread = [[] for _ in rows.index]
            if output_logits:
                full = logits.new_full((B, logits.shape[1]), float("-inf"), dtype=torch.float32)
                full[torch.as_tensor(rows.index, device=logits.device)] = logits.float()
                scores.append(full)
        if streamer is not None:
            streamer.end()
        if rows is not None and len(rows.index):
            done_rows.append(rows)
    state = GenerationState(_merge(done_rows, B, session))
    pad = model.config.pad_id if model.config.pad_id is not None else (eos[0] if eos else 0)
    n = max((len(c) for c in new_codes), default=0)
    tail = torch.full((B, n), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, c in enumerate(new_codes):
        tail[b, : len(c)] = torch.as_tensor(c, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, tail], 1)
    if not (return_dict_in_generate or output_codebooks or output_logits):
        return sequences
    books = [d.codebook for d in state.rows.decoders] if output_codebooks else None
    return GenerationOutput(sequences, new_codes, new_base, stats, state, books,
                            tuple(scores) if output_logits else None)


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


def _left_align(ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes where ``mask`` is 1, moved to the right end of each row (padding on the left)."""
    keep = mask.astype(bool)
    return _flush_right([ids[b][keep[b]] for b in range(len(ids))], [lengths[b][keep[b]] for b in range(len(ids))],
                        ids.shape[1])


def _prepend_unread(rows: _Rows, ids: np.ndarray, mask: np.ndarray, lengths: list[list[int]],
                    session: _Session) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded ``[B, T']`` rows of (codes chosen last time but not read yet) + (the new codes)."""
    V = session.V
    seqs, lens = [], []
    for b in range(len(rows.index)):
        keep = mask[b].astype(bool)
        old = rows.unread[b]
        seqs.append(old + ids[b][keep].tolist())
        lens.append([1 if c < V else len(rows.books[b][c - V]) for c in old] + list(np.asarray(lengths[b])[keep]))
    return _flush_right(seqs, lens, max(len(s) for s in seqs))


def _detach(rows: _Rows, which: np.ndarray) -> _Rows:
    """Copy the rows ``which`` out of the batch (their KV cache included) before the batch is narrowed."""
    out = _Rows(**{k: getattr(rows, k) for k in rows.__dataclass_fields__})
    out.cache = None
    part = out.take(which)
    if rows.cache is not None:
        part.cache = [(layer.keys[torch.as_tensor(which)], layer.values[torch.as_tensor(which)])
                      if getattr(layer, "keys", None) is not None and layer.keys.numel() else None
                      for layer in rows.cache.layers]
    return part


def _merge(parts: list[_Rows], B: int, session: _Session) -> _Rows:
    """One batch of ``B`` sequences, in their original order, from rows that finished at different steps."""
    if len(parts) == 1 and np.array_equal(parts[0].index, np.arange(B)) and not isinstance(parts[0].cache, list):
        return parts[0]
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

    # the KV cache: each part padded on the right to the longest (masked out), then the rows put back in order
    from transformers import DynamicCache

    layer_lists = []
    for p in parts:
        if isinstance(p.cache, list):
            layer_lists.append(p.cache)
        else:
            layer_lists.append([(layer.keys, layer.values) if getattr(layer, "keys", None) is not None
                                and layer.keys.numel() else None for layer in p.cache.layers])
    data = []
    for li in range(len(layer_lists[0])):
        ks, vs = [], []
        for p, layers in zip(parts, layer_lists):
            k, v = layers[li]
            n = S - k.shape[2]  # the longest mask is at least as long as any layer's cache
            if n > 0:
                k = torch.cat([k, k.new_zeros(k.shape[:2] + (n,) + k.shape[3:])], 2)
                v = torch.cat([v, v.new_zeros(v.shape[:2] + (n,) + v.shape[3:])], 2)
            ks.append(k)
            vs.append(v)
        o = torch.as_tensor(order)
        data.append((torch.cat(ks)[o], torch.cat(vs)[o]))
    seen = cat("seen") if all(p.seen is not None for p in parts) else None
    ready = np.zeros((B, cap), bool)
    for p in parts:
        ready[p.index, : p.in_ready.shape[1]] = p.in_ready
    return _Rows(np.arange(B), lists("decoders"), lists("books"), cat("in_table", cap), cat("out_table", cap),
                 cat("lengths", cap), arrays("count"), arrays("base_len"), arrays("code_len"), cat("cand"),
                 cat("cand_ok"), cat("mask", S), DynamicCache(data), lists("unread"), seen, ready,
                 lists("cand_phrase"))


def encode_continuation(codec: Any, ids: Sequence[int], state: DecoderState) -> list[int]:
    """Codes for base tokens ``ids`` that continue a sequence whose decoder is ``state`` (left unchanged).

    Greedy longest match over the entries the sequence has installed (and the one new id that may
    legally come next), so a later turn reuses the hypertokens of the conversation so far.
    """
    M = codec.max_subtokens
    disabled = set(codec.disabled_ids)
    dec = state.copy()
    known: dict[tuple[int, ...], int] = {}
    for e in dec.codebook.entries():
        known.setdefault(e.phrase, e.id)
    out: list[int] = []
    i, n = 0, len(ids)
    ids = [int(x) for x in ids]
    while i < n:
        best = ids[i]
        if best not in disabled:
            p = dec.pending
            legal = (tuple(p) + (p[0],)) if 0 < len(p) < M and len(dec) < codec.max_codebook_size else None
            for L in range(min(M, n - i), 1, -1):
                phrase = tuple(ids[i: i + L])
                if any(t in disabled for t in phrase):
                    continue
                code = known.get(phrase)
                if code is None and phrase == legal:
                    code = dec.next_id
                if code is not None:
                    best = code
                    break
        got = dec.push(best)
        for e in got.installed:
            known.setdefault(e.phrase, e.id)
        out.append(best)
        i += len(got.ids)
    return out
