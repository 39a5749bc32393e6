"""The shipped default model (SmolLM2-135M-Instruct uptrained with hypervocab) on the real base model."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest
import torch

from hypervocab import HyperConfig, HyperModel, HyperTokenizer, load

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
    return load("default", base_model=base_dir, device="cpu")


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
        # measured 3.47 vs 5.27 and 4.13 vs 5.88 nats per code (step 340): the shipped weights loaded, training helped
        assert trained < 0.8 * untrained, (name, trained, untrained)


def test_default_is_what_from_pretrained_and_merge_adapter_gave(shipped, base_dir):
    # how the shipped model loaded before hypervocab.load: the base model in float32, the shipped folder over it,
    # eval mode, LoRA merged
    from hypervocab.pretrained import DEFAULT_MODEL, shipped_dir
    from hypervocab.tokenizer import load_tokenizer

    model, htok = shipped
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float32)}
    old = HyperModel.from_pretrained(shipped_dir(), base_model=transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32)).eval().merge_adapter()
    old_tok = HyperTokenizer(load_tokenizer(str(base_dir)), old.config)
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    codes = htok(prompt, return_tensors="pt")["input_ids"]
    assert codes.tolist() == old_tok(prompt, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(codes).logits, old(codes).logits)
    by_name, _ = load(DEFAULT_MODEL, base_model=base_dir, device="cpu")  # the shipped model by its own name
    with torch.no_grad():
        assert torch.equal(by_name(codes).logits, old(codes).logits)


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
    # the base model's bits per byte and the distinct 4-gram ratios of the hypervocab output and of the base
    # model's, on the same prompt, next to the speeds
    assert all(re.search(r"\| [\d.]+ / [\d.]+ \| [01]\.\d\d / [01]\.\d\d \|$", line) for line in table), table
    # both prompt lookups timed on the same prompt: hypervocab's (drafts of codes) and the base model's
    assert all(re.search(r"\| [\d.]+ \| [\d.]+ \| [\d.]+x( \(worse text\))? / [\d.]+x \|", line)
               for line in table), table
    assert len(re.findall(r"with prompt lookup \(K=10\): hypervocab [\d.]+, base [\d.]+ tokens/s", out)) == 3


def test_speculative_decoding_on_the_shipped_model_writes_its_greedy_output(shipped):
    """Prompt lookup on the real model and a real file: the same codes as plain greedy, and drafts taken."""
    model, htok = shipped
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = (lib / HELD_OUT[1]).read_text(encoding="utf-8")[:1500]
    prompt = code + "\n\n# The same code once more, unchanged:\n" + code[:400]
    codes = htok(prompt, return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=48, eos_token_id=[], return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(codes, **kw)
        got = model.generate(codes, prompt_lookup_num_tokens=8, **kw)
    assert got.new_codes == want.new_codes and got.new_base_ids == want.new_base_ids
    st = got.stats[0]
    assert st.accepted_codes > 0 and st.draft_codes >= st.accepted_codes


def test_requests_batched_together_write_what_each_writes_alone_on_the_shipped_model(shipped):
    """Continuous batching on the real model: requests joining at different steps, greedy, each one's text
    and usage exactly what it gets alone on an idle server."""
    from hypervocab.serving.batch import RunningBatch

    from .test_serving_batch import alone, drive, job

    model, htok = shipped
    tok = htok.tokenizer
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = (lib / HELD_OUT[0]).read_text(encoding="utf-8")
    prompts = [code[:900], code[2000:2400], "The museum opens at nine in the morning and closes at six in the "
               "evening, except on Mondays, when it", "Dear team, thank you for your work on the release. Before we "
               "start planning the next one, I would like"]
    want = [alone(model, tok, p, 24) for p in prompts]
    jobs = [(at, *job(tok, p, 24)) for at, p in zip((0, 0, 2, 7), prompts)]
    sizes = drive(RunningBatch(model, tok), [(at, j) for at, j, _ in jobs])
    assert max(sizes) == 4
    assert [out.summary() for _, _, out in jobs] == want


def test_the_top_64_distillation_holds_most_of_the_exact_divergence_on_real_text(shipped):
    """With SmolLM2 as the teacher on held-out code, the bucketed divergence the trainer uses (the teacher's top 64
    tokens and one bucket) is at most the exact one and holds most of it: measured 0.93 to 0.96 of it, the teacher
    keeping 8-9% of its mass outside its top 64 (16 tokens: 0.88-0.93; 256: 0.97-0.98)."""
    from hypervocab.codebook import PreparedCodebooks
    from hypervocab.loss import Teacher, first_tokens, next_code_targets, train_scores

    model, htok = shipped
    codec = model.codec
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in HELD_OUT:
        ids = htok.tokenizer((lib / name).read_text(encoding="utf-8")[:6000], add_special_tokens=False)["input_ids"]
        base = torch.tensor([ids[:700]])
        codes = torch.as_tensor(codec.encode(base[0]))[None]
        prep = PreparedCodebooks.from_codes(codec, codes)
        with torch.no_grad():
            out = model(codes, codebooks=prep, compute_logits=False)
            with model.disable_adapter():
                teacher = model(base, compute_logits=False, codebooks=PreparedCodebooks.base_only(
                    base, base_vocab_size=codec.base_vocab_size, max_subtokens=codec.max_subtokens)).hidden_states
            ends = prep.lengths.cumsum(1) - 1
            teacher = teacher.gather(1, ends.unsqueeze(-1).expand(-1, -1, teacher.shape[-1]))
            targets = next_code_targets(codes, torch.ones_like(codes))
            first = first_tokens(prep, out.head_context.table.shape[1])
            kl = {k: float(train_scores(model, out.hidden_states, out.head_context, targets, first=first,
                                        teacher=Teacher(teacher, top_k=k)).distillation) for k in (64, 0)}
        assert 0.9 * kl[0] < kl[64] <= kl[0] * (1 + 1e-5), (name, kl)


def test_the_written_text_yardstick_tells_the_base_models_text_from_spliced_text_on_the_real_model(shipped):
    """``eval generation``'s judge on the real base model: its own greedy continuation of held-out code scores
    low, and the same start followed by what the broken hypertokens of issue 25 wrote is judged worse."""
    import math

    from hypervocab.evaluation.quality import base_bits, distinct_ngram_ratio, generation_report, is_worse, text_prompts

    model, htok = shipped
    tok = htok.tokenizer
    lib = Path(sysconfig.get_paths()["stdlib"])
    (prompt,) = text_prompts("python", [("calendar.py", (lib / "calendar.py").read_text())], tok, places=1,
                             prompt_tokens=192)
    result = generation_report(model, tok, [prompt], max_new_tokens=32, lookup=False, ignore_eos=True)
    base = next(o for o in result.outputs if o.system == "base")
    assert base.new_tokens == 32 and base.bits_per_byte < 0.6  # what the base model itself would write
    start = tok(base.text, add_special_tokens=False)["input_ids"][:12]
    spliced = start + tok(" = Status.TOTOO_MANING_RIGHEMPTYINGEMPTYINGEMPTYING", add_special_tokens=False)["input_ids"]
    nll, n_bytes = base_bits(model, tok, prompt.ids, spliced)
    ratio = nll / math.log(2) / n_bytes / base.bits_per_byte
    assert ratio > 3 and is_worse(ratio, distinct_ngram_ratio(spliced) / base.distinct_4)
    hyper = result.row("python", "hypervocab")  # measured, whatever it is: the verdict follows its ratios
    assert hyper.worse == is_worse(hyper.bits_per_byte_ratio, hyper.distinct_ratio)
