#!/usr/bin/env python
"""Load test of ``hypervocab serve``: concurrent streaming clients, every answer checked for correctness.

The script starts the OpenAI-compatible server in-process on a loopback port (127.0.0.1 only), with
``--model`` (``default``: the shipped model, or a hypervocab checkpoint folder, loaded with ``hypervocab.load``
as the CLI does, on ``--device``) or ``--tiny`` (a tiny random Llama over the real SmolLM2 tokenizer: no weights
needed, for a smoke run).

1. Each distinct prompt is sent once, alone and sequentially, through the same server: that is the
   reference answer.  Requests are greedy (``temperature=0``), so a request must always get it back.
2. ``--clients`` threads then stream requests concurrently with the official ``openai`` client, each
   picking prompts from the same fixed set, until ``--seconds`` have passed or ``--requests`` were sent.

Every response must be complete (HTTP 200, a ``finish_reason``, a ``usage`` chunk, the hypervocab
pieces adding up to the text, running totals matching the usage) and equal its reference answer: the
server runs one request at a time with its own codebook and cache, so concurrency must change nothing.
Prompts are real text: a few functions of the standard library (read with :mod:`inspect`, so they are
the running Python's own source) and a few English sentences.

Prints a Markdown table (requests, errors, mismatches, latency, time to first chunk, throughput in
base tokens/s and codes/s, the hypertoken share) and exits with status 1 on any error or mismatch, or
if the server's ``/metrics`` totals differ from what the clients received.

    python benchmarks/serve_load.py --tiny --clients 4 --seconds 10    # a smoke run, no weights needed
    python benchmarks/serve_load.py                                    # the shipped model, 8 clients, 30 s
    python benchmarks/serve_load.py --model path/to/checkpoint --max-tokens 128
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervocab.loading import DTYPES, load, resolve_device

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

HOST = "127.0.0.1"  # loopback only: this is a benchmark, not a public server

ENGLISH = [
    "The museum opens at nine in the morning and closes at six in the evening, except on Mondays, when it",
    "To make a simple bread, mix flour, water, salt and yeast, knead the dough for ten minutes, then let it",
    "In the early years of the railway, most passengers travelled in open carriages, and the journey from",
    "Dear team, thank you for your work on the release. Before we start planning the next one, I would like",
]


def stdlib_prompts() -> list[str]:
    """A few small, pure-Python functions of the standard library, as their source text."""
    import calendar
    import colorsys
    import shlex
    import statistics as stats_module
    import string
    import textwrap

    functions = [colorsys.rgb_to_hsv, shlex.quote, string.capwords, stats_module.median, textwrap.dedent,
                 calendar.isleap]
    # cut long ones: the prompt set must fit the server's default prompt limit with a wide margin
    return [inspect.getsource(f)[:1200] for f in functions]


@dataclass
class Result:
    """One streamed request: what came back and how long it took (times in seconds from the send)."""

    prompt: int
    text: str = ""
    error: str | None = None
    latency: float = 0.0
    first_chunk: float | None = None
    base_tokens: int = 0
    codes: int = 0
    finish_reason: str | None = None


@dataclass
class Counter:
    """Hands out request numbers to the client threads until the budget of requests runs out."""

    limit: int
    taken: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        with self.lock:
            if self.taken >= self.limit:
                return False
            self.taken += 1
            return True


def tiny_model() -> tuple[Any, Any]:
    """A tiny random Llama wrapped as a HyperModel, over the real SmolLM2 tokenizer (converted offline)."""
    import torch
    import transformers
    from assets import smollm2_tokenizer_dir

    from hypervocab import HyperConfig, HyperModel

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)).eval()
    model = HyperModel.from_base(base, tok, HyperConfig(max_codebook_size=64, max_subtokens=4))
    with torch.no_grad():  # fresh encoders would make a hypertoken look like its first subtoken: perturb them
        for p in list(model.input_encoder.parameters()) + list(model.output_encoder.parameters()):
            p.normal_(0, 0.05)
    return model.eval(), tok


def served_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, base tokenizer, served model name) for the arguments."""
    if args.tiny:
        model, tok = tiny_model()
        return model.to(resolve_device(args.device)), tok, "tiny-random-llama"
    model, htok = load(args.model, device=args.device, dtype=args.dtype)
    name = "hypervocab-smollm2-135m" if args.model == "default" else args.model.rstrip("/").split("/")[-1]
    return model, htok.tokenizer, name


