"""The shipped default model (SmolLM2-135M-Instruct uptrained with hypervocab) on the real base model."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest
import torch

from hypervocab import HyperConfig, HyperModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from .models import assert_same_greedy  # noqa: E402  (after the skips: it imports transformers)

pytestmark = pytest.mark.slow

# standard library files that the recipe's split holds out of the shipped model's training set
HELD_OUT = ["calendar.py", "contextlib.py"]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m" / "prepare_data.py"


def test_the_held_out_files_really_are_held_out():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert all(recipe.held_out(name, 0, 0.1) for name in HELD_OUT)
    assert not recipe.held_out("json/decoder.py", 0, 0.1)  # the split is real: most files are trained on


@pytest.fixture(scope="module")
def base_dir():
    from assets import smollm2_model_dir

    return smollm2_model_dir()


@pytest.fixture(scope="module")
def shipped(base_dir):
    from hypervocab.pretrained import load_default

    return load_default(base_model=base_dir)


def test_shipped_model_loads_merged_and_reads_held_out_code_better_than_untrained_encoders(shipped, base_dir):
    model, htok = shipped
    assert model.adapter_merged and not model.training
    assert (model.codec.max_codebook_size, model.codec.max_subtokens) == (1024, 4)
    fresh = HyperModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(base_dir), htok.tokenizer,
                                 HyperConfig(max_codebook_size=1024, max_subtokens=4, protect_digits=True)).eval()
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in HELD_OUT:
        text = (lib / name).read_text(encoding="utf-8")[:3000]
        codes = htok(text, return_tensors="pt")["input_ids"]
        assert codes.shape[1] < 0.9 * len(htok.tokenizer(text)["input_ids"])  # the prompt really is compressed
        with torch.no_grad():
            trained = model(codes, labels=codes).loss.item()
            untrained = fresh(codes, labels=codes).loss.item()
        # measured 3.47 vs 5.27 and 4.13 vs 5.88 nats per code (step 340): the shipped weights loaded and training helped
        assert trained < 0.8 * untrained, (name, trained, untrained)


def test_merged_and_unmerged_shipped_model_write_the_same_text(shipped):
    model, htok = shipped
    enc = htok("def fibonacci(n):\n    ", return_tensors="pt")
    with torch.no_grad():
        merged = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=10)
        model.unmerge_adapter()
        try:
            unmerged = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=10)
        finally:
            model.merge_adapter()
        assert_same_greedy(model, merged, unmerged, prompt_len=enc["input_ids"].shape[1])


def test_demo_shows_three_prompts_their_compression_and_the_speed_table(base_dir, capsys):
    from hypervocab.cli.main import main

    assert main(["demo", "--base-model", str(base_dir), "--max-new-tokens", "6", "--no-color"]) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"=== (.+?): prompt (\d+) base tokens -> (\d+) codes", out)
    assert [h[0].split(" (")[0] for h in headers] == ["continue real code", "a chat question", "summarise a document"]
    tokens, codes = int(headers[0][1]), int(headers[0][2])
    assert codes < 0.9 * tokens  # the code prompt is a table of similar lines: it compresses
    stats = re.findall(r"output (\d+) base tokens in (\d+) codes .* tokens/s vs base model [\d.]+ tokens/s: "
                       r"[\d.]+x", out)
    assert len(stats) == 3 and all(int(n) == 6 for n, _ in stats)
    table = [line for line in out.splitlines() if re.match(r"\| [a-z ]+ \| \d+ -> \d+ \| 6 -> \d+ \|", line)]
    assert len(table) == 3 and table[0].startswith("| continue real code | ")
    # the distinct 4-gram ratios of the hypervocab output and the base model's, on the same prompt
    assert all(re.search(r"\| [01]\.\d\d / [01]\.\d\d \|$", line) for line in table), table
