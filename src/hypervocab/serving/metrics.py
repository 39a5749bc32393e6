"""``GET /metrics``: the server's counters in Prometheus' text exposition format (version 0.0.4).

HTTP responses by path and status; generations by how they ended; prompt and completion tokens,
counted both as base tokens and as the codes hypervocab actually processed; hypertokens and their
share of the completion codes; the queue, the running batch, and seconds spent waiting and running.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


class Metrics:
    """Counts HTTP responses (called by the guard middleware) and renders them with ``engine``'s totals."""

    def __init__(self, engine: Any, *, max_batch_size: int = 1) -> None:
        self.engine, self.max_batch_size = engine, max_batch_size
        self.http: dict[tuple[str, int], int] = {}

    def count(self, path: str, status: int) -> None:
        key = (path if path in _PATHS else "other", int(status))  # unknown paths share a label: bounded series
        self.http[key] = self.http.get(key, 0) + 1

    def render(self) -> str:
        s = self.engine.stats()
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP hypervocab_{name} {help}")
            out.append(f"# TYPE hypervocab_{name} {kind}")
            for labels, value in samples:
                out.append(f"hypervocab_{name}{labels} {_number(value)}")

        metric("http_requests_total", "counter", "HTTP responses by path and status code.",
               [(f'{{path="{p}",status="{c}"}}', n) for (p, c), n in sorted(self.http.items())])
        reasons = {"stop": 0, "length": 0, "cancelled": 0, "error": 0, **s["finish_reasons"]}
        metric("generations_total", "counter", "Generations by how they ended: stop, length, cancelled or error.",
               [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(reasons.items())])
        for name, help in (("prompt_tokens", "Prompt tokens read, in base tokens."),
                           ("prompt_codes", "Prompt codes the model read (the prompt compressed)."),
                           ("completion_tokens", "Completion tokens written, in base tokens."),
                           ("completion_codes", "Completion codes generated: decoding steps."),
                           ("hypertokens", "Completion codes that were hypertokens.")):
            metric(f"{name}_total", "counter", help, [("", s[name])])
        share = s["hypertokens"] / s["completion_codes"] if s["completion_codes"] else 0.0
        metric("hypertoken_share", "gauge", "Share of completion codes that were hypertokens, since the start.",
               [("", share)])
        metric("queue_length", "gauge", "Requests waiting for the engine.", [("", s["waiting"])])
        metric("batch_size", "gauge", "Requests being generated now, in one batch.", [("", s["running"])])
        metric("max_batch_size", "gauge", "Most requests the engine generates at once.", [("", self.max_batch_size)])
        metric("queue_seconds_total", "counter", "Seconds requests spent waiting in the queue.",
               [("", s["queue_seconds"])])
        metric("generation_seconds_total", "counter", "Seconds the engine spent generating.", [("", s["run_seconds"])])
        return "\n".join(out) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
