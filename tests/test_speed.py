"""``hypervocab eval speed``: three workloads x four systems on a tiny random model over the real tokenizer.

Timings are never asserted (they depend on the machine): only that every system wrote what it was
asked to, that the numbers are there and sane, and that the reports are well formed.
"""

from __future__ import annotations

import json
import math
import re
import sys
import sysconfig
from dataclasses import fields
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hypervocab.embedding import HyperEmbedding, HyperHead
from hypervocab.errors import ConfigError, InputTypeError
from hypervocab.evaluation.speed import (
    SYSTEMS,
    WORKLOADS,
    SpeedRow,
    SpeedRun,
    build_prompt,
    speed_report,
)

from .models import make, tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
N = 10  # new base tokens: more than prompt lookup's 3 + 1 per step, so every system has a decode phase
SIZES = dict(max_prompt_tokens=96, max_new_base_tokens=N, prompt_lookup_num_tokens=3)


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    """Real text: a stdlib module to edit, this repository's README as the document, argparse to continue."""
    return {"edit": STDLIB / "textwrap.py", "document": ROOT / "README.md", "free": STDLIB / "argparse.py"}


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    return make("llama", smollm2_tokenizer)


@pytest.fixture(scope="module")
def result(model, smollm2_tokenizer, files):
    return speed_report(model, smollm2_tokenizer, files, repeats=2, warmup=False, **SIZES)


def test_every_system_writes_the_requested_base_tokens_on_every_workload(result):
    assert [(r.workload, r.system) for r in result.rows] == [(w, s) for w in WORKLOADS for s in SYSTEMS]
    assert len(result.runs) == len(WORKLOADS) * len(SYSTEMS) * 2
    assert all(r.new_tokens == N for r in result.runs)
    assert all(r.new_tokens == N and r.runs == 2 for r in result.rows)
    for p in result.prompts:
        assert p.chat and p.truncated and 0 < p.codes <= p.tokens <= SIZES["max_prompt_tokens"]
        assert sorted(p.outputs) == sorted(SYSTEMS) and all(len(o) == N for o in p.outputs.values())
    hyper = [r for r in result.runs if r.system == "hypervocab"]
    assert all(r.prompt_codes is not None and r.prompt_codes <= r.prompt_tokens for r in hyper)
    assert all(r.hypertokens is not None and 0 <= r.hypertokens <= r.steps == r.codes <= N for r in hyper)
    # with drafts, a forward pass may take several codes: steps count forward passes
    looked = [r for r in result.runs if r.system == "hypervocab_lookup"]
    assert all(r.codes is not None and 1 <= r.steps <= r.codes <= N for r in looked)


def test_the_numbers_are_positive_and_finite(result):
    for row in result.rows:
        for name in ("prompt_tokens", "prefill_tokens_per_s", "ttft_s", "decode_tokens_per_s", "total_s",
                     "total_tokens_per_s", "tokens_per_step", "decode_speedup", "total_speedup"):
            value = getattr(row, name)
            assert value is not None and math.isfinite(value) and value > 0, (row.workload, row.system, name, value)
        assert 0 <= row.same_as_base <= 1
        hyper = row.system.startswith("hypervocab")
        for name in ("prompt_codes", "codes", "base_tokens_per_code", "hypertokens"):
            assert (getattr(row, name) is not None) == hyper, (row.system, name)
        if hyper:
            assert row.base_tokens_per_code == pytest.approx(N / row.codes) and row.base_tokens_per_code >= 1
    for row in result.rows:
        if row.system == "base":
            assert row.decode_speedup == 1.0 and row.total_speedup == 1.0 and row.same_as_base == 1.0


def test_prompt_lookup_writes_exactly_what_base_greedy_writes(result):
    """Prompt lookup decoding is lossless: the same prompt must give the same greedy text."""
    for p in result.prompts:
        assert p.outputs["prompt_lookup"] == p.outputs["base"], p.workload
    assert all(r.same_as_base == 1.0 for r in result.rows if r.system == "prompt_lookup")


def test_hypervocab_with_prompt_lookup_writes_what_hypervocab_greedy_writes(result):
    for p in result.prompts:
        assert p.outputs["hypervocab_lookup"] == p.outputs["hypervocab"], p.workload
    md = result.to_markdown()
    for w in WORKLOADS:  # the ratio the speed goal is about, measured in the same run
        row, lookup = result.row(w, "hypervocab_lookup"), result.row(w, "prompt_lookup")
        assert f"| {w} | {row.decode_tokens_per_s / lookup.decode_tokens_per_s:.2f}x |" in md


def test_the_json_has_every_field(result):
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert sorted(d) == ["prompts", "rows", "runs", "settings"]
    assert all(sorted(r) == sorted(f.name for f in fields(SpeedRow)) for r in d["rows"])
    run_keys = {f.name for f in fields(SpeedRun)} | {"prefill_tokens_per_s", "decode_tokens_per_s",
                                                     "total_tokens_per_s"}
    assert all(set(r) == run_keys for r in d["runs"])
    assert all(set(p) == {"workload", "source", "tokens", "codes", "truncated", "chat", "outputs"}
               for p in d["prompts"])
    s = d["settings"]
    assert s["eos"] == "ignored" and s["decoding"] == "greedy" and s["workloads"] == list(WORKLOADS)
    assert (s["max_new_base_tokens"], s["prompt_lookup_num_tokens"], s["repeats"]) == (N, 3, 2)
    assert {"model", "device", "dtype", "threads", "versions", "files", "max_prompt_tokens"} <= set(s)


