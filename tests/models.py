"""Tiny random models of several architectures over the real SmolLM2 vocabulary, for the model tests."""

from __future__ import annotations

import torch
import transformers

from hypervocab import HyperConfig, HyperModel

V = 49152  # the SmolLM2 tokenizer


def tiny(arch: str):
    """A tiny random model of ``arch`` over the real tokenizer's vocabulary."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                    n_positions=2048))
    if arch == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, pad_token_id=0))
    if arch == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, head_dim=8))
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gpt2", "phi3", "gemma3"]


def make(arch: str, tok, **kw) -> HyperModel:
    config = HyperConfig(**{"max_codebook_size": 64, "max_subtokens": 4, **kw})
    model = HyperModel.from_base(tiny(arch).eval(), tok, config)
    with torch.no_grad():  # random encoders, so that hypertokens differ from their first subtoken
        for p in list(model.input_encoder.parameters()) + list(model.output_encoder.parameters()):
            p.normal_(0, 0.05)
    return model.eval()


def assert_same_greedy(model: HyperModel, got: torch.Tensor, want: torch.Tensor, *, prompt_len: int,
                       atol: float = 1e-3) -> None:
    """Two greedy continuations (1, T) of the same prompt agree, up to near-ties.

    Folding LoRA into the weights changes float rounding, so a random model whose top two logits are within
    rounding of each other may pick either. Where the texts part, the two chosen ids must score within ``atol``
    of each other under ``model``'s full forward on the shared prefix; any real disagreement still fails.
    """
    if torch.equal(got, want):
        return
    n = min(got.shape[1], want.shape[1])
    differ = (got[0, :n] != want[0, :n]).nonzero()
    assert len(differ), (got, want)  # one is a prefix of the other: a length disagreement, not a tie
    i = int(differ[0])
    assert i >= prompt_len, "the prompt itself changed"
    with torch.no_grad():
        logits = model(want[:, :i]).logits[0, -1]
    a, b = int(got[0, i]), int(want[0, i])
    gap = abs(float(logits[a] - logits[b]))
    assert gap <= atol, f"continuations part at {i}: {a} vs {b}, {gap:.2e} apart in logit, more than a tie"
