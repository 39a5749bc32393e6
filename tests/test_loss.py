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


# ------------------------------------------------------------------------------------------ the fused scorer

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hypervocab.loss import Teacher, train_scores  # noqa: E402


def scored(model: HyperModel, x: torch.Tensor, mask: torch.Tensor, prep: PreparedCodebooks, *,
           teacher_hidden: torch.Tensor | None = None, rows: list[int] | None = None, top_k: int = 0,
           weight: float = 1.0, fused: bool = True, cells: int | None = None, reference_top_k: int = 0):
    """(scores, d loss / d hidden, output-encoder gradients) of one scoring of ``x``.

    ``reference_top_k``: score with autograd over the full logits and the bucketed divergence written out
    here (the formula the fused scorer's top-k divergence implements), instead of :func:`train_scores`.
    """
    model.zero_grad()
    out = model(x, mask, codebooks=prep, compute_logits=False)
    hidden = out.hidden_states
    if not hidden.requires_grad:  # no hypertoken in the input: nothing before the head is trained
        hidden.requires_grad_(True)
    hidden.retain_grad()
    targets = next_code_targets(x, mask)
    first = first_tokens(prep, out.head_context.table.shape[1])
    if reference_top_k:
        ce, kl = bucketed_reference(model, hidden, out.head_context, targets, teacher_hidden, first, reference_top_k)
        loss = ce + weight * kl
        loss.backward()
        return (loss.detach(), ce.detach(), kl.detach()), hidden.grad.clone(), encoder_grads(model)
    teacher = None
    if teacher_hidden is not None:
        index = None if rows is None else torch.tensor(rows)
        teacher = Teacher(teacher_hidden if index is None else teacher_hidden[index], index, top_k=top_k)
    s = train_scores(model, hidden, out.head_context, targets, teacher=teacher, first=first, distill_weight=weight,
                     chunk_cells=cells, fused=fused)
    s.loss.backward()
    kl = s.distillation if s.distillation is not None else torch.zeros(())
    return (s.loss.detach(), s.cross_entropy, kl, s.hyper_correct), hidden.grad.clone(), encoder_grads(model)


def bucketed_reference(model, hidden, context, targets, teacher_hidden, first, k):
    """Cross-entropy and the top-k bucketed divergence over the full logits, differentiated by autograd."""
    logp = model.score(hidden, context).float().log_softmax(-1)
    valid = targets != -100
    ce = -(logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid).sum()
    marg = _marginal(logp.exp(), V, first[0], first[1], context.visible)
    q = model.score(teacher_hidden, None).float().softmax(-1)
    q_top, ids = q.topk(k, -1)
    # the rest buckets summed from their members (1 - the top's mass would be rounding noise for a peaked q)
    q_rest = q.scatter(-1, ids, 0.0).sum(-1)
    m_top = marg.gather(-1, ids).clamp_min(1e-30)
    m_rest = marg.scatter(-1, ids, 0.0).sum(-1).clamp_min(1e-30)
    kl = (torch.xlogy(q_top, q_top) - q_top * m_top.log()).sum(-1) + torch.xlogy(q_rest, q_rest) - q_rest * m_rest.log()
    return ce, (kl * valid).sum()


