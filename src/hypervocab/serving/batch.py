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

A temperature below :data:`MIN_TEMPERATURE` is greedy: dividing the logits by it would overflow
float32 (1e-40 gives ``inf``, so ``nan`` probabilities), and sampling that cold is greedy anyway.
``logit_bias`` is added to the base tokens' logits, and such a request generates base tokens only
(see :class:`Job`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MIN_TEMPERATURE", "Finished", "Job", "Piece", "RunningBatch"]

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


@dataclass(eq=False)
class Job:
    """One request: base token ids of the prompt and generation options; ``emit`` receives events.

    seed: ``None`` or an int in [0, 2**64); logit_bias: base id -> value added to its logit.  A request
    with a bias generates base tokens only (no hypertokens), so that a banned token cannot come back
    inside a hypertoken and a favoured one means what it means for the base model.  ``started``: when
    it joined the batch (``None`` while it waits).
    """

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Piece | Finished], None]
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None


def error_result(e: BaseException) -> Finished:
    return Finished("error", error=f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS])


class _RowText:
    """One request's output text: decoded as codes come, stop strings cut, final pieces sent to ``emit``."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        from ..streaming import IncrementalDetokenizer

        self.job = job
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.codes = self.base_tokens = self.hypertokens = 0
        self.pending: list[tuple[str, bool]] = []  # final text held back: it may still become a stop string
        self.sent = ""
        self.stopped = False
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def push(self, ids: list[int]) -> None:
        """The base ids of one code just written."""
        self.codes += 1
        self.base_tokens += len(ids)
        self.hypertokens += len(ids) > 1
        self._add(self.detok.push(ids), len(ids) > 1)

    def end(self) -> None:
        self._add(self.detok.flush(), False)
        self._release(final=True)

    def _add(self, text: str, hyper: bool) -> None:
        if text and not self.stopped:
            self.pending.append((text, hyper))
            self._release(final=False)

    def _release(self, *, final: bool) -> None:
        if self.stopped:
            return
        held = "".join(t for t, _ in self.pending)
        whole = self.sent + held
        cut = min((i for i in (whole.find(s, max(0, len(self.sent) - len(s))) for s in self.job.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self._send(cut - len(self.sent))
            return
        self._send(len(held) if final else max(0, len(held) - self.hold))

    def _send(self, n: int) -> None:
        """Send the first ``n`` held-back characters, keeping each piece's hypertoken flag."""
        while n > 0 and self.pending:
            text, hyper = self.pending[0]
            part = text[:n]
            if len(part) == len(text):
                self.pending.pop(0)
            else:
                self.pending[0] = (text[len(part):], hyper)
            n -= len(part)
            self.sent += part
            try:
                self.job.emit(Piece(part, hyper, self.codes, self.base_tokens))
            except Exception:  # noqa: BLE001 - the caller is gone (e.g. its event loop closed): only its row leaves
                self.job.cancelled.set()
                self.pending.clear()
                return


@dataclass
class _Row:
    job: Job
    text: _RowText
    sampler: Any  # CodeSampler with the request's options
    prompt_codes: int
    reader: Any = None  # DraftReader with this request's own PromptLookup (drafts follow one sequence)

    def result(self, reason: str) -> Finished:
        t = self.text
        return Finished(reason, prompt_tokens=len(self.job.prompt_ids), prompt_codes=self.prompt_codes,
                        completion_tokens=t.base_tokens, completion_codes=t.codes, hypertokens=t.hypertokens)


@dataclass
class _Joining:
    """A request reading its prompt: its own one-row session, the prompt's codes and how many are read."""

    session: Any
    codes: np.ndarray  # [1, T]
    row: _Row
    done: int = 0
    logits: Any = None  # [1, V + C] after the last chunk

    def next_chunk(self, size: int) -> int:
        """Codes in the next chunk: chunks are cut at multiples of ``size`` from the prompt's start."""
        total = self.codes.shape[1]
        return total - self.done if not size else min(size, total - self.done)


