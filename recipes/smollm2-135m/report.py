#!/usr/bin/env python
"""Regenerate the shipped model's report: held-out bits per byte, compression, written text, speed, samples.

Runs the ``hypervocab eval`` commands on the held-out files of ``prepare_data.py`` (never trained on),
writes JSON, Markdown and PNG files into ``reports/smollm2-135m/``, and rewrites the part of the
README (and of the model card) between ``<!-- report:start -->`` and ``<!-- report:end -->``.

    python recipes/smollm2-135m/report.py              # about 20 minutes on 2 CPU cores
    python recipes/smollm2-135m/report.py --only bpb   # one part
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
os.environ.setdefault("HYPERVOCAB_CACHE", str(ROOT / ".cache"))
OUT = ROOT / "reports" / "smollm2-135m"
DATA = ROOT / ".cache" / "smollm2-data" / "heldout"
PARTS = ("bpb", "compression", "generation", "speed", "samples")
START, END = "<!-- report:start -->", "<!-- report:end -->"


def _cli(argv: list[str]) -> str:
    """Run ``hypervocab ARGV`` in this process; returns what it printed."""
    from hypervocab.cli.main import main

    print("hypervocab " + " ".join(argv), file=sys.stderr)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code:
        raise SystemExit(f"hypervocab {argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({code})")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="the hypervocab model (default: the shipped one)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts (repeatable)")
    parser.add_argument("--max-bytes", type=int, default=40_000, help="held-out text per domain for bits per byte")
    parser.add_argument("--repeats", type=int, default=2, help="runs per prompt and system for speed")
    args = parser.parse_args()
    parts = args.only or list(PARTS)

    from hypervocab.pretrained import smollm2_base_dir

    if not DATA.is_dir():
        subprocess.run([sys.executable, str(HERE / "prepare_data.py"), "--out", str(DATA.parent)], check=True)
    base = str(smollm2_base_dir())
    model = ["--model", args.model, "--base-model", base]
    OUT.mkdir(parents=True, exist_ok=True)
    domains = [f"{d}={DATA / d}" for d in ("python", "docs", "json", "po")]
    if "bpb" in parts:
        _cli(["eval", "bpb", *domains, *model, "--max-bytes", str(args.max_bytes), "--window", "1024",
              "--stride", "512", "--out", str(OUT), "--plot"])
    if "compression" in parts:
        _cli(["eval", "compression", *domains, f"yaml={DATA / 'yaml'}", *model, "--generate", "4",
              "--prompt-tokens", "384", "--max-new-tokens", "96", "--out", str(OUT), "--plot"])
    if "generation" in parts:  # what it writes: held-out code, prose and translations, and chat questions
        _cli(["eval", "generation", *[d for d in domains if not d.startswith("json=")], *model, "--files", "2",
              "--places", "3", "--prompt-tokens", "256", "--chat", "3", "--max-new-tokens", "64", "--out", str(OUT),
              "--plot"])
    if "speed" in parts:
        files = sorted((DATA / "python").rglob("*.py"))
        docs = sorted((DATA / "docs").rglob("*.rst.txt"))
        _cli(["eval", "speed", "--edit", str(files[0]), "--document", str(docs[0]), "--free", str(files[2]), *model,
              "--max-prompt-tokens", "768", "--max-new-tokens", "96", "--repeats", str(args.repeats),
              "--out", str(OUT), "--plot"])
    if "samples" in parts:
        text = _cli(["demo", *model, "--no-color", "--max-new-tokens", "80"])
        (OUT / "samples.md").write_text("```text\n" + text.strip() + "\n```\n")
    _rewrite()


def _section() -> str:
    """The report as Markdown, from the files in ``reports/smollm2-135m/``."""
    rel = OUT.relative_to(ROOT).as_posix()
    out = []

    def read(name: str) -> str | None:
        p = OUT / name
        return p.read_text().strip() if p.is_file() else None

    if (md := read("bpb.md")) is not None:
        out += ["#### Held-out bits per byte (lower is better)", "", md, "", f"![bits per byte]({rel}/bpb.png)", ""]
    if (md := read("compression.md")) is not None:
        out += ["#### Compression of held-out input, and of the model's own output", "", md, "",
                f"![compression]({rel}/compression.png)", ""]
    if (md := read("generation.md")) is not None:
        out += ["#### What it writes: held-out prompts continued, judged by the base model", "", md, "",
                f"![written text]({rel}/generation.png)", ""]
    if (md := read("speed.md")) is not None:
        out += ["#### Generation speed: base model, hypervocab, prompt lookup decoding", "", md, "",
                f"![speed]({rel}/speed.png)", ""]
    if (md := read("samples.md")) is not None:
        out += ["#### Sample outputs (`hypervocab demo --no-color`)", "", md, ""]
    facts = ROOT / "src" / "hypervocab" / "shipped" / "smollm2-135m-instruct" / "training_facts.json"
    if facts.is_file():
        f = json.loads(facts.read_text())
        device = f.get("device", "CPU")
        hours = f"{device}, about {f['estimated_training_hours']:.1f} hours of training steps" \
            if "estimated_training_hours" in f else device
        seen = (f"{f['base_tokens_seen']:,} base tokens (at most {f['codes_per_step']:,} codes per step; counted "
                "along the data)" if f.get("base_tokens_counted") else
                f"about {f['base_tokens_seen']:,} base tokens ({f['codes_per_step']:,} codes per step)")
        out.insert(0, f"Trained {f['steps']} steps, {seen}, on {hours}. Regenerate this report with "
                      "`python recipes/smollm2-135m/report.py`.\n")
    return "\n".join(out).strip() + "\n"


def _rewrite() -> None:
    section = _section()
    (OUT / "README.md").write_text("# SmolLM2-135M hypervocab report\n\n" + section)
    for path in (ROOT / "README.md", HERE / "MODEL_CARD.md",
                 ROOT / "src" / "hypervocab" / "shipped" / "smollm2-135m-instruct" / "README.md"):
        if not path.is_file():
            continue
        text = path.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            path.write_text(head + START + "\n" + section.replace("](reports/", "](" + _prefix(path) + "reports/")
                            + END + tail)
            print(f"rewrote the report in {path.relative_to(ROOT)}", file=sys.stderr)


def _prefix(path: Path) -> str:
    """Relative path from ``path``'s folder back to the repository root, for image links."""
    depth = len(path.parent.relative_to(ROOT).parts)
    return "../" * depth


if __name__ == "__main__":
    main()
