"""The running batch behind the server: requests join and leave one batch at step boundaries.

Each request is one row of a single :class:`~hypervocab.session.HyperSession`, so it keeps its own LZW
decoder, hypertoken tables, KV cache rows and positions: nothing one request writes is visible to
another.  A request joins by reading its prompt alone, in chunks of ``prefill_chunk`` codes, one step's
worth at a time between the running rows' decoding steps (so a long prompt joining pauses the running
streams by about one chunk's forward, not by the whole prompt's), and is then concatenated to the batch;
every step chooses one code per row, with the row's own sampling options, budget, stop strings and
cancellation; finished rows leave and the columns of the KV cache no row reads any more are dropped.
The chunks of a prompt are always cut at the same places, whatever else runs, so a greedy request writes
what it would write alone, up to the last bits of float arithmetic that a wider matrix product may round
differently.

With prompt lookup on, a request that is alone in the batch decodes speculatively (drafts are per
sequence); the moment another joins, its draft is dropped and the batch decodes a code per row.

The decode step is :class:`~hypervocab.generation.Decoder`'s, the loop ``generate`` runs too; a request's
options are a :class:`~hypervocab.generation.GenerationOptions` (:func:`request_options` reads OpenAI's
fields into one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..generation import GenerationOptions, Row
    from ..model import HyperModel

__all__ = ["MIN_TEMPERATURE", "Finished", "Job", "Piece", "RunningBatch", "request_options"]

# below this a temperature is greedy: logits / 1e-40 overflow float32, and sampling this cold is greedy anyway
MIN_TEMPERATURE = 1e-5
MAX_ERROR_CHARS = 300  # an error message quotes at most this much of an exception


@dataclass
class Piece:
    """Final text of the output; ``hyper``: written by a hypertoken.  Running totals of what was written."""

    text: str
    hyper: bool
    codes: int
    base_tokens: int


@dataclass
class Finished:
    """The end of a request: why it stopped and what it cost (or the error that ended it)."""

    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    prompt_codes: int = 0
    completion_tokens: int = 0
    completion_codes: int = 0
    hypertokens: int = 0
    error: str | None = None


# how the decoder's reasons read in OpenAI's terms
_FINISH = {"eos": "stop", "stop_string": "stop", "base_budget": "length", "length": "length", "cancelled": "cancelled"}


def request_options(*, max_tokens: int, temperature: float = 1.0, top_p: float | None = None,
                    seed: int | None = None, stop: list[str] | None = None,
                    logit_bias: dict[int, float] | None = None, prompt_lookup: int = 0) -> GenerationOptions:
    """OpenAI's request fields as :class:`~hypervocab.generation.GenerationOptions`.

    ``max_tokens`` counts base tokens (what OpenAI's clients count).  A temperature below
    :data:`MIN_TEMPERATURE` is greedy: dividing the logits by it would overflow float32 (1e-40 gives
    ``inf``, so ``nan`` probabilities), and sampling that cold is greedy anyway; ``top_p`` and ``seed``
    matter only when sampling.  A request with a ``logit_bias`` writes base tokens only, so that a banned
    token cannot come back inside a hypertoken and a favoured one means what it means for the base model.
    ``prompt_lookup``: the server's draft length (0: off).
    """
    from ..generation import GenerationOptions

    sample = temperature >= MIN_TEMPERATURE
    return GenerationOptions(
        max_new_tokens=max_tokens, max_new_base_tokens=max_tokens, do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_p=top_p if sample and top_p is not None and top_p < 1 else None,
        seed=seed if sample else None, stop_strings=tuple(stop or ()), logit_bias=dict(logit_bias or {}),
        allow_hypertokens=not logit_bias, prompt_lookup_num_tokens=prompt_lookup or None)


@dataclass(eq=False)
class Job:
    """One request: base token ids of the prompt and its options; ``emit`` receives events.

    options: made by :func:`request_options` (the server's draft length is set on them when the job
    joins).  ``started``: when it joined the batch (``None`` while it waits).
    """

    prompt_ids: list[int]
    options: GenerationOptions
    emit: Callable[[Piece | Finished], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None


def error_result(e: BaseException) -> Finished:
    return Finished("error", error=f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS])


def _result(row: Row, reason: str) -> Finished:
    job: Job = row.owner.job
    return Finished(_FINISH[reason], prompt_tokens=len(job.prompt_ids), prompt_codes=row.owner.prompt_codes,
                    completion_tokens=len(row.base_ids), completion_codes=len(row.codes),
                    hypertokens=row.hypertokens)


@dataclass(eq=False)
class _Request:
    """What the batch keeps of a request next to its decoder row (the row's ``owner``)."""

    job: Job
    prompt_codes: int


@dataclass
class _Joining:
    """A request reading its prompt: its own one-row session, the prompt's codes and how many are read."""

    session: Any
    codes: np.ndarray  # [1, T]
    row: Row
    done: int = 0
    logits: Any = None  # [1, V + C] after the last chunk

    @property
    def job(self) -> Job:
        owner: _Request = self.row.owner
        return owner.job

    def next_chunk(self, size: int) -> int:
        """Codes in the next chunk: chunks are cut at multiples of ``size`` from the prompt's start."""
        total = int(self.codes.shape[1])
        return total - self.done if not size else min(size, total - self.done)


class RunningBatch:
    """The requests being generated now: rows of one :class:`~hypervocab.generation.Decoder`.

    model: a :class:`~hypervocab.HyperModel` in eval mode; tokenizer: its base Hugging Face tokenizer;
    prompt_lookup: draft codes per step while one request is alone in the batch (0: off); prefill_chunk:
    prompt codes read per step for the requests joining (0: a whole prompt at once).  Not thread safe:
    one worker thread owns it.  :meth:`join` and :meth:`step` return the ``(job, Finished)`` of the
    requests that ended; the caller tells them.
    """

    def __init__(self, model: HyperModel, tokenizer: Any, *, prompt_lookup: int = 0, prefill_chunk: int = 64) -> None:
        from ..generation import Decoder, default_eos

        self.model, self.tokenizer = model, tokenizer
        self.V = model.codec.base_vocab_size
        self.default_eos = default_eos(model)
        self.prompt_lookup = prompt_lookup
        self.prefill_chunk = prefill_chunk
        self.joining: list[_Joining] = []  # reading their prompts, oldest first
        self.decoder = Decoder(self.V, compact=True)

    def __len__(self) -> int:
        """The rows decoding now (the requests still reading their prompts not counted)."""
        return len(self.decoder)

    @property
    def rows(self) -> list[Row]:
        """The decoder's rows (``row.owner.job``: the request)."""
        return self.decoder.rows

    @property
    def session(self) -> Any:
        """The rows' :class:`~hypervocab.session.HyperSession` (``None`` when no row decodes)."""
        return self.decoder.session

    @property
    def busy(self) -> bool:
        """Whether a step has anything to do: rows to decode, or prompts to read."""
        return bool(self.decoder.rows or self.joining)

    @property
    def jobs(self) -> list[Job]:
        """Every request the batch holds: the rows, then the ones reading their prompts."""
        return [r.owner.job for r in self.decoder.rows] + [j.job for j in self.joining]

    def join(self, jobs: list[Job]) -> list[tuple[Job, Finished]]:
        """Take the jobs in: each reads its prompt over the next steps (:meth:`step`), alone, then joins the rows."""
        ended: list[tuple[Job, Finished]] = []
        for job in jobs:
            job.started = time.monotonic()
            if job.cancelled.is_set():
                ended.append((job, Finished("cancelled")))
                continue
            try:
                self.joining.append(self._prefill(job))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                ended.append((job, error_result(e)))
        return ended

    def _read_prompts(self) -> list[tuple[Job, Finished]]:
        """Read one step's worth of prompt chunks (at least one chunk; then more while they fit in
        ``prefill_chunk`` codes), and move the requests whose prompts are read into the batch."""
        import torch

        from ..session import HyperSession

        ended: list[tuple[Job, Finished]] = []
        for j in [j for j in self.joining if j.job.cancelled.is_set()]:
            self.joining.remove(j)
            ended.append((j.job, Finished("cancelled")))
        used = 0
        for j in list(self.joining):
            n = j.next_chunk(self.prefill_chunk)
            if used and self.prefill_chunk and used + n > self.prefill_chunk:
                break
            try:
                chunk = j.codes[:, j.done: j.done + n]
                j.logits, _, _ = j.session.feed(chunk, np.ones_like(chunk))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
                self.joining.remove(j)
                ended.append((j.job, error_result(e)))
                continue
            j.done += n
            used += n
        ready = [j for j in self.joining if j.done == j.codes.shape[1]]
        if not ready:
            return ended
        self.joining = [j for j in self.joining if j.done < j.codes.shape[1]]
        try:
            session = HyperSession.concat([j.session for j in ready])
            self.decoder.join(session, torch.cat([j.logits for j in ready]), [j.row for j in ready])
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while the caches merge
            # the merge consumes the running rows' state too: they end as well
            return ended + [(j.job, error_result(e)) for j in ready] + self._fail_rows(e)
        return ended

    def _prefill(self, job: Job) -> _Joining:
        """The job's prompt as codes, its session (nothing read yet) and its decoder row."""
        import dataclasses

        import torch

        from ..errors import InputTypeError
        from ..generation import GenerationOptions, Row
        from ..streaming import OutputText

        model = self.model
        if not isinstance(job.options, GenerationOptions):
            raise InputTypeError(f"job.options must be a GenerationOptions, got {type(job.options).__name__}")
        options = job.options
        if options.prompt_lookup_num_tokens is None and self.prompt_lookup:
            options = dataclasses.replace(options, prompt_lookup_num_tokens=self.prompt_lookup)
        options.check_vocab(self.V)
        codes = np.asarray([model.codec.encode(job.prompt_ids)], np.int64)
        session = model.new_session(1)
        session.track_seen()  # every row's (rows merge their seen codes only if all track them): for penalties
        gen = (torch.Generator(device=session.device).manual_seed(options.seed)
               if options.do_sample and options.seed is not None else None)
        owner = _Request(job, int(codes.shape[1]))
        row: Row

        def emit(text: str, hyper: bool) -> None:
            try:
                job.emit(Piece(text, hyper, len(row.codes), len(row.base_ids)))
            except Exception:  # noqa: BLE001 - the caller is gone (e.g. its event loop closed): only its row leaves
                job.cancelled.set()

        text = OutputText(self.tokenizer, list(options.stop_strings or ()), emit=emit, skip_special_tokens=True)
        row = Row.start(model, options, owner=owner, eos=frozenset(options.eos_ids(self.V, self.default_eos)),
                        text=text, generator=gen)
        return _Joining(session, codes, row)

    def step(self) -> list[tuple[Job, Finished]]:
        """One code for every row (cancelled rows leave first; the rows that finish leave the batch), then
        one step's worth of the joining requests' prompts (those fully read join the rows)."""
        ended: list[tuple[Job, Finished]] = []
        if self.decoder.rows:
            gone = np.array([r.owner.job.cancelled.is_set() for r in self.decoder.rows], bool)
            ended += [(r.owner.job, _result(r, "cancelled")) for r in self.decoder.leave(gone, "cancelled")]
            ended += [(r.owner.job, _result(r, r.finish_reason or "length")) for r in self.decoder.step()]
        if self.joining:
            ended += self._read_prompts()
        return ended

    def fail(self, e: BaseException) -> list[tuple[Job, Finished]]:
        """Every request ends with the error ``e`` (a step failed: the batch's state is no longer known)."""
        ended = [(j.job, error_result(e)) for j in self.joining]
        self.joining = []
        return self._fail_rows(e) + ended

    def _fail_rows(self, e: BaseException) -> list[tuple[Job, Finished]]:
        return [(r.owner.job, error_result(e)) for r in self.decoder.clear()]
