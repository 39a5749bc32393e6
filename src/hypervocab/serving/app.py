"""An OpenAI-compatible HTTP API for a hypervocab model (FastAPI), with a live playground at ``/``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
both streaming with server-sent events when ``"stream": true``; ``GET /v1/models``; ``GET /health``.

``usage`` counts base tokens like any server, and adds what hypervocab actually processed:
``prompt_codes`` and ``completion_codes`` (and ``hypertokens``).  Streamed chunks carry a
``hypervocab`` object: the chunk's text as pieces flagged when a hypertoken wrote them, and running
totals, which is what the playground colours and counts.

Every error answers with OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, and a 4xx
status for anything the client can fix: malformed JSON, bad parameters, a prompt or ``max_tokens``
over the server's limits (400), an unknown model (404), a full queue (429).
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoint annotations, and the request
# models are local to create_app (pydantic is imported only when a server is built)
import asyncio
import html
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from ..errors import ConfigError

__all__ = ["ServeLimits", "create_app"]


@dataclass
class ServeLimits:
    """What one request may ask for; beyond it the server answers 400 (429 for the queue)."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_queue: int = 32

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")


def _fastapi() -> Any:
    try:
        import fastapi  # brings pydantic
    except ImportError:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'hypervocab[serve]'") from None
    return fastapi


