"""Checkpoints of the public zip2zip format: hypervocab must run them exactly as the public runtime does.

Each checkpoint is built by the public ``zip2zip`` package itself around a tiny random Llama over the real
SmolLM2 tokenizer, with random (and, on the output side, enlarged) encoder weights so that hypertokens
are actually chosen.  Both runtimes then read the same compressed prompts: the logits must agree within
1e-4 (fp32) wherever the public runtime reads them, and greedy generations must be identical.

Two conventions of the public runtime are worked around on its side only, never on ours: its tokenizer
pads a batch wrongly (base tokens on the right, then codes on the left), so batches are compressed by
ours; and its plain forward gives left-padded rows positions that ignore the padding (its ``generate``
does not), so in ``"compressed"`` mode the batched forward gets our position ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hypervocab import HyperModel, HyperTokenizer
from hypervocab.errors import ConfigError
from hypervocab.interop import load_public_model, load_public_tokenizer

zip2zip = pytest.importorskip("zip2zip", reason="pip install --no-deps zip2zip==0.2.0 (and omegaconf)")

pytestmark = pytest.mark.slow  # the real SmolLM2 tokenizer

V, C, M = 49152, 64, 4
PROMPTS = ["def f(x):\n    return x + x + x + x\ndef g(x):\n    return x + x + x + x\nprint(f(1), g(2))\n",
           "import os\nimport os.path\nimport sys\n"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as an ordinary Hugging Face folder."""
    import transformers

    torch.manual_seed(0)
    tok = smollm2_tokenizer
    # a wide initialisation, so that greedy decoding does not settle into one repeated token
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True, initializer_range=0.3,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id)
    directory = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def make_checkpoint(directory: Path, base_dir: Path, tok, *, kind: str, position_mode: str = "compressed",
                    decoder: str = "lora", meta: dict | None = None, **encoder) -> Path:
    """Build, perturb and save a checkpoint with the public package.

    decoder: ``"lora"`` (a PEFT adapter), ``"full"`` (a whole ``model.safetensors`` over the base model),
    ``"self"`` (the folder is its own base model, ``base_model_name_or_path: "."``) or ``"none"``.
    """
    import transformers
    from peft import LoraConfig
    from zip2zip import CompressionConfig, Zip2ZipConfig, Zip2ZipModel
    from zip2zip.nn.encoders.config import ResLatentAttnConfig, TransformerEncoderConfig

    torch.manual_seed(1)
    compression = CompressionConfig.from_tokenizer(tok, max_codebook_size=C, max_subtokens=M)
    if kind == "transformer":
        enc = TransformerEncoderConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48,
                                          "num_heads": 4, "position_encoding": "learnable", **encoder})
    else:
        enc = ResLatentAttnConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 40,
                                     "num_heads": 2, **encoder})
    config = Zip2ZipConfig(base_model_name_or_path=str(base_dir), position_mode=position_mode, encoder_type=kind,
                           encoder=enc, compression=compression)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if decoder == "lora" else None
    model = Zip2ZipModel(config, base_model=base, peft_config=lora)
    with torch.no_grad():
        out_enc = model.output_encoder or model.input_encoder
        for p in list(model.input_encoder.parameters()) + list(out_enc.parameters()):
            p.normal_(0, 0.3)
        # larger output vectors: hypertokens then win some greedy steps
        if kind == "transformer":
            out_enc.layers[-1].post_mlp_layernorm.weight.mul_(3)
        elif out_enc.proj_out is not None:
            out_enc.proj_out.weight.mul_(3)
        else:
            out_enc.norm.weight.mul_(3)
    model.save_pretrained(str(directory))
    if decoder in ("full", "self"):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        base.save_pretrained(directory)  # config.json and model.safetensors (the tied head left out)
        if decoder == "self":
            tok.save_pretrained(directory)
            path = directory / "zip2zip_config.json"
            data = json.loads(path.read_text())
            data["base_model_name_or_path"] = "."
            path.write_text(json.dumps(data))
        else:
            (directory / "config.json").unlink()
    if meta is not None:
        torch.save(meta, directory / "meta.pt")
    return directory


