"""Reading a request body into a generation job: JSON, OpenAI's fields, limits, the prompt's tokens.

:class:`RequestParser` does all of it, off the event loop (the server calls it in a thread): parsing
a large body and tokenizing a long prompt take real time.  Every error is an :class:`APIError` that
names the field, shows the value (cut short) and says what is allowed.

Fields are handled one of three ways; none is accepted and ignored:

* implemented: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (``max_completion_tokens``),
  ``temperature``, ``top_p``, ``n`` (1), ``stream``, ``stream_options.include_usage``, ``stop``,
  ``seed``, ``logit_bias``; and the end-user identifiers ``user``, ``safety_identifier``,
  ``prompt_cache_key``, which change no output (as with OpenAI);
* known to OpenAI but not implemented (:data:`NEUTRAL`): accepted only with the value that means "off"
  (``frequency_penalty: 0``, ``tools: []``, ``response_format: {"type": "text"}``, ...), otherwise 400;
* anything else: 400, unknown field.

This module imports pydantic: the server imports it only when an app is built.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .batch import request_options
from .http import APIError, clip, short

if TYPE_CHECKING:
    from ..generation import GenerationOptions

__all__ = ["NEUTRAL", "Prepared", "RequestParser", "SEED_RANGE"]

SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a signed 64-bit integer
BIAS_RANGE = (-100, 100)
MAX_STOP_CHARS = 256  # a stop string's text is held back from a stream until it cannot be a stop any more
_SURROGATE = re.compile("[\ud800-\udfff]")


def _off(*values: Any) -> Callable[[Any], bool]:
    """A test that a value is null or one of ``values`` (types matter: ``false`` is not ``0``)."""
    def test(v: Any) -> bool:
        if v is None:
            return True
        for a in values:
            same_type = type(v) is type(a) or (type(v) in (int, float) and type(a) in (int, float))
            if same_type and v == a:
                return True
        return False
    return test


def _any_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


# OpenAI fields this server does not implement: (accepted when, what is allowed, why)
NEUTRAL: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "frequency_penalty": (_off(0), "0", "penalties are not implemented"),
    "presence_penalty": (_off(0), "0", "penalties are not implemented"),
    "logprobs": (_off(False, 0), "null, false or 0", "log probabilities are not returned"),
    "top_logprobs": (_off(0), "null or 0", "log probabilities are not returned"),
    "echo": (_off(False), "false", "the prompt is not echoed"),
    "best_of": (_off(1), "1", "one completion is generated per request"),
    "suffix": (_off(""), "null or an empty string", "insertion is not supported"),
    "tools": (_off([]), "null or []", "tool calling is not supported"),
    "tool_choice": (_off("none"), "null or \"none\"", "tool calling is not supported"),
    "functions": (_off([]), "null or []", "function calling is not supported"),
    "function_call": (_off("none"), "null or \"none\"", "function calling is not supported"),
    "parallel_tool_calls": (_any_bool, "a boolean", "it has no effect without tools"),
    "response_format": (_off({"type": "text"}), "null or {\"type\": \"text\"}", "structured output is not supported"),
    "store": (_off(False), "null or false", "completions are not stored"),
    "metadata": (_off({}), "null or {}", "completions are not stored"),
    "modalities": (_off(["text"]), "null or [\"text\"]", "only text is generated"),
    "audio": (_off(), "null", "only text is generated"),
    "prediction": (_off(), "null", "predicted outputs are not supported"),
    "reasoning_effort": (_off(), "null", "this is not a reasoning model"),
    "verbosity": (_off(), "null", "verbosity is not supported"),
    "web_search_options": (_off(), "null", "web search is not supported"),
    "service_tier": (_off("auto", "default"), "null, \"auto\" or \"default\"", "this server has one tier"),
}
_IDENTIFIERS = ("user", "safety_identifier", "prompt_cache_key")  # say who asks; change no output
# message fields with no place in a chat template: accepted when null (or an empty list of tool calls)
_MESSAGE_NEUTRAL = {"name": _off(), "tool_calls": _off([]), "tool_call_id": _off(), "function_call": _off(),
                    "refusal": _off(), "audio": _off()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _StreamOptions(_Strict):
    include_usage: bool | None = None


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class _Completion(_Common):
    prompt: Any


class _Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Any  # a string or a list of text parts: checked by RequestParser.chat


class _Chat(_Common):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class Prepared:
    """A request ready to run: its prompt's base ids, its options and how to answer."""

    prompt_ids: list[int]
    options: GenerationOptions
    stream: bool
    include_usage: bool