class _APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def create_app(model: Any, tokenizer: Any, *, model_name: str = "hypervocab", limits: ServeLimits | None = None) -> Any:
    """A FastAPI app serving ``model`` (a :class:`~hypervocab.HyperModel`) with its base ``tokenizer``.

    Requests are queued and run one at a time by an :class:`~hypervocab.serving.engine.Engine`, each
    with its own codebook and cache.  ``app.state.engine`` is the engine (``engine.close()`` stops it).
    """
    fastapi = _fastapi()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    from .engine import Engine, Finished, Job, Piece, QueueFullError

    limits = limits or ServeLimits()
    engine = Engine(model.eval(), tokenizer, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        engine.close()  # the worker finishes its request and exits with the server

    app = fastapi.FastAPI(title="hypervocab", version=model.config.hypervocab_version, lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    class _Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = 1
        stream: bool = False
        stream_options: dict[str, Any] | None = None
        stop: str | list[str] | None = None
        seed: int | None = None
        user: str | None = None

    class CompletionRequest(_Common):
        prompt: str | list[str]
        echo: bool = False
        logprobs: int | None = None
        best_of: int | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "developer"]
        content: str | list[dict[str, Any]]

    class ChatRequest(_Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = None

    @app.exception_handler(_APIError)
    async def _api_error(_request: Request, e: _APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg, param = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {err.get('msg', 'invalid')}" + (
                f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else "")
        return JSONResponse(_APIError(400, msg, param=param, code="invalid_value").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:  # a bug: say so, keep serving
        return JSONResponse(_APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    def check_common(req: _Common, max_tokens: int | None, default: int) -> tuple[int, list[str]]:
        if req.model is not None and req.model != model_name:
            raise _APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                            param="model", code="model_not_found")
        if req.n != 1:
            raise _APIError(400, f"n must be 1 (one completion per request), got {req.n}", param="n")
        max_tokens = default if max_tokens is None else max_tokens
        if max_tokens > limits.max_tokens:
            raise _APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                            param="max_tokens", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise _APIError(400, f"stop must be up to 4 non-empty strings, got {req.stop!r}", param="stop")
        return max_tokens, stop

    def prompt_ids(text: str, *, special: bool) -> list[int]:
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise _APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise _APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                            f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        return ids

    async def run(request: Request, job_args: dict[str, Any], *, chat: bool, stream: bool,
                  include_usage: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Piece | Finished] = asyncio.Queue()
        job = Job(emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), **job_args)
        try:
            engine.submit(job)
        except QueueFullError as e:
            raise _APIError(429, str(e), code="rate_limit_exceeded", type="rate_limit_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"

        checked = [time.monotonic()]

        async def next_event() -> Piece | Finished | None:
            """The next event, or None once the client has gone (the job is then cancelled).

            The connection is checked at least every 0.25 s, also while events keep coming."""
            while True:
                if time.monotonic() - checked[0] >= 0.25:
                    checked[0] = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return None
                try:
                    return await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue

        def usage(f: Finished) -> dict[str, Any]:
            return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                    "total_tokens": f.prompt_tokens + f.completion_tokens, "prompt_codes": f.prompt_codes,
                    "completion_codes": f.completion_codes, "hypertokens": f.hypertokens}

        def failed(f: Finished) -> _APIError:
            return _APIError(500, f"generation failed: {f.error}", type="server_error")

        if not stream:
            text, pieces = [], []
            while True:
                ev = await next_event()
                if ev is None:
                    return JSONResponse({}, status_code=499)  # nobody is listening
                if isinstance(ev, Piece):
                    text.append(ev.text)
                    pieces.append([ev.text, ev.hyper])
                    continue
                if ev.finish_reason == "error":
                    raise failed(ev)
                choice: dict[str, Any] = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": "".join(text)}
                else:
                    choice["text"] = "".join(text)
                return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                        "choices": [choice], "usage": usage(ev), "hypervocab": {"pieces": pieces}}

        def chunk(choice: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": obj + (".chunk" if chat else ""),
                                    "created": int(time.time()), "model": model_name, "choices": [choice]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        async def sse() -> Any:
            try:
                if chat:
                    yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                while True:
                    ev = await next_event()
                    if ev is None:
                        return
                    if isinstance(ev, Piece):
                        delta = {"content": ev.text} if chat else None
                        choice = {"index": 0, "finish_reason": None, "logprobs": None,
                                  **({"delta": delta} if chat else {"text": ev.text})}
                        yield chunk(choice, {"hypervocab": {"pieces": [[ev.text, ev.hyper]], "codes": ev.codes,
                                                            "base_tokens": ev.base_tokens}})
                        continue
                    if ev.finish_reason == "error":
                        yield f"data: {json.dumps(failed(ev).body())}\n\n"
                        return
                    final = {"index": 0, "finish_reason": ev.finish_reason, "logprobs": None,
                             **({"delta": {}} if chat else {"text": ""})}
                    yield chunk(final, {"hypervocab": {"pieces": [], "codes": ev.completion_codes,
                                                       "base_tokens": ev.completion_tokens, "usage": usage(ev)}})
                    if include_usage:
                        body = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": int(time.time()),
                                "model": model_name, "choices": [], "usage": usage(ev)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                job.cancelled.set()  # a no-op once finished; stops the work when the client went away

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def sampling(req: _Common) -> dict[str, Any]:
        return {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.echo or req.logprobs or (req.best_of or 1) != 1:
            raise _APIError(400, "echo, logprobs and best_of are not supported", param="echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise _APIError(400, f"prompt must be one string, got a list of {len(prompts)}", param="prompt")
        max_tokens, stop = check_common(req, req.max_tokens, 16)
        ids = prompt_ids(prompts[0], special=True)
        return await run(request, {"prompt_ids": ids, "max_tokens": max_tokens, "stop": stop, **sampling(req)},
                         chat=False, stream=req.stream,
                         include_usage=bool((req.stream_options or {}).get("include_usage")))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        if req.logprobs:
            raise _APIError(400, "logprobs is not supported", param="logprobs")
        if not getattr(tokenizer, "chat_template", None):
            raise _APIError(400, f"model {model_name!r} has no chat template: use /v1/completions", param="messages")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens, stop = check_common(req, limit, min(limits.max_tokens, 256))
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise _APIError(400, f"messages[{i}].content: only text parts are supported",
                                    param=f"messages.{i}.content")
                content = "".join(p["text"] for p in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = prompt_ids(text, special=False)  # the template holds its special tokens
        return await run(request, {"prompt_ids": ids, "max_tokens": max_tokens, "stop": stop, **sampling(req)},
                         chat=True, stream=req.stream,
                         include_usage=bool((req.stream_options or {}).get("include_usage")))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hypervocab"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "waiting": engine.waiting, "served": engine.served,
                "cancelled": engine.cancelled}

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        page = resources.files("hypervocab.serving").joinpath("playground.html").read_text(encoding="utf-8")
        return page.replace("{{MODEL}}", html.escape(model_name))

    return app