def test_the_markdown_has_one_row_per_workload_and_system(result):
    md = result.to_markdown()
    main_table = md.split("\n\n")[1]  # the intro, this table, then the lookup-against-lookup table
    rows = [line for line in main_table.splitlines() if re.match(r"\| (edit|document|free) \|", line)]
    assert [tuple(c.strip() for c in line.split("|")[1:3]) for line in rows] == [
        (w, s) for w in WORKLOADS for s in SYSTEMS]
    header = next(line for line in md.splitlines() if line.startswith("| workload"))
    for column in ("prefill tok/s", "TTFT (s)", "decode tok/s", "decode speed-up"):
        assert column in header
    assert all(line.count("|") == header.count("|") for line in rows)


def test_plot_writes_a_png(result, tmp_path):
    out = result.plot(tmp_path / "speed.png")
    assert out == tmp_path / "speed.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(result, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # what an import of a missing package meets
    with pytest.raises(ImportError, match=re.escape("pip install 'hypervocab[train]'")):
        result.plot(tmp_path / "speed.png")


def test_without_hypertokens_hypervocab_writes_what_base_writes(smollm2_tokenizer, files):
    """With no codebook the hypervocab model is the base model: same prompt, same greedy text."""
    plain = make("llama", smollm2_tokenizer, max_codebook_size=0)
    res = speed_report(plain, smollm2_tokenizer, {"free": files["free"]}, repeats=1, warmup=False, **SIZES)
    (p,) = res.prompts
    assert p.codes == p.tokens
    assert p.outputs["hypervocab"] == p.outputs["base"] == p.outputs["prompt_lookup"]
    assert res.row("free", "hypervocab").same_as_base == 1.0


def test_with_a_static_cache_base_and_hypervocab_write_what_they_write_with_a_dynamic_one(result, model,
                                                                                          smollm2_tokenizer, files):
    """``cache_implementation="static"``: the base model through Hugging Face's static cache, hypervocab through
    its own (:mod:`hypervocab.static_cache`); same greedy text as the dynamic run, and the report says so."""
    res = speed_report(model, smollm2_tokenizer, {"edit": files["edit"]}, repeats=1, warmup=False,
                       cache_implementation="static", **SIZES)
    (p,) = res.prompts
    want = next(q for q in result.prompts if q.workload == "edit")
    assert p.outputs == want.outputs
    assert res.settings["cache_implementation"] == "static" and "static KV cache" in res.to_markdown()


def test_the_base_systems_run_with_lora_off_and_the_wrappers_come_back(smollm2_tokenizer, files):
    from peft import LoraConfig

    model = make("llama", smollm2_tokenizer)
    # random B: the adapter changes the model's output, so "LoRA off" is seen in what the base writes
    model.add_lora(LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False))
    text = files["edit"].read_text()
    res = speed_report(model, smollm2_tokenizer, {"edit": files["edit"]}, repeats=1, warmup=False, **SIZES)
    assert isinstance(model.embedding, HyperEmbedding) and isinstance(model.head, HyperHead)
    ids, _ = build_prompt("edit", text, smollm2_tokenizer, max_prompt_tokens=96, chat=True, language="python")
    x = torch.tensor([ids])
    reference = tiny("llama").eval()  # the same seed: the same weights, never wrapped, no adapter
    want = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                              eos_token_id=[], pad_token_id=0)[0, len(ids):].tolist()
    assert res.prompts[0].outputs["base"] == want
    with torch.no_grad():  # and the adapter does change the output, so the check above means something
        on = model.base(input_ids=x).logits[0, -1, : model.config.base_vocab_size].argmax()
        off = reference(input_ids=x).logits[0, -1].argmax()
    assert on != off


def test_build_prompt_renames_a_function_and_fits_the_limit(smollm2_tokenizer):
    tok = smollm2_tokenizer
    code = (ROOT / "src" / "hypervocab" / "positions.py").read_text()
    ids, cut = build_prompt("edit", code, tok, max_prompt_tokens=4096, chat=False, language="python")
    text = tok.decode(ids)
    assert not cut and len(ids) <= 4096
    assert text.startswith("Rename the function `position_ids` to `position_ids_v2`")
    assert code.rstrip() in text and text.endswith("The same file with that change:\n\n```python\n")
    ids, cut = build_prompt("edit", code, tok, max_prompt_tokens=200, chat=False, language="python")
    body = tok.decode(ids).split("```python\n")[1].split("\n```")[0] + "\n"
    assert cut and len(ids) <= 200 and code.startswith(body)  # a prefix of the file, cut at a line end
    ids, cut = build_prompt("document", code, tok, max_prompt_tokens=80, chat=True)
    text = tok.decode(ids)
    assert cut and len(ids) <= 80 and text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    ids, cut = build_prompt("free", code, tok, max_prompt_tokens=50, chat=False)
    assert cut and ids == tok(code)["input_ids"][: len(ids)] and len(ids) >= 48


