"""An OpenAI-compatible HTTP API for a hypervocab model (FastAPI), with a live playground at ``/``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
both streaming with server-sent events when ``"stream": true``; ``GET /v1/models``; ``GET /health``;
``GET /metrics`` (Prometheus text format).

``usage`` counts base tokens like any server, and adds what hypervocab actually processed:
``prompt_codes`` and ``completion_codes`` (and ``hypertokens``).  Streamed chunks carry a
``hypervocab`` object: the chunk's text as pieces flagged when a hypertoken wrote them, and running
totals, which is what the playground colours and counts.  A stream always ends with ``data: [DONE]``,
also after an error event.

Every error answers with OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for
malformed JSON, bad or unsupported parameters, a prompt or ``max_tokens`` over the server's limits;
401 without the API key; 404 for an unknown model or path; 405; 408 for a body that does not arrive
in time; 413 for a body over the size limit; 415 for a body that is not JSON; 429 (with
``Retry-After``) for a full queue; 503 while shutting down.  Request bodies are parsed and prompts
tokenized in worker threads, never on the event loop.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoint annotations, and the request
# models are built only when an app is (pydantic is imported by create_app, not by this module)
import asyncio
import base64
import hashlib
import html
import json
import math
import re
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, check_int
from .batch import Finished, Job, Piece
from .engine import Engine, QueueFullError
from .http import LOOPBACK_HOSTS, APIError, Guard, clip, encode_json, short
from .metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from .schema import Prepared

__all__ = ["LOOPBACK_HOSTS", "ServeLimits", "create_app"]

PARSE_THREADS = 2  # request bodies parsed and prompts tokenized at once, off the event loop
_OPEN_PATHS = {"/health", "/"}  # served without the API key: a liveness probe, and the page that asks for it
_API_KEY_FIELD = ('  <label>API key <input type="password" id="api_key" autocomplete="off" '
                  'spellcheck="false"></label>\n')


@dataclass
class ServeLimits:
    """What one request may ask for and send; beyond it the server answers 4xx.

    max_prompt_tokens: longest prompt in base tokens (400); max_tokens: largest ``max_tokens`` (400);
    max_queue: requests waiting (429 beyond); max_body_bytes: largest request body (413);
    read_timeout: seconds from the headers to the end of the body (408); max_batch_size: requests
    generated at once, in one continuously batched forward per step (1: one at a time).
    """

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_queue: int = 32
    max_body_bytes: int = 2 * 1024 * 1024
    read_timeout: float = 30.0
    max_batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_queue", "max_body_bytes", "max_batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        v = self.read_timeout
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"read_timeout must be a finite number of seconds > 0, got {v!r}")


def _fastapi() -> Any:
    try:
        import fastapi  # brings pydantic
    except ImportError:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'hypervocab[serve]'") from None
    return fastapi


def _csp(page: str) -> str:
    """A Content-Security-Policy allowing exactly the page's inline script and style (by hash), nothing else."""
    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _check_api_key(api_key: str | None) -> None:
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or api_key != api_key.strip()
                                or not api_key.isprintable() or not api_key.isascii()):
        raise ConfigError("api_key must be a non-empty string of printable ASCII without surrounding spaces")


