"""The server against bad input and hostile clients: each defect a loopback probe found, and the limits,
security options and metrics added for them.

Most tests talk to a real uvicorn server on loopback, some over a raw socket: whether a keep-alive
connection survives an error, or what happens to a body that never finishes arriving, can only be
seen there.  The tiny random Llama over the real SmolLM2 tokenizer keeps them fast.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from hypervocab.errors import ConfigError  # noqa: E402
from hypervocab.serving import ServeLimits, create_app  # noqa: E402
from hypervocab.serving.batch import Job, request_options  # noqa: E402

from .models import make  # noqa: E402
from .test_serving import PROMPT, Server, alone  # noqa: E402


class Tokenizer:
    """The real tokenizer, with switches for the tests: the prompt "boom" raises (a stand-in for any bug),
    the prompt "wait" blocks until ``gate`` is set, and ``fail_decode`` makes decoding fail mid-generation."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_decode = False

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def __call__(self, text, **kw):
        if text == "boom":
            raise RuntimeError("a bug")
        if text == "wait":
            self.entered.set()
            self.gate.wait(30)
        return self._tok(text, **kw)

    def decode(self, *args, **kw):
        if self.fail_decode:
            raise RuntimeError("decoding failed")
        return self._tok.decode(*args, **kw)


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    return make("llama", smollm2_tokenizer)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return Tokenizer(smollm2_tokenizer)


@pytest.fixture(scope="module")
def server(model, tok):
    s = Server(create_app(model, tok, model_name="tiny",
                          limits=ServeLimits(max_prompt_tokens=400, max_tokens=64, max_queue=2)))
    yield s
    s.stop()


def post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: lone surrogates survive
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=kw.pop("timeout", 30), **kw)


def assert_openai_error(r, status: int, param=None, *, contains: str = "") -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and len(err["message"]) < 400, err
    assert err["param"] == param, err
    assert contains in err["message"], err
    return err


def sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------- raw HTTP


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None, port: int = 0) -> bytes:
    head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
            **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response from a keep-alive socket (Content-Length bodies only: what errors and /health send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"the server closed the connection; got {data!r}"
        data += got
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(rest) < n:
        got = sock.recv(65536)
        assert got, "the server closed the connection mid-body"
        rest += got
    return status, headers, rest[:n]


def connect(server, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return sock


# ---------------------------------------------------------------------------------------------- the defects


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_tiny_temperature_is_greedy_and_a_stream_ends_with_done(server, temperature):
    body = {"prompt": PROMPT, "max_tokens": 12}
    greedy = post(server, "/v1/completions", {**body, "temperature": 0}).json()["choices"][0]["text"]
    r = post(server, "/v1/completions", {**body, "temperature": temperature})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy
    r = post(server, "/v1/completions", {**body, "temperature": temperature, "stream": True})
    assert r.status_code == 200
    data = sse_data(r.text)
    assert data[-1] == "[DONE]" and not any("error" in json.loads(d) for d in data[:-1]), r.text[-300:]
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == greedy


def test_a_stream_that_fails_still_ends_with_an_error_event_and_done(server, tok):
    tok.fail_decode = True
    try:
        r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True})
    finally:
        tok.fail_decode = False
    assert r.status_code == 200
    data = sse_data(r.text)
    assert data[-1] == "[DONE]", r.text
    err = json.loads(data[-2])["error"]
    assert err["type"] == "server_error" and "decoding failed" in err["message"]


def test_seeds_are_64_bit_integers(server):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0}

    def text(seed):
        r = post(server, "/v1/completions", {**body, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert text(7) == text(7)
    # OpenAI's range, a signed 64-bit integer; negative seeds seed the generator with seed % 2**64
    assert text(-1) == text(-1)
    assert text(-(2**63)) and text(2**63 - 1)
    for bad in (2**63, 2**64, -(2**63) - 1, 10**30):
        r = post(server, "/v1/completions", {**body, "seed": bad})
        err = assert_openai_error(r, 400, "seed", contains="seed must be an integer in [-9223372036854775808, ")
        assert str(bad) in err["message"]
    for bad in (1.5, "1", True):
        assert_openai_error(post(server, "/v1/completions", {**body, "seed": bad}), 400, "seed")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["\udfff"]}, "prompt.0"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["\ud800"]}, "stop.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}]},
     "messages.0.content.0.text"),
])
def test_a_lone_surrogate_is_a_400_and_the_connection_stays_usable(server, path, body, param):
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", path, json.dumps(body).encode(), port=server.port))
        status, headers, raw = read_response(sock)
        assert status == 400, raw
        err = json.loads(raw)["error"]
        assert err["param"] == param and "lone surrogate" in err["message"], err
        assert headers.get("connection") != "close"
        sock.sendall(request_bytes("GET", "/health", port=server.port))  # the same connection
        status, _, raw = read_response(sock)
        assert status == 200 and json.loads(raw)["status"] == "ok"