CASES = {
    "transformer-lora": dict(kind="transformer"),
    "res_latent-projections-lora": dict(kind="res_latent_attn", hidden_size=16, model_hidden_size=32),
    # causal / no residual come from meta.pt, as the public loader reads them
    "res_latent-tied-meta-base_positions": dict(kind="res_latent_attn", tie_encoders=True, decoder="none",
                                                position_mode="base_token_end",
                                                meta={"args": {"encoder_causal": True, "no_encoder_residual": True}}),
    "transformer-no_positions-full_decoder-base_positions": dict(kind="transformer", position_encoding=None,
                                                                 decoder="full", position_mode="base_token_end"),
    "transformer-self_contained": dict(kind="transformer", decoder="self"),
}


def _public_logits(model, batch: dict, *, position_ids: torch.Tensor | None) -> torch.Tensor:
    model.codebook_manager.reset()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids).logits
    model.codebook_manager.reset()
    return logits


def _assert_same_logits(theirs: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor) -> None:
    assert theirs.shape == ours.shape  # no padded rows past V here: both are [B, T, V + C]
    keep = mask.bool()
    a, b = theirs[keep], ours[keep]
    assert torch.equal(torch.isinf(a), torch.isinf(b))  # the same rows are scorable
    finite = torch.isfinite(a)
    torch.testing.assert_close(b[finite], a[finite], atol=1e-4, rtol=0)


def _until_eos(codes: list[int], eos: int | None) -> list[int]:
    return codes[: codes.index(eos) + 1] if eos in codes else codes


@pytest.mark.parametrize("case", list(CASES))
def test_same_logits_and_generations_as_the_public_runtime(case, tmp_path, base_dir, smollm2_tokenizer):
    from zip2zip import Zip2ZipModel, Zip2ZipTokenizer

    spec = dict(CASES[case])
    directory = make_checkpoint(tmp_path / "ckpt", base_dir, smollm2_tokenizer, **spec)
    theirs = Zip2ZipModel.from_pretrained(str(directory)).eval()
    their_tok = Zip2ZipTokenizer.from_pretrained(str(directory))
    ours = load_public_model(directory).eval()
    tok = load_public_tokenizer(directory)
    assert ours.config.base_vocab_size == V and ours.config.position_mode == (
        "base" if spec.get("position_mode") == "base_token_end" else "compressed")

    # one prompt at a time: the same codes from both tokenizers, the same logits at every position
    for text in PROMPTS:
        one = tok([text], return_tensors="pt")
        assert one["input_ids"].tolist() == their_tok([text], return_tensors="pt")["input_ids"].tolist()
        with torch.no_grad():
            mine = ours(**one).logits
        _assert_same_logits(_public_logits(theirs, one, position_ids=None), mine, one["attention_mask"])

    # a left-padded batch
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["input_ids"] >= V).any()
    with torch.no_grad():
        mine = ours(**batch).logits
    positions = batch["position_ids"] if ours.config.position_mode == "compressed" else None
    _assert_same_logits(_public_logits(theirs, batch, position_ids=positions), mine, batch["attention_mask"])

    # greedy generation, batched
    eos = smollm2_tokenizer.eos_token_id
    with torch.no_grad():
        their_out = theirs.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
        our_out = ours.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=NEW_TOKENS,
                                return_dict_in_generate=True)
    T = batch["input_ids"].shape[1]
    for b in range(len(PROMPTS)):
        assert our_out.new_codes[b] == _until_eos(their_out[b, T:].tolist(), eos)
    assert any(c >= V for codes in our_out.new_codes for c in codes), "no hypertoken was generated: a weak test"


@pytest.mark.parametrize("case", CASES)
def test_load_reads_the_public_format_as_from_pretrained_does(case, tmp_path, base_dir, smollm2_tokenizer):
    from hypervocab import load

    directory = make_checkpoint(tmp_path / "ckpt", base_dir, smollm2_tokenizer, **dict(CASES[case]))
    ours = load_public_model(directory).eval()
    tok = load_public_tokenizer(directory)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = ours(**batch).logits
    model, htok = load(directory, device="cpu", merged=False)
    assert not model.training and model.config.to_dict() == ours.config.to_dict()
    assert htok(PROMPTS, return_tensors="pt", padding=True)["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    merged, _ = load(directory, device="cpu")  # the default: LoRA, where there is one, folded in
    with torch.no_grad():
        got = merged(**batch).logits
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=0)