def _playground_page(model_name: str, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The playground page for this server, and the headers it is served with."""
    page = resources.files("hypervocab.serving").joinpath("playground.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL}}", html.escape(model_name)).replace("{{API_KEY_FIELD}}",
                                                                      _API_KEY_FIELD if api_key else "")
    return page, {"Content-Security-Policy": _csp(page), "Cache-Control": "no-store"}


def _lifespan(engine: Engine, pool: ThreadPoolExecutor) -> Any:
    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        engine.close(timeout=10)  # cancels what is still running or queued; the worker exits
        pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


def _error_response(e: APIError) -> Any:
    from fastapi.responses import Response

    return Response(encode_json(e.body()), status_code=e.status, media_type="application/json", headers=e.headers)


def _add_error_handlers(app: Any) -> None:
    """Answer every error with OpenAI's body: ours, routing's (404, 405), and what FastAPI could not read."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> Response:
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> Response:
        where = f"{request.method} {short(request.url.path)}"
        if e.status_code == 404:
            msg = f"Invalid URL ({where}): this server has POST /v1/completions, POST /v1/chat/completions, " \
                  "GET /v1/models, GET /health, GET /metrics and GET /"
        elif e.status_code == 405:
            msg = f"method {request.method} is not allowed on {short(request.url.path)} " \
                  f"(allowed: {(e.headers or {}).get('Allow', '?')})"
        else:
            msg = f"{where}: {e.detail}"
        return _error_response(APIError(e.status_code, msg, headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> Response:  # no endpoint declares a body
        err = e.errors()[0] if e.errors() else {}
        param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
        return _error_response(APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param=param))


class _Completion:
    """One completion request being answered: its job's events in, OpenAI's body (whole or streamed) out."""

    def __init__(self, request: Any, job: Job, events: asyncio.Queue[Piece | Finished], prepared: "Prepared", *,
                 chat: bool, model_name: str, withdraw: Any) -> None:
        self.request, self.job, self.events, self.prepared = request, job, events, prepared
        self.withdraw = withdraw
        self.chat, self.model_name = chat, model_name
        self.rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.obj = "chat.completion" if chat else "text_completion"
        self._checked = time.monotonic()

    async def next_event(self) -> Piece | Finished | None:
        """The next event, or None once the client has gone (the job is then cancelled).

        The connection is checked at least every 0.25 s, also while events keep coming."""
        while True:
            if time.monotonic() - self._checked >= 0.25:
                self._checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.withdraw(self.job)  # a queued job gives its place back now
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                continue

    @staticmethod
    def usage(f: Finished) -> dict[str, Any]:
        return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens, "prompt_codes": f.prompt_codes,
                "completion_codes": f.completion_codes, "hypertokens": f.hypertokens}

    @staticmethod
    def failed(f: Finished) -> APIError:
        return APIError(500, f"generation failed: {f.error}", type="server_error")

    async def whole(self) -> Any:
        """The answer in one body, once the job has finished."""
        from fastapi.responses import JSONResponse

        try:
            text, pieces = [], []
            while True:
                ev = await self.next_event()
                if ev is None:
                    return JSONResponse({}, status_code=499)  # nobody is listening
                if isinstance(ev, Piece):
                    text.append(ev.text)
                    pieces.append([ev.text, ev.hyper])
                    continue
                if ev.finish_reason == "error":
                    raise self.failed(ev)
                if ev.finish_reason == "cancelled":  # the server is shutting down
                    raise APIError(503, "the request was cancelled: the server is shutting down",
                                   type="server_error", code="shutting_down")
                choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": "".join(text)}
                else:
                    choice["text"] = "".join(text)
                return {"id": self.rid, "object": self.obj, "created": int(time.time()), "model": self.model_name,
                        "choices": [choice], "usage": self.usage(ev), "hypervocab": {"pieces": pieces}}
        finally:
            self.withdraw(self.job)  # a no-op once finished; stops the work if this task was cancelled (shutdown)

    def streamed(self) -> Any:
        """The answer as server-sent events, while the job runs."""
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self._sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _chunk(self, choice: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"id": self.rid, "object": self.obj + (".chunk" if self.chat else ""),
                                "created": int(time.time()), "model": self.model_name, "choices": [choice]}
        if extra:
            body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    @staticmethod
    def _error_event(e: APIError) -> str:
        return f"data: {encode_json(e.body()).decode()}\n\ndata: [DONE]\n\n"

    async def _sse(self) -> Any:
        chat = self.chat
        try:
            if chat:
                yield self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            while True:
                ev = await self.next_event()
                if ev is None:
                    return
                if isinstance(ev, Piece):
                    delta = {"content": ev.text} if chat else None
                    choice = {"index": 0, "finish_reason": None, "logprobs": None,
                              **({"delta": delta} if chat else {"text": ev.text})}
                    yield self._chunk(choice, {"hypervocab": {"pieces": [[ev.text, ev.hyper]], "codes": ev.codes,
                                                              "base_tokens": ev.base_tokens}})
                    continue
                if ev.finish_reason == "error":
                    yield self._error_event(self.failed(ev))
                    return
                if ev.finish_reason == "cancelled":
                    yield self._error_event(APIError(503, "the request was cancelled: the server is shutting down",
                                                     type="server_error", code="shutting_down"))
                    return
                final = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None,
                         **({"delta": {}} if chat else {"text": ""})}
                yield self._chunk(final, {"hypervocab": {"pieces": [], "codes": ev.completion_codes,
                                                         "base_tokens": ev.completion_tokens, "usage": self.usage(ev)}})
                if self.prepared.include_usage:
                    body = {"id": self.rid, "object": self.obj + (".chunk" if chat else ""),
                            "created": int(time.time()), "model": self.model_name, "choices": [],
                            "usage": self.usage(ev)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
        except Exception as e:  # noqa: BLE001 - a bug; the stream still ends the way clients expect
            yield self._error_event(APIError(500, f"internal error: {type(e).__name__}: {clip(str(e))}",
                                             type="server_error"))
        finally:
            self.withdraw(self.job)  # a no-op once finished; stops the work when the client went away


class _Handlers:
    """What the endpoints do, with what they share: the engine, the request parser and its thread pool."""

    def __init__(self, engine: Engine, metrics: Metrics, parser: Any, pool: ThreadPoolExecutor, *, model_name: str,
                 api_key: str | None) -> None:
        self.engine, self.metrics, self.parser, self.pool = engine, metrics, parser, pool
        self.model_name = model_name
        self.created = int(time.time())
        self.page, self.page_headers = _playground_page(model_name, api_key)
        # as many parses at once as the pool has threads: the rest wait here, on the event loop, where a
        # departed client is noticed before its body is parsed
        self.parsing = asyncio.Semaphore(PARSE_THREADS)

    async def prepare(self, request: Any, parse: Any) -> "Prepared":
        ctype = request.headers.get("content-type")
        mime = (ctype or "").split(";", 1)[0].strip().lower()
        if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
            # also a defence: a browser sends a cross-site form, text/plain or a bodyless-type post (a Blob,
            # sendBeacon) without asking first
            raise APIError(415, f"Content-Type must be application/json, got {short(ctype) if ctype else 'none'}",
                           code="unsupported_media_type")
        body = await request.body()  # already read (and limited) by the guard
        # at most a few parses at once: each holds a whole body, and many large ones would starve the rest
        async with self.parsing:
            if await request.is_disconnected():  # its client left while it waited: nobody wants the answer
                raise APIError(499, "the client closed the connection before its request was read",
                               code="client_closed")
            return await asyncio.get_running_loop().run_in_executor(self.pool, parse, body)

    async def run(self, request: Any, prepared: "Prepared", *, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Piece | Finished] = asyncio.Queue()
        job = Job(prepared.prompt_ids, prepared.options, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            self.engine.submit(job)
        except QueueFullError as e:
            if self.engine.closing:
                raise APIError(503, str(e), type="server_error", code="shutting_down",
                               headers={"Retry-After": "5"}) from None
            raise APIError(429, str(e), code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": str(self.engine.retry_after())}) from None
        completion = _Completion(request, job, events, prepared, chat=chat, model_name=self.model_name,
                                 withdraw=self.engine.withdraw)
        return completion.streamed() if prepared.stream else await completion.whole()


def _add_routes(app: Any, h: _Handlers) -> None:
    """The endpoints, as FastAPI reads them: their names, parameters and return annotations matter to it."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, Response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await h.run(request, await h.prepare(request, h.parser.completion), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await h.run(request, await h.prepare(request, h.parser.chat), chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": h.model_name, "object": "model", "created": h.created,
                                            "owned_by": "hypervocab"}]}

    @app.get("/health")
    async def health() -> Any:
        from fastapi.responses import JSONResponse

        engine = h.engine
        body = {"status": "ok", "model": h.model_name, "waiting": engine.waiting, "running": engine.running,
                "served": engine.served, "cancelled": engine.cancelled}
        if not engine.alive or engine.closing:  # load balancers: send nothing here
            body["status"] = "shutting_down" if engine.closing else "worker_stopped"
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(h.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(h.page, headers=h.page_headers)


def create_app(model: Any, tokenizer: Any, *, model_name: str = "hypervocab", limits: ServeLimits | None = None,
               api_key: str | None = None, allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
               prompt_lookup: int = 0, allowed_origins: Sequence[str] | None = None, prefill_chunk: int = 64) -> Any:
    """A FastAPI app serving ``model`` (a :class:`~hypervocab.HyperModel`) with its base ``tokenizer``.

    Requests are queued and generated together, joining and leaving one running batch at step
    boundaries (:class:`~hypervocab.serving.engine.Engine`), each with its own codebook, cache and
    options.  ``app.state.engine`` is the engine (``engine.close()`` stops it).

    api_key: clients must send ``Authorization: Bearer <api_key>`` (all paths but ``/health`` and the
    playground page ``/``); allowed_hosts: the names the ``Host`` header may give (``*.example.com``
    patterns; ``"*"`` or ``None``: any), the loopback names by default, against DNS rebinding;
    prompt_lookup: draft codes per step of speculative decoding for a request alone in the batch (0: off);
    allowed_origins: web origins (``https://app.example.com``) whose pages may POST here; ``None``: only the
    server's own (its playground), ``["*"]``: any.  Browsers' other cross-site POSTs get 403.
    prefill_chunk: prompt codes a joining request reads per step, between the running streams' steps (0: its
    whole prompt at once).
    """
    fastapi = _fastapi()
    from .schema import RequestParser

    limits = limits or ServeLimits()
    _check_api_key(api_key)
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else [h.strip().lower() for h in allowed_hosts]
    engine = Engine(model.eval(), tokenizer, max_queue=limits.max_queue, max_batch_size=limits.max_batch_size,
                    prompt_lookup=prompt_lookup, prefill_chunk=prefill_chunk)
    metrics = Metrics(engine, max_batch_size=limits.max_batch_size)
    parser = RequestParser(tokenizer, model_name=model_name, vocab_size=model.codec.base_vocab_size, limits=limits)
    # JSON parsing and tokenizing run here, off the event loop (the tokenizer releases the GIL)
    pool = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="hypervocab-parse")
    app = fastapi.FastAPI(title="hypervocab", version=model.config.hypervocab_version,
                          lifespan=_lifespan(engine, pool), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, read_timeout=limits.read_timeout,
                       allowed_hosts=hosts, api_key=api_key, open_paths=_OPEN_PATHS, count=metrics.count,
                       allowed_origins=None if allowed_origins is None else [o.rstrip("/") for o in allowed_origins],
                       get_paths=("/", "/health", "/metrics", "/v1/models"))
    _add_error_handlers(app)
    _add_routes(app, _Handlers(engine, metrics, parser, pool, model_name=model_name, api_key=api_key))
    return app
