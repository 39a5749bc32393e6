"""Generation with a live vocabulary: KV-cached, batched, greedy or sampled, streamed.

The loop of :meth:`HyperModel.generate <hypervocab.model.HyperModel.generate>`: each sequence of the batch
lives in a :class:`~hypervocab.session.HyperSession` row (its own LZW decoder, hypertoken tables and KV cache);
:class:`~hypervocab.sampling.CodeSampler` chooses each step's codes; the session pushes them into the decoders
the moment they are chosen (so an invalid code can never get further) and the model reads them on the next
step.  Finished sequences leave the batch.  After the last step the final codes are chosen but not yet read,
which is what lets a later call (``past=``) continue exactly where this one stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codebook import Codebook
from .errors import ConfigError, InputTypeError, StateError, check_int
from .sampling import CodeSampler
from .session import HyperSession, attention_mask_of
from .speculative import DraftReader, PromptLookup

__all__ = ["GenerationOutput", "GenerationState", "SequenceStats", "default_eos", "generate"]


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


# ---------------------------------------------------------------------------------------------- checks


def _check_options(V: int, max_new_tokens: Any, max_new_base_tokens: Any, do_sample: Any, temperature: Any,
                   top_k: Any, top_p: Any, repetition_penalty: Any, eos_token_id: Any, stop_strings: Any,
                   tokenizer: Any, streamer: Any, seed: Any, generator: Any) -> tuple[list[int], list[str]]:
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    check_int("max_new_base_tokens", max_new_base_tokens, minimum=1, optional=True)
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
    for name, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    check_int("top_k", top_k, minimum=0, optional=True)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    eos = ([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, (int, np.integer))
           else eos_token_id)
    if not isinstance(eos, (list, tuple)) or not all(
            isinstance(e, (int, np.integer)) and not isinstance(e, bool) and 0 <= e < V for e in eos):
        raise ConfigError(f"eos_token_id must be a base id in [0, {V}) or a list of them, got {eos_token_id!r}")
    stops = [] if stop_strings is None else [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop_strings must be a non-empty str or a list of them, got {stop_strings!r}")
    if stops and tokenizer is None:
        raise ConfigError("stop_strings needs tokenizer= (a Hugging Face tokenizer) to read the text")
    if streamer is not None and not all(callable(getattr(streamer, name, None)) for name in ("put", "end")):
        raise ConfigError(f"streamer must have put() and end() methods, got {type(streamer).__name__}")
    if seed is not None and generator is not None:
        raise ConfigError("give seed= or generator=, not both")
    check_int("seed", seed, minimum=0, optional=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return [int(e) for e in eos], list(stops)


def default_eos(model: Any) -> list[int] | int | None:
    """The base model's end-of-sequence id(s), from its generation config or its config (``None``: none)."""
    for cfg in (getattr(model.base, "generation_config", None), getattr(model.base, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class _Stop:
    """When a sequence ends: ids, strings (read back with ``tokenizer``), budgets."""

    eos: set[int]
    strings: list[str]
    tokenizer: Any
    max_new_tokens: int
    max_new_base_tokens: int | None
    window: int = 0

    def reason(self, code: int, written: list[int], step: int) -> str | None:
        if code in self.eos:
            return "eos"
        if self.strings and any(s in self.tokenizer.decode(written[-self.window:]) for s in self.strings):
            return "stop_string"
        if self.max_new_base_tokens is not None and len(written) >= self.max_new_base_tokens:
            return "base_budget"
        if step >= self.max_new_tokens:
            return "length"
        return None


def generate(
    model: Any,
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
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int | None = None,
    cache_implementation: str = "dynamic",
    compile: bool | str | None = None,
) -> torch.Tensor | GenerationOutput:
    """See :meth:`HyperModel.generate`."""
    static = _check_cache(cache_implementation, compile, past, prompt_lookup_num_tokens)
    V = model.codec.base_vocab_size
    reader = DraftReader(None if prompt_lookup_num_tokens is None else PromptLookup(
        model.codec, prompt_lookup_num_tokens, max_ngram=3 if max_matching_ngram_size is None
        else max_matching_ngram_size))
    eos, stops = _check_options(V, max_new_tokens, max_new_base_tokens, do_sample, temperature, top_k, top_p,
                                repetition_penalty, default_eos(model) if eos_token_id is None else eos_token_id,
                                stop_strings, tokenizer, streamer, seed, generator)
    session: HyperSession | None  # None once every sequence has finished
    session, ids, mask = _start(model, input_ids, attention_mask, past,
                                static=(max_new_tokens, compile) if static else None)
    input_ids = input_ids if input_ids is not None else torch.as_tensor(ids, device=session.device)
    B = session.batch_size
    if streamer is not None and B > 1:
        raise ConfigError(f"a streamer shows one sequence: input_ids has {B} rows, give one")
    if reader.lookup is not None and B > 1:
        raise ConfigError(f"prompt_lookup_num_tokens drafts for one sequence: input_ids has {B} rows, give one")
    gen = generator if generator is not None else (
        torch.Generator(device=session.device).manual_seed(seed) if seed is not None else None)
    sampler = CodeSampler(V, do_sample=do_sample, temperature=float(temperature), top_k=top_k, top_p=top_p,
                          repetition_penalty=float(repetition_penalty), allow_hypertokens=allow_hypertokens,
                          generator=gen)
    stop = _Stop(set(eos), stops, tokenizer, max_new_tokens, max_new_base_tokens,
                 4 * max((len(s) for s in stops), default=0) + 2 * model.codec.max_subtokens)
    new_codes: list[list[int]] = [[] for _ in range(B)]
    new_base: list[list[int]] = [[] for _ in range(B)]
    with torch.no_grad():
        if sampler.penalty != 1.0:
            session.track_seen()
        stats, logits, scores = _read_input(session, ids, mask, max_new_tokens, streamer, output_logits)
        done: list[HyperSession] = []
        step = 0
        while max_new_tokens > 0 and session is not None:
            budget = None if max_new_base_tokens is None else np.array(
                [max_new_base_tokens - len(new_base[i]) for i in session.index], np.int64)
            assert logits is not None  # _read_input returns none only when max_new_tokens == 0
            codes = reader.choose(sampler, logits, session, budget)
            expansions = session.append(codes)
            step += 1
            finished = _record_step(session.index.tolist(), codes, expansions, step, V, stop, new_codes, new_base,
                                    stats)
            if streamer is not None:
                streamer.put(torch.as_tensor(expansions[0]))
            logits = reader.taken(session, codes, finished)
            if logits is None:  # no draft, or it was left: read the codes just written
                session = _drop_finished(session, finished, done)
                logits = None if session is None else reader.read(session, max_new_tokens - step)
            if output_logits and session is not None and logits is not None:
                scores.append(_scatter_rows(logits, session.index, B))
        if streamer is not None:
            streamer.end()
        if session is not None:
            # the state left to continue from is an ordinary dynamic session (a static cache is only so long)
            done.append(session.detach(np.arange(session.batch_size)) if session.static is not None else session)
    if reader.lookup is not None:  # one sequence
        stats[0].draft_codes, stats[0].accepted_codes = reader.draft_codes, reader.accepted_codes
    state = GenerationState(HyperSession.merge(done, B))
    return _result(model, input_ids, eos, new_codes, new_base, stats, state, scores,
                   return_dict_in_generate, output_codebooks, output_logits)


def _record_step(index: list[int], codes: list[int], expansions: list[list[int]], step: int, V: int, stop: _Stop,
                 new_codes: list[list[int]], new_base: list[list[int]], stats: list[SequenceStats]) -> np.ndarray:
    """Add one step's codes to the sequences (``index``: theirs in the batch); which of the rows are now done."""
    finished = np.zeros(len(index), bool)
    for i, (b, c, exp) in enumerate(zip(index, codes, expansions)):
        new_codes[b].append(c)
        new_base[b].extend(exp)
        st = stats[b]
        st.codes += 1
        st.base_tokens += len(exp)
        st.hypertokens += c >= V
        reason = stop.reason(c, new_base[b], step)
        if reason is not None:
            st.finish_reason, finished[i] = reason, True
    return finished


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


def _start(model: Any, input_ids: Any, attention_mask: Any, past: Any,
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
                output_logits: bool) -> tuple[list[SequenceStats], torch.Tensor | None, list[torch.Tensor]]:
    """Read the input (after any codes a previous call chose but did not read): stats, logits, the scores kept."""
    if not any(len(u) for u in session.unread) and not mask.any():
        # continuing with nothing new to read: the last logits were not kept
        if max_new_tokens > 0:
            raise InputTypeError("nothing to read: give input_ids to continue from, or generate more codes in "
                                 "the previous call")
        return [SequenceStats() for _ in range(session.batch_size)], None, []
    logits, n_new, new_base = session.feed(ids, mask)
    if streamer is not None:  # the input's text first, as transformers' streamers expect
        book = session.decoders[0].codebook
        streamer.put(torch.as_tensor([t for c in ids[0][mask[0].astype(bool)].tolist() for t in book.phrase(c)]))
    stats = [SequenceStats(prompt_codes=int(n_new[b]), prompt_base_tokens=int(new_base[b]))
             for b in range(session.batch_size)]
    return stats, logits, [logits.float().clone()] if output_logits else []


def _drop_finished(session: HyperSession, finished: np.ndarray, done: list[HyperSession]) -> HyperSession | None:
    """Sequences that are done stop costing: their state leaves the batch (kept in ``done``)."""
    if not finished.any():
        return session
    done.append(session.detach(np.flatnonzero(finished)))
    keep = np.flatnonzero(~finished)
    return session.select(keep) if len(keep) else None


def _scatter_rows(logits: torch.Tensor, index: np.ndarray, B: int) -> torch.Tensor:
    """``[B, N]`` float32 scores with the live rows' logits in place and ``-inf`` for finished ones."""
    full = logits.new_full((B, logits.shape[1]), float("-inf"), dtype=torch.float32)
    full[torch.as_tensor(index, device=logits.device)] = logits.float()
    return full


def _result(model: Any, input_ids: torch.Tensor, eos: list[int], new_codes: list[list[int]],
            new_base: list[list[int]], stats: list[SequenceStats], state: GenerationState, scores: list[torch.Tensor],
            as_dict: bool, output_codebooks: bool, output_logits: bool) -> torch.Tensor | GenerationOutput:
    B = len(new_codes)
    pad = model.config.pad_id if model.config.pad_id is not None else (eos[0] if eos else 0)
    n = max((len(c) for c in new_codes), default=0)
    tail = torch.full((B, n), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, c in enumerate(new_codes):
        tail[b, : len(c)] = torch.as_tensor(c, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, tail], 1)
    if not (as_dict or output_codebooks or output_logits):
        return sequences
    books = [d.codebook for d in state.decoders] if output_codebooks else None
    return GenerationOutput(sequences, new_codes, new_base, stats, state, books,
                            tuple(scores) if output_logits else None)