def test_from_pretrained_reads_only_our_format_and_says_what_reads_the_public_one(tmp_path, plain_checkpoint):
    """hypervocab.load is the one place that recognises a format: from_pretrained names it."""
    import re

    want = (f"{str(plain_checkpoint)!r} holds no hypervocab_config.json: not a hypervocab checkpoint (it is one of "
            "the public zip2zip format: hypervocab.load() reads it, as does hypervocab.interop.load_public_model())")
    for read in (HyperModel.from_pretrained, HyperTokenizer.from_pretrained):
        with pytest.raises(ConfigError, match=re.escape(want)):
            read(plain_checkpoint)


def test_tokenizer_decodes_what_it_encodes(tmp_path, base_dir, smollm2_tokenizer):
    directory = make_checkpoint(tmp_path / "ckpt", base_dir, smollm2_tokenizer, kind="transformer", decoder="none")
    tok = load_public_tokenizer(directory)
    assert len(tok) == V + C and tok.config.pad_id == smollm2_tokenizer.eos_token_id
    assert tok.config.disabled_ids == sorted(smollm2_tokenizer.get_added_vocab().values())
    ids = tok(PROMPTS[0])["input_ids"]
    assert max(ids) >= V and tok.decode(ids) == PROMPTS[0]


def test_a_converted_checkpoint_saves_and_loads_in_our_format(tmp_path, plain_checkpoint):
    converted = load_public_model(plain_checkpoint).eval()
    converted.save_pretrained(tmp_path / "ours")
    reloaded = HyperModel.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.to_dict() == converted.config.to_dict()
    batch = load_public_tokenizer(plain_checkpoint)(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, converted(**batch).logits)


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, base_dir, smollm2_tokenizer) -> Path:
    """A valid checkpoint (transformer encoders, no decoder changes) that each error test copies and breaks."""
    return make_checkpoint(tmp_path_factory.mktemp("plain") / "ckpt", base_dir, smollm2_tokenizer,
                           kind="transformer", decoder="none")


@pytest.fixture
def broken(tmp_path, plain_checkpoint) -> Path:
    directory = tmp_path / "broken"
    shutil.copytree(plain_checkpoint, directory)
    return directory


def _edit_config(directory: Path, edit) -> None:
    path = directory / "zip2zip_config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_encoders(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "zip2zip_encoders.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_the_attention_encoder_is_refused(broken):
    _edit_config(broken, lambda d: d.update(encoder_type="attention"))
    for load in (load_public_model, load_public_tokenizer):
        with pytest.raises(ConfigError) as e:
            load(broken)
        assert str(e.value) == (
            f"{broken / 'zip2zip_config.json'}: field 'encoder_type' is 'attention', which hypervocab does not run: "
            f"the public runtime cannot run it either (it passes a batched codebook the encoder does not take)")


def test_an_unknown_encoder_is_refused(broken):
    _edit_config(broken, lambda d: d.update(encoder_type="perceiver"))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{broken / 'zip2zip_config.json'}: field 'encoder_type' must be one of "
                            f"['res_latent_attn', 'transformer'], got 'perceiver'")


def test_unknown_fields_and_bad_values_are_refused(broken):
    path = broken / "zip2zip_config.json"
    _edit_config(broken, lambda d: d["encoder"].update(rope_theta=10000.0))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{path}: unknown field 'encoder.rope_theta' (value 10000.0): written by a zip2zip "
                            f"version hypervocab does not know")
    _edit_config(broken, lambda d: (d["encoder"].pop("rope_theta"), d.update(position_mode="rope_scaled")))
    with pytest.raises(ConfigError) as e:
        load_public_tokenizer(broken)
    assert str(e.value) == (f"{path}: field 'position_mode' must be one of ['base_token_end', 'compressed'], "
                            f"got 'rope_scaled'")
    _edit_config(broken, lambda d: (d.update(position_mode="compressed"), d["compression"].update(max_subtokens=0)))
    with pytest.raises(ConfigError) as e:
        load_public_tokenizer(broken)
    assert str(e.value) == f"{path}: field 'compression.max_subtokens' must be an int >= 1, got 0"


def test_a_missing_encoders_file_is_refused_not_randomised(broken):
    (broken / "zip2zip_encoders.safetensors").unlink()
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{str(broken)!r} has a zip2zip_config.json but no zip2zip_encoders.safetensors or "
                            f"encoders.safetensors: the hyper-encoders' weights are missing (hypervocab never "
                            f"replaces them by random ones)")


