"""Speculative hypertoken decoding: drafts from the context (prompt lookup), checked in one forward pass.

Prompt lookup guesses that text about to be written has been written before: it finds the latest earlier
place where the last few codes (or base tokens) occurred and proposes what followed.  Codes that repeat
are proposed as they were written; tokens are encoded with the sequence's own live codebook
(:meth:`~hypervocab.codec.LZWCodec.encode_continuation`), the way the LZW compressor the model was
trained on would write them.  Either way a draft of ``k`` codes covers several base tokens per code.
:meth:`HyperSession.read_ahead <hypervocab.session.HyperSession.read_ahead>` scores the whole draft in one
forward; generation then takes the codes greedy decoding would have chosen anyway, and
for sampling :func:`accept_draft` keeps the output distribution exactly that of ordinary sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .codec import DecoderState, LZWCodec
from .errors import InputTypeError, check_int

if TYPE_CHECKING:
    from .session import HyperSession

__all__ = ["DraftReader", "PromptLookup", "accept_draft", "ngram_follow"]


def ngram_follow(ids: np.ndarray, *, max_ngram: int, width: int) -> np.ndarray | None:
    """Up to ``width`` ids that followed the latest earlier occurrence of the last n-gram of ``ids``, for ``n``
    from ``max_ngram`` down to 1 (the longest match wins); ``None`` when no earlier occurrence exists.

    A pure function over an array, the whole of prompt lookup's guess.  In ``a b c d a b``, the last
    bigram ``a b`` occurred before at the start, followed by ``c d``:

    >>> import numpy as np
    >>> ngram_follow(np.array([1, 2, 3, 4, 1, 2]), max_ngram=3, width=2).tolist()
    [3, 4]
    >>> ngram_follow(np.array([1, 2, 3, 4, 1, 2]), max_ngram=3, width=9).tolist()  # up to the end
    [3, 4, 1, 2]
    >>> ngram_follow(np.array([1, 2, 3]), max_ngram=3, width=2) is None  # nothing repeats
    True
    """
    N = len(ids)
    for n in range(min(max_ngram, N - 1), 0, -1):
        tail = ids[N - n: N]
        starts = np.flatnonzero(ids[: N - n] == tail[0])  # occurrences that start before the tail does
        for o in range(1, n):
            starts = starts[ids[starts + o] == tail[o]]
        if len(starts):
            i = int(starts[-1]) + n
            return ids[i: min(N, i + width)]
    return None


class _Stream:
    """A sequence's ids in a growing NumPy buffer (appended to, never copied whole, as the sequence grows)."""

    def __init__(self) -> None:
        self.ids = np.zeros(256, np.int64)
        self.n = 0

    def sync(self, ids: Sequence[int]) -> np.ndarray:
        """The buffer holding ``ids`` (which extend the ones synced before), as an array view."""
        n = len(ids)
        if n > len(self.ids):
            grown = np.zeros(max(n, 2 * len(self.ids)), np.int64)
            grown[: self.n] = self.ids[: self.n]
            self.ids = grown
        if n > self.n:
            self.ids[self.n: n] = ids[self.n:]
        self.n = n
        return self.ids[:n]


class PromptLookup:
    """Drafts up to ``num_codes`` codes for one sequence from the latest earlier match of its last codes/tokens.

    First the codes: where the last codes occurred before, the codes that followed are the draft (a model
    that repeats itself repeats its own segmentation).  Failing that, the base tokens: what followed the
    last tokens' earlier occurrence, encoded with the live codebook as the LZW compressor would.

    num_codes: the most codes per draft (``prompt_lookup_num_tokens`` in :meth:`HyperModel.generate`);
    max_ngram: the longest run of last codes (or tokens) matched, tried from longest to 1, as Hugging
    Face's prompt lookup does.

    A draft costs a forward over all its codes (on a CPU, two positions cost about 1.6 times one), so
    drafting follows how drafts have fared (:meth:`update`): two codes more after a draft taken whole, one
    fewer after one cut short, and after a draft of which nothing was taken, no draft for the next 1, 2,
    4, ... 16 steps (reset by the next draft that is taken), so that text that does not repeat costs
    little more than plain decoding.
    """

    def __init__(self, codec: LZWCodec, num_codes: int, *, max_ngram: int = 3) -> None:
        self.codec = codec
        self.num_codes = check_int("prompt_lookup_num_tokens", num_codes, minimum=1)
        self.max_ngram = check_int("max_matching_ngram_size", max_ngram, minimum=1)
        self._codes, self._tokens = _Stream(), _Stream()
        self._known: dict[tuple[int, ...], int] = {}  # phrase -> first id, for the entries seen so far
        self._n_known = 0
        self.length = self.num_codes  # the next draft's length at most
        self._misses = 0  # drafts in a row of which nothing was taken
        self._wait = 0  # steps to go without drafting

    def update(self, drafted: int, accepted: int) -> None:
        """Tell how the last draft fared: ``accepted`` of its ``drafted`` codes were kept."""
        if not drafted:
            return
        self.length = min(self.num_codes, self.length + 2) if accepted == drafted else max(1, self.length - 1)
        self._misses = 0 if accepted else self._misses + 1
        self._wait = min(16, 1 << (self._misses - 1)) if self._misses else 0

    def __call__(self, codes: Sequence[int], tokens: Sequence[int], decoder: DecoderState,
                 entries: Sequence[tuple[int, ...]], limit: int) -> list[int]:
        """A draft of at most ``min(num_codes, limit)`` codes to follow one sequence; empty when nothing earlier
        matches.

        codes / tokens: the sequence's codes and base tokens so far (each call extends the last one's);
        decoder: its LZW decoder state; entries: the phrases of its hypertokens so far, in id order.
        """
        k = min(self.length, limit)
        if k <= 0:
            return []
        if self._wait:
            self._wait -= 1
            return []
        found = ngram_follow(self._codes.sync(codes), max_ngram=self.max_ngram, width=k)
        if found is not None:
            return [int(c) for c in found]
        follow = ngram_follow(self._tokens.sync(tokens), max_ngram=self.max_ngram,
                              width=k * self.codec.max_subtokens)
        if follow is None:
            return []
        V = self.codec.base_vocab_size
        for i in range(self._n_known, len(entries)):
            self._known.setdefault(entries[i], V + i)
        self._n_known = len(entries)
        return self.codec.encode_continuation(follow, decoder, known=self._known, max_codes=k)

    def for_session(self, session: HyperSession, limit: int) -> list[int]:
        """:meth:`__call__` for row 0 of a :class:`~hypervocab.session.HyperSession`."""
        return self(session.history[0], session.tokens[0], session.decoders[0], session.books[0], limit)


