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

import contextlib
import math
import queue
import threading
import time
from typing import Any

from ..errors import HypervocabError, check_int
from .batch import MIN_TEMPERATURE, Finished, Job, Piece, RunningBatch

__all__ = ["Engine", "Job", "QueueFullError", "Piece", "Finished", "MIN_TEMPERATURE"]


class QueueFullError(HypervocabError, ValueError):
    """The server has as many requests waiting as its limit allows (HTTP 429)."""


class Engine:
    """Runs queued requests on one model in a worker thread, continuously batched.

    model: a :class:`~hypervocab.HyperModel` (eval mode); tokenizer: its base Hugging Face tokenizer;
    max_queue: requests allowed to wait (beyond it :meth:`submit` raises :class:`QueueFullError`);
    max_batch_size: requests generated at once (1: one at a time);
    prompt_lookup: draft codes per step of speculative decoding while a request is alone in the batch
    (0: off; see :mod:`hypervocab.speculative`).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 32, max_batch_size: int = 16,
                 prompt_lookup: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = check_int("max_queue", max_queue, minimum=1)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, minimum=1)
        self.prompt_lookup = check_int("prompt_lookup", prompt_lookup, minimum=0)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._current: list[Job] = []  # the jobs in the running batch (the worker updates it)
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
        """Requests being generated now: the running batch's size."""
        return len(self._current)

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
        """Cancel the running requests and every queued one, and stop the worker (waits up to ``timeout`` s)."""
        with self._lock:
            self._closing = True
            for job in self._current:
                job.cancelled.set()
        self._queue.put(None)
        self._thread.join(timeout=timeout)

    def _work(self) -> None:
        import torch

        torch.set_grad_enabled(False)  # grad mode is per thread
        batch = RunningBatch(self.model, self.tokenizer, prompt_lookup=self.prompt_lookup)
        stopping = False
        while not stopping or len(batch):
            jobs, stopping = self._take(block=not len(batch) and not stopping,
                                        room=self.max_batch_size - len(batch), stopping=stopping)
            start = time.monotonic()
            ended = batch.join(jobs)
            with self._lock:
                self._current = batch.jobs
                if self._closing:  # close() came while these joined
                    for job in self._current:
                        job.cancelled.set()
            if len(batch):
                try:
                    ended += batch.step()
                except Exception as e:  # noqa: BLE001 - a failed step ends the batch's requests, not the server
                    ended += batch.fail(e)
            took = time.monotonic() - start
            with self._lock:
                self._current = batch.jobs
                self._totals["run_seconds"] += took
            for job, result in ended:
                self._finish(job, result)

    def _take(self, *, block: bool, room: int, stopping: bool) -> tuple[list[Job], bool]:
        """Waiting jobs that may join now (at most ``room``; waits for one if ``block``), and whether the
        queue's end (``close``) was reached."""
        jobs: list[Job] = []
        while len(jobs) < room and not stopping:
            try:
                job = self._queue.get(block=block and not jobs)
            except queue.Empty:
                break
            if job is None:
                stopping = True
                break
            with self._lock:
                self._waiting -= 1
                if self._closing:
                    job.cancelled.set()
            jobs.append(job)
        return jobs, stopping

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