def test_the_other_encoders_file_name_is_read(broken, plain_checkpoint):
    (broken / "zip2zip_encoders.safetensors").rename(broken / "encoders.safetensors")
    a, b = load_public_model(broken), load_public_model(plain_checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(a.input_encoder.state_dict().values(),
                                                 b.input_encoder.state_dict().values()))


def test_missing_extra_and_misshapen_tensors_are_refused(broken):
    file = broken / "zip2zip_encoders.safetensors"
    sizes = "hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=48, position_encoding='learnable', " \
            "max_subtokens=4"
    _edit_encoders(broken, lambda t: t.pop("output_encoder.layers.1.attention.k_proj.weight"))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{file}: tensor 'output_encoder.layers.1.attention.k_proj.weight' is missing; "
                            f"zip2zip_config.json (encoder_type 'transformer', {sizes}) needs it")
    _edit_encoders(broken, lambda t: t.update({"output_encoder.layers.1.attention.k_proj.weight": torch.zeros(32, 32),
                                               "input_encoder.layers.2.mlp.fc1.weight": torch.zeros(48, 32)}))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{file}: unexpected tensor 'input_encoder.layers.2.mlp.fc1.weight': zip2zip_config.json "
                            f"(encoder_type 'transformer', {sizes}) has no place for it")
    _edit_encoders(broken, lambda t: (t.pop("input_encoder.layers.2.mlp.fc1.weight"),
                                      t.update({"input_encoder.layers.0.mlp.fc1.weight": torch.zeros(40, 32)})))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{file}: tensor 'input_encoder.layers.0.mlp.fc1.weight' (40, 32) does not fit "
                            f"zip2zip_config.json (encoder_type 'transformer', {sizes}), which needs (48, 32)")


def test_an_encoder_width_other_than_the_model_is_refused(broken):
    _edit_config(broken, lambda d: d["encoder"].update(hidden_size=16))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{broken / 'zip2zip_config.json'}: field 'encoder.hidden_size' is 16, but the base "
                            f"model's input vectors have width 32")


def test_a_base_model_with_a_scaled_embedding_is_refused(broken, base_dir):
    from .models import tiny

    with pytest.raises(ConfigError) as e:
        load_public_model(broken, base_model=tiny("gemma3"))
    assert str(e.value) == (f"the base model {str(base_dir)!r} reads ids with a Gemma3TextScaledWordEmbedding; the "
                            f"public zip2zip runtime replaces it by a plain embedding lookup of its weight (dropping "
                            f"any scaling or adapter), which hypervocab does not reproduce")


def test_decoder_weights_the_public_runtime_ignores_are_refused(broken):
    (broken / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{broken / 'model.safetensors.index.json'}: decoder weights the public runtime would "
                            f"ignore (it reads only adapter_config.json adapters or a single model.safetensors); "
                            f"hypervocab cannot tell which decoder was meant")


def test_a_full_decoder_next_to_an_adapter_is_refused(broken, base_dir):
    shutil.copy(base_dir / "model.safetensors", broken / "model.safetensors")
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{broken / 'model.safetensors'}: decoder weights the public runtime would ignore (it "
                            f"loads the adapter of adapter_config.json instead); hypervocab cannot tell which "
                            f"decoder was meant")


def test_a_partial_full_decoder_is_refused(broken, base_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base_dir / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{broken / 'model.safetensors'}: tensor 'model.norm.weight' is missing: a full decoder "
                            f"must hold every weight (the public runtime would keep the base model's, a mix of two "
                            f"models)")


def test_a_meta_file_that_needs_unpickling_is_refused(broken):
    # a class of the training script's own is not one of the plain containers a weights-only load accepts
    torch.save({"args": _Args(encoder_causal=True)}, broken / "meta.pt")
    _edit_config(broken, lambda d: d.update(encoder_type="res_latent_attn",
                                            encoder={"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2}))
    with pytest.raises(ConfigError) as e:
        load_public_model(broken)
    assert str(e.value) == (f"{broken / 'meta.pt'} cannot be read without running the code it pickles "
                            f"(UnpicklingError); its training arguments may change encoder.causal / "
                            f"encoder.residual, so hypervocab will not guess them (remove the file if "
                            f"zip2zip_config.json is right)")


class _Args(dict):
    """Training arguments pickled as a class of their own (what a weights-only load must refuse)."""