class Chooser(Protocol):
    """What :class:`DraftReader` needs of a sampler (:class:`~hypervocab.sampling.CodeSampler` is one)."""

    def __call__(self, logits: torch.Tensor, session: HyperSession, budget: np.ndarray | None) -> list[int]: ...

    def choose_draft(self, logits: torch.Tensor, session: HyperSession, budget: np.ndarray | None,
                     draft: int) -> int: ...


class DraftReader:
    """How each step's codes are read: one step at a time, or with prompt lookup, drafts read ahead.

    The decoding loop of :func:`~hypervocab.generation.generate` and of the server's batch: :meth:`choose`
    the step's codes, push them (``session.append``), then :meth:`taken` gives the next logits when the
    code was the draft's (already read), else :meth:`read` reads it (and a new draft with it).

    lookup: the drafter, or ``None`` (plain decoding); ahead: logits of the draft positions read ahead and
    not reached yet; draft_codes / accepted_codes: codes drafted and drafts kept, in all.
    """

    def __init__(self, lookup: PromptLookup | None) -> None:
        self.lookup = lookup
        self.ahead: list[torch.Tensor] = []
        self.drafted = 0  # codes in the draft being checked
        self.draft_codes = self.accepted_codes = 0

    def choose(self, sampler: Chooser, logits: torch.Tensor, session: HyperSession,
               budget: np.ndarray | None) -> list[int]:
        """The step's codes; where a draft proposes one, by the rule that keeps greedy and sampled output."""
        if session.ahead:
            return [sampler.choose_draft(logits, session, budget, session.ahead[0][0])]
        return sampler(logits, session, budget)

    def taken(self, session: HyperSession, codes: list[int], finished: np.ndarray) -> torch.Tensor | None:
        """The next logits if the code just written is the draft's (already read), else ``None`` (the rest
        of the draft is dropped)."""
        if session.ahead and not finished.any() and codes[0] == session.ahead[0][0]:
            session.accept_ahead()
            self.accepted_codes += 1
            return self.ahead.pop(0)
        self.drop(session)
        return None

    def drop(self, session: HyperSession) -> None:
        """Leave the current draft: the positions not reached are cut from the KV cache."""
        if self.lookup is not None and self.drafted:
            self.lookup.update(self.drafted, self.drafted - len(session.ahead))
            self.drafted = 0
        session.drop_ahead()
        self.ahead.clear()

    def read(self, session: HyperSession, steps_left: int) -> torch.Tensor:
        """Read the codes just appended: the next ``[B, V + C]`` logits.  With prompt lookup (one row), a
        draft of at most ``steps_left`` codes is read with them and the logits after each draft code wait
        in ``ahead``."""
        if self.lookup is None or session.batch_size != 1:
            return session.advance()
        draft = self.lookup.for_session(session, steps_left)
        self.draft_codes += len(draft)
        if not draft:
            return session.advance()
        logits = session.read_ahead(draft)
        self.ahead, self.drafted = list(logits[1:].split(1)), len(draft)
        return logits[:1]


def accept_draft(probs: torch.Tensor, draft: int, generator: torch.Generator | None = None) -> int:
    """The speculative sampling rule for a draft that proposes ``draft`` with certainty.

    ``probs`` is ``[N]``, the distribution ordinary sampling would draw from.  The draft is kept with
    probability ``probs[draft]``; otherwise a code is drawn from ``probs`` with ``draft`` removed.  The
    result is distributed exactly as ``probs``: P(x) = p(d)[x = d] + (1 - p(d)) p(x)[x != d] / (1 - p(d)).
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 1:
        raise InputTypeError(f"probs must be a 1-D torch.Tensor, got {type(probs).__name__}"
                             + (f" of shape {tuple(probs.shape)}" if isinstance(probs, torch.Tensor) else ""))
    draft = check_int("draft", draft, minimum=0, maximum=len(probs) - 1, error=InputTypeError)
    p_draft = float(probs[draft])
    u = float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))
    if u < p_draft:
        return draft
    rest = probs.clone()
    rest[draft] = 0
    total = float(rest.sum())
    if total <= 0:  # p(d) = 1 within rounding: nothing else can be drawn
        return draft
    return int(torch.multinomial(rest / total, 1, generator=generator)[0])
