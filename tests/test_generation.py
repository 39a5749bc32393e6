"""Generation with a live vocabulary: exactness against the base model and the full forward, validity, batching."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hypervocab import HyperConfig, HyperModel, HyperTokenizer
from hypervocab.errors import ConfigError, InputTypeError, InvalidCodeError, StateError
from hypervocab.streaming import IncrementalDetokenizer

transformers = pytest.importorskip("transformers")

from .models import V, make, tiny  # noqa: E402

PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
           "import os\nimport sys\n\n",
           "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
           "        self.items.append(item)\n\n    def pop(self):\n"]


@pytest.fixture(scope="module")
def htok(smollm2_tokenizer):
    return HyperTokenizer.from_base(smollm2_tokenizer, HyperConfig(max_codebook_size=64, max_subtokens=4))


def eager(model: HyperModel) -> HyperModel:
    """Make a random model's hypertokens score high often, so that sampling picks them often."""
    with torch.no_grad():
        model.output_encoder.out_proj.weight.mul_(3000)
    return model


class Recorder:
    """A streamer in the shape of transformers' TextStreamer: records what it is given."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_greedy_without_hypertokens_equals_the_base_model(arch, smollm2_tokenizer):
    base = smollm2_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    reference = tiny(arch).eval()
    model = make(arch, smollm2_tokenizer)
    want = reference.generate(**base, max_new_tokens=15, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    got = model.generate(base["input_ids"], base["attention_mask"], max_new_tokens=15, allow_hypertokens=False,
                         eos_token_id=[])
    assert torch.equal(got, want)


def test_greedy_codes_are_the_argmax_of_the_full_forward(smollm2_tokenizer, htok):
    """KV-cached generation with a growing codebook == reading the whole result at once."""
    model = make("llama", smollm2_tokenizer)
    enc = htok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=25, eos_token_id=[],
                         return_dict_in_generate=True)
    T = enc["input_ids"].shape[1]
    assert sum(s.hypertokens for s in out.stats) > 0, "the random encoders should make some hypertokens win"
    mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), 25, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(out.sequences, mask).logits
    assert torch.equal(logits[:, T - 1: -1].argmax(-1), out.sequences[:, T:])


def test_decoded_codes_are_the_base_tokens_they_stand_for_when_sampling(smollm2_tokenizer, htok):
    model = eager(make("llama", smollm2_tokenizer))
    enc = htok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=40, do_sample=True,
                         temperature=1.5, top_k=200, seed=3, eos_token_id=[], return_dict_in_generate=True)
    codec = model.codec
    for b, prompt in enumerate(PROMPTS):
        prompt_codes = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        full = codec.decode(prompt_codes + out.new_codes[b]).tolist()
        prompt_base = smollm2_tokenizer(prompt)["input_ids"]
        assert full == prompt_base + out.new_base_ids[b]
        st = out.stats[b]
        assert (st.codes, st.base_tokens, st.prompt_base_tokens) == (40, len(out.new_base_ids[b]), len(prompt_base))
        assert st.hypertokens == sum(c >= V for c in out.new_codes[b]) > 0
        text = smollm2_tokenizer.decode(out.new_base_ids[b])
        assert htok.decode(prompt_codes + out.new_codes[b]) == smollm2_tokenizer.decode(prompt_base) + text


def test_no_invalid_code_ever_reaches_the_decoder_at_temperature_5(smollm2_tokenizer):
    """Random weights, hot sampling, a tiny codebook that fills up: every code must decode strictly."""
    model = eager(make("qwen2", smollm2_tokenizer, max_codebook_size=12, max_subtokens=3))
    htok = HyperTokenizer.from_base(smollm2_tokenizer, model.config)
    enc = htok(PROMPTS[:2], return_tensors="pt", padding=True)
    hyper = kwkwk = 0
    for seed in range(25):
        out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=30, do_sample=True,
                             temperature=5.0, top_p=0.999 if seed % 2 else None, seed=seed, eos_token_id=[],
                             return_dict_in_generate=True, output_codebooks=True)
        for b in range(2):
            codes = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist() + out.new_codes[b]
            decoded = model.codec.decode(codes, errors="strict")  # raises on any invalid code
            assert len(decoded) == out.stats[b].prompt_base_tokens + out.stats[b].base_tokens
            assert out.codebooks[b] == model.codec.decode(codes, return_codebook=True)[1]
            state = model.codec.decoder_state()
            for c in codes:
                kwkwk += c == state.next_id  # the one id that is defined by its own use
                state.push(c)
            hyper += sum(c >= V for c in out.new_codes[b])
    assert hyper > 100 and kwkwk > 0


def test_a_batch_gives_the_same_greedy_codes_as_each_prompt_alone(smollm2_tokenizer, htok):
    model = make("phi3", smollm2_tokenizer)
    enc = htok(PROMPTS, return_tensors="pt", padding=True)
    batch = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=20, eos_token_id=[],
                           return_dict_in_generate=True)
    for b, prompt in enumerate(PROMPTS):
        alone = model.generate(htok(prompt, return_tensors="pt")["input_ids"], max_new_tokens=20, eos_token_id=[],
                               return_dict_in_generate=True)
        assert alone.new_codes[0] == batch.new_codes[b]


def test_a_seed_gives_the_same_sample_twice(smollm2_tokenizer, htok):
    model = make("llama", smollm2_tokenizer)
    ids = htok(PROMPTS[0], return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=20, do_sample=True, temperature=2.0, eos_token_id=[])
    a, b = model.generate(ids, seed=7, **kw), model.generate(ids, seed=7, **kw)
    c = model.generate(ids, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sequences_that_finish_early_and_continue_equal_reading_everything_at_once(smollm2_tokenizer, htok):
    """Multi-turn: continuing from past (KV cache + codebooks) == generating from the whole history."""
    model = make("llama", smollm2_tokenizer)
    enc = htok(PROMPTS[:2], return_tensors="pt", padding=True)
    probe = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8, eos_token_id=[],
                           return_dict_in_generate=True)
    # a base code that row 0 writes at step k + 1 and row 1 never: row 0 stops early, row 1 goes on
    k, eos = next((i, c) for i, c in enumerate(probe.new_codes[0][:7]) if c < V and c not in probe.new_codes[1]
                  and c not in probe.new_codes[0][:i])
    first = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8, eos_token_id=eos,
                           return_dict_in_generate=True)
    assert [s.finish_reason for s in first.stats] == ["eos", "length"]
    assert [len(c) for c in first.new_codes] == [k + 1, 8]
    turn = htok.encode_continuation(["\nprint(fibonacci(10))\n", "\nimport re\n"], first)
    second = model.generate(**turn, past=first, max_new_tokens=10, eos_token_id=[], return_dict_in_generate=True)
    for b in range(2):
        history = (enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist() + first.new_codes[b]
                   + turn["input_ids"][b][turn["attention_mask"][b].bool()].tolist())
        fresh = model.generate(torch.tensor([history]), max_new_tokens=10, eos_token_id=[],
                               return_dict_in_generate=True)
        assert second.new_codes[b] == fresh.new_codes[0]
        assert second.stats[b].prompt_codes == len(turn["input_ids"][b][turn["attention_mask"][b].bool()])
    # the continuation reused the conversation's hypertokens
    assert any(c >= V for c in turn["input_ids"].reshape(-1).tolist())
    with pytest.raises(StateError, match="already continued once"):
        model.generate(**turn, past=first)


def test_base_token_budget_is_exact_and_stop_strings_stop(smollm2_tokenizer, htok):
    model = eager(make("llama", smollm2_tokenizer))
    enc = htok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=100, max_new_base_tokens=17,
                         do_sample=True, temperature=3.0, seed=0, eos_token_id=[], return_dict_in_generate=True)
    assert [s.base_tokens for s in out.stats] == [17, 17, 17]
    assert {s.finish_reason for s in out.stats} == {"base_budget"}
    free = model.generate(enc["input_ids"][:1], enc["attention_mask"][:1], max_new_tokens=30, eos_token_id=[],
                          return_dict_in_generate=True)
    text = smollm2_tokenizer.decode(free.new_base_ids[0])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    out = model.generate(enc["input_ids"][:1], enc["attention_mask"][:1], max_new_tokens=30, eos_token_id=[],
                         stop_strings=[stop], tokenizer=smollm2_tokenizer, return_dict_in_generate=True)
    got = smollm2_tokenizer.decode(out.new_base_ids[0])
    assert out.stats[0].finish_reason == "stop_string" and stop in got and text.startswith(got)
    prompt = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    last = len(model.codec.decode(prompt + out.new_codes[0])) - len(model.codec.decode(prompt + out.new_codes[0][:-1]))
    assert stop not in smollm2_tokenizer.decode(out.new_base_ids[0][:-last])  # it stopped at the first chance


def test_streamer_gets_the_prompt_then_each_codes_base_tokens(smollm2_tokenizer, htok):
    model = make("llama", smollm2_tokenizer)
    ids = htok(PROMPTS[0], return_tensors="pt")["input_ids"]
    rec = Recorder()
    out = model.generate(ids, max_new_tokens=12, streamer=rec, eos_token_id=[], return_dict_in_generate=True)
    assert rec.puts[0] == smollm2_tokenizer(PROMPTS[0])["input_ids"] and rec.ended == 1
    assert rec.puts[1:] == [list(model.codec.decode(ids[0].tolist() + out.new_codes[0][: i + 1]))[
        len(model.codec.decode(ids[0].tolist() + out.new_codes[0][:i])):] for i in range(12)]
    streamer = transformers.TextStreamer(smollm2_tokenizer, skip_prompt=True)
    model.generate(ids, max_new_tokens=5, streamer=streamer)  # the Hugging Face streamer works as is


@pytest.mark.parametrize("text", ["naïve café — 東京タワー 🎉🚀 done", "def f(x):\n    return x ** 2  # ✓\n"])
def test_incremental_detokenizer_emits_only_final_text(smollm2_tokenizer, text):
    ids = smollm2_tokenizer(text)["input_ids"]
    for chunk in (1, 3):
        detok = IncrementalDetokenizer(smollm2_tokenizer)
        pieces = [detok.push(ids[i: i + chunk]) for i in range(0, len(ids), chunk)]
        pieces.append(detok.flush())
        assert "".join(pieces) == text == detok.text
        assert not any("\ufffd" in p for p in pieces)


def test_bad_generation_options_give_clear_errors(smollm2_tokenizer, htok):
    model = make("llama", smollm2_tokenizer)
    ids = htok(PROMPTS[0], return_tensors="pt")["input_ids"]
    cases = [
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
        (dict(max_new_base_tokens=0), "max_new_base_tokens must be an int >= 1 or None, got 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(top_p=1.5), "top_p must be a number in (0, 1] or None, got 1.5"),
        (dict(top_k=-2), "top_k must be an int >= 0 or None, got -2"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number > 0, got nan"),
        (dict(eos_token_id=V + 3), f"eos_token_id must be a base id in [0, {V}) or a list of them, got {V + 3}"),
        (dict(stop_strings="\n"), "stop_strings needs tokenizer= (a Hugging Face tokenizer) to read the text"),
        (dict(stop_strings=[""], tokenizer=smollm2_tokenizer),
         "stop_strings must be a non-empty str or a list of them, got ['']"),
        (dict(streamer=object()), "streamer must have put() and end() methods, got object"),
        (dict(seed=1, generator=torch.Generator()), "give seed= or generator=, not both"),
        (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            model.generate(ids, **kwargs)
    with pytest.raises(ConfigError, match="a streamer shows one sequence: input_ids has 2 rows"):
        model.generate(ids.repeat(2, 1), streamer=Recorder())
    with pytest.raises(InputTypeError, match="past must be a GenerationOutput or GenerationState, got dict"):
        model.generate(ids, past={})
    with pytest.raises(InputTypeError, match=r"row 1 of attention_mask is all 0"):
        model.generate(ids.repeat(2, 1), torch.tensor([[1] * ids.shape[1], [0] * ids.shape[1]]))
    bad = ids.clone()
    bad[0, 1] = V + 60  # a hypertoken id that is not defined there
    with pytest.raises(InvalidCodeError, match=re.escape(
            f"input_ids[0][1]: hypertoken {V + 60} is not defined yet: no entry exists at this point "
            f"(the first will be {V}); valid codes here are [0, {V + 1})")):
        model.generate(bad)


@pytest.mark.slow
def test_real_smollm2_greedy_equals_the_base_model_and_hypertokens_flow():
    from assets import smollm2_model_dir

    path = smollm2_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = HyperModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tok,
                                 HyperConfig(max_codebook_size=256)).eval()
    base = tok(PROMPTS[:2], return_tensors="pt", padding=True, padding_side="left")
    want = reference.generate(**base, max_new_tokens=8, do_sample=False)
    got = model.generate(base["input_ids"], base["attention_mask"], max_new_tokens=8, allow_hypertokens=False)
    assert torch.equal(got, want)
    htok = HyperTokenizer.from_base(tok, model.config)
    enc = htok(PROMPTS[2], return_tensors="pt")
    out = model.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=8,
                         return_dict_in_generate=True)
    assert out.stats[0].prompt_codes < out.stats[0].prompt_base_tokens
    assert np.array_equal(model.codec.decode(enc["input_ids"][0].tolist() + out.new_codes[0]),
                          tok(PROMPTS[2])["input_ids"] + out.new_base_ids[0])


def test_teacher_forcing_through_generate_equals_the_full_forward(smollm2_tokenizer, htok):
    """Reading a text one code per call (max_new_tokens=0) gives the logits of the whole-text forward."""
    model = make("gemma3", smollm2_tokenizer)
    codes = htok(PROMPTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(codes).logits[0]
    out = model.generate(codes[:, :5], max_new_tokens=0, output_logits=True)
    got = [out.logits[0][0]]
    for t in range(5, codes.shape[1]):
        out = model.generate(codes[:, t: t + 1], past=out, max_new_tokens=0, output_logits=True)
        got.append(out.logits[0][0])
    got = torch.stack(got)
    assert torch.equal(torch.isinf(got), torch.isinf(want[4:]))
    torch.testing.assert_close(got, want[4:], rtol=1e-4, atol=1e-5)
    assert out.sequences.shape == (1, 1) and out.new_codes == [[]]


def test_cli_generate_streams_the_greedy_text_and_a_stats_line(smollm2_tokenizer, htok, tmp_path, capsys):
    from hypervocab.cli.main import main

    base_dir, ckpt = tmp_path / "base", tmp_path / "hv"
    tiny("llama").save_pretrained(base_dir)
    smollm2_tokenizer.save_pretrained(base_dir)
    model = make("llama", smollm2_tokenizer)
    model.config.base_model_name_or_path = str(base_dir)
    model.save_pretrained(ckpt)
    # --max-new-tokens counts base tokens, as in every command
    want = model.generate(htok(PROMPTS[0], return_tensors="pt")["input_ids"], max_new_tokens=12,
                          max_new_base_tokens=12, return_dict_in_generate=True)
    assert main(["generate", "--model", str(ckpt), PROMPTS[0], "--max-new-tokens", "12", "--no-color"]) == 0
    out, err = capsys.readouterr()
    assert out == smollm2_tokenizer.decode(want.new_base_ids[0], skip_special_tokens=True) + "\n"
    st = want.stats[0]
    assert re.search(rf"prompt {st.prompt_base_tokens} tokens in {st.prompt_codes} codes .* output {st.base_tokens} "
                     rf"tokens in {st.codes} codes, {st.hypertokens} hypertokens .* stop: {st.finish_reason}", err)
    assert main(["generate", "--model", str(ckpt), PROMPTS[0], "--max-new-tokens", "12", "--color"]) == 0
    coloured = capsys.readouterr().out
    assert ("\x1b[36m" in coloured) == (st.hypertokens > 0)
    assert re.sub(r"\x1b\[\d+m", "", coloured) == out
    assert main(["generate", "--model", str(ckpt), PROMPTS[0], "--max-new-tokens", "12", "--max-new-codes", "3",
                 "--no-color"]) == 0
    assert re.search(r"output \d+ tokens in 3 codes", capsys.readouterr().err)
    assert main(["generate", "--model", str(ckpt), "x", "--temperature", "-1", "--top-p", "2"]) == 2
    assert "top_p must be a number in (0, 1] or None, got 2.0" in capsys.readouterr().err


def test_every_command_counts_new_tokens_in_base_tokens_and_names_the_draft_length_alike():
    """One unit per flag name: every --max-new-tokens is base tokens and says so; the draft length: --prompt-lookup."""
    import argparse

    from hypervocab.cli.main import build_parser

    def walk(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + (name,))
            else:
                yield path, action

    flags = {}
    for path, action in walk(build_parser()):
        for opt in action.option_strings:
            flags.setdefault(opt, []).append((" ".join(path), action.help or ""))
    assert len(flags["--max-new-tokens"]) >= 5
    for command, text in flags["--max-new-tokens"]:
        assert "base tokens" in text, (command, text)
    assert {c for c, _ in flags["--prompt-lookup"]} >= {"generate", "serve", "demo", "eval generation", "eval speed"}
    assert not [f for f in flags if "lookup" in f and f not in ("--prompt-lookup",)]


def test_right_padded_prompts_give_the_same_codes_as_left_padded_ones(smollm2_tokenizer, htok):
    model = make("llama", smollm2_tokenizer)
    enc = htok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    right_ids, right_mask = torch.full_like(ids, model.config.pad_id), torch.zeros_like(mask)
    for b in range(len(PROMPTS)):
        row = ids[b][mask[b].bool()]
        right_ids[b, : len(row)], right_mask[b, : len(row)] = row, 1
    assert not torch.equal(right_mask, mask)
    left = model.generate(ids, mask, max_new_tokens=10, eos_token_id=[], return_dict_in_generate=True)
    right = model.generate(right_ids, right_mask, max_new_tokens=10, eos_token_id=[], return_dict_in_generate=True)
    assert right.new_codes == left.new_codes


def test_detokenizer_rejects_what_is_not_a_base_id(smollm2_tokenizer):
    from hypervocab.errors import TokenTypeError

    detok = IncrementalDetokenizer(smollm2_tokenizer)
    for bad in ([1, -2], [1.5], ["a"]):
        with pytest.raises(TokenTypeError, match=re.escape(f"ids must be base token ids (ints >= 0), got {bad[-1]!r}")):
            detok.push(bad)
    assert detok.ids == [] and detok.push([]) == ""


# ---------------------------------------------------------------------------------------------- options, driver


def test_generation_options_are_one_validated_frozen_object(smollm2_tokenizer, htok):
    import dataclasses

    from hypervocab import GenerationOptions

    opts = GenerationOptions(max_new_tokens=7, stop_strings="\n\n", eos_token_id=[5, 3, 5])
    assert opts.stop_strings == ("\n\n",) and opts.eos_token_id == (5, 3, 5)
    assert opts.eos_ids(V, None) == (5, 3) and GenerationOptions().eos_ids(V, [2, 1]) == (2, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.max_new_tokens = 3  # type: ignore[misc]
    cases = [
        (lambda: opts.replace(top_p=0), "top_p must be a number in (0, 1] or None, got 0"),  # replace validates
        (lambda: opts.replace(max_new_token=3), "unknown generation option 'max_new_token'; the options are: "
                                                "max_new_tokens, max_new_base_tokens, do_sample,"),
        (lambda: GenerationOptions(logit_bias={3: -100.0}),
         "logit_bias needs allow_hypertokens=False: a biased base token could come back inside a hypertoken"),
        (lambda: GenerationOptions(logit_bias={-1: 1.0}, allow_hypertokens=False),
         "logit_bias must map base ids (ints >= 0) to finite numbers, got {-1: 1.0}"),
        (lambda: GenerationOptions(eos_token_id="2"),
         "eos_token_id must be a base id (an int >= 0), a list of them or None, got '2'"),
        (lambda: GenerationOptions(allow_hypertokens=1), "allow_hypertokens must be True or False, got 1"),
        (lambda: GenerationOptions(logit_bias={V: 1.0}, allow_hypertokens=False).check_vocab(V),
         f"logit_bias keys must be base ids in [0, {V}), got {V}"),
    ]
    for make_it, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_it()
    model = make("llama", smollm2_tokenizer)
    ids = htok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with pytest.raises(ConfigError, match="unknown generation option 'max_length'"):
        model.generate(ids, max_length=5)
    with pytest.raises(InputTypeError, match="options must be a GenerationOptions, got dict"):
        model.generate(ids, options={"max_new_tokens": 3})
    # the object, the keywords, and the object with keywords on top are one thing
    sampled = GenerationOptions(max_new_tokens=12, do_sample=True, temperature=2.0, seed=4, eos_token_id=[])
    by_object = model.generate(ids, options=sampled)
    by_name = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=2.0, seed=4, eos_token_id=[])
    overridden = model.generate(ids, options=sampled.replace(seed=0), seed=4)
    assert torch.equal(by_object, by_name) and torch.equal(by_object, overridden)
    assert not torch.equal(by_object, model.generate(ids, options=sampled.replace(seed=5)))


def test_one_decoder_steps_rows_with_their_own_options_as_each_would_alone(smollm2_tokenizer, htok):
    """The driver generate runs, with rows joining at different steps and each row its own options (the
    server's use): every row writes what generate writes for it alone."""
    from hypervocab.generation import Decoder, GenerationOptions, Row

    model = eager(make("llama", smollm2_tokenizer))
    banned = int(smollm2_tokenizer(" =")["input_ids"][0])
    plans = [GenerationOptions(max_new_tokens=9, eos_token_id=[]),
             GenerationOptions(max_new_tokens=30, max_new_base_tokens=11, eos_token_id=[]),
             GenerationOptions(max_new_tokens=8, allow_hypertokens=False, logit_bias={banned: -100.0},
                               eos_token_id=[]),
             GenerationOptions(max_new_tokens=10, do_sample=True, temperature=1.5, seed=3, eos_token_id=[])]
    decoder = Decoder(V, compact=True)
    got: dict[int, Row] = {}
    pending = list(enumerate(plans))
    steps = 0
    while pending or len(decoder):
        if pending and steps % 2 == 0:  # a row joins every other step
            i, opts = pending.pop(0)
            codes = htok(PROMPTS[i % len(PROMPTS)], return_tensors="np")["input_ids"]
            session = model.new_session(1)
            logits, _, _ = session.feed(codes, np.ones_like(codes))
            gen = torch.Generator().manual_seed(opts.seed) if opts.seed is not None else None
            row = Row.start(model, opts, owner=i, eos=frozenset(), generator=gen)
            decoder.join(session, logits, [row])
            got[i] = row
        decoder.step()
        steps += 1
    for i, opts in enumerate(plans):
        codes = htok(PROMPTS[i % len(PROMPTS)], return_tensors="pt")["input_ids"]
        want = model.generate(codes, options=opts, return_dict_in_generate=True)
        assert got[i].codes == want.new_codes[0] and got[i].base_ids == want.new_base_ids[0], i
        assert got[i].finish_reason == want.stats[0].finish_reason
    assert got[1].finish_reason == "base_budget" and len(got[1].base_ids) == 11
    assert got[2].hypertokens == 0 and banned not in got[2].base_ids
    assert any(r.hypertokens for r in got.values())  # the rows did write hypertokens


def test_output_text_holds_back_what_may_become_a_stop_string_and_cuts_at_it(smollm2_tokenizer):
    from hypervocab.streaming import OutputText

    text = "x = 1\ny = 2\n\nz = 3\n"
    ids = smollm2_tokenizer(text)["input_ids"]
    pieces: list[tuple[str, bool]] = []
    out = OutputText(smollm2_tokenizer, ["\n\n", "never"], emit=lambda t, h: pieces.append((t, h)))
    for k, i in enumerate(ids):
        out.push([i], hyper=k % 2 == 1)
        assert "\n\n" not in "".join(t for t, _ in pieces)  # never sent: it might have been the stop
        if out.stopped:
            break
    assert out.stopped and out.text == "x = 1\ny = 2" == "".join(t for t, _ in pieces)
    out.end()
    assert out.text == "x = 1\ny = 2"
    plain = OutputText(smollm2_tokenizer)
    for i in ids:
        plain.push([i], hyper=False)
    plain.end()
    assert plain.text == text and not plain.stopped
