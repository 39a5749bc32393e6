"""The lm-eval model type: scores equal a direct forward, rolling windows score every token once, generation
stops at stop strings, and a local multiple-choice task runs end to end through lm-eval."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from hypervocab import HyperConfig, HyperModel  # noqa: E402
from hypervocab.errors import ConfigError, InputTypeError  # noqa: E402
from hypervocab.evaluation import harness  # noqa: E402
from hypervocab.evaluation.harness import HyperLM, main  # noqa: E402
from hypervocab.evaluation.likelihood import prefix_id, score_texts  # noqa: E402

from .models import V  # noqa: E402

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("The cat sat on the ", "mat."),  # the trailing space moves to the continuation
    ("def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "    return a + b\n"),  # reuses hypertokens
    ("", "Hello world"),  # empty context: the prefix token stands in
    ("  ", "Hello"),  # only whitespace: nothing is left of the context but the prefix token
]
TEXT = ("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again, "
        "and then the quick brown fox runs into the forest while the lazy dog sleeps in the sun.")
QUESTIONS = [
    {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red", "black"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "answer": 1},
    {"question": "Which animal is called the king of the jungle?", "choices": ["elephant", "zebra", "lion", "giraffe"],
     "answer": 2},
    {"question": "What do bees make?", "choices": ["milk", "silk", "wool", "honey"], "answer": 3},
    {"question": "Which planet do we live on?", "choices": ["Earth", "Mars", "Venus", "Jupiter"], "answer": 0},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm2_tokenizer):
    """``(base folder, hypervocab folder, model)``: a tiny random Llama and a HyperModel over it, both saved."""
    root = tmp_path_factory.mktemp("harness")
    base_dir, hyper_dir = root / "base", root / "hyper"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        initializer_range=0.5)).save_pretrained(base_dir)
    smollm2_tokenizer.save_pretrained(base_dir)
    # loaded back so that the checkpoint names its base model folder
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = HyperModel.from_base(base, smollm2_tokenizer, HyperConfig(max_codebook_size=64, max_subtokens=4))
    with torch.no_grad():  # random encoders, so that hypertokens differ from their first subtoken
        for p in list(model.input_encoder.parameters()) + list(model.output_encoder.parameters()):
            p.normal_(0, 0.05)
    model.save_pretrained(hyper_dir)
    smollm2_tokenizer.save_pretrained(hyper_dir)
    return base_dir, hyper_dir, model.eval()


@pytest.fixture(scope="module")
def lm(saved, smollm2_tokenizer):
    return HyperLM(model=saved[2], tokenizer=smollm2_tokenizer)


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def hf_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's Hugging Face rule, written out here: trailing space to the continuation, split the whole."""
    if not context:
        return [prefix_id(tok)], tok(continuation, add_special_tokens=False)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    return ctx or [prefix_id(tok)], whole[len(ctx):]


def direct(model: HyperModel, ctx: list[int], target: list[int]) -> tuple[float, bool, list[int]]:
    """One full forward over the codes of context + target (code boundary at the split): logprob, greedy, codes."""
    codec = model.codec
    ctx_codes = codec.encode(ctx).tolist()
    state = codec.decoder_state()
    state.push(ctx_codes)
    tgt = codec.encode_continuation(target, state)
    assert codec.decode(ctx_codes + tgt).tolist() == list(ctx) + list(target)
    with torch.no_grad():
        rows = model(torch.tensor([ctx_codes + tgt])).logits[0, len(ctx_codes) - 1:-1].float()
    want = torch.tensor(tgt)
    logp = F.log_softmax(rows, -1).gather(-1, want[:, None]).sum()
    return float(logp), bool((rows.argmax(-1) == want).all()), tgt


# ------------------------------------------------------------------------------------------ loglikelihood


def test_loglikelihood_equals_a_direct_forward_over_the_codes(lm, saved, smollm2_tokenizer):
    got = lm.loglikelihood(requests("loglikelihood", *PAIRS))
    hypertokens = 0
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        want, want_greedy, codes = direct(saved[2], *hf_split(smollm2_tokenizer, context, continuation))
        assert logprob == pytest.approx(want, abs=1e-4), (context, continuation)
        assert greedy is want_greedy
        hypertokens += sum(c >= V for c in codes)
    assert hypertokens > 0  # the scored codes hold hypertokens: compression is really exercised


def test_is_greedy_when_every_code_is_the_argmax(lm, saved):
    """With the final norm zeroed every logit is 0, so argmax is id 0 (<|endoftext|>) everywhere."""
    norm = saved[2].base.model.norm.weight
    kept = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.zero_()
        (lp0, g0), (_, g1) = lm.loglikelihood(requests("loglikelihood", ("Hello", "<|endoftext|>"),
                                                       ("Hello", " world")))
    finally:
        with torch.no_grad():
            norm.copy_(kept)
    assert g0 is True and g1 is False
    # uniform over what is visible there: the V base ids (and at most one new hypertoken, 1/V off)
    assert lp0 == pytest.approx(-math.log(V), abs=1e-4)