class LoopbackServer:
    """uvicorn serving ``app`` in a thread, on a port of 127.0.0.1 chosen by the OS."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        # bind the socket here and hand it to uvicorn: no window in which another process takes the port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def stream_one(client: Any, model_name: str, prompt: str, index: int, max_tokens: int) -> Result:
    """Stream one greedy completion and check that it is whole; errors are recorded, never raised."""
    import openai

    res = Result(index)
    t0 = time.perf_counter()
    pieces: list[str] = []
    last_hv: dict[str, Any] | None = None
    usage: Any = None
    try:
        raw = client.completions.with_raw_response.create(
            model=model_name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        if raw.status_code != 200:  # a 2xx other than 200 is not what the API promises either
            raise RuntimeError(f"HTTP {raw.status_code}")
        text: list[str] = []
        for chunk in raw.parse():
            if res.first_chunk is None:
                res.first_chunk = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.text or "")
                if choice.finish_reason is not None:
                    res.finish_reason = choice.finish_reason
            hv = (chunk.model_extra or {}).get("hypervocab")
            if hv is not None:
                pieces.extend(t for t, _ in hv["pieces"])
                last_hv = hv
        res.text = "".join(text)
        # the stream ends quietly if the connection drops, so "complete" is checked from its content
        if res.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"no finish_reason stop/length (got {res.finish_reason!r})")
        if usage is None or last_hv is None:
            raise RuntimeError("no usage chunk" if usage is None else "no hypervocab extension")
        extra = usage.model_extra or {}
        res.base_tokens, res.codes = usage.completion_tokens, int(extra.get("completion_codes", -1))
        if "".join(pieces) != res.text:
            raise RuntimeError("the hypervocab pieces do not add up to the text")
        if (last_hv["base_tokens"], last_hv["codes"]) != (res.base_tokens, res.codes):
            raise RuntimeError(f"running totals {last_hv['base_tokens']} tokens / {last_hv['codes']} codes "
                               f"differ from the usage {res.base_tokens} / {res.codes}")
    except openai.APIStatusError as e:
        res.error = f"HTTP {e.status_code}: {e.message}"
    except Exception as e:  # noqa: BLE001 - a failed request is a result to report, not a crash
        res.error = f"{type(e).__name__}: {e}"
    res.latency = time.perf_counter() - t0
    return res


def scrape_metrics(url: str) -> dict[str, float]:
    """The server's ``/metrics`` samples, by name with labels."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_load(server: LoopbackServer, model_name: str, prompts: list[str], args: argparse.Namespace,
             label: str) -> tuple[list[Result], float]:
    """``--clients`` threads streaming requests until ``--requests`` were sent or ``--seconds`` passed."""
    import openai
    from tqdm import tqdm

    counter = Counter(args.requests)
    results: list[Result] = []
    lock = threading.Lock()
    bar = tqdm(total=args.requests, desc=label, unit="req", file=sys.stderr)
    deadline = time.perf_counter() + args.seconds

    def client_loop(c: int) -> None:
        # a client of its own per thread, as separate users would have; no retries: a failure must show
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
        rng = random.Random(args.seed * 1000 + c)  # a fixed sequence of prompts per client
        while time.perf_counter() < deadline and counter.take():
            i = rng.randrange(len(prompts))
            r = stream_one(client, model_name, prompts[i], i, args.max_tokens)
            with lock:
                results.append(r)
                bar.update(1)
                if r.error:
                    bar.set_postfix(errors=sum(x.error is not None for x in results))

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for f in [pool.submit(client_loop, c) for c in range(args.clients)]:
            f.result()
    wall = time.perf_counter() - start
    bar.total = len(results)  # the time budget may end the run before the request budget
    bar.refresh()
    bar.close()
    return results, wall