class RunningBatch:
    """The requests being generated now, a row each of one :class:`~hypervocab.session.HyperSession`.

    model: a :class:`~hypervocab.HyperModel` in eval mode; tokenizer: its base Hugging Face tokenizer;
    prompt_lookup: draft codes per step while one request is alone in the batch (0: off); prefill_chunk:
    prompt codes read per step for the requests joining (0: a whole prompt at once).  Not thread safe:
    one worker thread owns it.  :meth:`join` and :meth:`step` return the ``(job, Finished)`` of the
    requests that ended; the caller tells them.
    """

    def __init__(self, model: Any, tokenizer: Any, *, prompt_lookup: int = 0, prefill_chunk: int = 64) -> None:
        from ..generation import default_eos
        from ..sampling import CodeSampler

        self.model, self.tokenizer = model, tokenizer
        self.V = model.codec.base_vocab_size
        eos = default_eos(model)
        self.eos = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}
        self.prompt_lookup = prompt_lookup
        self.prefill_chunk = prefill_chunk
        self.joining: list[_Joining] = []  # reading their prompts, oldest first
        self.rows: list[_Row] = []
        self.session: Any = None  # HyperSession of the rows, None when empty
        self.logits: Any = None  # [B, V + C] the next code's logits of every row
        self._masks = CodeSampler(self.V)  # what the session allows every row: budgets

    def __len__(self) -> int:
        """The rows decoding now (the requests still reading their prompts not counted)."""
        return len(self.rows)

    @property
    def busy(self) -> bool:
        """Whether a step has anything to do: rows to decode, or prompts to read."""
        return bool(self.rows or self.joining)

    @property
    def jobs(self) -> list[Job]:
        """Every request the batch holds: the rows, then the ones reading their prompts."""
        return [r.job for r in self.rows] + [j.row.job for j in self.joining]

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
        for j in [j for j in self.joining if j.row.job.cancelled.is_set()]:
            self.joining.remove(j)
            ended.append((j.row.job, Finished("cancelled")))
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
                ended.append((j.row.job, error_result(e)))
                continue
            j.done += n
            used += n
        ready = [j for j in self.joining if j.done == j.codes.shape[1]]
        if not ready:
            return ended
        self.joining = [j for j in self.joining if j.done < j.codes.shape[1]]
        parts, logits = [j.session for j in ready], [j.logits for j in ready]
        try:
            if self.session is not None:
                self._drop_draft()  # a draft is one sequence's: leave it before others join
                parts.insert(0, self.session)
                logits.insert(0, self.logits)
            session = HyperSession.concat(parts)
            session.compact()
            merged = torch.cat(logits)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory while the caches merge
            # concat consumes its parts: the running rows' state is no longer known either, so they end too
            return ended + [(j.row.job, error_result(e)) for j in ready] + self._fail_rows(e)
        self.session, self.logits = session, merged
        self.rows += [j.row for j in ready]
        return ended

    def _prefill(self, job: Job) -> _Joining:
        """The job's prompt as codes, its session (nothing read yet) and its row's options."""
        import torch

        from ..sampling import CodeSampler
        from ..speculative import DraftReader, PromptLookup

        model = self.model
        codes = np.asarray([model.codec.encode(job.prompt_ids)], np.int64)
        session = model.new_session(1)
        sample = job.temperature >= MIN_TEMPERATURE
        device = session.device
        gen = torch.Generator(device=device).manual_seed(job.seed) if sample and job.seed is not None else None
        bias = None
        if job.logit_bias:
            bias = torch.zeros(self.V, device=device)
            bias[torch.as_tensor(list(job.logit_bias), dtype=torch.long, device=device)] = torch.as_tensor(
                list(job.logit_bias.values()), device=device)
        sampler = CodeSampler(self.V, do_sample=sample, temperature=job.temperature if sample else 1.0,
                              top_p=job.top_p if sample and job.top_p is not None and job.top_p < 1 else None,
                              allow_hypertokens=not job.logit_bias, generator=gen, logit_bias=bias)
        reader = DraftReader(PromptLookup(model.codec, self.prompt_lookup)) if self.prompt_lookup else None
        return _Joining(session, codes, _Row(job, _RowText(job, self.tokenizer), sampler, int(codes.shape[1]), reader))

    @property
    def _reader(self) -> Any:
        """The drafting reader while one request with prompt lookup is alone in the batch, else ``None``."""
        return self.rows[0].reader if len(self.rows) == 1 else None

    def _drop_draft(self) -> None:
        if self.session is not None and self.session.ahead:
            self._reader.drop(self.session)

    def step(self) -> list[tuple[Job, Finished]]:
        """One code for every row (cancelled rows leave first; the rows that finish leave the batch), then
        one step's worth of the joining requests' prompts (those fully read join the rows)."""
        ended = self._decode() if self.rows else []
        if self.joining:
            ended += self._read_prompts()
        return ended

    def _decode(self) -> list[tuple[Job, Finished]]:
        ended = self._leave(np.array([r.job.cancelled.is_set() for r in self.rows], bool), "cancelled")
        if not self.rows:
            return ended
        session, rows, V = self.session, self.rows, self.V
        budget = np.array([r.job.max_tokens - r.text.base_tokens for r in rows], np.int64)
        reader = self._reader
        if session.ahead:  # one request, alone, reading a draft
            codes = reader.choose(rows[0].sampler, self.logits, session, budget)
        else:
            masked = self._masks.scores(self.logits, session, budget)
            codes = [r.sampler.pick(r.sampler.restrict(masked[i: i + 1]))[0] for i, r in enumerate(rows)]
        expansions = session.append(codes)
        reasons: list[str | None] = []
        for r, c, ids in zip(rows, codes, expansions):
            r.text.push(ids)
            stop = c < V and c in self.eos or r.text.stopped
            reasons.append("stop" if stop else "length" if r.text.base_tokens >= r.job.max_tokens else None)
        finished = np.array([x is not None for x in reasons], bool)
        logits = reader.taken(session, codes, finished) if reader is not None else None
        for r, reason in zip(rows, reasons):
            if reason is not None:
                r.text.end()
                ended.append((r.job, r.result(reason)))
        self._narrow(~finished)
        if self.rows and logits is None:
            reader = self._reader
            if reader is None:
                logits = self.session.advance()
            else:
                logits = reader.read(self.session, self.rows[0].job.max_tokens - self.rows[0].text.base_tokens)
        self.logits = logits
        return ended

    def fail(self, e: BaseException) -> list[tuple[Job, Finished]]:
        """Every request ends with the error ``e`` (a step failed: the batch's state is no longer known)."""
        ended = [(j.row.job, error_result(e)) for j in self.joining]
        self.joining = []
        return self._fail_rows(e) + ended

    def _fail_rows(self, e: BaseException) -> list[tuple[Job, Finished]]:
        ended = [(r.job, error_result(e)) for r in self.rows]
        self.rows, self.session, self.logits = [], None, None
        return ended

    def _leave(self, which: np.ndarray, reason: str) -> list[tuple[Job, Finished]]:
        if not which.any():
            return []
        ended = [(r.job, r.result(reason)) for r, w in zip(self.rows, which) if w]
        self._drop_draft()
        self._narrow(~which)
        return ended

    def _narrow(self, keep: np.ndarray) -> None:
        """Keep the rows ``keep`` (and their logits); the KV cache columns nobody reads go."""
        if keep.all():
            return
        self.rows = [r for r, k in zip(self.rows, keep) if k]
        if not self.rows:
            self.session = self.logits = None
            return
        idx = np.flatnonzero(keep)
        self.session = self.session.select(idx)
        self.session.compact()
        if self.logits is not None:
            self.logits = self.logits[idx]
