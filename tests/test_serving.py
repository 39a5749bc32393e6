"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hypervocab import HyperTokenizer  # noqa: E402
from hypervocab.errors import ConfigError  # noqa: E402
from hypervocab.serving import ServeLimits, create_app  # noqa: E402
from hypervocab.serving.batch import request_options  # noqa: E402
from hypervocab.serving.engine import Job  # noqa: E402

from .models import make  # noqa: E402

PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef"


class Server:
    """A uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app, **config) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    return make("llama", smollm2_tokenizer)


@pytest.fixture(scope="module")
def server(model, smollm2_tokenizer):
    app = create_app(model, smollm2_tokenizer, model_name="tiny",
                     limits=ServeLimits(max_prompt_tokens=400, max_tokens=3000, max_queue=2))
    s = Server(app)
    yield s
    s.stop()


def alone(model, tok, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """What a direct greedy ``generate`` writes for these base ids: (text, base ids)."""
    codes = torch.as_tensor(model.codec.encode(ids))[None]
    with torch.no_grad():
        out = model.generate(codes, torch.ones_like(codes), max_new_tokens=max_tokens,
                             max_new_base_tokens=max_tokens, return_dict_in_generate=True)
    return tok.decode(out.new_base_ids[0], skip_special_tokens=True), out.new_base_ids[0]


def test_models_health_and_playground(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "hypervocab playground" in page.text and "<code>tiny</code>" in page.text


def test_completion_equals_the_same_generation_run_alone(server, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok(PROMPT)["input_ids"]
    want, want_ids = alone(model, tok, ids, 40)
    got = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    assert got.choices[0].text == want
    u = got.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), len(want_ids), len(ids) + len(want_ids))
    extra = u.model_extra
    assert extra["prompt_codes"] == len(model.codec.encode(ids)) < len(ids)
    assert 0 < extra["completion_codes"] <= len(want_ids)
    assert got.choices[0].finish_reason in ("stop", "length")

    # streamed: the same text, in pieces flagged by who wrote them, then the usage
    stream = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    pieces = [p for c in chunks if c.choices for p in c.model_extra["hypervocab"]["pieces"]]
    assert "".join(t for t, _ in pieces) == want
    assert chunks[-1].usage.completion_tokens == len(want_ids)


def test_chat_completion_uses_the_chat_template(server, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Say hello hello hello."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    want, _ = alone(model, tok, ids, 24)
    got = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)
    stream = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                     stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_stop_strings_are_cut_from_the_text(server, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    want, _ = alone(model, tok, tok(PROMPT)["input_ids"], 40)
    stop = want[len(want) // 2: len(want) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = want[: want.index(stop)]
    got = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    stream = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0,
                                                stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == cut


def test_concurrent_requests_do_not_share_codebooks(server, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompts = [PROMPT, "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\n",
               "The cat sat on the mat. The cat sat on the mat. The"]
    want = [alone(model, tok, tok(p)["input_ids"], 30)[0] for p in prompts]
    limits_ok = ServeLimits(max_prompt_tokens=400, max_tokens=64, max_queue=8)
    s = Server(create_app(model, tok, model_name="tiny", limits=limits_ok))
    try:
        with ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(lambda p=p: s.client().completions.create(
                model="tiny", prompt=p, max_tokens=30, temperature=0, stream=True)) for p in prompts * 2]
            got = ["".join(c.choices[0].text for c in j.result()) for j in jobs]
    finally:
        s.stop()
    assert got == want * 2


def test_a_client_that_disconnects_stops_its_generation(server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.time() + 20
    while httpx.get(server.url + "/health").json()["cancelled"] == before:
        assert time.time() < deadline, "the generation went on after the client left"
        time.sleep(0.1)
    # a non-streamed request whose client gives up is cancelled too
    before += 1
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3000, "temperature": 0},
                   timeout=1.0)
    deadline = time.time() + 20
    while httpx.get(server.url + "/health").json()["cancelled"] == before:
        assert time.time() < deadline, "the non-streamed generation went on after the client left"
        time.sleep(0.1)
    # and the server still answers
    assert server.client().completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0).choices


def test_a_full_queue_answers_429(server):
    engine = server.app.state.engine
    release = threading.Event()
    blocker = Job([1, 2, 3], request_options(max_tokens=1), lambda ev: release.wait(30))
    engine.submit(blocker)  # the worker sits in this job's first event until released
    time.sleep(0.2)
    waiting = [threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", json={
        "prompt": "Hi", "max_tokens": 1}, timeout=60)) for _ in range(2)]
    for t in waiting:
        t.start()
    deadline = time.time() + 10
    while engine.waiting < 2:
        assert time.time() < deadline
        time.sleep(0.02)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    release.set()
    for t in waiting:
        t.join(60)
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["Retry-After"]) <= 60  # seconds, from the mean time of recent requests
    assert "2 requests are already waiting (max_queue=2)" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, param, message", [
    (b"{not json", 400, None, "the request body is not valid JSON"),
    ({"prompt": "Hi", "temperature": 5}, 400, "temperature", "temperature: Input should be less than or equal to 2"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "Hi", "max_tokens": 3001}, 400, "max_tokens", "max_tokens=3001 is over this server's limit of 3000"),
    ({"prompt": "word " * 500}, 400, "prompt", "the prompt has 501 tokens, over this server's limit of 400"),
    ({"prompt": "Hi", "model": "gpt-4"}, 404, "model", "model 'gpt-4' is not served here; this server serves 'tiny'"),
    ({"prompt": "Hi", "n": 2}, 400, "n", "n must be 1 (one completion per request), got 2"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "prompt must be one string, got a list of 2"),
    ({"prompt": "Hi", "stop": [""]}, 400, "stop", "stop must be up to 4 non-empty strings, got ['']"),
    ({}, 400, "prompt", "prompt: Field required"),
    ([1, 2], 400, None, "the request body must be a JSON object, got an array"),
])
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, body, status, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"].startswith(message) and err["param"] == param


def test_bad_chat_messages_and_limits(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="max_queue must be an int >= 1, got 0"):
        ServeLimits(max_queue=0)
    assert HyperTokenizer  # the public tokenizer type is what the CLI hands the app