@dataclass
class Phase:
    """One server configuration under the load: what the clients got, and the server's own totals."""

    label: str
    max_batch_size: int
    results: list[Result]
    wall: float
    metrics: dict[str, float]
    reference: list[Result] = field(default_factory=list)  # requests run alone on this server (counted too)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if not r.error]

    def errors(self) -> list[Result]:
        return [r for r in self.results if r.error]

    def mismatches(self, reference: list[Result]) -> list[Result]:
        return [r for r in self.ok if r.text != reference[r.prompt].text]

    def tokens_per_second(self) -> float:
        return sum(r.base_tokens for r in self.ok) / self.wall

    def metrics_match(self) -> bool | None:
        """Whether ``/metrics`` counted exactly what the clients received (``None`` after errors)."""
        if self.errors():
            return None  # a failed request may have counted part of its tokens: nothing exact to compare
        everyone = self.reference + self.results
        return all(self.metrics[f"hypervocab_completion_{k}_total"] == sum(getattr(r, a) for r in everyone)
                   for k, a in (("tokens", "base_tokens"), ("codes", "codes")))


def serve_phase(model: Any, tok: Any, model_name: str, prompts: list[str], args: argparse.Namespace,
                max_batch_size: int, label: str, *, with_reference: bool) -> Phase:
    """Start a server with ``max_batch_size``, (optionally) run every prompt alone first, then the load."""
    import openai
    from tqdm import tqdm

    from hypervocab.serving import ServeLimits, create_app

    # the queue must hold every client's request, or the load itself would cause 429s
    limits = ServeLimits(max_tokens=args.max_tokens, max_queue=max(32, args.clients), max_batch_size=max_batch_size)
    server = LoopbackServer(create_app(model, tok, model_name=model_name, limits=limits))
    reference: list[Result] = []
    try:
        if with_reference:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=args.timeout)
            for i, p in enumerate(tqdm(prompts, desc="alone", unit="req", file=sys.stderr)):
                reference.append(stream_one(client, model_name, p, i, args.max_tokens))
            bad = [r for r in reference if r.error]
            if bad:
                raise RuntimeError("; ".join(f"prompt {r.prompt} run alone: {r.error}" for r in bad))
        results, wall = run_load(server, model_name, prompts, args, label)
        metrics = scrape_metrics(server.url)
    finally:
        server.stop()
    return Phase(label, max_batch_size, results, wall, metrics, reference)