def close(got, want, what, *, floor: float = 0.0):
    """Equal up to float32 rounding: relative to the largest entry, and within ``floor`` absolutely."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=max(1e-5 * max(scale, 1e-6), floor),
                               msg=lambda m: f"{what}: {m}")


def kl_floor(x: torch.Tensor) -> float:
    """Float32 resolution of a summed divergence: sum q log q - sum q log m over 49k ids rounds to about 1e-6
    nats per position, which matters only where both distributions are near uniform (a KL near 0)."""
    return 2e-6 * x.numel()


MODES = [("exact", True), ("none", True), ("none", False)]


def drawn_batch(data, tok):
    """A model, a two-row batch of real text (the second left-padded), its codebooks and a peaky teacher."""
    arch = data.draw(st.sampled_from(["llama", "gemma3"]), label="arch")
    mode, next_id = data.draw(st.sampled_from(MODES), label="codebook_mask, score_next_id")
    C = data.draw(st.sampled_from([64, 8, 0]), label="max_codebook_size")
    model = make(arch, tok, codebook_mask=mode, score_next_id=next_id, max_codebook_size=C).train()
    cap = data.draw(st.sampled_from([None, 4.0]), label="final_logit_softcapping")
    model.base.config.final_logit_softcapping = cap
    ids = tok(TEXT)["input_ids"]
    rows = []
    for r in range(2):
        s = data.draw(st.integers(0, 300), label=f"start {r}")
        rows.append(model.codec.encode(ids[s: s + data.draw(st.integers(2, 160), label=f"length {r}")]))
    T = max(len(r) for r in rows)
    x = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, c in enumerate(rows):
        x[i, T - len(c):] = torch.as_tensor(c)
        mask[i, T - len(c):] = 1
    prep = PreparedCodebooks.from_codes(model.codec, x, exact=mode == "exact", score_next_id=next_id)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="teacher seed"))
    # tied embeddings of std 0.02: a teacher hidden state of norm ~100 gives a peaked, real-looking distribution
    teacher = torch.randn(2, T, 32, generator=g) * data.draw(st.sampled_from([1.0, 20.0]), label="teacher scale")
    return model, x, mask, prep, teacher


@settings(max_examples=12, deadline=None)  # each example scores twice, forward and backward, over 49k ids
@given(data=st.data())
def test_fused_scoring_equals_autograd_scoring(smollm2_tokenizer, data):
    """Cross-entropy, the exact distillation (top_k=0) and every gradient equal the autograd reference, for
    any chunking, soft-capping, codebook mode, codebook size and subset of windows the teacher reads."""
    model, x, mask, prep, teacher = drawn_batch(data, smollm2_tokenizer)
    rows = data.draw(st.sampled_from([None, [0], [1], [0, 1]]), label="teacher rows")
    use_teacher = data.draw(st.booleans(), label="teacher")
    weight = data.draw(st.sampled_from([0.5, 3.0]), label="distill weight")
    cells = data.draw(st.sampled_from([1, 3 * (V + 64) * 2, None]), label="chunk cells")
    kw = dict(teacher_hidden=teacher if use_teacher else None, rows=rows, weight=weight, cells=cells)
    got, g_hidden, g_enc = scored(model, x, mask, prep, **kw)
    want, w_hidden, w_enc = scored(model, x, mask, prep, fused=False, **kw)
    for name, a, b in zip(("loss", "cross-entropy", "distillation"), got, want):
        close(a, b, name, floor=kl_floor(x))
    assert int(got[3]) == int(want[3])  # hypertoken targets scored highest (no ties in random float logits)
    close(g_hidden, w_hidden, "d/d hidden")
    assert len(g_enc) == len(w_enc)
    for a, b in zip(g_enc, w_enc):
        close(a, b, "d/d output encoder")


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_bucketed_distillation_is_the_coarsened_divergence_and_never_exceeds_the_exact_one(smollm2_tokenizer, data):
    """Top-k: the KL divergence of the two distributions coarsened to the teacher's k top tokens plus one
    bucket for the rest (value and gradients as autograd computes them from the full logits), at most the
    exact divergence (the data-processing inequality), and equal to it when k covers the vocabulary."""
    model, x, mask, prep, teacher = drawn_batch(data, smollm2_tokenizer)
    k = data.draw(st.sampled_from([1, 5, 64]), label="top_k")
    got, g_hidden, g_enc = scored(model, x, mask, prep, teacher_hidden=teacher, top_k=k, weight=2.0)
    want, w_hidden, w_enc = scored(model, x, mask, prep, teacher_hidden=teacher, weight=2.0, reference_top_k=k)
    for name, a, b in zip(("loss", "cross-entropy", "bucketed distillation"), got, want):
        close(a, b, name, floor=kl_floor(x))
    close(g_hidden, w_hidden, "d/d hidden")
    for a, b in zip(g_enc, w_enc):
        close(a, b, "d/d output encoder")
    exact = scored(model, x, mask, prep, teacher_hidden=teacher, top_k=0)[0][2]
    assert float(got[2]) <= float(exact) * (1 + 1e-5) + kl_floor(x)
    whole = scored(model, x, mask, prep, teacher_hidden=teacher, top_k=V)[0][2]
    close(whole, exact, "top_k = V", floor=kl_floor(x))


def test_a_trainable_head_is_scored_through_autograd(smollm2_tokenizer):
    """A head with trainable weights cannot be fused (its weight gradient would be lost): the scorer falls back."""
    from hypervocab.loss import fusable

    model = make("llama", smollm2_tokenizer).train()
    x, mask, _ = batch(model, smollm2_tokenizer)
    prep = PreparedCodebooks.from_codes(model.codec, x)
    assert fusable(model)
    model.head.base.weight.requires_grad_(True)
    assert not fusable(model)
    scores, _, _ = scored(model, x, mask, prep)
    assert model.head.base.weight.grad is not None and float(model.head.base.weight.grad.abs().sum()) > 0
    model.head.base.weight.requires_grad_(False)
    model.head.base.weight.grad = None
    close(scored(model, x, mask, prep)[0][1], scores[1], "cross-entropy")


def test_train_scores_refuses_a_teacher_without_first_tokens(smollm2_tokenizer):
    model = make("llama", smollm2_tokenizer)
    x, mask, _ = batch(model, smollm2_tokenizer)
    out = model(x, mask, compute_logits=False)
    with pytest.raises(InputTypeError, match=r"train_scores: a teacher needs first= \(first_tokens of the batch\)"):
        train_scores(model, out.hidden_states, out.head_context, next_code_targets(x, mask),
                     teacher=Teacher(out.hidden_states))


# ------------------------------------------------------------------------------------------ the phrase ceiling

import math  # noqa: E402

from hypervocab.loss import phrase_ceiling, phrase_excess, row_phrases  # noqa: E402


def ceiling_by_hand(row: list[int], nxt: list[int], lp: list[float]) -> float:
    """The bound of phrase_ceiling's docstring, read token by token."""
    total = 0.0
    for i, token in enumerate(t for t in row if t >= 0):
        if i >= len(nxt) or nxt[i] < 0:
            return total  # the text is unknown from here: the bound stops
        if token != nxt[i]:
            return max(total + math.log(-math.expm1(min(lp[i], -1e-7))), -80.0)
        total += lp[i]
    return max(total, -80.0)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_phrase_ceiling_is_the_bound_read_token_by_token(data):
    B, c = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 3), label="c")
    W, M = data.draw(st.integers(0, 5), label="W"), data.draw(st.integers(1, 4), label="M")
    token = st.integers(0, 2)
    rows = []
    for _ in range(B * W):
        k = data.draw(st.integers(0, M), label="row length")
        rows.append([data.draw(token) for _ in range(k)] + [-1] * (M - k))
    nxt, lp = [], []
    for _ in range(B * c):
        known = data.draw(st.integers(0, M), label="known next tokens")
        nxt.append([data.draw(token) for _ in range(known)] + [-1] * (M - known))
        lp.append([data.draw(st.floats(-6.0, 0.0)) for _ in range(M)])
    phrases = torch.tensor(rows, dtype=torch.long).view(B, W, M)
    got = phrase_ceiling(phrases, torch.tensor(nxt).view(B, c, M), torch.tensor(lp).view(B, c, M))
    assert got.shape == (B, c, W)
    for b in range(B):
        for t in range(c):
            for w in range(W):
                want = ceiling_by_hand(rows[b * W + w], nxt[b * c + t], lp[b * c + t])
                assert float(got[b, t, w]) == pytest.approx(want, rel=1e-5, abs=1e-5), (b, t, w)


