#!/usr/bin/env python
"""How long a long prompt joining the server's running batch pauses the streams already running.

One greedy request streams (its prompt a few sentences, ``--max-tokens`` base tokens).  Once it has written
``--warm`` codes, ``--joiners`` requests with long prompts (``--prompt-tokens`` base tokens each of real Python:
the largest files of the running interpreter's standard library) join at once.  The running stream's codes are
timestamped as they arrive; the figure is its longest gap between two codes while the joiners read their prompts,
against its median gap before they came (one decoding step).

Both ways of reading a joining prompt run in the same process, taking turns, ``--repeats`` times each:

* ``whole``: ``prefill_chunk=0``, a prompt read in one forward (what the server did before);
* ``chunked``: ``prefill_chunk=--chunk`` codes per step, in between the running rows' steps (the default).

Every answer is also checked: the running stream's text is the same in every run, and equals what it writes
alone.  Prints a Markdown table of medians (longest pause, one step, their ratio, the joiners' time to their
first code) and writes it to ``benchmarks/results/serve_join_pause.md`` / ``.json``.

    python benchmarks/serve_join_pause.py                        # the shipped model on the CPU
    python benchmarks/serve_join_pause.py --tiny --repeats 1     # a smoke run, no weights needed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNNING_PROMPT = ("The museum opens at nine in the morning and closes at six in the evening, except on Mondays. "
                  "Visitors can buy tickets at the door or online. Tell me what a visitor should know:")


class Stream:
    """Events of one request: the arrival time of each code, its text, its end."""

    def __init__(self) -> None:
        self.times: list[tuple[float, int]] = []  # (when, codes written so far)
        self.text = ""
        self.end = None
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        from hypervocab.serving.batch import Piece

        if isinstance(ev, Piece):
            self.times.append((time.perf_counter(), ev.codes))
            self.text += ev.text
        else:
            self.end = ev
            self.done.set()


def long_prompts(tok, n: int, tokens: int) -> list[list[int]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"), key=lambda f: f.stat().st_size, reverse=True)
    out = []
    for f in files:
        ids = tok(f.read_text(encoding="utf-8", errors="replace"))["input_ids"][:tokens]
        if len(ids) == tokens:
            out.append(ids)
        if len(out) == n:
            return out
    raise SystemExit(f"not {n} standard library files of {tokens} tokens")


def one_run(model, tok, *, chunk: int, joiners: list[list[int]], max_tokens: int, warm: int) -> dict:
    from hypervocab.serving.batch import Job
    from hypervocab.serving.engine import Engine

    engine = Engine(model, tok, max_batch_size=1 + len(joiners), prefill_chunk=chunk)
    try:
        running = Stream()
        engine.submit(Job(tok(RUNNING_PROMPT)["input_ids"], max_tokens, running, temperature=0.0))
        while len(running.times) < warm and not running.done.is_set():
            time.sleep(0.005)
        joined_at = time.perf_counter()
        others = [Stream() for _ in joiners]
        for ids, s in zip(joiners, others):
            engine.submit(Job(ids, 1, s, temperature=0.0))
        for s in others:
            s.done.wait(600)
        all_read = max((s.times[0][0] if s.times else time.perf_counter() for s in others), default=joined_at)
        running.done.wait(600)
    finally:
        engine.close()
    before = [b - a for (a, _), (b, _) in zip(running.times, running.times[1:]) if b <= joined_at]
    during = [b - a for (a, _), (b, _) in zip(running.times, running.times[1:]) if b > joined_at and a <= all_read]
    return {"step_s": statistics.median(before) if before else float("nan"),
            "pause_s": max(during) if during else float("nan"),
            "joiners_first_code_s": all_read - joined_at, "text": running.text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="default", help="'default' (the shipped model) or a checkpoint folder")
    which.add_argument("--tiny", action="store_true", help="a tiny random Llama over the SmolLM2 tokenizer")
    p.add_argument("--joiners", type=int, default=1, help="long prompts joining at once (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=4000, help="base tokens of each long prompt (default 4000)")
    p.add_argument("--chunk", type=int, default=64, help="prefill_chunk of the chunked runs (default 64)")
    p.add_argument("--max-tokens", type=int, default=200, help="base tokens the running stream writes (default 200)")
    p.add_argument("--warm", type=int, default=8, help="codes the running stream writes before they join (8)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each way (default 3)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_join_pause", help="results prefix")
    args = p.parse_args(argv)
    import torch

    torch.set_grad_enabled(False)
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from hypervocab.pretrained import smollm2_tokenizer_dir
        from hypervocab.tokenizer import load_tokenizer
        from tests.models import make

        tok = load_tokenizer(str(smollm2_tokenizer_dir()))
        model = make("llama", tok).eval()
    else:
        from hypervocab import load

        model, htok = load(args.model, device=args.device, dtype="float32")
        tok = htok.tokenizer
    joiners = long_prompts(tok, args.joiners, args.prompt_tokens)
    ways = {"whole": 0, "chunked": args.chunk}
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for _ in range(args.repeats):
        for way, chunk in ways.items():  # taking turns: the machine's drift hits both alike
            runs[way].append(one_run(model, tok, chunk=chunk, joiners=joiners, max_tokens=args.max_tokens,
                                     warm=args.warm))
            print(f"{way}: {json.dumps({k: v for k, v in runs[way][-1].items() if k != 'text'})}", file=sys.stderr)
    texts = {r["text"] for rs in runs.values() for r in rs}
    texts.add(one_run(model, tok, chunk=args.chunk, joiners=[], max_tokens=args.max_tokens, warm=0)["text"])  # alone
    rows = []
    for way, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("step_s", "pause_s", "joiners_first_code_s")}
        rows.append({"way": way, "prefill_chunk": ways[way], **med, "pause_steps": med["pause_s"] / med["step_s"]})
    lines = [f"{args.joiners} prompt(s) of {args.prompt_tokens} base tokens joining a running greedy stream "
             f"({'tiny random model' if args.tiny else args.model}, {args.device}); medians of {args.repeats} runs "
             "each, the two ways taking turns.", "",
             "| way | prefill_chunk | one step (median gap) | longest pause while they join | pause in steps | "
             "joiners' first code after |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['way']} | {r['prefill_chunk']} | {r['step_s'] * 1e3:.0f} ms | {r['pause_s']:.2f} s | "
                     f"{r['pause_steps']:.1f} | {r['joiners_first_code_s']:.2f} s |")
    whole, chunked = rows
    lines += ["", f"Chunked / whole: longest pause **{chunked['pause_s'] / whole['pause_s']:.2f}x**, joiners' first "
              f"code {chunked['joiners_first_code_s'] / whole['joiners_first_code_s']:.2f}x. The running stream wrote "
              f"the same text in every run: {'yes' if len(texts) == 1 else 'NO'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "rows": rows, "same_text": len(texts) == 1}, indent=1) + "\n")
    return 0 if len(texts) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