def report(phases: list[Phase], reference: list[Result], args: argparse.Namespace, model_name: str) -> str:
    """The Markdown table of every phase, and the throughput ratio of the last to the first."""
    def cell(p: Phase, what: str) -> str:
        ok = p.ok
        lat = [r.latency for r in ok]
        firsts = [r.first_chunk for r in ok if r.first_chunk is not None]
        tokens, codes = sum(r.base_tokens for r in ok), sum(r.codes for r in ok)
        return {
            "requests": str(len(p.results)),
            "errors": str(len(p.errors())),
            "mismatches with the answer alone": str(len(p.mismatches(reference))),
            "latency median / p95 (s)": f"{statistics.median(lat):.2f} / {percentile(lat, 0.95):.2f}" if lat else "-",
            "time to first chunk median / p95 (s)":
                f"{statistics.median(firsts):.2f} / {percentile(firsts, 0.95):.2f}" if firsts else "-",
            "wall time (s)": f"{p.wall:.1f}",
            "base tokens/s (total)": f"{tokens / p.wall:.1f}",
            "codes/s (total)": f"{codes / p.wall:.1f}",
            "base tokens per code": f"{tokens / codes:.2f}" if codes else "-",
            "hypertoken share of codes (/metrics)": f"{p.metrics['hypervocab_hypertoken_share']:.3f}",
            "/metrics totals match the clients'": {True: "yes", False: "NO", None: "- (errors)"}[p.metrics_match()],
        }[what]

    whats = ["requests", "errors", "mismatches with the answer alone", "latency median / p95 (s)",
             "time to first chunk median / p95 (s)", "wall time (s)", "base tokens/s (total)", "codes/s (total)",
             "base tokens per code", "hypertoken share of codes (/metrics)", "/metrics totals match the clients'"]
    lines = [f"{args.clients} concurrent streaming clients, greedy, max_tokens={args.max_tokens}, model "
             f"{model_name!r}.", "", "| | " + " | ".join(p.label for p in phases) + " |",
             "|---|" + "---:|" * len(phases)]
    lines += [f"| {w} | " + " | ".join(cell(p, w) for p in phases) + " |" for w in whats]
    if len(phases) > 1:
        ratio = phases[-1].tokens_per_second() / phases[0].tokens_per_second()
        lines += ["", f"**{phases[-1].label} ÷ {phases[0].label}: {ratio:.2f}× the tokens/s** "
                  f"(p95 latency {cell(phases[-1], 'latency median / p95 (s)').split(' / ')[1]} s against "
                  f"{cell(phases[0], 'latency median / p95 (s)').split(' / ')[1]} s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default="default", help="'default' (the shipped model) or a hypervocab "
                       "checkpoint folder; a plain Hugging Face model folder gets fresh hyper-encoders, as with "
                       "`hypervocab serve` (default: default)")
    which.add_argument("--tiny", action="store_true", help="a tiny random Llama over the SmolLM2 tokenizer instead")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the batched server's max_batch_size (default: --clients)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the one-at-a-time server (max_batch_size=1): no ratio, half the time")
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="per server, send no new request after this long (default 600)")
    parser.add_argument("--requests", type=int, default=48, help="requests per server (default 48)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout in s (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' prompt choices (default 0)")
    parser.add_argument("--device", default="auto", help="'auto' (default: CUDA when available, else the CPU), "
                        "'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="model dtype (default 'auto': bfloat16 on a GPU that has it, else float32)")
    parser.add_argument("--output", default=None, metavar="PREFIX",
                        help="also write the table to PREFIX.md and the figures to PREFIX.json")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    batch = args.max_batch_size or args.clients
    if batch < 1:
        parser.error("--max-batch-size must be >= 1")

    prompts = stdlib_prompts() + ENGLISH
    t = time.perf_counter()
    model, tok, model_name = served_model(args)
    print(f"loaded {model_name!r} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    phases = []
    try:
        if not args.no_baseline:
            phases.append(serve_phase(model, tok, model_name, prompts, args, 1, "one at a time", with_reference=True))
        phases.append(serve_phase(model, tok, model_name, prompts, args, batch, f"batched (max {batch})",
                                  with_reference=args.no_baseline))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    reference = phases[0].reference
    table = report(phases, reference, args, model_name)
    print(table)
    if args.output:
        Path(args.output + ".md").write_text(table + "\n", encoding="utf-8")
        Path(args.output + ".json").write_text(json.dumps({
            "model": model_name, "clients": args.clients, "max_tokens": args.max_tokens,
            "phases": [{"label": p.label, "max_batch_size": p.max_batch_size, "requests": len(p.results),
                        "errors": len(p.errors()), "mismatches": len(p.mismatches(reference)),
                        "wall_s": p.wall, "tokens_per_s": p.tokens_per_second(),
                        "latency_p50_s": statistics.median([r.latency for r in p.ok]) if p.ok else None,
                        "latency_p95_s": percentile([r.latency for r in p.ok], 0.95)} for p in phases]},
            indent=2) + "\n", encoding="utf-8")
    failed = False
    for p in phases:
        for r in p.errors()[:5]:
            print(f"{p.label}: error (prompt {r.prompt}): {r.error}", file=sys.stderr)
        for r in p.mismatches(reference)[:5]:
            want = reference[r.prompt].text
            # show where they part: the texts often share a long prefix
            at = next((i for i, (a, b) in enumerate(zip(r.text, want)) if a != b), min(len(r.text), len(want)))
            print(f"{p.label}: mismatch (prompt {r.prompt}) at character {at}: got {r.text[max(0, at - 20):at + 40]!r}"
                  f", alone {want[max(0, at - 20):at + 40]!r}", file=sys.stderr)
        if p.metrics_match() is False:
            print(f"{p.label}: /metrics completion totals differ from what the clients got", file=sys.stderr)
        failed |= bool(p.errors() or p.mismatches(reference) or not p.results or p.metrics_match() is False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
