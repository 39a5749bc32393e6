"""Evaluation: compression on a hand-made corpus, bits per byte two ways, and the eval commands end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hypervocab.cli.main import main
from hypervocab.errors import ConfigError, InputTypeError
from hypervocab.evaluation.likelihood import continuation_logprob, prefix_id, score_texts, sliding_windows

transformers = pytest.importorskip("transformers")

from .models import make, tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "src" / "hypervocab" / "errors.py").read_text()


@pytest.fixture(scope="module")
def lora_model(smollm2_tokenizer):
    """A tiny hypervocab Llama with a LoRA adapter whose B matrices are not zero, so LoRA on != LoRA off."""
    from peft import LoraConfig

    model = make("llama", smollm2_tokenizer)
    model.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def direct_bits_per_byte(logits: torch.Tensor, ids: list[int], text: str) -> float:
    """Sum of -log p of ids[1:] from one full forward's logits ``[T, N]``, in bits, over the text's bytes."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    return float(-logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum()) / math.log(2) / len(text.encode())


def test_bits_per_byte_equals_a_direct_sum_of_log_probs(lora_model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = TEXT[:1500]
    ids = [prefix_id(tok)] + tok(text, add_special_tokens=False)["input_ids"]
    scores = score_texts(lora_model, tok, [text], window=4096, stride=4096)
    # the base model is the plain tiny Llama (same seed), not the LoRA one
    with torch.no_grad():
        base_logits = tiny("llama").eval()(torch.tensor([ids])).logits[0]
        codes = lora_model.codec.encode(ids).tolist()
        hyper_logits = lora_model(torch.tensor([codes])).logits[0]
    assert scores["base"].bytes == scores["hypervocab"].bytes == len(text.encode())
    assert scores["base"].units == scores["base"].tokens == len(ids) - 1
    assert scores["hypervocab"].units == len(codes) - 1 < len(ids) - 1
    assert scores["base"].bits_per_byte == pytest.approx(direct_bits_per_byte(base_logits, ids, text), rel=1e-5)
    assert scores["hypervocab"].bits_per_byte == pytest.approx(direct_bits_per_byte(hyper_logits, codes, text),
                                                               rel=1e-5)
    assert scores["base"].bits_per_byte != pytest.approx(scores["hypervocab"].bits_per_byte, rel=1e-3)
    assert scores["base"].byte_perplexity == pytest.approx(2 ** scores["base"].bits_per_byte)


def test_sliding_windows_score_every_token_once_from_the_same_context(lora_model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = TEXT[:2000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = sliding_windows(len(ids), 200, 64)
    assert windows[0] == (0, 0, 200) and windows[1] == (64, 200, 264)
    scored = [i for _, s, e in windows for i in range(s, e)]
    assert scored == list(range(len(ids)))
    scores = score_texts(lora_model, tok, [text], window=200, stride=64)
    assert scores["base"].units == len(ids)
    # the second window by hand: 136 tokens of context, 64 scored, for both models
    ctx, start, end = windows[1]
    with torch.no_grad():
        logits = tiny("llama").eval()(torch.tensor([ids[ctx:end]])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)[start - ctx - 1: end - ctx - 1]
    direct = float(logp.gather(-1, torch.tensor(ids[start:end])[:, None]).sum())
    got = continuation_logprob(lora_model, ids[ctx:start], ids[start:end], base=True)
    assert got.logprob == pytest.approx(direct, rel=1e-5) and got.units == 64
    # the hypervocab side continues the LZW pass over the scored tokens: its codes decode to exactly them
    c = continuation_logprob(lora_model, ids[ctx:start], ids[start:end])
    assert 0 < c.units < 64
    with pytest.raises(ConfigError, match=r"stride must be at most window \(8\), got 9"):
        sliding_windows(10, 8, 9)
    with pytest.raises(InputTypeError, match="context must hold at least one token"):
        continuation_logprob(lora_model, [], ids[:3])


def test_compression_of_a_hand_made_corpus_equals_hand_computed_values(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("the the the the the the")
    (tmp_path / "b" / "y.txt").write_text("the the the")
    (tmp_path / "b" / "z.txt").write_text("a a a a")
    # the hand computation below assumes these tokenizations
    the, _the = tok("the the", add_special_tokens=False)["input_ids"]
    a, _a = tok("a a", add_special_tokens=False)["input_ids"]
    assert tok("the the the the the the", add_special_tokens=False)["input_ids"] == [the] + [_the] * 5
    assert tok("a a a a", add_special_tokens=False)["input_ids"] == [a] + [_a] * 3
    tok.save_pretrained(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "tok2")
    out = tmp_path / "out"
    assert main(["eval", "compression", f"rep={tmp_path / 'a'}", f"two={tmp_path / 'b'}", "--tokenizer",
                 str(tmp_path / "tok"), "--tokenizer", str(tmp_path / "tok2"), "--out", str(out), "--plot"]) == 0
    every = json.loads((out / "compression.json").read_text())["rows"]
    assert [(r["tokenizer"], r["path"]) for r in every] == [
        (str(tmp_path / t), d) for t in ("tok", "tok2") for d in ("rep", "two")]
    rows = {r["path"]: r for r in every if r["tokenizer"] == str(tmp_path / "tok")}
    # LZW, M = 4: the | _the (+[the,_the]) | _the (+[_the,_the]) | [_the,_the] (+[_the,_the,_the]) | [_the,_the]
    assert {k: rows["rep"][k] for k in ("files", "bytes", "tokens", "codes", "hypertokens")} == {
        "files": 1, "bytes": 23, "tokens": 6, "codes": 4, "hypertokens": 2}
    # "the the the": 3 codes, none merged; "a a a a": a | _a | [_a,_a]
    assert {k: rows["two"][k] for k in ("files", "bytes", "tokens", "codes", "hypertokens")} == {
        "files": 2, "bytes": 18, "tokens": 7, "codes": 6, "hypertokens": 1}
    assert rows["rep"]["codes_per_token"] == pytest.approx(4 / 6)
    assert rows["rep"]["hypertoken_share"] == pytest.approx(0.5)
    assert rows["two"]["bytes_per_token"] == pytest.approx(18 / 7)
    assert "| rep | 1 | 23 | 6 | 3.83 | 4 | 5.75 | 0.667 | 50.0% |" in (out / "compression.md").read_text()
    assert (out / "compression.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer, lora_model):
    """The LoRA model saved as a hypervocab checkpoint over a saved base folder."""
    d = tmp_path_factory.mktemp("eval-ckpt")
    tiny("llama").save_pretrained(d / "base")
    smollm2_tokenizer.save_pretrained(d / "base")
    lora_model.config = replace(lora_model.config, base_model_name_or_path=str(d / "base"))
    lora_model.save_pretrained(d / "model")
    smollm2_tokenizer.save_pretrained(d / "model")
    return d / "model"


def test_eval_bpb_and_generated_compression_commands(checkpoint, tmp_path, smollm2_tokenizer):
    src = ROOT / "src" / "hypervocab"
    out = tmp_path / "out"
    assert main(["eval", "bpb", f"code={src / 'errors.py'}", f"docs={ROOT / 'README.md'}", "--model",
                 str(checkpoint), "--max-bytes", "1500", "--window", "256", "--stride", "128", "--out", str(out),
                 "--plot"]) == 0
    rows = {r["domain"]: r for r in json.loads((out / "bpb.json").read_text())["rows"]}
    assert set(rows) == {"code", "docs", "total"}
    assert rows["total"]["bytes"] == rows["code"]["bytes"] + rows["docs"]["bytes"] <= 3000
    for r in rows.values():
        assert r["base_bits_per_byte"] > 0 and r["hypervocab_bits_per_byte"] > 0
        assert r["ratio"] == pytest.approx(r["hypervocab_bits_per_byte"] / r["base_bits_per_byte"])
    assert (out / "bpb.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "compression", f"code={src}", "--glob", "errors.py", "--glob", "positions.py",
                 "--model", str(checkpoint), "--generate", "2", "--prompt-tokens", "64", "--max-new-tokens", "12",
                 "--out", str(out)]) == 0
    report = json.loads((out / "compression.json").read_text())
    (gen,) = report["generated"]
    # --max-new-tokens 12 is base tokens: exactly 12 per prompt (end of sequence off), in at most 12 codes each
    assert gen["prompts"] == 2 and gen["base_tokens"] == 24 and gen["codes"] <= 24
    assert gen["base_tokens_per_code"] == pytest.approx(24 / gen["codes"])
    assert report["rows"][0]["files"] == 2


def test_eval_speed_command(checkpoint, tmp_path):
    src = ROOT / "src" / "hypervocab"
    out = tmp_path / "out"
    assert main(["eval", "speed", "--edit", str(src / "positions.py"), "--document", str(ROOT / "README.md"),
                 "--free", str(src / "errors.py"), "--model", str(checkpoint), "--max-prompt-tokens", "200",
                 "--max-new-tokens", "8", "--repeats", "1", "--out", str(out), "--plot"]) == 0
    report = json.loads((out / "speed.json").read_text())
    systems = ("base", "hypervocab", "prompt_lookup", "hypervocab_lookup")
    assert sorted((r["workload"], r["system"]) for r in report["rows"]) == sorted(
        (w, s) for w in ("edit", "document", "free") for s in systems)
    assert report["settings"]["model"] == str(checkpoint)
    assert (out / "speed.md").read_text().count("\n| ") >= 9
    assert (out / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_commands_reject_bad_input(checkpoint, tmp_path, capsys):
    assert main(["eval", "bpb", str(tmp_path / "nowhere"), "--model", str(checkpoint)]) == 2
    assert "does not exist (give PATH or NAME=PATH, a file or folder)" in capsys.readouterr().err
    assert main(["eval", "compression", str(ROOT / "README.md")]) == 2
    assert "eval compression needs --tokenizer (repeatable) or --model" in capsys.readouterr().err
    assert main(["eval", "bpb", str(ROOT / "README.md"), "--model", str(checkpoint), "--max-bytes", "0"]) == 2
    assert "--max-bytes must be an int >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", "speed", "--model", str(checkpoint)]) == 2
    assert "eval speed needs files for at least one workload: --edit, --document or --free" in capsys.readouterr().err


def test_eval_lm_eval_hands_its_arguments_to_lm_eval(capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", "lm-eval", "--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out


def test_distinct_ngram_ratio_golden_examples_and_errors():
    from hypervocab.errors import ConfigError, InputTypeError
    from hypervocab.evaluation.quality import distinct_ngram_ratio

    assert distinct_ngram_ratio([1, 2, 3, 4, 5]) == 1.0
    assert distinct_ngram_ratio([7] * 10) == 1 / 7  # seven 4-grams, all the same
    assert distinct_ngram_ratio([1, 2, 1, 2, 1, 2], n=2) == 2 / 5
    assert distinct_ngram_ratio([1, 2, 3]) == 1.0  # no 4-gram at all: nothing repeats
    with pytest.raises(ConfigError, match="n must be an int >= 1, got 0"):
        distinct_ngram_ratio([1, 2], n=0)
    with pytest.raises(InputTypeError, match="ids must be a sequence of token ids, got str"):
        distinct_ngram_ratio("abcd")
