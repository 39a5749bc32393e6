"""Chunked scoring and the first-token distillation (hypervocab.loss), on tiny random models over the real
vocabulary."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hypervocab import HyperConfig, HyperModel
from hypervocab.codebook import PreparedCodebooks
from hypervocab.errors import InputTypeError, InvalidTokenError
from hypervocab.loss import _marginal, first_tokens, next_code_targets, score_chunks

from .models import V, make, tiny

TEXT = (Path(__file__).resolve().parent.parent / "src" / "hypervocab" / "codec.py").read_text()[:4000]


def batch(model: HyperModel, tok) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Two real texts' codes, the second left-padded, and the first's base ids."""
    ids = tok(TEXT)["input_ids"]
    a, b = model.codec.encode(ids[:300]), model.codec.encode(ids[120:360])
    T = max(len(a), len(b))
    x = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, c in enumerate((a, b)):
        x[i, T - len(c):] = torch.as_tensor(c)
        mask[i, T - len(c):] = 1
    return x, mask, np.asarray(ids[:300])


def encoder_grads(model: HyperModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.output_encoder.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mask_mode", ["exact", "none"])
def test_chunked_scores_equal_the_full_logits(smollm2_tokenizer, arch, mask_mode):
    """Scoring a chunk of positions at a time (checkpointed) gives the full-logits loss and the same gradients."""
    model = make(arch, smollm2_tokenizer, codebook_mask=mask_mode).train()
    x, mask, _ = batch(model, smollm2_tokenizer)
    model.zero_grad()
    full = model(x, mask, labels=x).loss
    full.backward()
    want = encoder_grads(model)
    prep = PreparedCodebooks.from_codes(model.codec, x, exact=mask_mode == "exact")
    for cells in (3 * (V + 64) * 2, 10**9):  # 3 positions per chunk, and one chunk
        model.zero_grad()
        out = model(x, mask, codebooks=prep, compute_logits=False)
        targets = next_code_targets(x, mask)
        scores = score_chunks(model, out.hidden_states, out.head_context, targets, chunk_cells=cells)
        loss = scores.cross_entropy / (targets != -100).sum()
        loss.backward()
        torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
        for g, w in zip(encoder_grads(model), want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        # the forward's own loss without logits is the same number
        torch.testing.assert_close(model(x, mask, labels=x, codebooks=prep, compute_logits=False).loss, full,
                                   rtol=1e-5, atol=1e-5)


def test_prepared_codebooks_give_the_same_forward_and_pickle(smollm2_tokenizer):
    model = make("llama", smollm2_tokenizer)
    x, mask, _ = batch(model, smollm2_tokenizer)
    prep = PreparedCodebooks.from_codes(model.codec, x)
    again = pickle.loads(pickle.dumps(prep))
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask, codebooks=again).logits, model(x, mask).logits)
    with pytest.raises(InputTypeError, match=r"codebooks are prepared for \(2, \d+\) codes, input_ids are \(1, \d+\)"):
        model(x[:1], mask[:1], codebooks=prep)


def test_base_only_codebooks_refuse_hypertoken_ids():
    with pytest.raises(InvalidTokenError, match=r"ids\[0\]\[1\] = 49152 is not a base id: they are \[0, 49152\)"):
        PreparedCodebooks.base_only([[5, V]], base_vocab_size=V, max_subtokens=4)


def test_first_token_marginal_is_the_sum_over_codes_that_start_with_each_token(smollm2_tokenizer):
    model = make("llama", smollm2_tokenizer)
    x, mask, _ = batch(model, smollm2_tokenizer)
    prep = PreparedCodebooks.from_codes(model.codec, x)
    with torch.no_grad():
        out = model(x, mask, codebooks=prep, compute_logits=False)
        probs = model.score(out.hidden_states, out.head_context).float().softmax(-1)
    W = out.head_context.table.shape[1]
    rows, cand = first_tokens(prep, W)
    got = _marginal(probs, V, rows, cand, out.head_context.visible)
    books = [model.codec.decode(r[m.bool()].numpy(), return_codebook=True)[1] for r, m in zip(x, mask)]
    for b in range(2):
        for t in range(0, x.shape[1], 17):
            want = probs[b, t, :V].clone()
            for k in range(W):
                if probs[b, t, V + k] == 0:
                    continue  # not scored here (-inf)
                if k < len(books[b]) and k < int(prep.visible[b, t]):
                    first = books[b].phrase(V + k)[0]
                else:  # the one new id that may come next: the pending phrase's first token
                    assert k == int(prep.visible[b, t]) and int(cand[b, t]) >= 0
                    first = int(cand[b, t])
                want[first] += probs[b, t, V + k]
            torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[b, t].sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)


def test_distillation_is_zero_for_the_base_model_itself(smollm2_tokenizer):
    """Without hypertokens (C = 0) and without an adapter the model is its base: nothing to distil."""
    model = HyperModel.from_base(tiny("llama").eval(), smollm2_tokenizer, HyperConfig(max_codebook_size=0))
    ids = torch.as_tensor(smollm2_tokenizer(TEXT)["input_ids"][:200])[None]
    prep = PreparedCodebooks.from_codes(model.codec, ids)
    with torch.no_grad():
        out = model(ids, codebooks=prep, compute_logits=False)
        teacher = model(ids, codebooks=PreparedCodebooks.base_only(ids, base_vocab_size=V, max_subtokens=4),
                        compute_logits=False).hidden_states
        targets = next_code_targets(ids, torch.ones_like(ids))
        scores = score_chunks(model, out.hidden_states, out.head_context, targets, teacher_hidden=teacher,
                              first=first_tokens(prep, 0))
    assert abs(float(scores.distillation)) < 1e-3 * 199


def test_distillation_gradient_reaches_the_encoders(smollm2_tokenizer):
    """The distillation term alone moves the output encoder: hypertoken rows change the first-token marginal."""
    model = make("llama", smollm2_tokenizer).train()
    x, mask, base_ids = batch(model, smollm2_tokenizer)
    x, mask = x[:1, -len(model.codec.encode(base_ids)):], mask[:1, -len(model.codec.encode(base_ids)):]
    prep = PreparedCodebooks.from_codes(model.codec, x)
    out = model(x, mask, codebooks=prep, compute_logits=False)
    with torch.no_grad():
        base = torch.as_tensor(base_ids)[None]
        t = model(base, codebooks=PreparedCodebooks.base_only(base, base_vocab_size=V, max_subtokens=4),
                  compute_logits=False).hidden_states
        ends = prep.lengths.cumsum(1) - 1
        t = t.gather(1, ends.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    scores = score_chunks(model, out.hidden_states, out.head_context, next_code_targets(x, mask), teacher_hidden=t,
                          first=first_tokens(prep, out.head_context.table.shape[1]), chunk_cells=10**6)
    assert float(scores.distillation) > 0
    scores.distillation.backward()
    assert any(float(g.abs().sum()) > 0 for g in encoder_grads(model))
