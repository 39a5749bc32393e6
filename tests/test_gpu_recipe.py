"""recipes/smollm2-135m/gpu_run.py and evaluate_run.py: what the two-call GPU run relies on, checked here cheaply.

The whole path (pack, both calls, land) is rehearsed by ``gpu_run.py rehearse``; these tests pin the pieces
whose failure would only show on the device: the windows built in call 1 must be found again in call 2
after part 2 of the corpus arrives, and the data list must weigh domains as asked.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hypervocab import HyperConfig
from hypervocab.config import bind_config
from hypervocab.training.config import DataSource
from hypervocab.training.data import build_windows

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-135m"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"smollm2_{name}", RECIPE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu_run():
    return _module("gpu_run")


def _write(corpus: Path, domain: str, origin: str, texts: list[str], chat: bool = False) -> None:
    (corpus / domain).mkdir(parents=True, exist_ok=True)
    with open(corpus / domain / f"{origin}-000.jsonl", "w") as f:
        for t in texts:
            row = {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]} if chat \
                else {"text": t}
            f.write(json.dumps(row) + "\n")


def _summary(corpus: Path, tokens: dict[str, dict[str, int]]) -> None:
    (corpus / "summary.json").write_text(json.dumps({"domains": {
        d: {"tokens": sum(o.values()), "origins": {k: {"tokens": v} for k, v in o.items()}}
        for d, o in tokens.items()}}))


def test_sources_of_earlier_origins_keep_their_place_and_windows(gpu_run, tmp_path, smollm2_tokenizer, stdlib_files):
    """Call 1 builds the windows of the image's trees and part 1; call 2 adds part 2 and must reuse them all."""
    corpus = tmp_path / "corpus"
    texts = [p.read_text() for p in stdlib_files]
    _write(corpus, "python", "tree", texts[:3])
    _write(corpus, "docs", "part-1", texts[3:5])
    _write(corpus, "chat", "part-1", ["hello there", "what is a tuple?"], chat=True)
    first = gpu_run.data_sources(corpus)
    codec = bind_config(HyperConfig(max_codebook_size=64), smollm2_tokenizer).codec()

    def windows(sources):
        return build_windows([DataSource(**s) for s in sources], smollm2_tokenizer, codec, window=128,
                             eval_fraction=0.2, seed=0, cache_dir=tmp_path / "cache", progress=False)

    before = windows(first)
    _write(corpus, "python", "part-2", texts[5:6])
    _write(corpus, "docs", "part-2", texts[6:7])
    second = gpu_run.data_sources(corpus)
    assert second[: len(first)] == first
    assert [(Path(s["path"]).name, s["glob"]) for s in second[len(first):]] == [
        ("python", ["part-2-*.jsonl"]), ("docs", ["part-2-*.jsonl"])]
    assert [s["kind"] for s in second] == ["jsonl", "jsonl", "chat", "jsonl", "jsonl"]
    after = windows(second)
    n = len(before[0])
    np.testing.assert_array_equal(after[0].codes[:n], before[0].codes)  # the earlier sources' windows, as built
    assert after[0].from_cache is False and len(after[0]) > n
    again = windows(second)
    assert again[0].from_cache and again[1].from_cache  # nothing built twice


def test_domain_weights_are_split_among_origins_by_tokens(gpu_run, tmp_path):
    corpus = tmp_path / "corpus"
    for d, o in (("python", "tree"), ("python", "part-2"), ("po", "part-1")):
        _write(corpus, d, o, ["x = 1\n" * 20])
    _summary(corpus, {"python": {"tree": 300, "part-2": 100}, "po": {"part-1": 50}})
    got = {(Path(s["path"]).name, s["glob"][0]): s["weight"]
           for s in gpu_run.data_sources(corpus, {"python": 0.6, "po": 0.4})}
    assert got == pytest.approx({("python", "tree-*.jsonl"): 0.45, ("po", "part-1-*.jsonl"): 0.4,
                                 ("python", "part-2-*.jsonl"): 0.15})


def test_heldout_texts_read_whole_files_up_to_the_budget(tmp_path):
    evaluate_run = _module("evaluate_run")
    for i, size in enumerate((30, 30, 30)):
        (tmp_path / "python").mkdir(exist_ok=True)
        (tmp_path / "python" / f"m{i}.py").write_text(f"# {i}\n" + "x" * size)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "big.rst.txt").write_text("word " * 100)
    texts = evaluate_run.heldout_texts(tmp_path, 70)
    assert [t[:3] for t in texts["python"]] == ["# 0", "# 1"]  # the third would pass the budget
    assert len(texts["docs"]) == 1 and len(texts["docs"][0].encode()) == 70  # one file alone: its head
    assert set(texts) == {"python", "docs"}
