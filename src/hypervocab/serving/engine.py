"""The generation worker behind the HTTP server: one queue, one request at a time, each fully isolated.

Requests wait in a bounded queue and one worker thread runs them in arrival order, so every request
has its own codebook, hypertoken tables and KV cache for the whole of its run (nothing is shared, so
nothing can leak between requests).  A request streams events back to its caller as its text becomes
final; a caller that goes away sets ``cancelled`` and the worker stops that generation at its next
step.  Stop strings are cut from the text the OpenAI way: the stop string itself is never sent, and
text that might still turn into one is held back until it cannot.

A temperature below :data:`MIN_TEMPERATURE` is greedy: dividing the logits by it would overflow
float32 (1e-40 gives ``inf``, so ``nan`` probabilities), and sampling that cold is greedy anyway.
``logit_bias`` is added to the base tokens' logits, and such a request generates base tokens only
(see :class:`Job`).  :meth:`Engine.stats` gives the totals the server's ``/metrics`` reports.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import HypervocabError, check_int

__all__ = ["Engine", "Job", "QueueFullError", "Piece", "Finished", "MIN_TEMPERATURE"]

# below this a temperature is greedy: logits / 1e-40 overflow float32, and sampling this cold is greedy anyway
MIN_TEMPERATURE = 1e-5
_MAX_ERROR_CHARS = 300  # an error message quotes at most this much of an exception


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
    """One request: base token ids of the prompt and generation options; ``emit`` receives events.

    seed: ``None`` or an int in [0, 2**64); logit_bias: base id -> value added to its logit.  A request
    with a bias generates base tokens only (no hypertokens), so that a banned token cannot come back
    inside a hypertoken and a favoured one means what it means for the base model.
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


class _Cancelled(Exception):
    pass


class _JobStreamer:
    """Streamer for :func:`~hypervocab.generation.generate`: text pieces, stop strings cut, cancellation."""

    def __init__(self, job: Job, tokenizer: Any) -> None:
        from ..streaming import IncrementalDetokenizer

        self.job = job
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.prompt_seen = False
        self.codes = self.base_tokens = self.hypertokens = 0
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
            self.job.emit(Piece(part, hyper, self.codes, self.base_tokens))


