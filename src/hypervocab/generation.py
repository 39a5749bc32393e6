"""Generation with a live vocabulary: the options, the one decode driver, and ``generate``.

:class:`Decoder` is the loop both :func:`generate` and the server's
:class:`~hypervocab.serving.batch.RunningBatch` run: its rows are the rows of one
:class:`~hypervocab.session.HyperSession` (each with its own LZW decoder, hypertoken tables and KV cache);
every :meth:`Decoder.step` chooses a code per row (:class:`~hypervocab.sampling.CodeSampler`, or a draft
check with prompt lookup), pushes the codes into the decoders the moment they are chosen (so an invalid
code can never get further), records them, lets the rows that are done leave, and reads the next
logits.  :class:`GenerationOptions` is one request's options, validated once, for ``generate``, the
server and the CLI alike.

After the last step the final codes are chosen but not yet read, which is what lets a later call
(``past=``) continue exactly where this one stopped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .codebook import Codebook
from .errors import ConfigError, InputTypeError, StateError, check_int
from .sampling import CodeSampler
from .session import HyperSession, attention_mask_of
from .speculative import DraftReader, PromptLookup
from .streaming import OutputText

if TYPE_CHECKING:
    from .model import HyperModel

__all__ = ["Decoder", "GenerationOptions", "GenerationOutput", "GenerationState", "Row", "SequenceStats",
           "default_eos", "generate"]


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """One request's generation options, validated when made (``dataclasses.replace`` validates again).

    max_new_tokens: codes to emit at most (decoding steps).
    max_new_base_tokens: base tokens to write at most; a hypertoken longer than what is left is never
        chosen, so the budget is exact.  ``None``: no such limit.
    do_sample, temperature, top_k, top_p, repetition_penalty: as in Hugging Face ``generate`` (the
        penalty applies to codes already read or written).
    eos_token_id: base id(s) that end a sequence; ``None``: the base model's own; ``[]``: none.
    stop_strings: end a sequence once its new text contains one of them (the text is read with a
        tokenizer); ``None`` or ``()``: none.
    allow_hypertokens: ``False`` writes base ids only (the input may still hold hypertokens).
    seed: for reproducible sampling.
    logit_bias: base id -> a number added to its logit (OpenAI's ``logit_bias``); needs
        ``allow_hypertokens=False``, so that a banned token cannot come back inside a hypertoken.
    prompt_lookup_num_tokens: speculative decoding with up to this many draft codes per step (one
        sequence at a time); ``None``: off.  max_matching_ngram_size: the longest run of last codes (or
        base tokens) a draft matches (``None``: 3).

    >>> GenerationOptions(max_new_tokens=32, do_sample=True, top_p=0.9, seed=0)       # doctest: +SKIP
    """

    max_new_tokens: int = 20
    max_new_base_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | tuple[int, ...] | None = None
    stop_strings: str | list[str] | tuple[str, ...] | None = ()
    allow_hypertokens: bool = True
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, minimum=0)
        check_int("max_new_base_tokens", self.max_new_base_tokens, minimum=1, optional=True)
        for name in ("do_sample", "allow_hypertokens"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        check_int("top_k", self.top_k, minimum=0, optional=True)
        top_p = self.top_p
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ConfigError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        eos = self.eos_token_id
        if eos is not None and not (_is_id(eos) or isinstance(eos, (list, tuple)) and all(_is_id(e) for e in eos)):
            raise ConfigError(f"eos_token_id must be a base id (an int >= 0), a list of them or None, got {eos!r}")
        stops = self.stop_strings
        stops = () if stops is None else [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"stop_strings must be a non-empty str or a list of them, got {self.stop_strings!r}")
        check_int("seed", self.seed, minimum=0, optional=True)
        bias = self.logit_bias
        if not isinstance(bias, Mapping) or not all(
                _is_id(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in bias.items()):
            raise ConfigError(f"logit_bias must map base ids (ints >= 0) to finite numbers, got {bias!r:.200}")
        if bias and self.allow_hypertokens:
            raise ConfigError("logit_bias needs allow_hypertokens=False: a biased base token could come back "
                              "inside a hypertoken")
        check_int("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens, minimum=1, optional=True)
        check_int("max_matching_ngram_size", self.max_matching_ngram_size, minimum=1, optional=True)
        # normal forms: what the rest of the code reads (frozen, so set through object)
        object.__setattr__(self, "stop_strings", tuple(stops))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in bias.items()})
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(int(e) for e in eos))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names (the keyword arguments :func:`generate` takes for them)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with ``changes``, validated again; an unknown name is a :class:`~hypervocab.errors.ConfigError`."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ConfigError(f"unknown generation option {unknown[0]!r}; the options are: {', '.join(self.names())}")
        return dataclasses.replace(self, **changes) if changes else self

    def eos_ids(self, V: int, default: int | list[int] | None) -> tuple[int, ...]:
        """The base ids that end a sequence, in the order given (``default`` where :attr:`eos_token_id` is
        ``None``), each checked to be in ``[0, V)``."""
        eos = self.eos_token_id if self.eos_token_id is not None else default
        ids: list[Any] = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if not all(_is_id(e) and e < V for e in ids):
            shown = list(eos) if isinstance(eos, tuple) else eos
            raise ConfigError(f"eos_token_id must be a base id in [0, {V}) or a list of them, got {shown!r}")
        return tuple(dict.fromkeys(int(e) for e in ids))

    def check_vocab(self, V: int) -> None:
        """The ids these options name exist in a base vocabulary of ``V``."""
        bad = [k for k in self.logit_bias if k >= V]
        if bad:
            raise ConfigError(f"logit_bias keys must be base ids in [0, {V}), got {bad[0]}")


def _is_id(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= 0)


def default_eos(model: HyperModel) -> list[int] | int | None:
    """The base model's end-of-sequence id(s), from its generation config or its config (``None``: none)."""
    for cfg in (getattr(model.base, "generation_config", None), getattr(model.base, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


# ---------------------------------------------------------------------------------------------- outputs


@dataclass
class SequenceStats:
    """What one sequence of a :func:`generate` call cost and produced.

    codes: codes emitted (decoding steps); base_tokens: base tokens they stand for;
    hypertokens: how many of the codes were hypertokens; prompt_codes / prompt_base_tokens: the
    same for what this call read; finish_reason: ``"eos"``, ``"stop_string"``, ``"length"``
    (``max_new_tokens`` codes) or ``"base_budget"`` (``max_new_base_tokens``); draft_codes /
    accepted_codes: with prompt lookup, codes proposed by drafts and how many of them were kept.
    """

    codes: int = 0
    base_tokens: int = 0
    hypertokens: int = 0
    prompt_codes: int = 0
    prompt_base_tokens: int = 0
    finish_reason: str = "length"
    draft_codes: int = 0
    accepted_codes: int = 0

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
class GenerationState:
    """Where every sequence of a batch stands after :func:`generate`: its :class:`~hypervocab.session.HyperSession`.

    Pass it (or the :class:`GenerationOutput` holding it) as ``past=`` to continue.  It is consumed by
    that call: continue from each state once.
    """

    session: HyperSession
    used: bool = field(default=False, repr=False)

    @property
    def decoders(self) -> list:
        """The sequences' decoder states (their codebooks hold every code chosen so far)."""
        return self.session.decoders

    @property
    def batch_size(self) -> int:
        return self.session.batch_size


# ---------------------------------------------------------------------------------------------- the driver


@dataclass(eq=False)
class Row:
    """One sequence being decoded: its options, how its codes are chosen, and what it has written.

    Made by :meth:`start`.  ``owner`` is the caller's (``generate``: the sequence's place in its batch; the
    server: the request).  ``text``: the new text, read as it is written, where stop strings or a stream
    need it.  ``on_code``: called with each code's base ids.  ``finish_reason``: ``None`` while it runs,
    then ``"eos"``, ``"stop_string"``, ``"base_budget"`` (``max_new_base_tokens``) or ``"length"``
    (``max_new_tokens`` codes), or the caller's own (the server's ``"cancelled"``).
    """

    options: GenerationOptions
    sampler: CodeSampler
    eos: frozenset[int]
    V: int
    owner: Any = None
    text: OutputText | None = None
    reader: DraftReader | None = None  # prompt lookup: drafts follow one sequence, so only while it is alone
    on_code: Callable[[list[int]], None] | None = None
    codes: list[int] = field(default_factory=list)
    base_ids: list[int] = field(default_factory=list)
    hypertokens: int = 0
    finish_reason: str | None = None

    @classmethod
    def start(cls, model: HyperModel, options: GenerationOptions, *, owner: Any = None, eos: frozenset[int],
              text: OutputText | None = None, generator: torch.Generator | None = None,
              sampler: CodeSampler | None = None, on_code: Callable[[list[int]], None] | None = None) -> Row:
        """A row with ``options``: its sampler (``sampler`` when rows share one) and its prompt-lookup reader."""
        V = model.codec.base_vocab_size
        k = options.prompt_lookup_num_tokens
        ngram = options.max_matching_ngram_size
        reader = None if k is None else DraftReader(PromptLookup(model.codec, k, max_ngram=ngram or 3))
        return cls(options, sampler if sampler is not None else CodeSampler(V, options, generator=generator), eos, V,
                   owner=owner, text=text, reader=reader, on_code=on_code)

    @property
    def budget(self) -> int | None:
        """Base tokens this row may still write (``None``: no base-token budget)."""
        n = self.options.max_new_base_tokens
        return None if n is None else n - len(self.base_ids)

    @property
    def steps_left(self) -> int:
        """Codes this row may still write at most (what a draft may propose)."""
        left = self.options.max_new_tokens - len(self.codes)
        return left if self.budget is None else min(left, self.budget)

    def record(self, code: int, ids: list[int]) -> str | None:
        """Add one code just written (``ids``: its base tokens); why the row ends now, or ``None``."""
        self.codes.append(code)
        self.base_ids.extend(ids)
        self.hypertokens += code >= self.V
        if self.on_code is not None:
            self.on_code(ids)
        if self.text is not None:
            self.text.push(ids, hyper=code >= self.V)
        if code in self.eos:
            self.finish_reason = "eos"
        elif self.text is not None and self.text.stopped:
            self.finish_reason = "stop_string"
        elif self.budget is not None and self.budget <= 0:
            self.finish_reason = "base_budget"
        elif len(self.codes) >= self.options.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason


class Decoder:
    """The rows of one :class:`~hypervocab.session.HyperSession` writing a code per step: join, step, leave.

    :func:`generate` joins its whole batch once and steps until no row is left; the server's
    :class:`~hypervocab.serving.batch.RunningBatch` joins requests as their prompts are read and lets them
    leave as they end.  A row with prompt lookup decodes speculatively while it is alone; the moment
    another joins, its draft is dropped and every row gets a code per step.

    V: the base vocabulary; keep_states: keep each leaving row's session state in :attr:`done` (to
    continue from); compact: drop the KV-cache columns no row reads whenever rows leave (a batch that
    lives long).  :attr:`session` / :attr:`logits` (``[B, V + C]``: each row's next-code logits, read and
    not yet chosen from) are ``None`` when no row is left.
    """

    def __init__(self, V: int, *, keep_states: bool = False, compact: bool = False) -> None:
        self.V, self.keep_states, self.compact = V, keep_states, compact
        self.rows: list[Row] = []
        self.session: HyperSession | None = None
        self.logits: torch.Tensor | None = None
        self.done: list[HyperSession] = []  # with keep_states: the states of the rows that left
        # what the session allows every row (budgets), before each row's own sampler
        self._masks = CodeSampler(V, GenerationOptions())

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, session: HyperSession, logits: torch.Tensor, rows: list[Row]) -> None:
        """Add ``rows``, whose input ``session`` has read (``logits``: ``[len(rows), V + C]`` after it), after the
        running ones.  ``session`` is consumed; on an error (e.g. out of memory while the caches merge) the
        running rows' state is lost too, and the caller must end them."""
        if session.batch_size != len(rows) or logits.shape[0] != len(rows):
            raise StateError(f"{len(rows)} rows joined with a session of {session.batch_size} and "
                             f"{logits.shape[0]} rows of logits")
        if self.session is None:
            self.session, self.logits, self.rows = session, logits, list(rows)
            return
        assert self.logits is not None  # they go together
        self._drop_draft()  # a draft is one sequence's: leave it before others join
        merged = HyperSession.concat([self.session, session])
        self.session = None
        if self.compact:
            merged.compact()
        self.session, self.logits, self.rows = merged, torch.cat([self.logits, logits]), self.rows + list(rows)

    @property
    def _reader(self) -> DraftReader | None:
        """The drafting reader while one row with prompt lookup is alone, else ``None``."""
        return self.rows[0].reader if len(self.rows) == 1 else None

    def _drop_draft(self) -> None:
        if self.session is not None and self.session.ahead:
            reader = self._reader
            assert reader is not None  # only a lone row's reader reads ahead
            reader.drop(self.session)

    def _choose(self) -> list[int]:
        """One code per row: a draft check, the rows' one shared sampler over the batch, or each row its own."""
        session, logits, rows = self.session, self.logits, self.rows
        assert session is not None and logits is not None
        budgets = [r.budget for r in rows]
        budget = None if all(b is None for b in budgets) else np.array(
            [2 ** 62 if b is None else b for b in budgets], np.int64)
        if session.ahead:
            reader = self._reader
            assert reader is not None
            return reader.choose(rows[0].sampler, logits, session, budget)
        sampler = rows[0].sampler
        if all(r.sampler is sampler for r in rows):
            return sampler(logits, session, budget)
        masked = self._masks.scores(logits, session, budget)
        seen = session.seen
        return [r.sampler.pick(r.sampler.restrict(r.sampler.penalize(
            masked[i: i + 1], None if seen is None else seen[i: i + 1])))[0] for i, r in enumerate(rows)]

    def step(self) -> list[Row]:
        """A code for every row; the rows that end leave (returned, ``finish_reason`` set), and the next
        logits are read (with prompt lookup, alone: the next draft with them)."""
        if self.session is None:
            return []
        session, rows = self.session, self.rows
        codes = self._choose()
        expansions = session.append(codes)
        finished = np.array([r.record(c, ids) is not None for r, c, ids in zip(rows, codes, expansions)], bool)
        reader = self._reader
        logits = reader.taken(session, codes, finished) if reader is not None else None
        ended = [r for r, f in zip(rows, finished) if f]
        for r in ended:
            if r.text is not None:
                r.text.end()
        self._narrow(~finished)
        if self.session is not None and logits is None:
            reader = self._reader
            logits = self.session.advance() if reader is None else reader.read(self.session, self.rows[0].steps_left)
        self.logits = logits
        return ended

    def leave(self, which: np.ndarray, reason: str) -> list[Row]:
        """The rows ``which`` (``[B]`` bool) end now with ``reason`` (e.g. cancelled) and leave."""
        if not which.any():
            return []
        ended = [r for r, w in zip(self.rows, which) if w]
        for r in ended:
            r.finish_reason = reason
        self._drop_draft()
        self._narrow(~which)
        return ended

    def clear(self) -> list[Row]:
        """Every row leaves at once, its state unknown (a step failed): the rows, for the caller to end."""
        rows = self.rows
        self.rows, self.session, self.logits = [], None, None
        return rows

    def _narrow(self, keep: np.ndarray) -> None:
        """Keep the rows ``keep`` (and their logits); the others' states go to :attr:`done` with keep_states."""
        if keep.all():
            return
        assert self.session is not None
        if self.keep_states:
            self.done.append(self.session.detach(np.flatnonzero(~keep)))
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        if not self.rows:
            self.session = self.logits = None
            return
        idx = np.flatnonzero(keep)
        self.session = self.session.select(idx)
        if self.compact:
            self.session.compact()
        if self.logits is not None:
            self.logits = self.logits[idx]


# ---------------------------------------------------------------------------------------------- generate


def generate(
    model: HyperModel,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    past: GenerationState | GenerationOutput | None = None,
    options: GenerationOptions | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    return_dict_in_generate: bool = False,
    output_codebooks: bool = False,
    output_logits: bool = False,
    cache_implementation: str = "dynamic",
    compile: bool | str | None = None,
    **changes: Any,
) -> torch.Tensor | GenerationOutput:
    """See :meth:`HyperModel.generate`: ``options`` (default :class:`GenerationOptions`), with ``changes``
    (any of its fields by name) applied."""
    if options is not None and not isinstance(options, GenerationOptions):
        raise InputTypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
    opts = (options if options is not None else GenerationOptions()).replace(**changes)
    static = _check_cache(cache_implementation, compile, past, opts.prompt_lookup_num_tokens)
    V = model.codec.base_vocab_size
    eos = opts.eos_ids(V, default_eos(model))
    opts.check_vocab(V)
    _check_call(opts, tokenizer, streamer, generator)
    session, ids, mask = _start(model, input_ids, attention_mask, past,
                                static=(opts.max_new_tokens, compile) if static else None)
    input_ids = input_ids if input_ids is not None else torch.as_tensor(ids, device=session.device)
    B = session.batch_size
    if streamer is not None and B > 1:
        raise ConfigError(f"a streamer shows one sequence: input_ids has {B} rows, give one")
    if opts.prompt_lookup_num_tokens is not None and B > 1:
        raise ConfigError(f"prompt_lookup_num_tokens drafts for one sequence: input_ids has {B} rows, give one")
    gen = generator if generator is not None else (
        torch.Generator(device=session.device).manual_seed(opts.seed) if opts.seed is not None else None)
    sampler = CodeSampler(V, opts, generator=gen)  # one for the batch: its rows are chosen together
    # stop strings are found in the new text as it is decoded, special tokens included (as decode() shows them)
    rows = [Row.start(model, opts, owner=b, eos=frozenset(eos), sampler=sampler,
                      text=OutputText(tokenizer, list(opts.stop_strings)) if opts.stop_strings else None,
                      on_code=None if streamer is None else lambda e: streamer.put(torch.as_tensor(e)))
            for b in range(B)]
    decoder = Decoder(V, keep_states=True)
    with torch.no_grad():
        if sampler.penalty != 1.0:
            session.track_seen()
        prompt, logits, scores = _read_input(session, ids, mask, opts.max_new_tokens, streamer, output_logits)
        if opts.max_new_tokens == 0 or logits is None:
            # the state left to continue from is an ordinary dynamic session (a static cache is only so long)
            decoder.done.append(session.detach(np.arange(B)) if session.static is not None else session)
        else:
            decoder.join(session, logits, rows)
            while decoder.session is not None:
                decoder.step()
                if output_logits and decoder.session is not None and decoder.logits is not None:
                    scores.append(_scatter_rows(decoder.logits, decoder.session.index, B))
        if streamer is not None:
            streamer.end()
    stats = [SequenceStats(codes=len(r.codes), base_tokens=len(r.base_ids), hypertokens=r.hypertokens,
                           prompt_codes=p[0], prompt_base_tokens=p[1], finish_reason=r.finish_reason or "length",
                           draft_codes=0 if r.reader is None else r.reader.draft_codes,
                           accepted_codes=0 if r.reader is None else r.reader.accepted_codes)
             for r, p in zip(rows, prompt)]
    state = GenerationState(HyperSession.merge(decoder.done, B))
    return _result(model, input_ids, list(eos), rows, stats, state, scores,
                   return_dict_in_generate, output_codebooks, output_logits)


def _check_call(options: GenerationOptions, tokenizer: Any, streamer: Any, generator: Any) -> None:
    """What goes with the options in one call: a tokenizer for stop strings, a streamer, a generator."""
    if options.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings needs tokenizer= (a Hugging Face tokenizer) to read the text")
    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise ConfigError(f"streamer must have put() and end() methods, got {type(streamer).__name__}")
    if options.seed is not None and generator is not None:
        raise ConfigError("give seed= or generator=, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_cache(cache_implementation: Any, compile: Any, past: Any, lookup: Any) -> bool:
    """Whether the call runs a static session (checked: ``"static"`` or ``"dynamic"``, and what goes with it)."""
    if cache_implementation not in ("dynamic", "static"):
        raise ConfigError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
    if compile is not None and not isinstance(compile, (bool, str)):
        raise ConfigError(f"compile must be True, False, None or a torch.compile backend name, got {compile!r}")
    static = cache_implementation == "static"
    if static and past is not None:
        raise ConfigError("cache_implementation='static' starts a new sequence: continuing (past=) runs dynamic")
    if static and lookup is not None:
        raise ConfigError("prompt_lookup_num_tokens reads drafts ahead, which needs cache_implementation='dynamic'")
    if compile is not None and not static:
        raise ConfigError("compile= applies to the static decode step: give cache_implementation='static'")
    return static


def _start(model: HyperModel, input_ids: Any, attention_mask: Any, past: Any,
           static: tuple[int, bool | str | None] | None = None) -> tuple[HyperSession, np.ndarray, np.ndarray]:
    """The session to run (new, or the one ``past`` left) and the codes to read first (``[B, T]`` and mask);
    ``static``: ``(max_new_tokens, compile)`` for a static session."""
    if isinstance(past, GenerationOutput):
        past = past.state
    if past is not None and not isinstance(past, GenerationState):
        raise InputTypeError(f"past must be a GenerationOutput or GenerationState, got {type(past).__name__}")
    if past is not None and past.used:
        raise StateError("this past state was already continued once: continue from the newer output")
    B = past.batch_size if past is not None else None
    if input_ids is None:
        if past is None:
            raise InputTypeError("input_ids is required (the codes from HyperTokenizer), unless past= is given")
        input_ids = torch.zeros(past.batch_size, 0, dtype=torch.long)
    ids = model.check_codes(input_ids)
    if B is not None and ids.shape[0] != B:
        raise InputTypeError(f"input_ids has {ids.shape[0]} rows but past holds {B} sequences")
    if ids.shape[0] == 0:
        raise InputTypeError("input_ids has no rows")
    mask = attention_mask_of(attention_mask, ids.shape[0], ids.shape[1], input_ids.device).cpu().numpy()
    if past is None:
        if ids.shape[1] == 0:
            raise InputTypeError("input_ids is empty: give at least one code to start from")
        if static is None:
            return model.new_session(ids.shape[0]), ids, mask
        if ids.shape[0] != 1:
            raise ConfigError(f"cache_implementation='static' runs one sequence: input_ids has {ids.shape[0]} rows")
        # the prompt, then one position per new code (the last code chosen is never read)
        return model.new_session(1, max_length=ids.shape[1] + static[0], compiled=static[1]), ids, mask
    past.used = True
    return past.session, ids, mask


def _read_input(session: HyperSession, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, streamer: Any,
                output_logits: bool) -> tuple[list[tuple[int, int]], torch.Tensor | None, list[torch.Tensor]]:
    """Read the input (after any codes a previous call chose but did not read): per sequence the codes and
    base tokens read, the next logits, the scores kept."""
    if not any(len(u) for u in session.unread) and not mask.any():
        # continuing with nothing new to read: the last logits were not kept
        if max_new_tokens > 0:
            raise InputTypeError("nothing to read: give input_ids to continue from, or generate more codes in "
                                 "the previous call")
        return [(0, 0)] * session.batch_size, None, []
    logits, n_new, new_base = session.feed(ids, mask)
    if streamer is not None:  # the input's text first, as transformers' streamers expect
        book = session.decoders[0].codebook
        streamer.put(torch.as_tensor([t for c in ids[0][mask[0].astype(bool)].tolist() for t in book.phrase(c)]))
    read = [(int(n_new[b]), int(new_base[b])) for b in range(session.batch_size)]
    return read, logits, [logits.float().clone()] if output_logits else []


def _scatter_rows(logits: torch.Tensor, index: np.ndarray, B: int) -> torch.Tensor:
    """``[B, N]`` float32 scores with the live rows' logits in place and ``-inf`` for finished ones."""
    full = logits.new_full((B, logits.shape[1]), float("-inf"), dtype=torch.float32)
    full[torch.as_tensor(index, device=logits.device)] = logits.float()
    return full


def _result(model: HyperModel, input_ids: torch.Tensor, eos: list[int], rows: list[Row], stats: list[SequenceStats],
            state: GenerationState, scores: list[torch.Tensor], as_dict: bool, output_codebooks: bool,
            output_logits: bool) -> torch.Tensor | GenerationOutput:
    B = len(rows)
    pad = model.config.pad_id if model.config.pad_id is not None else (eos[0] if eos else 0)
    n = max((len(r.codes) for r in rows), default=0)
    tail = torch.full((B, n), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(rows):
        tail[b, : len(r.codes)] = torch.as_tensor(r.codes, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, tail], 1)
    if not (as_dict or output_codebooks or output_logits):
        return sequences
    books = [d.codebook for d in state.decoders] if output_codebooks else None
    return GenerationOutput(sequences, [r.codes for r in rows], [r.base_ids for r in rows], stats, state, books,
                            tuple(scores) if output_logits else None)