def test_row_phrases_are_the_codebook_rows(smollm2_tokenizer):
    """Every hypertoken of the input decodes to its table row's phrase."""
    model = make("llama", smollm2_tokenizer)
    x, mask, _ = batch(model, smollm2_tokenizer)
    prep = PreparedCodebooks.from_codes(model.codec, x)
    rows = row_phrases(prep, prep.width)
    seen = 0
    for b in range(2):
        state = model.codec.decoder_state()
        for code in x[b][mask[b] > 0].tolist():
            ids = state.push(code).ids.tolist()
            if code >= V:
                assert [t for t in rows[b, code - V].tolist() if t >= 0] == ids
                seen += 1
    assert seen > 20


def drawn_next_text(data, prep: PreparedCodebooks, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens that often follow a table row's phrase (so rows match), and low teacher log-probabilities
    (so the ceiling binds)."""
    rows = row_phrases(prep, prep.width)
    B, W, M = rows.shape
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="next-text seed"))
    nxt = torch.randint(0, V, (B, T, M), generator=g)
    if W:
        pick = torch.randint(0, W, (B, T), generator=g)
        copied = rows.gather(1, pick.unsqueeze(-1).expand(B, T, M))
        nxt = torch.where((torch.rand(B, T, 1, generator=g) < 0.7) & (copied >= 0), copied, nxt)
    nxt[:, -1, -1] = -1  # the window's end: unknown
    logp = -torch.rand(B, T, M, generator=g) * data.draw(st.sampled_from([2.0, 25.0]), label="teacher surprise")
    return nxt, logp


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_fused_phrase_ceiling_equals_autograd(smollm2_tokenizer, data):
    """The phrase ceiling's excess and its gradients, computed in place by the fused scorer, equal autograd
    through the full logits, with and without the first-token distillation, whichever windows the teacher read."""
    model, x, mask, prep, teacher_hidden = drawn_batch(data, smollm2_tokenizer)
    rows = data.draw(st.sampled_from([None, [0], [1]]), label="teacher rows")
    distill = data.draw(st.sampled_from([0.0, 1.0]), label="distill weight")
    top_k = data.draw(st.sampled_from([0, 5]), label="top_k")
    nxt, logp = drawn_next_text(data, prep, x.shape[1])
    results = []
    for fused in (True, False):
        model.zero_grad()
        out = model(x, mask, codebooks=prep, compute_logits=False)
        hidden = out.hidden_states
        if not hidden.requires_grad:
            hidden.requires_grad_(True)
        hidden.retain_grad()
        index = None if rows is None else torch.tensor(rows)
        picked = [t if index is None else t[index] for t in (teacher_hidden, nxt, logp)]
        teacher = Teacher(picked[0], index, top_k=top_k if fused else 0, next_tokens=picked[1], next_logp=picked[2])
        s = train_scores(model, hidden, out.head_context, next_code_targets(x, mask), teacher=teacher,
                         first=first_tokens(prep, out.head_context.table.shape[1]), distill_weight=distill,
                         phrases=row_phrases(prep, out.head_context.table.shape[1]), phrase_weight=2.0, fused=fused)
        s.loss.backward()
        results.append((s, hidden.grad.clone(), encoder_grads(model)))
    (got, g_hidden, g_enc), (want, w_hidden, w_enc) = results
    close(got.phrase, want.phrase, "phrase excess")
    if top_k == 0 or distill == 0:  # the reference's divergence is the exact one
        close(got.loss.detach(), want.loss.detach(), "loss", floor=kl_floor(x))
        close(g_hidden, w_hidden, "d/d hidden")
        for a, b in zip(g_enc, w_enc):
            close(a, b, "d/d output encoder")
    assert float(got.phrase) >= 0
    if prep.width and rows is None and float(logp.min()) < -12:  # a random model's rows (p ~ 1e-5) sit over these
        assert float(got.phrase) > 0


def test_phrase_excess_counts_only_the_mass_over_the_ceiling():
    logp = torch.tensor([[[math.log(0.5), math.log(0.1), math.log(0.2)]]])
    ceiling = torch.tensor([[[math.log(0.25), math.log(0.2), 0.0]]])
    mask = torch.tensor([[[True, True, False]]])
    # only the first row is over its ceiling: 0.5 * log(0.5 / 0.25)
    assert float(phrase_excess(logp, ceiling, mask)) == pytest.approx(0.5 * math.log(2))


def test_train_scores_refuses_a_phrase_weight_without_the_next_text(smollm2_tokenizer):
    model = make("llama", smollm2_tokenizer)
    x, mask, _ = batch(model, smollm2_tokenizer)
    prep = PreparedCodebooks.from_codes(model.codec, x)
    out = model(x, mask, codebooks=prep, compute_logits=False)
    with pytest.raises(InputTypeError, match=r"train_scores: phrase_weight needs phrases= \(row_phrases of the batch\) "
                                             r"and a teacher with next_tokens and next_logp"):
        train_scores(model, out.hidden_states, out.head_context, next_code_targets(x, mask),
                     teacher=Teacher(out.hidden_states), first=first_tokens(prep, out.head_context.table.shape[1]),
                     phrases=row_phrases(prep, out.head_context.table.shape[1]), phrase_weight=1.0)
