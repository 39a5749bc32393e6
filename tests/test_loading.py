"""``hypervocab.load``: every kind of source, on the device and in the dtype asked for, with clear errors.

The shipped model ("default") is checked against the old way of loading it in ``test_shipped.py`` (it needs the
real base model); a checkpoint of the public zip2zip format in ``test_interop.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hypervocab import HyperConfig, HyperModel, HyperTokenizer, load
from hypervocab.errors import ConfigError
from hypervocab.loading import DTYPES, resolve_device, resolve_dtype

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from .models import tiny  # noqa: E402  (after the skips: it imports transformers)

PROMPT = "def f(x):\n    return x + x + x + x\n" * 3
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    """``base``: a tiny random Llama and its tokenizer; ``other``: the same with other weights; ``ckpt``: a
    hypervocab checkpoint over ``base`` (LoRA that changes the outputs, random encoders) with its tokenizer;
    ``bare``: the same checkpoint without tokenizer files."""
    root = tmp_path_factory.mktemp("loading")
    tok = smollm2_tokenizer
    out = {name: root / name for name in ("base", "other", "ckpt", "bare")}
    tiny("llama").save_pretrained(out["base"])
    tok.save_pretrained(out["base"])
    other = tiny("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    other.save_pretrained(out["other"])
    # loaded back, so that the checkpoint names the base folder
    base = transformers.AutoModelForCausalLM.from_pretrained(out["base"])
    model = HyperModel.from_base(base, tok, HyperConfig(max_codebook_size=64, max_subtokens=4))
    model.add_lora(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(model.input_encoder.parameters()) + list(model.output_encoder.parameters()):
            p.normal_(0, 0.05)
    for name in ("ckpt", "bare"):
        model.save_pretrained(out[name])
    tok.save_pretrained(out["ckpt"])
    return out


def logits(model: HyperModel, htok: HyperTokenizer) -> torch.Tensor:
    codes = htok(PROMPT, return_tensors="pt")["input_ids"]
    assert (codes >= htok.codec.base_vocab_size).any()  # hypertokens read: the encoders matter
    with torch.no_grad():
        return model(codes.to(next(model.parameters()).device)).logits.float().cpu()


def test_a_checkpoint_loads_merged_in_eval_mode_with_its_tokenizer(folders):
    model, htok = load(folders["ckpt"], device="cpu")
    assert isinstance(model, HyperModel) and isinstance(htok, HyperTokenizer)
    assert model.adapter_merged and not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference = HyperModel.from_pretrained(folders["ckpt"]).eval()  # LoRA on, not merged
    ref_tok = HyperTokenizer.from_pretrained(folders["ckpt"])
    assert htok(PROMPT)["input_ids"] == ref_tok(PROMPT)["input_ids"]
    torch.testing.assert_close(logits(model, htok), logits(reference, ref_tok), atol=1e-4, rtol=0)
    unmerged, _ = load(folders["ckpt"], device="cpu", merged=False)
    assert not unmerged.adapter_merged and not unmerged.training
    assert torch.equal(logits(unmerged, htok), logits(reference, ref_tok))


def test_a_checkpoint_without_a_tokenizer_takes_its_base_models(folders):
    model, htok = load(folders["bare"], device="cpu", merged=False)
    ref, ref_tok = load(folders["ckpt"], device="cpu", merged=False)
    assert htok(PROMPT)["input_ids"] == ref_tok(PROMPT)["input_ids"]
    assert torch.equal(logits(model, htok), logits(ref, ref_tok))


def test_base_model_replaces_the_one_the_checkpoint_names(folders):
    model, htok = load(folders["ckpt"], base_model=folders["other"], device="cpu", merged=False)
    reference = HyperModel.from_pretrained(
        folders["ckpt"], base_model=transformers.AutoModelForCausalLM.from_pretrained(folders["other"])).eval()
    default, _ = load(folders["ckpt"], device="cpu", merged=False)
    assert torch.equal(logits(model, htok), logits(reference, htok))
    assert not torch.allclose(logits(model, htok), logits(default, htok))  # the other weights really were used


def test_a_dtype_reaches_the_base_model_and_the_encoders(folders):
    for dtype in ("bfloat16", torch.bfloat16):
        model, htok = load(folders["ckpt"], device="cpu", dtype=dtype)
        # PEFT keeps LoRA's own A and B in float32 (folded into the bfloat16 weights here, so unused)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
        scores = logits(model, htok)  # ids not defined yet at a position score -inf
        assert not scores.isnan().any() and torch.isfinite(scores[..., : htok.codec.base_vocab_size]).all()


def test_a_plain_causal_lm_gets_untrained_encoders_and_a_warning(folders, smollm2_tokenizer):
    from hypervocab.errors import UntrainedEncodersWarning

    torch.manual_seed(0)
    with pytest.warns(UntrainedEncodersWarning, match=f"{re.escape(str(folders['base']))} is not a hypervocab "
                                                      "checkpoint, so its hyper-encoders are untrained"):
        model, htok = load(folders["base"], device="cpu", max_codebook_size=32, max_subtokens=3)
    assert (model.codec.max_codebook_size, model.codec.max_subtokens) == (32, 3) == (htok.codec.max_codebook_size,
                                                                                    htok.codec.max_subtokens)
    assert not model.training and not model.adapter_merged
    torch.manual_seed(0)  # the same fresh encoders as from_base makes
    fresh = HyperModel.from_base(transformers.AutoModelForCausalLM.from_pretrained(folders["base"]),
                                 smollm2_tokenizer, HyperConfig(max_codebook_size=32, max_subtokens=3)).eval()
    assert torch.equal(logits(model, htok), logits(fresh, HyperTokenizer(smollm2_tokenizer, fresh.config)))


@NO_CUDA
def test_auto_is_the_cpu_in_float32_without_cuda(folders):
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == resolve_dtype(None, torch.device("cpu")) == torch.float32
    model, _ = load(folders["ckpt"])
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float32)}


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_on_a_machine_without_it_is_a_clear_error(device):
    # checked before anything loads: the model need not exist
    with pytest.raises(ConfigError, match=r"device .*cuda.*: this machine has no CUDA device"):
        load("no/such/model", device=device)


@pytest.mark.parametrize("device", ["tpu", "gpu", "", 3.5])
def test_an_unknown_device_is_a_clear_error(device):
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got"):
        load("no/such/model", device=device)


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp16", "torch.float16", 16])
def test_an_unknown_dtype_names_the_allowed_ones(dtype):
    allowed = ", ".join(map(repr, DTYPES))
    with pytest.raises(ConfigError, match=re.escape(f"dtype must be one of {allowed} or a torch.dtype, got {dtype!r}")):
        load("no/such/model", device="cpu", dtype=dtype)



def test_training_dtype_auto_is_bfloat16_only_where_the_cpu_multiplies_it(monkeypatch):
    """dtype "auto" for training: bfloat16 on a CPU with AMX or AVX512-BF16, float32 on one without, each with
    its reason; an explicit dtype is taken as given."""
    import torch

    from hypervocab.loading import training_dtype

    cpu = torch.device("cpu")
    for amx, avx in ((True, False), (False, True), (True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        dtype, why = training_dtype("auto", cpu)
        if amx or avx:
            units = " and ".join(u for u, on in (("AMX", amx), ("AVX512-BF16", avx)) if on)
            assert dtype == torch.bfloat16 and why == f"this CPU has {units}: bfloat16 matrix products run in hardware"
        else:
            assert dtype == torch.float32 and why.startswith("this CPU has neither AMX nor AVX512-BF16 (PyTorch uses")
    assert training_dtype("bfloat16", cpu) == (torch.bfloat16, "dtype: bfloat16 was asked for")
    assert training_dtype(None, cpu)[0] in (torch.float32, torch.bfloat16)