def test_loglikelihood_cuts_the_context_on_the_left(saved, smollm2_tokenizer):
    model, tok = saved[2], smollm2_tokenizer
    context, continuation = TEXT + "\nQuestion: who sleeps?\nAnswer:", " the dog"
    short = HyperLM(model=model, tokenizer=tok, max_length=16)
    ctx, target = hf_split(tok, context, continuation)
    assert len(ctx) + len(target) > 16
    ((got, greedy),) = short.loglikelihood(requests("loglikelihood", (context, continuation)))
    want, want_greedy, _ = direct(model, ctx[-(16 - len(target)):], target)
    assert got == pytest.approx(want, abs=1e-4) and greedy is want_greedy
    full, _, _ = direct(model, ctx, target)
    assert abs(full - want) > 1e-3  # the cut changed what the model saw
    with pytest.raises(ConfigError, match="max_length=3"):
        HyperLM(model=model, tokenizer=tok, max_length=3).loglikelihood(
            requests("loglikelihood", ("Hi", " a longer continuation")))


# ------------------------------------------------------------------------------------------ rolling


def test_rolling_equals_a_direct_forward_for_a_short_text(lm, saved, smollm2_tokenizer):
    ids = smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) < lm.max_length - 1
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (TEXT,)))
    want, _, codes = direct(saved[2], [prefix_id(smollm2_tokenizer)], ids)
    assert got == pytest.approx(want, abs=1e-4)
    assert any(c >= V for c in codes)


@pytest.mark.parametrize("stride", [None, 4])
def test_rolling_windows_score_every_token_exactly_once(saved, smollm2_tokenizer, monkeypatch, stride):
    model, tok = saved[2], smollm2_tokenizer
    ids = smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    short = HyperLM(model=model, tokenizer=tok, max_length=12, rolling_stride=stride)
    calls: list[tuple[list[int], list[int]]] = []
    real = harness.continuation_logprob

    def spy(model, context, target, **kw):
        calls.append((list(context), list(target)))
        return real(model, context, target, **kw)

    monkeypatch.setattr(harness, "continuation_logprob", spy)
    (got,) = short.loglikelihood_rolling(requests("loglikelihood_rolling", (TEXT,)))
    assert len(calls) > 3
    assert [t for _, target in calls for t in target] == ids  # every token once, in order
    assert calls[0][0] == [prefix_id(tok)]
    done = len(calls[0][1])
    for context, target in calls[1:]:
        assert context == ids[done - len(context):done]  # the tokens right before, nothing skipped
        assert len(context) == 12 - 1 - (stride or 10) or done + len(target) == len(ids)
        assert len(context) + len(target) <= 12
        done += len(target)
    total = score_texts(model, tok, [TEXT], window=11, stride=stride or 10)["hypervocab"]
    assert got == pytest.approx(-total.nll, abs=1e-4)
    assert total.tokens == len(ids)


# ------------------------------------------------------------------------------------------ generation