def test_an_internal_error_is_a_500_with_an_openai_body_and_the_connection_stays_usable(server):
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/v1/completions", json.dumps({"prompt": "boom"}).encode(),
                                   port=server.port))
        status, headers, raw = read_response(sock)
        assert status == 500
        err = json.loads(raw)["error"]
        assert err["type"] == "server_error" and "RuntimeError: a bug" in err["message"]
        assert headers.get("connection") != "close"
        sock.sendall(request_bytes("GET", "/health", port=server.port))
        assert read_response(sock)[0] == 200


def test_tokenizing_runs_off_the_event_loop(server, tok):
    tok.gate.clear()
    tok.entered.clear()
    slow = threading.Thread(target=lambda: post(server, "/v1/completions", {"prompt": "wait", "max_tokens": 1}))
    slow.start()
    try:
        assert tok.entered.wait(10), "the request never reached the tokenizer"
        t0 = time.monotonic()
        r = httpx.get(server.url + "/health", timeout=10)  # would hang if the tokenizer ran on the event loop
        assert r.status_code == 200 and time.monotonic() - t0 < 5
    finally:
        tok.gate.set()
        slow.join(30)


def test_a_body_over_the_limit_is_refused_before_it_is_read(server, model, smollm2_tokenizer):
    assert ServeLimits().max_body_bytes == 2 * 1024 * 1024
    with connect(server, timeout=5) as sock:
        # 20 MB declared, none sent: the answer must come from the headers alone
        sock.sendall(request_bytes("POST", "/v1/completions", headers={"Content-Length": str(20_000_000)},
                                   port=server.port))
        status, headers, raw = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        err = json.loads(raw)["error"]
        assert err["code"] == "request_too_large" and "over this server's limit of 2097152" in err["message"]
    # a chunked body (no Content-Length) is counted as it arrives
    small = Server(create_app(model, smollm2_tokenizer, model_name="tiny", limits=ServeLimits(max_body_bytes=1000)))
    try:
        def chunks():
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        r = httpx.post(small.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert_openai_error(r, 413, contains="over this server's limit of 1000 bytes")
        # under the limit is fine
        r = httpx.post(small.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        small.stop()


def test_a_body_that_stops_arriving_times_out(model, smollm2_tokenizer):
    assert ServeLimits().read_timeout == 30
    s = Server(create_app(model, smollm2_tokenizer, model_name="tiny", limits=ServeLimits(read_timeout=0.5)))
    try:
        with connect(s, timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(request_bytes("POST", "/v1/completions", headers={"Content-Length": "1000"},
                                       port=s.port) + b'{"prompt":')
            status, headers, raw = read_response(sock)
            assert status == 408 and headers["connection"] == "close" and time.monotonic() - t0 < 5
            err = json.loads(raw)["error"]
            assert err["code"] == "request_timeout" and "did not arrive within 0.5 s (10 bytes came" in err["message"]
            assert sock.recv(10) == b""  # and the connection is closed
    finally:
        s.stop()


def test_errors_never_repeat_a_large_input(server):
    r = post(server, "/v1/completions", {"prompt": list(range(200_000))})  # 1.3 MB, under the body limit
    err = assert_openai_error(r, 400, "prompt", contains="token-id prompts are not supported")
    assert len(err["message"]) < 200
    for body, param in (({"prompt": "Hi", "model": "m" * 100_000}, "model"),
                        ({"prompt": "Hi", "temperature": "t" * 100_000}, "temperature"),
                        ({"prompt": "Hi", "stop": ["s"] * 100_000}, "stop"),
                        ({"prompt": "Hi", "x" * 100_000: 1}, "x" * 100 + "..."),
                        ({"messages": [{"role": "user", "content": [1] * 100_000}]}, "messages.0.content")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = post(server, path, body)
        assert r.status_code in (400, 404) and len(r.json()["error"]["message"]) < 400, r.text[:300]
        assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("method, path, body, headers, status, contains", [
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', {}, 400, "not valid UTF-8"),
    ("POST", "/v1/completions", b"[" * 10_000 + b"]" * 10_000, {}, 400, "nested too deeply"),
    ("POST", "/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', {}, 400, "NaN is not a JSON number"),
    ("POST", "/v1/completions", b"", {}, 400, "the request body is empty"),
    ("POST", "/v1/completions", b'{"prompt": "Hi"}', {"Content-Type": "text/plain"}, 415,
     "Content-Type must be application/json"),
    ("POST", "/v1/completions", b"prompt=Hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "Content-Type must be application/json"),
    ("GET", "/nowhere", b"", {}, 404, "Invalid URL (GET '/nowhere')"),
    ("POST", "/v1/embeddings", b"{}", {}, 404, "Invalid URL (POST '/v1/embeddings')"),
    ("GET", "/v1/completions", b"", {}, 405, "method GET is not allowed on '/v1/completions' (allowed: POST)"),
    ("DELETE", "/health", b"", {}, 405, "method DELETE is not allowed"),
])
def test_every_error_is_an_openai_error_body(server, method, path, body, headers, status, contains):
    r = httpx.request(method, server.url + path, content=body,
                      headers={"Content-Type": "application/json", **headers})
    assert_openai_error(r, status, contains=contains)


@pytest.mark.parametrize("body, param, contains", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools is not supported"),
    ({"tool_choice": "auto"}, "tool_choice", "tool_choice is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "allowed null or {\"type\": \"text\"}"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "penalties are not implemented"),
    ({"presence_penalty": -1}, "presence_penalty", "got -1"),
    ({"logprobs": True}, "logprobs", "log probabilities are not returned"),
    ({"top_logprobs": 2}, "top_logprobs", "allowed null or 0"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "allowed a boolean"),
    ({"store": True}, "store", "completions are not stored"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "not a reasoning model"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation", "Extra inputs"),
    ({"top_k": 5}, "top_k", "unknown field 'top_k'"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "bob"}]}, "messages.0.name",
     "messages[0].name is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "only text is supported"),
])
def test_unsupported_fields_are_rejected_by_name(server, body, param, contains):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body}
    assert_openai_error(post(server, "/v1/chat/completions", body), 400, param, contains=contains)


@pytest.mark.parametrize("body, param, contains", [
    ({"suffix": "end"}, "suffix", "insertion is not supported"),
    ({"echo": True}, "echo", "the prompt is not echoed"),
    ({"best_of": 3}, "best_of", "one completion is generated per request"),
    ({"logprobs": 2}, "logprobs", "log probabilities are not returned"),
    ({"messages": []}, "messages", "unknown field 'messages'"),
])
def test_unsupported_completion_fields_are_rejected_by_name(server, body, param, contains):
    assert_openai_error(post(server, "/v1/completions", {"prompt": "Hi", **body}), 400, param, contains=contains)


def test_unsupported_fields_with_their_off_value_are_accepted(server):
    off = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "frequency_penalty": 0,
           "presence_penalty": 0.0, "logprobs": False, "top_logprobs": None, "parallel_tool_calls": True,
           "store": False, "user": "someone", "n": 1, "stream_options": None, "service_tier": "auto"}
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "name": None}],
                                             "max_tokens": 2, **off})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "echo": False, "best_of": 1,
                                         "logprobs": None, "suffix": None, "user": "someone"})
    assert r.status_code == 200, r.text


