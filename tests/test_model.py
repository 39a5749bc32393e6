"""HyperModel on tiny random models of five architectures, with the real SmolLM2 tokenizer and real code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hypervocab import HyperConfig, HyperModel, HyperTokenizer
from hypervocab.errors import ConfigError, InputTypeError, InvalidCodeError

transformers = pytest.importorskip("transformers")

from .models import ARCHS, V, assert_same_greedy, make, tiny


@pytest.fixture(scope="module")
def code_text(stdlib_files):
    return stdlib_files[0].read_text(encoding="utf-8")[:1500]


@pytest.fixture(scope="module")
def htok(smollm2_tokenizer):
    return HyperTokenizer.from_base(smollm2_tokenizer, HyperConfig(max_codebook_size=64, max_subtokens=4))


def step_by_step(model: HyperModel, codes: torch.Tensor) -> torch.Tensor:
    """The logits of every position, read a code at a time through a session (its KV cache and growing tables)."""
    session = model.new_session(codes.shape[0])
    logits = []
    for t in range(codes.shape[1]):
        step, _, _ = session.feed(codes[:, t: t + 1].numpy(), np.ones((codes.shape[0], 1), np.int64))
        logits.append(step[:, None])
    return torch.cat(logits, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_without_hypertokens_logits_equal_the_base_model(arch, smollm2_tokenizer, code_text):
    base_ids = torch.tensor([smollm2_tokenizer(code_text[:300])["input_ids"]])
    reference = tiny(arch).eval()
    model = make(arch, smollm2_tokenizer)
    with torch.no_grad():
        want = reference(base_ids).logits
        got = model(base_ids).logits  # plain base ids: no hypertoken anywhere
    assert got.shape == (1, base_ids.shape[1], V + 64)
    assert torch.equal(got[..., :V], want)
    zero = HyperModel.from_base(tiny(arch).eval(), smollm2_tokenizer, HyperConfig(max_codebook_size=0))
    codes = torch.tensor(zero.codec.encode(base_ids[0]))[None]
    with torch.no_grad():
        assert torch.equal(zero(codes).logits, want)  # C = 0: the codec changes nothing


MODES = [(arch, "exact", "base") for arch in ARCHS] + [
    ("llama", m, p) for m, p in [("exact", "compressed"), ("none", "base"), ("none", "compressed")]]


@pytest.mark.parametrize("arch, mask, positions", MODES)
def test_full_forward_equals_kv_cached_steps(arch, mask, positions, smollm2_tokenizer, code_text):
    model = make(arch, smollm2_tokenizer, codebook_mask=mask, position_mode=positions)
    ids = smollm2_tokenizer(code_text[:450])["input_ids"]
    codes = torch.tensor(model.codec.encode(ids))[None]
    assert (codes >= V).sum() >= 3  # the text really has hypertokens
    with torch.no_grad():
        full = model(codes).logits
        step = step_by_step(model, codes)
    if mask == "exact":  # what inference sees: the same rows, the same values
        assert torch.equal(torch.isfinite(full), torch.isfinite(step))
        torch.testing.assert_close(full, step, rtol=1e-4, atol=1e-4)
    else:  # "none" also shows rows installed later; where both score a row, they agree
        n = torch.tensor(model.codec.trace_batch(codes)[1])  # entries installed after each position
        cols = torch.arange(V + 64).view(1, 1, -1)
        both = cols < V + n.unsqueeze(-1)
        torch.testing.assert_close(full[both], step[both], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padding_gives_the_same_logits_as_each_sequence_alone(arch, smollm2_tokenizer, code_text, htok):
    model = make(arch, smollm2_tokenizer)
    texts = [code_text[:400], code_text[400:600], code_text[600:1200]]
    batch = htok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # codebooks made ahead of time by the data pipeline give the same logits
        ahead = htok(texts, return_tensors="pt", padding=True, return_codebooks=True)["codebooks"]
        assert torch.equal(model(batch["input_ids"], attention_mask=batch["attention_mask"], codebooks=ahead).logits,
                           together)
        for i, text in enumerate(texts):
            alone = htok(text, return_tensors="pt")
            single = model(alone["input_ids"]).logits[0]
            n = single.shape[0]
            torch.testing.assert_close(together[i, -n:], single, rtol=1e-4, atol=1e-4)
            # the tokenizer's position ids are the ones the model computes
            assert torch.equal(batch["position_ids"][i, -n:], alone["position_ids"][0])


def test_loss_gradients_reach_only_encoders_and_lora(smollm2_tokenizer, htok, code_text):
    peft = pytest.importorskip("peft")
    model = make("llama", smollm2_tokenizer)
    model.add_lora(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = htok([code_text[:500], code_text[500:900]], return_tensors="pt", padding=True)
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["input_ids"])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("input_encoder", "output_encoder")) or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    assert model.output_encoder.out_proj.weight.grad.abs().sum() > 0
    assert model.embedding.base.weight.grad is None


def test_save_and_load_give_identical_logits(smollm2_tokenizer, htok, code_text, tmp_path):
    peft = pytest.importorskip("peft")
    model = make("qwen2", smollm2_tokenizer)
    model.add_lora(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    codes = htok(code_text[:600], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(codes).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "hypervocab_encoders.safetensors"))
    assert saved and all(k.startswith(("input_encoder.", "output_encoder.")) for k in saved)
    lora = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert lora and all("lora_" in k for k in lora)  # no base weight anywhere in the checkpoint
    config = HyperConfig.from_pretrained(tmp_path)
    assert config.hypervocab_version and config.base_vocab_size == V
    loaded = HyperModel.from_pretrained(tmp_path, base_model=tiny("qwen2").eval()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(codes).logits, want)


def test_merged_adapter_gives_the_same_logits_and_generation(smollm2_tokenizer, htok, code_text):
    peft = pytest.importorskip("peft")
    model = make("llama", smollm2_tokenizer)
    model.add_lora(peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False))
    model.eval()
    codes = htok(code_text[:600], return_tensors="pt")["input_ids"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        want = model(codes).logits
        want_gen = model.generate(codes[:, :40], max_new_tokens=12)
        with model.disable_adapter():
            base = model(codes).logits
        assert not torch.allclose(base, want, atol=1e-3)  # the adapter changes the model: the test can fail
        assert model.merge_adapter() is model and model.adapter_merged
        assert torch.allclose(model(codes).logits, want, atol=1e-4)
        assert_same_greedy(model, model.generate(codes[:, :40], max_new_tokens=12), want_gen, prompt_len=40)
        with model.disable_adapter():  # unmerged for the block, the plain base model inside it
            assert not model.adapter_merged
            assert torch.allclose(model(codes).logits, base, atol=1e-5)
        assert model.adapter_merged  # and merged again after it
        assert torch.allclose(model(codes).logits, want, atol=1e-4)
        model.unmerge_adapter()
        assert not model.adapter_merged
        assert torch.allclose(model(codes).logits, want, atol=1e-5)
    # switching the adapter off and on leaves frozen weights frozen
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_the_tables_of_a_call_are_installed_for_its_block_and_the_outer_ones_come_back(smollm2_tokenizer, htok,
                                                                                       code_text):
    """model.tables is the one way a forward hands its tables to the wrapped layers: nested calls (scoring inside a
    forward) see their own and leave the outer ones in place; nothing is left installed after a call, even a
    failed one."""
    from hypervocab.embedding import HeadContext

    model = make("llama", smollm2_tokenizer)
    outer_t, inner_t = torch.zeros(1, 2, 32), torch.ones(1, 3, 32)
    outer_c = HeadContext(torch.zeros(1, 2, 32), torch.zeros(1, 1, dtype=torch.long), None, None)
    inner_c = HeadContext(torch.ones(1, 3, 32), torch.ones(1, 1, dtype=torch.long), None, None)
    with model.tables(outer_t, outer_c) as head:
        assert model.embedding.table is outer_t and head.context is outer_c
        with model.tables(inner_t, inner_c):
            assert model.embedding.table is inner_t and model.head.context is inner_c
        assert model.embedding.table is outer_t and model.head.context is outer_c
    assert model.embedding.table is None and model.head.context is None
    with pytest.raises(RuntimeError, match="boom"), model.tables(inner_t, inner_c):
        raise RuntimeError("boom")
    assert model.embedding.table is None and model.head.context is None
    codes = htok(code_text[:400], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(codes, compute_logits=False)
        assert model.embedding.table is None and model.head.context is None
        torch.testing.assert_close(model.score(out.hidden_states, out.head_context), model(codes).logits)


def test_merging_without_lora_does_nothing(smollm2_tokenizer):
    model = make("llama", smollm2_tokenizer)
    assert model.merge_adapter() is model and not model.adapter_merged
    assert model.unmerge_adapter() is model


def test_bad_input_gives_clear_errors(smollm2_tokenizer, tmp_path):
    model = make("llama", smollm2_tokenizer)
    with pytest.raises(InvalidCodeError, match=re.escape(
            "input_ids[0][1] = 49216 is outside the id space [0, 49216) (base_vocab_size 49152 + "
            "max_codebook_size 64)")):
        model(torch.tensor([[5, V + 64]]))
    with pytest.raises(InvalidCodeError, match=re.escape("codes[0][1] = 49153 cannot be decoded")):
        model(torch.tensor([[5, V + 1]]))  # a hypertoken that was never defined
    # a session step with a bad code in one row leaves every row's state as it was
    session = model.new_session(2)
    session.feed(np.array([[5, 6, 5], [7, 8, 7]]), np.ones((2, 3), np.int64))
    before = [d.copy() for d in session.decoders]
    for bad in (np.array([[6], [V + 9]]), np.array([[6, 5], [8, V + 9]])):
        with pytest.raises(InvalidCodeError, match=re.escape("input_ids[1][")):
            session.feed(bad, np.ones_like(bad))
        assert session.decoders == before
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=1000, hidden_size=16,
                                                                   intermediate_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2))
    with pytest.raises(ConfigError, match=re.escape("the tokenizer has 49152 ids but the model's embedding has only "
                                                    "1000 rows: tokenizer and model do not match")):
        HyperModel.from_base(small, smollm2_tokenizer)
    model.save_pretrained(tmp_path)
    other = HyperConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("the checkpoint's input_encoder does not fit this model")):
        HyperModel.from_pretrained(tmp_path, base_model=transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))
    with pytest.raises(ConfigError, match="holds no hypervocab_config.json: not a hypervocab checkpoint"):
        HyperModel.from_pretrained(tmp_path / "nowhere")
    assert other.max_codebook_size == 64
    expected = "labels must be a tensor shaped like input_ids (1, 2), got (1, 3)"
    with pytest.raises(InputTypeError, match=re.escape(expected)):
        model(torch.tensor([[5, 6]]), labels=torch.tensor([[5, 6, 7]]))
    htok = HyperTokenizer.from_base(smollm2_tokenizer, model.config)
    with pytest.raises(InputTypeError, match=re.escape("text must be a str or a list of str, got int")):
        htok(["fine", 3])
    expected = "input_ids must be a [batch, length] integer torch.Tensor, got list"
    with pytest.raises(InputTypeError, match=re.escape(expected)):
        model([[5, 6]])
    with pytest.raises(ConfigError, match=re.escape("codebook_mask must be one of 'exact', 'none', got 'full'")):
        HyperConfig(codebook_mask="full")


def test_gemma_scaled_embeddings_reach_the_encoder(smollm2_tokenizer):
    model = HyperModel.from_base(tiny("gemma3").eval(), smollm2_tokenizer,
                                 HyperConfig(max_codebook_size=8, encoder="mean"))
    phrase = torch.tensor([[100, 200, -1, -1]])
    vin, vout = model.encode_entries(phrase)
    scaled = model.embedding.base(torch.tensor([100, 200]))  # Gemma multiplies by sqrt(hidden)
    torch.testing.assert_close(vin[0], scaled.mean(0))
    torch.testing.assert_close(vout[0], model.head.base.weight[[100, 200]].mean(0))
    assert not torch.allclose(scaled, model.embedding.base.weight[[100, 200]])
    assert model.embedding.base.weight is model.head.base.weight  # tied, never copied


def test_hyper_tokenizer_round_trip_render_and_save(htok, code_text, tmp_path):
    texts = [code_text[:300], code_text[300:420]]
    batch = htok(texts, return_tensors="pt", padding=True, return_codebooks=True)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["position_ids"].shape
    assert (batch["input_ids"] >= V).any() and batch["attention_mask"][1, 0] == 0  # left padding
    assert htok.batch_decode(batch["input_ids"], attention_mask=batch["attention_mask"]) == texts
    single = htok(texts[0])
    assert isinstance(single["input_ids"], list) and htok.decode(single["input_ids"]) == texts[0]
    assert len(single["input_ids"]) < len(htok.tokenizer(texts[0])["input_ids"])
    ansi, page = htok.render(texts[0]), htok.render(single["input_ids"], format="html")
    assert "\x1b[" in ansi and re.sub(r"\x1b\[[0-9;]*m", "", ansi) == texts[0]
    assert page.startswith('<pre class="hypervocab">') and 'class="hypertoken"' in page
    htok.save_pretrained(tmp_path)
    again = HyperTokenizer.from_pretrained(tmp_path)
    assert again(texts)["input_ids"] == htok(texts)["input_ids"] and again.config == htok.config
    with pytest.raises(ConfigError, match=re.escape("format must be 'ansi' or 'html', got 'pdf'")):
        htok.render(texts[0], format="pdf")


@pytest.mark.slow
def test_real_smollm2(code_text):
    """The real SmolLM2-135M: base logits untouched, cached steps equal the full forward, a sane start loss."""
    from assets import smollm2_model_dir

    path = smollm2_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tok(code_text[:400])["input_ids"]])
    with torch.no_grad():
        want = base(ids).logits
    model = HyperModel.from_base(base, tok, HyperConfig(max_codebook_size=256)).eval()
    htok = HyperTokenizer.from_base(tok, model.config)
    codes = htok(code_text[:400], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits[..., :V], want)
        full = model(codes, labels=codes)
        torch.testing.assert_close(step_by_step(model, codes), full.logits, rtol=1e-4, atol=1e-3)
    # zero-initialised encoders: a hypertoken starts as its first subtoken, so the start loss stays sane
    assert torch.isfinite(full.loss) and full.loss < 20


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_head_and_loss_equal_the_inference_head_and_a_direct_loss(arch, smollm2_tokenizer, htok, code_text):
    """With gradients the head concatenates instead of writing in place; both give the same logits and loss."""
    model = make(arch, smollm2_tokenizer)
    batch = htok([code_text[:600], code_text[200:500]], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want = model(ids, mask, labels=ids)
    got = model(ids, mask, labels=ids)
    assert got.logits.requires_grad and torch.equal(torch.isinf(got.logits), torch.isinf(want.logits))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    target = ids[:, 1:].clone()
    target[mask[:, 1:] == 0] = -100
    direct = torch.nn.functional.cross_entropy(want.logits[:, :-1].reshape(-1, want.logits.shape[-1]),
                                               target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got.loss.detach(), direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want.loss, direct, rtol=1e-5, atol=1e-5)