def test_generate_until_returns_text_cut_at_the_first_stop_string(lm):
    prompt = "Once upon a time"
    (free,) = lm.generate_until(requests("generate_until", (prompt, {"max_gen_toks": 16, "do_sample": False})))
    assert isinstance(free, str) and len(free) > 6
    stop = free[len(free) // 2: len(free) // 2 + 2]
    assert stop
    cut, as_str, zero_temp = lm.generate_until(requests(
        "generate_until", (prompt, {"until": [stop, "never appears"], "max_gen_toks": 16}),
        (prompt, {"until": stop, "max_gen_toks": 16}),
        (prompt, {"max_gen_toks": 16, "do_sample": True, "temperature": 0.0})))
    assert cut == as_str == free[:free.find(stop)]
    assert len(cut) < len(free)
    assert zero_temp == free  # temperature 0 is greedy decoding
    (sampled,) = lm.generate_until(requests("generate_until", (prompt, {"max_gen_toks": 4, "do_sample": True,
                                                                        "temperature": 0.8})))
    assert isinstance(sampled, str)


def test_generate_until_rejects_what_it_cannot_do(lm):
    with pytest.raises(ConfigError, match="num_beams"):
        lm.generate_until(requests("generate_until", ("Hi", {"num_beams": 4})))
    with pytest.raises(ConfigError, match=r"\['min_p'\]"):
        lm.generate_until(requests("generate_until", ("Hi", {"min_p": 0.1})))
    with pytest.raises(ConfigError, match="max_gen_toks=2048"):
        lm.generate_until(requests("generate_until", ("Hi", {"max_gen_toks": 2048})))


# ------------------------------------------------------------------------------------------ construction


def test_loads_from_folders_with_a_base_model_override(lm, saved, smollm2_tokenizer):
    base_dir, hyper_dir, _ = saved
    loaded = HyperLM(pretrained=str(hyper_dir), base_model=str(base_dir), dtype="float32")
    assert loaded.max_length == 2048 and loaded.device == torch.device("cpu")
    args = requests("loglikelihood", PAIRS[2])
    ((got, greedy),), ((want, want_greedy),) = loaded.loglikelihood(args), lm.loglikelihood(args)
    assert got == pytest.approx(want, abs=1e-6) and greedy is want_greedy


@pytest.mark.skipif(torch.cuda.is_available(), reason="falls back only where CUDA is missing")
def test_a_cuda_device_falls_back_to_the_cpu_without_cuda(saved, smollm2_tokenizer):
    # lm-eval's command line asks for cuda:0 unless --device is given
    assert HyperLM(model=saved[2], tokenizer=smollm2_tokenizer, device="cuda:0").device == torch.device("cpu")


def test_pretrained_takes_device_and_dtype_as_hypervocab_load_does(lm, saved):
    _, hyper_dir, _ = saved
    args = requests("loglikelihood", PAIRS[2])
    ((want, _),) = lm.loglikelihood(args)
    for device, dtype in (("cpu", "float32"), ("cpu", "torch.float32"), ("cpu", torch.float32), ("auto", "auto")):
        loaded = HyperLM(pretrained=str(hyper_dir), device=device, dtype=dtype)
        if not torch.cuda.is_available():
            assert loaded.device == torch.device("cpu") and next(loaded.model.parameters()).dtype == torch.float32
            ((got, _),) = loaded.loglikelihood(args)
            assert got == pytest.approx(want, abs=1e-5)
    assert not HyperLM(pretrained=str(hyper_dir), dtype="bfloat16").model.training
    with pytest.raises(ConfigError, match=r"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16' or a "
                                          r"torch.dtype, got 'int8'"):
        HyperLM(pretrained=str(hyper_dir), dtype="int8")
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        HyperLM(pretrained=str(hyper_dir), device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="falls back only where CUDA is missing")
def test_pretrained_on_cuda_falls_back_to_the_cpu_without_cuda(saved):
    assert HyperLM(pretrained=str(saved[1]), device="cuda").device == torch.device("cpu")


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ConfigError, "exactly one"),
    ({"pretrained": "x", "model": "MODEL"}, ConfigError, "exactly one"),
    ({"model": object(), "tokenizer": "TOK"}, InputTypeError, "model must be a hypervocab HyperModel"),
    ({"model": "MODEL"}, ConfigError, "tokenizer="),
    ({"model": "MODEL", "tokenizer": "TOK", "dtype": "bfloat16"}, ConfigError, "dtype='bfloat16'"),
    ({"model": "MODEL", "tokenizer": "TOK", "max_length": 2}, ConfigError, "max_length must be an int >= 3"),
    ({"model": "MODEL", "tokenizer": "TOK", "max_length": 12, "rolling_stride": 11}, ConfigError,
     r"rolling_stride must be at most max_length - 2 \(10\)"),
    ({"model": "MODEL", "tokenizer": "TOK", "batch_size": 0}, ConfigError, "batch_size must be an int >= 1"),
])
def test_bad_arguments_name_the_argument(saved, smollm2_tokenizer, kwargs, error, match):
    swap = {"MODEL": saved[2], "TOK": smollm2_tokenizer}
    kwargs = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        HyperLM(**kwargs)


def test_import_without_lm_eval_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    monkeypatch.delitem(sys.modules, "hypervocab.evaluation.harness")
    with pytest.raises(ImportError, match=r"pip install 'hypervocab\[eval\]'"):
        importlib.import_module("hypervocab.evaluation.harness")


def test_importing_hypervocab_does_not_import_lm_eval():
    code = "import sys, hypervocab, hypervocab.evaluation; print(sorted(m for m in sys.modules if 'lm_eval' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_main_hands_argv_to_the_lm_eval_command_line(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model_args" in out and "--tasks" in out
    assert main(["run", "--no-such-option"]) == 2


# ------------------------------------------------------------------------------------------ end to end


def test_a_local_multiple_choice_task_runs_end_to_end(lm, saved, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    # JSON strings are valid YAML scalars: paths and templates need no further quoting
    (tasks / "hv_tiny_mc.yaml").write_text("\n".join([
        "task: hv_tiny_mc",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        f"  cache_dir: {json.dumps(str(tmp_path / 'hf-datasets'))}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {json.dumps('Question: {{question}}' + chr(10) + 'Answer:')}",
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{answer}}"',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
    ]) + "\n", encoding="utf-8")
    out = lm_eval.simple_evaluate(model="hypervocab", model_args={"pretrained": str(saved[1])},
                                  tasks=["hv_tiny_mc"], bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    acc = out["results"]["hv_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # the same choice, question by question, as the in-memory adapter scores it
    right = 0
    for q in QUESTIONS:
        scores = lm.loglikelihood(requests("loglikelihood", *[(f"Question: {q['question']}\nAnswer:", " " + c)
                                                              for c in q["choices"]]))
        right += max(range(len(scores)), key=lambda i: scores[i][0]) == q["answer"]
    assert acc == right / len(QUESTIONS)