@pytest.mark.parametrize("options, message", [
    ({"max_prompt_tokens": 0}, "max_prompt_tokens must be an int >= 1, got 0"),
    ({"max_new_base_tokens": 1}, "max_new_base_tokens must be an int >= 2, got 1"),
    ({"prompt_lookup_num_tokens": -3}, "prompt_lookup_num_tokens must be an int >= 1, got -3"),
    ({"repeats": 0}, "repeats must be an int >= 1, got 0"),
    ({"repeats": True}, "repeats must be an int >= 1, got True"),
    ({"max_new_base_tokens": 8.5}, "max_new_base_tokens must be an int >= 2, got 8.5"),
    ({"chat_template": "yes"},
     "chat_template must be True, False or None (use it when the tokenizer has one), got 'yes'"),
    ({"cache_implementation": "paged"}, "cache_implementation must be one of 'dynamic', 'static', got 'paged'"),
])
def test_bad_sizes_raise_naming_the_argument(model, smollm2_tokenizer, files, options, message):
    with pytest.raises(ConfigError) as e:
        speed_report(model, smollm2_tokenizer, files, **options)
    assert str(e.value) == message


def test_bad_files_raise_naming_the_workload_and_the_path(model, smollm2_tokenizer, files, tmp_path):
    def fails(given) -> str:
        with pytest.raises(ConfigError) as e:
            speed_report(model, smollm2_tokenizer, given)
        return str(e.value)

    assert fails({"chat": files["free"]}) == ("files has an unknown workload 'chat': the workloads are 'edit', "
                                              "'document', 'free'")
    assert fails({}) == "files must name at least one workload of 'edit', 'document', 'free', got {}"
    missing = tmp_path / "missing.py"
    assert fails({"edit": [files["edit"], missing]}) == (f"files['edit'] holds {str(missing)!r}, which is not a "
                                                         "file: give existing text files")
    assert fails({"free": []}) == "files['free'] must be a file path or a non-empty list of them, got []"
    empty = tmp_path / "empty.md"
    empty.write_text("  \n")
    assert fails({"document": empty}) == (f"files['document'] holds {str(empty)!r}, which is empty: give files "
                                          "with some text")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\xff" * 10)
    assert fails({"free": binary}) == (f"files['free'] holds {str(binary)!r}, which is not UTF-8 text: give text "
                                       "files")
    with pytest.raises(ConfigError, match=r"^max_prompt_tokens must be at least \d+ for the 'edit' workload \(its "
                                          r"instruction and template take \d+ base tokens\), got 20$"):
        speed_report(model, smollm2_tokenizer, {"edit": files["edit"]}, max_prompt_tokens=20)
    with pytest.raises(InputTypeError, match=r"^files must be a mapping of workload name to file path\(s\), got list$"):
        speed_report(model, smollm2_tokenizer, [files["edit"]])
    with pytest.raises(InputTypeError, match="^model must be a HyperModel, got LlamaForCausalLM$"):
        speed_report(tiny("llama"), smollm2_tokenizer, files)
    with pytest.raises(ConfigError, match="^workload must be one of 'edit', 'document', 'free', got 'chat'$"):
        build_prompt("chat", "text", smollm2_tokenizer, max_prompt_tokens=10, chat=False)


def test_every_speed_stands_next_to_what_the_system_wrote(result, model, smollm2_tokenizer):
    """Bits per byte (the base model's, of each system's first output) and distinct 4-grams, per row; a
    speed-up whose text is worse than base's by the stated thresholds is marked in the table."""
    from hypervocab.evaluation.quality import base_bits, distinct_ngram_ratio, is_worse

    tok = smollm2_tokenizer
    for row in result.rows:
        prompts = [p for p in result.prompts if p.workload == row.workload]
        assert len(prompts) == 1
        ids = build_prompt(row.workload, Path(prompts[0].source).read_text(), tok, chat=True,
                           language="python" if row.workload == "edit" else "",
                           max_prompt_tokens=SIZES["max_prompt_tokens"])[0]
        nll, n_bytes = base_bits(model, tok, ids, prompts[0].outputs[row.system])
        assert row.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes)
        assert row.distinct_4 == distinct_ngram_ratio(prompts[0].outputs[row.system])
        base = result.row(row.workload, "base")
        if row.system == "base":
            assert row.worse is None
        else:
            assert row.worse == is_worse(row.bits_per_byte / base.bits_per_byte, row.distinct_4 / base.distinct_4)
    for system in ("prompt_lookup",):  # lossless: the same text as base, never worse
        assert not any(r.worse for r in result.rows if r.system == system)
    md = result.to_markdown()
    for row in result.rows:
        line = next(x for x in md.splitlines() if x.startswith(f"| {row.workload} | {row.system} |"))
        assert ("(worse text)" in line) == bool(row.worse) and f"| {row.bits_per_byte:.3f} |" in line
