"""Property: whatever a client sends, the server answers without a 5xx, and every 4xx is an OpenAI error body.

Hypothesis draws the method, the path, the headers (API key, Content-Type, Host, ...) and the body:
raw bytes, arbitrary JSON, or requests close to valid ones, with each field drawn from good values,
bad values and arbitrary JSON (lone surrogates included).  The app runs in-process (Starlette's test
client) on the tiny model, with small limits so that the valid requests that get through stay quick.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from hypervocab.serving import ServeLimits, create_app  # noqa: E402
from hypervocab.serving.schema import NEUTRAL  # noqa: E402

from .models import make  # noqa: E402

KEY = "sk-fuzz"
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
TEXT = st.text(st.characters() | SURROGATES, max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)

MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"]) | JSON,
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text") | JSON, "text": TEXT}), max_size=2)
     | JSON},
    optional={"name": st.none() | TEXT, "tool_calls": st.just([]) | JSON})
FIELDS = {
    "model": st.sampled_from(["tiny", None]) | TEXT,
    "max_tokens": st.integers(-2, 3) | JSON,
    "max_completion_tokens": st.integers(-2, 3) | JSON,
    "temperature": st.floats(0, 2) | st.sampled_from([1e-300, 1e-40, 0]) | JSON,
    "top_p": st.floats(0, 1) | JSON,
    "n": st.sampled_from([1, 2]) | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=5) | JSON,
    "seed": st.integers() | st.sampled_from([-1, 2**63, 2**64]) | JSON,
    "logit_bias": st.dictionaries(st.integers(-2, 50_000).map(str) | TEXT,
                                  st.integers(-150, 150) | st.floats(-150, 150) | JSON, max_size=3) | JSON,
    "user": TEXT | JSON,
    "prompt": TEXT | st.lists(TEXT, max_size=2) | st.lists(st.integers(), max_size=3) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    **dict.fromkeys(NEUTRAL, JSON),
    "unknown_field": JSON,
}
ANY_FIELDS = st.fixed_dictionaries({}, optional=FIELDS)  # each field or not: almost always some bad value
# a valid request plus up to three drawn fields: often valid, so generation and streaming run too
EXTRA = st.lists(st.sampled_from(sorted(FIELDS)).flatmap(lambda k: FIELDS[k].map(lambda v: (k, v))), max_size=3)
BASE = {"/v1/completions": st.fixed_dictionaries({"prompt": st.text(max_size=20), "max_tokens": st.integers(1, 3)}),
        "/v1/chat/completions": st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}),
            min_size=1, max_size=2), "max_tokens": st.integers(1, 3)})}


def near_valid(path: str) -> st.SearchStrategy[dict]:
    return st.builds(lambda base, extra: {**base, **dict(extra)}, BASE[path], EXTRA)


BODY = st.one_of(ANY_FIELDS.map(lambda d: json.dumps(d).encode()),
                 near_valid("/v1/completions").map(lambda d: json.dumps(d).encode()),
                 JSON.map(lambda v: json.dumps(v).encode()),
                 st.binary(max_size=40),
                 st.just(b"[" * 5000))

HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
# mostly the right key, so that most requests get past the check; None: no Authorization header
AUTHORIZATION = st.sampled_from([f"Bearer {KEY}"] * 20 + ["Bearer wrong", f"Basic {KEY}", "bearer", None])
HEADERS = st.builds(lambda auth, rest: {**({"Authorization": auth} if auth is not None else {}), **rest},
                    st.one_of(*[AUTHORIZATION] * 5, HEADER_VALUE), st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json"] * 4 + ["application/json; charset=utf-8", "text/plain",
                                                                "application/x-www-form-urlencoded",
                                                                "application/vnd.api+json", ""]) | HEADER_VALUE,
    "Host": st.sampled_from(["127.0.0.1"] * 4 + ["localhost:8000", "[::1]:1", "evil.example", "", "127.0.0.1:x"])
    | HEADER_VALUE,
    "Origin": st.sampled_from(["http://evil.example", "null"]) | HEADER_VALUE,
    "Accept": HEADER_VALUE,
    "Expect": st.just("100-continue") | HEADER_VALUE,
    "X-Anything": HEADER_VALUE,
}))
METHOD = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
PATH = st.sampled_from(["/v1/completions"] * 4 + ["/v1/chat/completions"] * 4 + [
    "/v1/models", "/health", "/metrics", "/", "/v1", "/v1/completions/", "/nope", "/v1/chat/completions?x=1",
    "/%ff%fe", "//v1/models"])


@pytest.fixture(scope="module")
def client(smollm2_tokenizer):
    app = create_app(make("llama", smollm2_tokenizer), smollm2_tokenizer, model_name="tiny", api_key=KEY,
                     limits=ServeLimits(max_prompt_tokens=48, max_tokens=3, max_queue=4, max_body_bytes=4096,
                                        read_timeout=10))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


def check(r, method: str) -> None:
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics shows how many got how far
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400 and method != "HEAD":
        body = json.loads(r.content.decode("utf-8"))
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and 0 < len(err["message"]) < 1000, err
        assert isinstance(err["type"], str) and err["type"], err
        assert err["param"] is None or isinstance(err["param"], str), err
        assert err["code"] is None or isinstance(err["code"], str), err
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
@given(method=METHOD, path=PATH, headers=HEADERS, body=BODY)
def test_any_request_gets_no_5xx_and_openai_errors(client, method, path, headers, body):
    r = client.request(method, path, content=body if method not in ("GET", "HEAD") else None, headers=headers)
    check(r, method)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
@given(data=st.data(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_near_valid_requests_get_no_5xx_and_openai_errors(client, data, path):
    body = data.draw(st.one_of(near_valid(path), near_valid(path), ANY_FIELDS), label="body")
    r = client.post(path, content=json.dumps(body).encode(),
                    headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    check(r, "POST")