class Engine:
    """Runs queued requests on one model in a worker thread.

    model: a :class:`~hypervocab.HyperModel` (eval mode); tokenizer: its base Hugging Face tokenizer;
    max_queue: requests allowed to wait (beyond it :meth:`submit` raises :class:`QueueFullError`);
    prompt_lookup: draft codes per step for speculative decoding (0: off; see :mod:`hypervocab.speculative`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 32, prompt_lookup: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self.prompt_lookup = check_int("prompt_lookup", prompt_lookup, minimum=0)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._closing = False
        self.served = self.cancelled = 0  # requests finished (stopped, length or error) / cancelled
        self._totals: dict[str, float] = dict.fromkeys(
            ("prompt_tokens", "prompt_codes", "completion_tokens", "completion_codes", "hypertokens",
             "queue_seconds", "run_seconds"), 0)
        self._reasons: dict[str, int] = {}
        self._mean_seconds = 0.0  # moving mean of a request's run time, for Retry-After
        self._thread = threading.Thread(target=self._work, name="hypervocab-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called: new requests are refused."""
        return self._closing

    @property
    def running(self) -> int:
        """Requests being generated now: 0 or 1 (the batch size of this one-at-a-time engine)."""
        return int(self._current is not None)

    def retry_after(self) -> int:
        """Seconds a client turned away by a full queue should wait: about one request's run time, 1 to 60."""
        return max(1, min(60, math.ceil(self._mean_seconds)))

    def stats(self) -> dict[str, Any]:
        """Totals since the start: tokens and codes (cancelled requests count what they used), requests by
        how they ended, seconds spent waiting and running; and the queue and batch now."""
        with self._lock:
            return {**self._totals, "finish_reasons": dict(self._reasons), "waiting": self._waiting,
                    "running": self.running, "served": self.served, "cancelled": self.cancelled}

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise QueueFullError("the server is shutting down: retry on another server")
            if self._waiting >= self.max_queue:
                raise QueueFullError(f"{self._waiting} requests are already waiting (max_queue={self.max_queue}): "
                                     "retry later")
            self._waiting += 1
        self._queue.put(job)

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running request and every queued one, and stop the worker (waits up to ``timeout`` s)."""
        with self._lock:
            self._closing = True
            if self._current is not None:
                self._current.cancelled.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _work(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                if self._closing:
                    job.cancelled.set()
                self._current = job
            start = time.monotonic()
            if job.cancelled.is_set():
                result = Finished("cancelled")
            else:
                try:
                    result = self._run(job)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                    result = Finished("error", error=f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS])
            took = time.monotonic() - start
            with self._lock:
                self._current = None
                if result.finish_reason == "cancelled":
                    self.cancelled += 1
                else:
                    self.served += 1
                    self._mean_seconds = took if not self._mean_seconds else 0.8 * self._mean_seconds + 0.2 * took
                self._reasons[result.finish_reason] = self._reasons.get(result.finish_reason, 0) + 1
                t = self._totals
                t["queue_seconds"] += start - job.submitted
                t["run_seconds"] += took
                for k in ("prompt_tokens", "prompt_codes", "completion_tokens", "completion_codes", "hypertokens"):
                    t[k] += getattr(result, k)
            # the caller may be gone (e.g. its event loop closed): then there is nobody to tell
            with contextlib.suppress(Exception):
                job.emit(result)

    def _run(self, job: Job) -> Finished:
        import torch

        codec = self.model.codec
        device = next(self.model.parameters()).device
        codes = torch.as_tensor(codec.encode(job.prompt_ids), dtype=torch.long, device=device)[None]
        streamer = _JobStreamer(job, self.tokenizer)
        sample = job.temperature >= MIN_TEMPERATURE
        hook = self._bias_hook(job.logit_bias) if job.logit_bias else None
        try:
            out = self.model.generate(
                codes, torch.ones_like(codes), max_new_tokens=job.max_tokens, max_new_base_tokens=job.max_tokens,
                do_sample=sample, temperature=job.temperature if sample else 1.0,
                top_p=job.top_p if sample and job.top_p is not None and job.top_p < 1 else None,
                seed=job.seed, stop_strings=job.stop or None, tokenizer=self.tokenizer if job.stop else None,
                streamer=streamer, allow_hypertokens=not job.logit_bias, return_dict_in_generate=True,
                prompt_lookup_num_tokens=self.prompt_lookup or None)
        except _Cancelled:
            return Finished("cancelled", prompt_tokens=len(job.prompt_ids), prompt_codes=int(codes.shape[1]),
                            completion_tokens=streamer.base_tokens, completion_codes=streamer.codes,
                            hypertokens=streamer.hypertokens)
        finally:
            if hook is not None:
                hook.remove()
        st = out.stats[0]
        reason = "stop" if st.finish_reason in ("eos", "stop_string") or streamer.stopped else "length"
        return Finished(reason, prompt_tokens=len(job.prompt_ids), prompt_codes=int(codes.shape[1]),
                        completion_tokens=st.base_tokens, completion_codes=st.codes, hypertokens=st.hypertokens)

    def _bias_hook(self, logit_bias: dict[int, float]) -> Any:
        """A forward hook on the model's head that adds the bias to the base ids' logits, for one request.

        Only this worker runs the model, one request at a time, so the hook sees this request's steps only."""
        import torch

        V = self.model.codec.base_vocab_size
        device = next(self.model.parameters()).device
        bias = torch.zeros(V, device=device)
        bias[torch.as_tensor(list(logit_bias), dtype=torch.long, device=device)] = torch.as_tensor(
            list(logit_bias.values()), device=device)

        def add(_module: Any, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            if out.shape[-1] >= V:
                out[..., :V] += bias.to(out.device, out.dtype)
            return out

        return self.model.head.register_forward_hook(add)
