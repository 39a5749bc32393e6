"""The generation worker behind the HTTP server: one queue, one request at a time, each fully isolated.

Requests wait in a bounded queue and one worker thread runs them in arrival order, so every request
has its own codebook, hypertoken tables and KV cache for the whole of its run (nothing is shared, so
nothing can leak between requests).  A request streams events back to its caller as its text becomes
final; a caller that goes away sets ``cancelled`` and the worker stops that generation at its next
step.  Stop strings are cut from the text the OpenAI way: the stop string itself is never sent, and
text that might still turn into one is held back until it cannot.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import HypervocabError

__all__ = ["Engine", "Job", "QueueFullError", "Piece", "Finished"]


class QueueFullError(HypervocabError, ValueError):
    """The server has as many requests waiting as its limit allows (HTTP 429)."""


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


@dataclass
class Job:
    """One request: base token ids of the prompt and generation options; ``emit`` receives events."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Piece | Finished], None]
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


class _Cancelled(Exception):
    pass


class _JobStreamer:
    """Streamer for :func:`~hypervocab.generation.generate`: text pieces, stop strings cut, cancellation."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        from ..generation import IncrementalDetokenizer

        self.job = job
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.prompt_seen = False
        self.codes = self.base_tokens = 0
        self.pending: list[tuple[str, bool]] = []  # final text held back: it may still become a stop string
        self.sent = ""
        self.stopped = False
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def put(self, value: Any) -> None:
        if self.job.cancelled.is_set():
            raise _Cancelled  # the caller has gone: stop at this step
        ids = value.reshape(-1).tolist()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.codes += 1
        self.base_tokens += len(ids)
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
            self.job.emit(Piece(part, hyper, self.codes, self.base_tokens))


class Engine:
    """Runs queued requests on one model in a worker thread.

    model: a :class:`~hypervocab.HyperModel` (eval mode); tokenizer: its base Hugging Face tokenizer;
    max_queue: requests allowed to wait (beyond it :meth:`submit` raises :class:`QueueFullError`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 32) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.served = self.cancelled = 0  # requests finished (stopped, length or error) / cancelled
        self._thread = threading.Thread(target=self._work, name="hypervocab-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFullError(f"{self._waiting} requests are already waiting (max_queue={self.max_queue}): "
                                     "retry later")
            self._waiting += 1
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            if job.cancelled.is_set():
                result = Finished("cancelled")
            else:
                try:
                    result = self._run(job)
                except _Cancelled:
                    result = Finished("cancelled")
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                    result = Finished("error", error=f"{type(e).__name__}: {e}")
            if result.finish_reason == "cancelled":
                self.cancelled += 1
            else:
                self.served += 1
            try:
                job.emit(result)
            except Exception:  # noqa: BLE001 - the caller is gone (e.g. its event loop closed): nothing to tell
                pass

    def _run(self, job: Job) -> Finished:
        import torch

        codec = self.model.codec
        codes = torch.as_tensor(codec.encode(job.prompt_ids), dtype=torch.long)[None]
        streamer = _JobStreamer(job, self.tokenizer)
        sample = job.temperature > 0
        out = self.model.generate(
            codes, torch.ones_like(codes), max_new_tokens=job.max_tokens, max_new_base_tokens=job.max_tokens,
            do_sample=sample, temperature=job.temperature if sample else 1.0,
            top_p=job.top_p if sample and job.top_p is not None and job.top_p < 1 else None,
            seed=job.seed, stop_strings=job.stop or None, tokenizer=self.tokenizer if job.stop else None,
            streamer=streamer, return_dict_in_generate=True)
        st = out.stats[0]
        reason = "stop" if st.finish_reason in ("eos", "stop_string") or streamer.stopped else "length"
        return Finished(reason, prompt_tokens=len(job.prompt_ids), prompt_codes=int(codes.shape[1]),
                        completion_tokens=st.base_tokens, completion_codes=st.codes, hypertokens=st.hypertokens)
