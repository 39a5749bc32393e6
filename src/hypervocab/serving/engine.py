"""The generation worker behind the HTTP server: a bounded queue and one continuously batched worker.

Requests wait in a bounded queue; one worker thread owns a :class:`~hypervocab.serving.batch.RunningBatch`
and, at every step boundary, lets waiting requests join it (up to ``max_batch_size`` rows) and runs
one decoding step for every row.  Each request keeps its own codebook, hypertoken tables and KV cache
rows, its own sampling options, stop strings and budget, and streams events back to its caller as its
text becomes final; a caller that goes away sets ``cancelled`` and the request leaves the batch at the
next step.  ``max_batch_size=1`` runs requests one at a time.  :meth:`Engine.stats` gives the totals
the server's ``/metrics`` reports.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from typing import Any

from ..errors import HypervocabError, check_int
from .batch import MIN_TEMPERATURE, Finished, Job, Piece, RunningBatch, error_result

__all__ = ["Engine", "Job", "QueueFullError", "Piece", "Finished", "MIN_TEMPERATURE"]


class QueueFullError(HypervocabError, ValueError):
    """The server has as many requests waiting as its limit allows (HTTP 429)."""


class Engine:
    """Runs queued requests on one model in a worker thread, continuously batched.

    model: a :class:`~hypervocab.HyperModel` (eval mode); tokenizer: its base Hugging Face tokenizer;
    max_queue: requests allowed to wait (beyond it :meth:`submit` raises :class:`QueueFullError`);
    max_batch_size: requests generated at once (1: one at a time);
    prompt_lookup: draft codes per step of speculative decoding while a request is alone in the batch
    (0: off; see :mod:`hypervocab.speculative`); prefill_chunk: prompt codes read per step for the requests
    joining, between the running rows' decoding steps (0: a whole prompt at once, pausing every running stream
    for as long as it takes).

    Failures never stop the worker: a request whose prompt cannot be read ends with an error; a failure
    while requests join the batch (an out-of-memory merging the caches) or during a step ends the
    requests whose state it touched with an error, and the worker goes on with the next.  :attr:`alive`
    says whether the worker runs (``/health`` answers 503 when it does not).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 32, max_batch_size: int = 16,
                 prompt_lookup: int = 0, prefill_chunk: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = check_int("max_queue", max_queue, minimum=1)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        self.prompt_lookup = check_int("prompt_lookup", prompt_lookup, minimum=0)
        self.prefill_chunk = check_int("prefill_chunk", prefill_chunk, minimum=0)
        self._queue: collections.deque[Job] = collections.deque()  # waiting jobs, oldest first
        self._wake = threading.Condition()  # guards the queue, _closing, _draining and _current
        self._lock = self._wake  # one lock for all the engine's shared state
        self._current: list[Job] = []  # the jobs in the running batch (the worker updates it)
        self._closing = False  # close(): refuse, cancel everything, stop the worker
        self._draining = False  # drain(): refuse, cancel the queue, let the running requests finish
        self.served = self.cancelled = 0  # requests finished (stopped, length or error) / cancelled
        self._totals: dict[str, float] = dict.fromkeys(
            ("prompt_tokens", "prompt_codes", "completion_tokens", "completion_codes", "hypertokens",
             "queue_seconds", "run_seconds"), 0)
        self._reasons: dict[str, int] = {}
        self._mean_seconds = 0.0  # moving mean of a request's run time, for Retry-After
        self.worker_error: str | None = None  # what stopped the worker, if anything ever does
        self._thread = threading.Thread(target=self._work, name="hypervocab-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests in the queue whose callers are still there."""
        with self._lock:
            return sum(not j.cancelled.is_set() for j in self._queue)

    @property
    def closing(self) -> bool:
        """True once :meth:`close` or :meth:`drain` was called: new requests are refused."""
        return self._closing or self._draining

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it only stops after :meth:`close`)."""
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        """Requests being generated now: the running batch's size."""
        return len(self._current)

    def retry_after(self) -> int:
        """Seconds a client turned away by a full queue should wait, 1 to 60: the time for the requests ahead
        of it to get a row, from the measured mean run time of a request and the batch size."""
        ahead = self.waiting + 1
        rounds = math.ceil(ahead / self.max_batch_size)
        return max(1, min(60, math.ceil(self._mean_seconds * rounds)))

    def stats(self) -> dict[str, Any]:
        """Totals since the start: tokens and codes (cancelled requests count what they used), requests by
        how they ended, seconds spent waiting and running; and the queue and batch now."""
        waiting = self.waiting
        with self._lock:
            return {**self._totals, "finish_reasons": dict(self._reasons), "waiting": waiting,
                    "running": self.running, "served": self.served, "cancelled": self.cancelled}

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFullError` when the queue is full or the server is stopping.

        Jobs whose callers left (``cancelled``) give their place back at once: they are withdrawn here,
        and by :meth:`withdraw` when the caller notices first."""
        gone: list[Job] = []
        with self._wake:
            if self._closing or self._draining:
                raise QueueFullError("the server is shutting down: retry on another server")
            if len(self._queue) >= self.max_queue:
                gone = [j for j in self._queue if j.cancelled.is_set()]
                self._queue = collections.deque(j for j in self._queue if not j.cancelled.is_set())
            if len(self._queue) >= self.max_queue:
                self._end_all(gone)
                raise QueueFullError(f"{len(self._queue)} requests are already waiting (max_queue={self.max_queue}): "
                                     "retry later")
            self._queue.append(job)
            self._wake.notify()
        self._end_all(gone)

    def withdraw(self, job: Job) -> None:
        """The caller of ``job`` left: cancel it, and if it still waits, take it out of the queue now."""
        job.cancelled.set()
        with self._wake:
            if not any(j is job for j in self._queue):
                return  # it runs (it leaves the batch at the next step) or it ended
            self._queue = collections.deque(j for j in self._queue if j is not job)
        self._end_all([job])

    def drain(self, grace: float) -> threading.Thread:
        """Stop admitting (:meth:`submit` raises), end every queued request as cancelled now, and let the
        running ones finish for up to ``grace`` seconds; then cancel those too.  Returns the timer thread
        (joined, it has done all of that).  What a shutdown signal calls before the server closes."""
        with self._wake:
            self._draining = True
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            job.cancelled.set()
        self._end_all(queued)

        def later() -> None:
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.running:
                time.sleep(0.02)
            with self._lock:
                for job in self._current:
                    job.cancelled.set()

        timer = threading.Thread(target=later, name="hypervocab-drain", daemon=True)
        timer.start()
        return timer

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running requests and every queued one, and stop the worker (waits up to ``timeout`` s)."""
        with self._wake:
            self._closing = True
            for job in self._current:
                job.cancelled.set()
            queued = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        for job in queued:
            job.cancelled.set()
        self._end_all(queued)
        self._thread.join(timeout=timeout)

    def _end_all(self, jobs: list[Job]) -> None:
        """Tell the callers of jobs that never ran that they were cancelled."""
        for job in jobs:
            self._finish(job, Finished("cancelled"))

    def _work(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread
        batch = RunningBatch(self.model, self.tokenizer, prompt_lookup=self.prompt_lookup,
                             prefill_chunk=self.prefill_chunk)
        while True:
            jobs = self._take(block=not batch.busy, room=self.max_batch_size - len(batch.jobs))
            if jobs is None:  # closed: the running rows leave as cancelled, with what they used
                for job in batch.jobs:
                    job.cancelled.set()
                try:
                    ended = batch.step() if batch.busy else []
                except Exception as e:  # noqa: BLE001
                    ended = batch.fail(e)
                with self._lock:
                    self._current = batch.jobs
                for job, result in ended:
                    self._finish(job, result)
                return
            start = time.monotonic()
            ended: list[tuple[Job, Finished]] = []
            try:
                ended += batch.join(jobs)
                with self._lock:
                    self._current = batch.jobs
                    if self._closing:  # close() came while these joined
                        for job in self._current:
                            job.cancelled.set()
                if batch.busy:
                    ended += batch.step()
            except Exception as e:  # noqa: BLE001 - a failure ends the requests it touched, never the worker
                known = {id(j) for j, _ in ended} | {id(j) for j in batch.jobs}
                ended += [(j, error_result(e)) for j in jobs if id(j) not in known]  # joined nowhere
                ended += batch.fail(e)
            took = time.monotonic() - start
            with self._lock:
                self._current = batch.jobs
                self._totals["run_seconds"] += took
            for job, result in ended:
                self._finish(job, result)

    def _take(self, *, block: bool, room: int) -> list[Job] | None:
        """Waiting jobs that may join now (at most ``room``; waits for one if ``block``); ``None`` once closed."""
        with self._wake:
            while block and not self._queue and not self._closing:
                self._wake.wait()
            if self._closing:
                return None
            jobs = []
            while self._queue and len(jobs) < room:
                jobs.append(self._queue.popleft())
            return jobs

    def _finish(self, job: Job, result: Finished) -> None:
        """Count a request that ended, and tell its caller."""
        end = time.monotonic()
        started = job.started if job.started is not None else end
        with self._lock:
            if result.finish_reason == "cancelled":
                self.cancelled += 1
            else:
                self.served += 1
                took = end - started
                self._mean_seconds = took if not self._mean_seconds else 0.8 * self._mean_seconds + 0.2 * took
            self._reasons[result.finish_reason] = self._reasons.get(result.finish_reason, 0) + 1
            t = self._totals
            t["queue_seconds"] += started - job.submitted
            for k in ("prompt_tokens", "prompt_codes", "completion_tokens", "completion_codes", "hypertokens"):
                t[k] += getattr(result, k)
        # the caller may be gone (e.g. its event loop closed): then there is nobody to tell
        with contextlib.suppress(Exception):
            job.emit(result)