def test_logit_bias_applies_to_base_tokens_and_turns_hypertokens_off(server, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    favourite = tok(" hello", add_special_tokens=False)["input_ids"][0]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                         "logit_bias": {str(favourite): 100}})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["choices"][0]["text"] == tok.decode([favourite] * 8)
    assert got["usage"]["completion_codes"] == got["usage"]["completion_tokens"] == 8
    assert got["usage"]["hypertokens"] == 0
    # a ban: greedy's first token can no longer come first
    want, want_ids = alone(model, tok, tok(PROMPT)["input_ids"], 8)
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                         "logit_bias": {str(want_ids[0]): -100}})
    assert r.status_code == 200 and not r.json()["choices"][0]["text"].startswith(tok.decode(want_ids[:1]))
    # zero biases change nothing: hypertokens stay on
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                         "logit_bias": {str(favourite): 0}})
    assert r.json()["choices"][0]["text"] == want
    V = model.codec.base_vocab_size
    for bias, contains in (({"abc": 1}, "logit_bias keys must be base token ids in [0, 49152)"),
                           ({str(V): 1}, f"got '{V}'"), ({"-1": 1}, "got '-1'"),
                           ({"5": 101}, "logit_bias['5'] must be a number in [-100, 100], got 101"),
                           ({"5": True}, "got True"), ([1, 2], "logit_bias: Input should be a valid dictionary")):
        r = post(server, "/v1/completions", {"prompt": "Hi", "logit_bias": bias})
        assert_openai_error(r, 400, "logit_bias", contains=contains)


