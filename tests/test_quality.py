"""``hypervocab eval generation``: what a model writes, judged by the base model (tiny random Llama, real tokenizer).

The real model's yardstick is checked in ``test_shipped.py``; here: the figures are what they say they are,
the verdicts follow the stated thresholds, the systems write what they should, and the reports are whole.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hypervocab.cli.main import main  # noqa: E402
from hypervocab.errors import ConfigError, InputTypeError  # noqa: E402
from hypervocab.evaluation.quality import (  # noqa: E402
    CHAT_QUESTIONS,
    MAX_BPB_RATIO,
    MIN_DISTINCT_RATIO,
    GenerationPrompt,
    WrittenText,
    base_bits,
    chat_prompts,
    distinct_ngram_ratio,
    generation_report,
    is_worse,
    quality_rows,
    text_prompts,
)

from .models import make, tiny  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
N = 12  # base tokens each system writes


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    """A tiny hypervocab Llama with LoRA B matrices that are not zero: hypervocab != its base model."""
    from peft import LoraConfig

    m = make("llama", smollm2_tokenizer)
    m.add_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    code = [(name, (STDLIB / name).read_text()) for name in ("textwrap.py", "shlex.py")]
    return (text_prompts("python", code, tok, places=2, prompt_tokens=48)
            + chat_prompts(tok, CHAT_QUESTIONS[:2]))


@pytest.fixture(scope="module")
def result(model, smollm2_tokenizer, prompts):
    return generation_report(model, smollm2_tokenizer, prompts, max_new_tokens=N, prompt_lookup_num_tokens=3,
                             sample=True, ignore_eos=True)


def test_base_bits_is_the_base_models_own_sum_of_log_probs(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok("def read(path):\n    with open(path) as f:\n", add_special_tokens=False)["input_ids"]
    output = tok("        return f.read()\n", add_special_tokens=False)["input_ids"]
    nll, n_bytes = base_bits(model, tok, prompt, output)
    with torch.no_grad():  # the plain tiny Llama of the same seed is the base model, LoRA and wrappers absent
        logits = tiny("llama").eval()(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    direct = -torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(output)[:, None]).sum()
    assert nll == pytest.approx(float(direct), rel=1e-5)
    assert n_bytes == len(b"        return f.read()\n")
    assert base_bits(model, tok, prompt, []) == (0.0, 0)
    # an end-of-sequence token is scored but has no bytes
    nll_eos, bytes_eos = base_bits(model, tok, prompt, output + [tok.eos_token_id])
    assert bytes_eos == n_bytes and nll_eos > nll


def test_the_verdict_follows_the_stated_thresholds():
    assert (MAX_BPB_RATIO, MIN_DISTINCT_RATIO) == (1.25, 0.9)
    assert is_worse(1.25, 0.9) is False  # both bounds belong to "as good"
    assert is_worse(1.2501, 1.0) is True and is_worse(1.0, 0.8999) is True
    assert is_worse(None, 0.95) is False and is_worse(2.0, None) is True and is_worse(None, None) is None


def test_rows_sum_nats_over_bytes_and_judge_against_the_right_reference():
    ln2 = math.log(2)

    def out(domain: str, system: str, bits: float, n_bytes: int, distinct: float, codes: int | None = None,
            hyper: int | None = None) -> WrittenText:
        return WrittenText(domain, f"{domain}:0", system, 10, 8, bits * ln2, n_bytes, distinct, "x", codes, hyper)

    outputs = [out("code", "base", 10, 100, 1.0), out("code", "base", 30, 100, 0.8),  # 0.2 bits/byte, 0.9
               out("code", "hypervocab", 50, 100, 0.7, codes=4, hyper=2),  # 0.25 bits/byte, 0.7
               out("prose", "base", 40, 100, 1.0), out("prose", "hypervocab", 45, 100, 1.0, codes=8, hyper=0),
               out("prose", "base_sampled", 80, 100, 1.0), out("prose", "hypervocab_sampled", 120, 100, 1.0, 8, 0)]
    rows = {(r.domain, r.system): r for r in quality_rows(outputs)}
    code = rows["code", "hypervocab"]
    assert code.bits_per_byte == pytest.approx(0.5) and rows["code", "base"].bits_per_byte == pytest.approx(0.2)
    assert code.bits_per_byte_ratio == pytest.approx(2.5) and code.distinct_ratio == pytest.approx(0.7 / 0.9)
    assert code.worse is True and code.base_tokens_per_code == 2.0 and code.hypertoken_share == 0.5
    prose = rows["prose", "hypervocab"]
    assert prose.bits_per_byte_ratio == pytest.approx(45 / 40) and prose.worse is False
    sampled = rows["prose", "hypervocab_sampled"]  # judged against the base model's samples, not its greedy text
    assert sampled.bits_per_byte_ratio == pytest.approx(1.5) and sampled.worse is True
    assert rows["prose", "base"].worse is None and rows["prose", "base"].bits_per_byte_ratio is None
    total = rows["total", "hypervocab"]
    assert total.outputs == 2 and total.bits_per_byte == pytest.approx(95 / 200)
    assert [k for k in rows if k[0] == "total"] == [("total", s) for s in
                                                    ("base", "hypervocab", "base_sampled", "hypervocab_sampled")]


def test_text_prompts_are_cut_after_line_ends_spread_through_each_file(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = (STDLIB / "textwrap.py").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ps = text_prompts("python", [("textwrap.py", text), ("tiny", "x = 1\n")], tok, places=3, prompt_tokens=64)
    assert len(ps) == 3 and all(p.domain == "python" and not p.chat for p in ps)  # the tiny text is passed over
    cuts = [int(p.source.split(":")[1]) for p in ps]
    assert cuts == sorted(cuts) and all(abs(c - len(ids) * k / 4) <= 16 for k, c in enumerate(cuts, 1))
    for p, cut in zip(ps, cuts):
        assert p.ids == ids[cut - 64: cut]  # the 64 base tokens before the cut, as the file tokenizes
        assert "\n" in tok.decode(p.ids[-1:])  # a line end (and the next line's indentation) ends it
    with pytest.raises(ConfigError, match=r"^places must be an int >= 1, got 0$"):
        text_prompts("python", [("t", text)], tok, places=0)
    with pytest.raises(ConfigError, match=r"^prompt_tokens must be an int >= 16, got 8$"):
        text_prompts("python", [("t", text)], tok, prompt_tokens=8)


def test_chat_prompts_are_one_user_turn_in_the_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (p,) = chat_prompts(tok, ["What is 2 + 2?"])
    text = tok.decode(p.ids)
    assert p.chat and p.domain == "chat" and p.source == "chat:0"
    assert "What is 2 + 2?" in text and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(ConfigError, match=r"^questions\[1\] must be a non-empty str, got ' '$"):
        chat_prompts(tok, ["fine", " "])


def test_every_system_answers_every_prompt_and_each_output_is_scored(result, prompts, model, smollm2_tokenizer):
    systems = ["base", "hypervocab", "hypervocab_lookup", "base_sampled", "hypervocab_sampled"]
    assert len(result.outputs) == len(prompts) * len(systems)
    assert [o.system for o in result.outputs[: len(systems)]] == systems
    for o in result.outputs:
        prompt = next(p for p in prompts if p.source == o.source)
        assert o.new_tokens == N and o.prompt_tokens == len(prompt.ids)  # ignore_eos: the whole budget
        hyper = o.system.startswith("hypervocab")
        assert (o.codes is not None) == hyper and (not hyper or 1 <= o.codes <= N)
        assert o.text == smollm2_tokenizer.decode(smollm2_tokenizer(o.text, add_special_tokens=False)["input_ids"])
    rows = {(r.domain, r.system) for r in result.rows}
    assert rows == {(d, s) for d in ("python", "chat", "total") for s in systems}


def test_the_base_output_is_hugging_face_greedy_and_lookup_changes_nothing(result, prompts, model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    first = prompts[0]
    with torch.no_grad():
        ids = torch.tensor([first.ids])
        greedy = tiny("llama").eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                               min_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
    base = next(o for o in result.outputs if o.source == first.source and o.system == "base")
    assert base.text == tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    nll, n_bytes = base_bits(model, tok, first.ids, greedy[0, ids.shape[1]:].tolist())
    assert base.nll == pytest.approx(nll) and base.bytes == n_bytes
    for p in prompts:
        plain, looked = (next(o for o in result.outputs if o.source == p.source and o.system == s)
                         for s in ("hypervocab", "hypervocab_lookup"))
        assert looked.text == plain.text and looked.codes == plain.codes


def test_sampling_is_seeded(model, smollm2_tokenizer, prompts, result):
    again = generation_report(model, smollm2_tokenizer, prompts[:1], max_new_tokens=N, lookup=False, sample=True,
                              ignore_eos=True)
    for o in again.outputs:
        first = next(r for r in result.outputs if r.source == o.source and r.system == o.system)
        assert o.text == first.text, o.system
    other = generation_report(model, smollm2_tokenizer, prompts[:1], max_new_tokens=N, lookup=False, sample=True,
                              seed=5, ignore_eos=True)
    assert any(a.text != b.text for a, b in zip(other.outputs, again.outputs) if a.system.endswith("_sampled"))


def test_the_reports_are_whole(result, tmp_path):
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["thresholds"] == {"max_bits_per_byte_ratio": 1.25, "min_distinct_ratio": 0.9}
    assert d["settings"]["sample"] and d["settings"]["max_new_tokens"] == N and d["settings"]["ignore_eos"]
    assert all({"bits_per_byte", "distinct_4", "text", "base_tokens_per_code"} <= set(o) for o in d["outputs"])
    md = result.to_markdown()
    table = [line for line in md.splitlines() if line.startswith(("| python |", "| chat |", "| total |"))]
    assert len(table) == len(result.rows) == 15
    for row, line in zip(result.rows, table):
        verdict = line.rstrip(" |").rsplit("| ", 1)[1]
        assert verdict == ("—" if row.worse is None else "worse" if row.worse else "ok")
        if row.bits_per_byte_ratio is not None:
            assert f"{row.bits_per_byte_ratio:.2f}x" in line
    assert "#### What they wrote" in md and "- hypervocab (" in md
    assert result.plot(tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_named(model, smollm2_tokenizer, prompts):
    tok = smollm2_tokenizer
    with pytest.raises(InputTypeError, match="^model must be a HyperModel, got LlamaForCausalLM$"):
        generation_report(tiny("llama"), tok, prompts)
    with pytest.raises(InputTypeError, match="^prompts must be a non-empty list of GenerationPrompt"):
        generation_report(model, tok, [])
    with pytest.raises(InputTypeError, match="^prompts must be a non-empty list of GenerationPrompt"):
        generation_report(model, tok, GenerationPrompt("d", "s", [1, 2]))
    with pytest.raises(ConfigError, match=r"^temperature must be a number > 0, got 0$"):
        generation_report(model, tok, prompts, temperature=0)
    with pytest.raises(ConfigError, match=r"^top_p must be a number in \(0, 1\], got 1.5$"):
        generation_report(model, tok, prompts, top_p=1.5)
    with pytest.raises(ConfigError, match=r"^max_new_tokens must be an int >= 1, got 0$"):
        generation_report(model, tok, prompts, max_new_tokens=0)


def test_eval_generation_command(model, smollm2_tokenizer, tmp_path, capsys):
    from dataclasses import replace

    d = tmp_path / "ckpt"
    tiny("llama").save_pretrained(d / "base")
    smollm2_tokenizer.save_pretrained(d / "base")
    model.config = replace(model.config, base_model_name_or_path=str(d / "base"))
    model.save_pretrained(d / "model")
    smollm2_tokenizer.save_pretrained(d / "model")
    out = tmp_path / "out"
    assert main(["eval", "generation", f"code={STDLIB / 'textwrap.py'}", "--model", str(d / "model"), "--files", "1",
                 "--places", "2", "--prompt-tokens", "40", "--chat", "1", "--question", "Name a prime number.",
                 "--max-new-tokens", "6", "--out", str(out), "--plot"]) == 0
    report = json.loads((out / "generation.json").read_text())
    assert report["settings"]["domains"] == {"code": 2, "chat": 2} and report["settings"]["model"] == str(d / "model")
    assert {(r["domain"], r["system"]) for r in report["rows"]} == {
        (dom, s) for dom in ("code", "chat", "total") for s in ("base", "hypervocab", "hypervocab_lookup")}
    assert all(o["new_tokens"] <= 6 for o in report["outputs"])
    assert (out / "generation.md").read_text().startswith("Continuations of 6 base tokens at most")
    assert (out / "generation.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["eval", "generation", "--model", str(d / "model"), "--chat", "0"]) == 2
    assert "eval generation needs a DOMAIN, --chat N or --question TEXT" in capsys.readouterr().err
    assert main(["eval", "generation", "--model", str(d / "model"), "--chat", "7"]) == 2
    assert "--chat must be an int in [0, 6], got 7" in capsys.readouterr().err


def test_distinct_ngram_ratio_is_exact_on_a_loop():
    assert distinct_ngram_ratio([5, 6, 7, 8] * 3) == 4 / 9


def test_the_docstring_examples_hold():
    import doctest

    from hypervocab.evaluation import quality

    assert doctest.testmod(quality).failed == 0