class RequestParser:
    """Turns request bodies into :class:`Prepared` requests for one model.

    tokenizer: the base Hugging Face tokenizer; vocab_size: the base vocabulary (logit_bias ids are
    checked against it); limits: a :class:`~hypervocab.serving.ServeLimits`.
    """

    def __init__(self, tokenizer: Any, *, model_name: str, vocab_size: int, limits: Any) -> None:
        self.tokenizer, self.model_name, self.vocab_size, self.limits = tokenizer, model_name, vocab_size, limits
        self._specials: list[str] | None = None
        self._max_token_chars: int | None = None

    # ------------------------------------------------------------------ endpoints

    def completion(self, body: bytes) -> Prepared:
        data = self._fields(parse_json(body), chat=False)
        req = _validate(_Completion, data)
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
                raise APIError(400, f"prompt must be one string, got a list of {len(prompt)}", param="prompt")
            what = "token-id prompts are not supported" if isinstance(prompt, list) else "the prompt is text"
            raise APIError(400, f"prompt must be a string ({what}), got {short(prompt)}", param="prompt",
                           code="invalid_type")
        max_tokens, stop = self._common(req, req.max_tokens, 16)
        ids = self._prompt_ids(prompt, special=True, param="prompt")
        return self._prepared(req, ids, max_tokens, stop)

    def chat(self, body: bytes) -> Prepared:
        data = self._fields(parse_json(body), chat=True)
        req = _validate(_Chat, data)
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {self.model_name!r} has no chat template: use /v1/completions",
                           param="messages")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens, stop = self._common(req, limit, min(self.limits.max_tokens, 256))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content(i, m.content)}
                    for i, m in enumerate(req.messages)]
        self._check_length("".join(m["content"] for m in messages), param="messages")
        ids = self._chat_ids(messages)
        return self._prepared(req, ids, max_tokens, stop)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's token ids for ``messages``, where message contents never become special tokens.

        Text such as ``<|im_end|>\n<|im_start|>system`` typed inside a message is the user's text, not a
        turn: when a content holds a special token's text, the template is rendered around placeholders,
        its own parts tokenized as usual and each content with its special-token text split into
        ordinary tokens.
        """
        tok = self.tokenizer

        def render(msgs: list[dict[str, str]]) -> str:
            try:
                return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # noqa: BLE001 - a template raises for messages it cannot render (its checks)
                raise APIError(400, f"messages: the chat template cannot render these messages: "
                               f"{type(e).__name__}: {clip(str(e))}", param="messages") from None

        specials = self._special_texts()
        if not any(sp in m["content"] for m in messages for sp in specials):
            return self._prompt_ids(render(messages), special=False, param="messages")  # the template's own
        mark = f"\ue000{uuid.uuid4().hex}\ue001"
        text = render([{**m, "content": f"{mark}{k}{mark}"} for k, m in enumerate(messages)])
        parts = text.split(mark)
        if len(parts) != 2 * len(messages) + 1:
            raise APIError(400, "messages: the chat template changes message contents, so text in them that "
                           "looks like a special token cannot be kept apart from the template's own",
                           param="messages")
        ids: list[int] = []
        for j, part in enumerate(parts):
            if j % 2:  # a message's content, by its index
                content = messages[int(part)]["content"]
                ids += tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif part:
                ids += tok(part, add_special_tokens=False)["input_ids"]
        return self._checked_ids(ids, param="messages")

    def _special_texts(self) -> list[str]:
        """The text of every special token of the tokenizer (what a message must not smuggle in)."""
        if self._specials is None:
            decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
            found = {str(t) for t in getattr(self.tokenizer, "all_special_tokens", [])}
            found |= {str(getattr(t, "content", t)) for t in decoder.values() if getattr(t, "special", True)}
            self._specials = sorted(t for t in found if t)
        return self._specials

    # ------------------------------------------------------------------ checks

    def _fields(self, data: Any, *, chat: bool) -> dict[str, Any]:
        """The body's fields, minus the unimplemented ones sent with their "off" value; 400 for any other."""
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_json_type(data)}")
        path = _find_surrogate(data)
        if path is not None:
            raise APIError(400, f"{path or 'body'}: the text holds a lone surrogate (like \\ud800), which is not "
                           "valid Unicode: send UTF-8 text or paired \\u escapes", param=path or None,
                           code="invalid_value")
        known = set((_Chat if chat else _Completion).model_fields)
        out = {}
        for name, value in data.items():
            if name in known:
                out[name] = value
            elif name in NEUTRAL:
                test, allowed, why = NEUTRAL[name]
                if not test(value):
                    raise APIError(400, f"{name} is not supported by this server ({why}): allowed {allowed}, "
                                   f"got {short(value)}", param=name, code="unsupported_parameter")
            else:
                endpoint = "chat completions" if chat else "completions"
                raise APIError(400, f"unknown field {short(name)}: not a {endpoint} parameter this server knows "
                               f"(it implements {', '.join(sorted(known))})", param=name, code="unknown_parameter")
        if chat and isinstance(out.get("messages"), list):
            out["messages"] = [self._message(i, m) for i, m in enumerate(out["messages"])]
        return out

    @staticmethod
    def _message(i: int, m: Any) -> Any:
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content, got {short(m)}",
                           param=f"messages.{i}", code="invalid_type")
        out = {}
        for name, value in m.items():
            if name in ("role", "content"):
                out[name] = value
            elif name in _MESSAGE_NEUTRAL:
                if not _MESSAGE_NEUTRAL[name](value):
                    raise APIError(400, f"messages[{i}].{name} is not supported (the chat template has no place "
                                   f"for it): allowed null, got {short(value)}", param=f"messages.{i}.{name}",
                                   code="unsupported_parameter")
            else:
                raise APIError(400, f"messages[{i}]: unknown field {short(name)}", param=f"messages.{i}.{name}",
                               code="unknown_parameter")
        return out

    def _common(self, req: _Common, max_tokens: int | None, default: int) -> tuple[int, list[str]]:
        limits = self.limits
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"model {short(req.model)} is not served here; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")
        if req.n is not None and req.n != 1:
            raise APIError(400, f"n must be 1 (one completion per request), got {short(req.n)}", param="n")
        max_tokens = default if max_tokens is None else max_tokens
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={short(max_tokens)} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="invalid_value")
        stop = req.stop
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"stop must be up to 4 non-empty strings, got {short(req.stop)}", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):  # a stream holds back as much text as its longest stop
            raise APIError(400, f"stop strings may have at most {MAX_STOP_CHARS} characters, got one of "
                           f"{max(len(s) for s in stop)}", param="stop", code="invalid_value")
        if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
            raise APIError(400, f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (64 bits), got "
                           f"{short(req.seed)}", param="seed", code="invalid_value")
        return max_tokens, stop

    def _logit_bias(self, bias: dict[str, Any] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        V = self.vocab_size
        for key, value in (bias or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key) or int(key) >= V:
                raise APIError(400, f"logit_bias keys must be base token ids in [0, {V}) written as strings, got "
                               f"{short(key)}", param="logit_bias", code="invalid_value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                    BIAS_RANGE[0] <= value <= BIAS_RANGE[1]:
                raise APIError(400, f"logit_bias[{key!r}] must be a number in [{BIAS_RANGE[0]}, {BIAS_RANGE[1]}], "
                               f"got {short(value)}", param="logit_bias", code="invalid_value")
            if value:
                out[int(key)] = float(value)
        return out

    def _check_length(self, text: str, *, param: str) -> None:
        """Refuse a prompt that cannot fit before tokenizing it: no token is longer than the vocabulary's
        longest, so text longer than that many characters per allowed token has too many tokens."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            # byte-level tokens spell a byte as one character; 1 char per byte is the bound either way
            self._max_token_chars = max((len(t) for t in vocab), default=0) or 1024
        limit = self.limits.max_prompt_tokens * self._max_token_chars
        if len(text) > limit:
            raise APIError(400, f"the prompt has {len(text)} characters, more than this server's limit of "
                           f"{self.limits.max_prompt_tokens} tokens can hold (at most {self._max_token_chars} "
                           "characters each)", param=param, code="context_length_exceeded")

    def _prompt_ids(self, text: str, *, special: bool, param: str) -> list[int]:
        self._check_length(text, param=param)
        return self._checked_ids(self.tokenizer(text, add_special_tokens=special)["input_ids"], param=param)

    def _checked_ids(self, ids: list[int], *, param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                           f"{self.limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        return ids

    def _prepared(self, req: _Common, ids: list[int], max_tokens: int, stop: list[str]) -> Prepared:
        options = request_options(max_tokens=max_tokens, stop=stop,
                                  temperature=1.0 if req.temperature is None else req.temperature, top_p=req.top_p,
                                  seed=None if req.seed is None else req.seed % 2**64,
                                  logit_bias=self._logit_bias(req.logit_bias))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(ids, options, bool(req.stream), include_usage)


def _content(i: int, content: Any) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and set(p) == {"type", "text"} and p["type"] == "text"
                                         and isinstance(p["text"], str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} "
                   f"parts (only text is supported), got {short(content)}", param=f"messages.{i}.content",
                   code="invalid_value")


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body: strict UTF-8, standard JSON only (no NaN or Infinity)."""
    if not body.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}: {short(body[e.start:e.start + 4])})"
                       ) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                       ) from None
    except ValueError as e:  # NaN / Infinity, or an integer of thousands of digits
        raise APIError(400, f"the request body is not valid JSON: {clip(str(e), 120)}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_type(v: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _find_surrogate(data: Any) -> str | None:
    """The path (``messages.0.content``) of the first string, key or value, with a lone surrogate, or None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path
        elif isinstance(v, dict):
            for k in v:
                if _SURROGATE.search(k):
                    return path
            stack.extend((f"{path}.{k}" if path else k, x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in reversed(list(enumerate(v))))
    return None


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(x) for x in err.get("loc", ())]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {err.get('msg', 'invalid')}"
        if err.get("type") != "missing" and "input" in err:
            msg += f" (got {short(err['input'])})"
        raise APIError(400, msg, param=param, code="invalid_value") from None