# ---------------------------------------------------------------------------------------------- security


def test_an_api_key_is_checked_as_a_bearer_token(model, smollm2_tokenizer):
    s = Server(create_app(model, smollm2_tokenizer, model_name="tiny", api_key="sk-test-123"))
    try:
        for headers, contains in (({}, "this server needs an API key"),
                                  ({"Authorization": "Bearer wrong"}, "incorrect API key"),
                                  ({"Authorization": "Basic sk-test-123"}, "incorrect API key")):
            for path in ("/v1/models", "/metrics", "/v1/nowhere"):
                r = httpx.get(s.url + path, headers=headers)
                err = assert_openai_error(r, 401, contains=contains)
                assert err["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
        r = post(s, "/v1/completions", {"prompt": "Hi"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-123", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer sk-test-123"}).status_code == 200
        # open: the liveness probe, and the playground page, which then asks for the key
        assert httpx.get(s.url + "/health").status_code == 200
        page = httpx.get(s.url + "/")
        assert page.status_code == 200 and 'id="api_key"' in page.text
    finally:
        s.stop()


def test_the_host_header_must_be_allowed(server, model, smollm2_tokenizer):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil"):
        r = httpx.get(server.url + "/health", headers={"Host": host})
        assert_openai_error(r, 400, contains="is not allowed by this server")
        assert r.json()["error"]["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
    app = create_app(model, smollm2_tokenizer, model_name="tiny", allowed_hosts=["api.example.com", "*.corp.example"])
    try:
        for host, ok in (("api.example.com", True), ("a.corp.example:8000", True), ("corp.example", False),
                         ("127.0.0.1", False)):
            r = TestClient(app, base_url=f"http://{host}").get("/health")
            assert r.status_code == (200 if ok else 400), host
        any_host = create_app(model, smollm2_tokenizer, model_name="tiny", allowed_hosts=["*"])
        assert TestClient(any_host, base_url="http://whatever.example").get("/health").status_code == 200
        any_host.state.engine.close()
    finally:
        app.state.engine.close()


def test_the_playground_sends_a_csp_that_allows_exactly_its_script_and_style(server):
    import base64
    import hashlib

    r = httpx.get(server.url + "/")
    csp = r.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    for tag in ("script", "style"):
        (inline,) = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert " style=" not in r.text  # inline style attributes would need 'unsafe-inline'
    assert 'id="api_key"' not in r.text  # no key, no field
    for name, value in (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                        ("Referrer-Policy", "no-referrer")):
        assert r.headers[name] == value
        assert httpx.get(server.url + "/health").headers[name] == value


def test_the_cli_flags_and_their_defaults(monkeypatch, model, smollm2_tokenizer):
    from hypervocab.cli import main as cli_main
    from hypervocab.cli import serve as cli_serve
    from hypervocab.cli.serve import server_settings

    parser = cli_main.build_parser()
    monkeypatch.delenv("HYPERVOCAB_API_KEY", raising=False)
    app_kw, uv = server_settings(parser.parse_args(["serve"]))
    limits = app_kw["limits"]
    assert (limits.max_body_bytes, limits.read_timeout, limits.max_prompt_tokens) == (2 * 1024 * 1024, 30.0, 4096)
    assert app_kw["api_key"] is None and app_kw["allowed_hosts"] == ["localhost", "127.0.0.1", "::1"]
    assert uv["grace"] == 10.0 and uv["host"] == "127.0.0.1"
    assert (uv["header_timeout"], uv["max_connections"], app_kw["allowed_origins"]) == (10.0, 1000, None)
    assert server_settings(parser.parse_args(["serve", "--host", "0.0.0.0"]))[0]["allowed_hosts"] == ["*"]
    assert server_settings(parser.parse_args(["serve", "--host", "10.1.2.3"]))[0]["allowed_hosts"][0] == "10.1.2.3"
    monkeypatch.setenv("HYPERVOCAB_API_KEY", "from-env")
    app_kw, uv = server_settings(parser.parse_args([
        "serve", "--allowed-hosts", "a.example, b.example", "--max-body-bytes", "5000", "--read-timeout", "2.5",
        "--shutdown-timeout", "3"]))
    assert app_kw["api_key"] == "from-env" and app_kw["allowed_hosts"] == ["a.example", "b.example"]
    assert (app_kw["limits"].max_body_bytes, app_kw["limits"].read_timeout, uv["grace"]) == (5000, 2.5, 3.0)
    assert server_settings(parser.parse_args(["serve", "--allowed-origins", "https://a.example, *"]))[0][
        "allowed_origins"] == ["https://a.example", "*"]
    for flags, message in ((["--allowed-origins", "a.example"], "--allowed-origins must be origins like"),
                           (["--header-timeout", "0"], "--header-timeout must be > 0 seconds, got 0.0"),
                           (["--max-connections", "0"], "--max-connections must be an int >= 1, got 0")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            server_settings(parser.parse_args(["serve", *flags]))
    assert server_settings(parser.parse_args(["serve", "--api-key", "flag"]))[0]["api_key"] == "flag"
    assert app_kw["prompt_lookup"] == 0  # speculative decoding is off unless asked for
    assert server_settings(parser.parse_args(["serve", "--prompt-lookup", "6"]))[0]["prompt_lookup"] == 6
    with pytest.raises(ConfigError, match=re.escape("--prompt-lookup must be an int >= 0, got -1")):
        server_settings(parser.parse_args(["serve", "--prompt-lookup", "-1"]))
    assert app_kw["prefill_chunk"] == 64  # joining prompts are read in chunks unless told otherwise
    assert server_settings(parser.parse_args(["serve", "--prefill-chunk", "0"]))[0]["prefill_chunk"] == 0
    with pytest.raises(ConfigError, match=re.escape("--prefill-chunk must be an int >= 0, got -2")):
        server_settings(parser.parse_args(["serve", "--prefill-chunk", "-2"]))

    # the whole command, with the model loader and uvicorn stubbed: the app it builds enforces the key
    ran = {}
    monkeypatch.setattr(cli_serve, "load", lambda *a, **k: (model, SimpleNamespace(tokenizer=smollm2_tokenizer)))
    from hypervocab.serving import server as serving_server

    monkeypatch.setattr(serving_server, "serve", lambda app, **kw: ran.update(app=app, **kw))
    assert cli_main.main(["serve", "--served-model-name", "tiny", "--shutdown-timeout", "4"]) == 0
    assert ran["grace"] == 4.0
    client = TestClient(ran["app"], base_url="http://127.0.0.1")
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    ran["app"].state.engine.close()
    assert cli_main.main(["serve", "--read-timeout", "0"]) == 2  # a bad flag: one line, exit status 2


def test_sigterm_refuses_new_work_ends_the_queue_now_and_running_requests_after_the_grace_period(smollm2_tokenizer):
    """What SIGTERM does (``handle_exit``, as the signal handler calls it) with 2 requests running and 2 queued,
    one of each streaming: the queued ones get the 503 at once and never start, the running ones after the
    grace period; every stream ends with an error event and ``[DONE]``, every other request gets a 503 body."""
    import signal

    from hypervocab.serving.server import HyperServer

    # a model of its own: if the work went on after the test, it would not run on the other tests' model
    app = create_app(make("llama", smollm2_tokenizer), smollm2_tokenizer, model_name="tiny",
                     limits=ServeLimits(max_prompt_tokens=400, max_tokens=3000, max_queue=4, max_batch_size=2))
    engine = app.state.engine
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = HyperServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        timeout_graceful_shutdown=10), engine=engine, grace=2.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/v1/completions"
    got: dict[str, tuple] = {}

    def client(name: str, stream: bool) -> None:  # greedy, 3000 tokens: far longer than the grace period
        body = {"prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": stream}
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                text = "".join(r.iter_text())
                got[name] = (r.status_code, text, time.monotonic())
        except httpx.HTTPError as e:
            got[name] = (type(e).__name__, "", time.monotonic())

    names = [("run-stream", True), ("run-whole", False), ("queued-stream", True), ("queued-whole", False)]
    threads = []
    for name, stream in names:
        threads.append(threading.Thread(target=client, args=(name, stream)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while engine.running + engine.waiting < len(threads):  # in this order: the first two run
            assert time.monotonic() < deadline, "the requests did not start"
            time.sleep(0.02)
    while not (engine.running == 2 and engine.waiting == 2):
        time.sleep(0.02)
    t0 = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    with pytest.raises(Exception, match="shutting down"):  # no new work from now on
        engine.submit(Job([1], request_options(max_tokens=1), lambda ev: None))
    for t in threads:
        t.join(30)
    thread.join(30)
    took = time.monotonic() - t0
    assert not thread.is_alive() and took < 8, f"shutdown took {took:.1f} s"
    for name, stream in names:
        status, text, at = got[name]
        if stream:  # the stream started (200), then ends the documented way
            assert status == 200 and text.endswith('"code":"shutting_down"}}\n\ndata: [DONE]\n\n'), (name, text[-200:])
        else:
            assert status == 503 and json.loads(text)["error"]["code"] == "shutting_down", (name, status, text)
        if name.startswith("queued"):
            assert at - t0 < 1.5, f"{name} waited {at - t0:.1f} s for its 503"  # at once, not after the grace
            assert '"text": "' not in text  # it never started
        else:
            assert at - t0 >= 1.9, f"{name} was cut after {at - t0:.1f} s, before the 2 s grace period"
    assert engine.cancelled == 4 and engine.served == 0 and engine.running == 0 and engine.waiting == 0


# ---------------------------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_tokens_queue_and_hypertokens(model, smollm2_tokenizer):
    app = create_app(model, smollm2_tokenizer, model_name="tiny",
                     limits=ServeLimits(max_prompt_tokens=400, max_tokens=64, max_queue=4))
    client = TestClient(app, base_url="http://127.0.0.1")
    try:
        usages = []
        for prompt in (PROMPT, "for i in range(10):\n    print(i)\n" * 3):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0})
            usages.append(r.json()["usage"])
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                 "stream": True})
        assert sse_data(r.text)[-1] == "[DONE]"
        usages.append(json.loads(sse_data(r.text)[-2])["hypervocab"]["usage"])
        assert client.post("/v1/completions", json={"prompt": "Hi", "n": 3}).status_code == 400
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "# TYPE hypervocab_http_requests_total counter" in r.text
        m = parse_metrics(r.text)
        assert m['hypervocab_http_requests_total{path="/v1/completions",status="200"}'] == 3
        assert m['hypervocab_http_requests_total{path="/v1/completions",status="400"}'] == 1
        assert sum(v for k, v in m.items() if k.startswith("hypervocab_generations_total")) == 3
        for name in ("prompt_tokens", "prompt_codes", "completion_tokens", "completion_codes", "hypertokens"):
            assert m[f"hypervocab_{name}_total"] == sum(u[name] for u in usages), name
        hyper, codes = sum(u["hypertokens"] for u in usages), sum(u["completion_codes"] for u in usages)
        assert hyper > 0 and m["hypervocab_hypertoken_share"] == pytest.approx(hyper / codes)
        assert m["hypervocab_queue_length"] == 0 and m["hypervocab_batch_size"] == 0
        assert m["hypervocab_max_batch_size"] == 16  # the default
        assert m["hypervocab_generation_seconds_total"] > 0
        # /health keeps its counters
        assert client.get("/health").json() == {"status": "ok", "model": "tiny", "waiting": 0, "running": 0,
                                                "served": 3, "cancelled": 0}
    finally:
        app.state.engine.close()


def test_a_server_with_prompt_lookup_answers_what_one_without_it_answers(model, smollm2_tokenizer):
    prompt = "def area(w, h):\n    return w * h\n\n\ndef area(w, h):\n    return w * h\n\n\n" * 2
    texts = []
    for k in (0, 5):
        app = create_app(model, smollm2_tokenizer, model_name="tiny", prompt_lookup=k,
                         limits=ServeLimits(max_prompt_tokens=400, max_tokens=64))
        client = TestClient(app, base_url="http://127.0.0.1")
        try:
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0})
            assert r.status_code == 200
            texts.append(r.json()["choices"][0]["text"])
        finally:
            app.state.engine.close()
    assert texts[0] == texts[1] and texts[0]
