"""Log-likelihood of text under a hypervocab model and under its base model, on exactly the same bytes.

The split between what is given and what is scored always happens in base tokens
(so in text), never in compressed ids: the context is compressed, the LZW pass
goes on over the scored tokens with a code boundary where they start, and the
model is scored *strictly* on that canonical code sequence.  Other code
sequences that spell the same text get probability too, so the strict score is
a lower bound on the model's likelihood of the text (its bits per byte an upper
bound), the honest side to err on.

The base model reads the same context tokens and scores the same target tokens,
with the LoRA adapter switched off when the model has one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputTypeError, check_int

__all__ = ["Continuation", "TextScore", "bits_per_byte_report", "continuation_logprob", "first_token_divergence",
           "format_bits_per_byte_markdown", "prefix_id", "score_texts", "sliding_windows", "window_pairs"]


@dataclass
class Continuation:
    """The log-probability of target tokens given context tokens.

    logprob: natural log, summed over the scored units; units: how many codes (hypervocab) or tokens (base)
    were scored; greedy: whether greedy decoding picks every scored unit.
    """

    logprob: float
    units: int
    greedy: bool


@dataclass
class TextScore:
    """Totals of one model over some texts: nats, scored units, bytes and base tokens."""

    model: str
    nll: float
    units: int
    bytes: int
    tokens: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else 0.0

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes) if self.bytes else 0.0

    @property
    def units_per_token(self) -> float:
        return self.units / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bits_per_byte=self.bits_per_byte, byte_perplexity=self.byte_perplexity,
                 units_per_token=self.units_per_token)
        return d


def prefix_id(tokenizer: Any) -> int:
    """The token every text starts after (BOS, else EOS), so that its first token is scored too."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start texts with")


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(context_start, score_start, end)`` triples that score each of ``n`` positions exactly once.

    The first window scores its first ``window`` positions; each later one scores the next ``stride``
    positions after up to ``window - stride`` positions of context.
    """
    for name, v in (("window", window), ("stride", stride)):
        check_int(name, v, minimum=1)
    if stride > window:
        raise ConfigError(f"stride must be at most window ({window}), got {stride}")
    out, start = [], 0
    while start < n:
        end = min(n, start + (stride if start else window))
        out.append((max(0, end - window), start, end))
        start = end
    return out


def _score(logits: torch.Tensor, targets: torch.Tensor) -> Continuation:
    """logits ``[T, N]`` predicting targets ``[T]``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return Continuation(float(picked.sum()), int(targets.numel()), bool((logits.argmax(-1) == targets).all()))


def window_pairs(ids: Sequence[int], start_id: int, *, window: int,
                 stride: int) -> list[tuple[list[int], list[int]]]:
    """``(context, target)`` base-token pairs of :func:`sliding_windows`: each of ``ids`` is a target once.

    A window with no context (a text's start, or ``stride == window``) reads ``start_id`` first, so that
    its first token is scored too.
    """
    ids = list(ids)
    out = []
    for ctx, start, end in sliding_windows(len(ids), window, stride):
        context = ids[ctx:start]
        if ctx == 0 or not context:
            context = [start_id] + context
        out.append((context, ids[start:end]))
    return out


@torch.inference_mode()
def continuation_logprob(model: Any, context: Sequence[int], target: Sequence[int], *,
                         base: bool = False) -> Continuation:
    """log P(``target`` | ``context``), both base token ids, under a :class:`~hypervocab.HyperModel`.

    With ``base=True`` the base model scores the base tokens (LoRA off).  Otherwise the context is
    compressed, the LZW pass continues over ``target`` with a code boundary at the split, and the
    target's codes are scored over the ``V + C`` ids visible at each position.  ``context`` must not be
    empty: start it with :func:`prefix_id` at the beginning of a text.
    """
    context, target = [int(t) for t in context], [int(t) for t in target]
    if not context:
        raise InputTypeError("context must hold at least one token (start texts with prefix_id(tokenizer))")
    if not target:
        return Continuation(0.0, 0, True)
    device = next(model.parameters()).device
    if base:
        ids = torch.tensor([context + target], device=device)
        with model.disable_adapter():
            logits = model.base(input_ids=ids, logits_to_keep=len(target) + 1).logits[0, :-1]
        return _score(logits, ids[0, len(context):])
    codec = model.codec
    ctx_codes = [int(c) for c in codec.encode(context)]
    state = codec.decoder_state()
    state.push(ctx_codes)
    tgt_codes = codec.encode_continuation(target, state)
    ids = torch.tensor([ctx_codes + tgt_codes], device=device)
    logits = model(ids).logits[0, len(ctx_codes) - 1:-1]
    return _score(logits, ids[0, len(ctx_codes):])


def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, window: int = 1024, stride: int = 512,
                progress: bool = False) -> dict[str, TextScore]:
    """Negative log-likelihood of ``texts`` under the hypervocab model and under its base model.

    Each text is tokenized alone and read in sliding windows of ``window`` base tokens moving by
    ``stride`` (see :func:`sliding_windows`); both models score every token of every text exactly once,
    from the same context.  Returns ``{"base": TextScore, "hypervocab": TextScore}``.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InputTypeError("texts must be a list of str")
    sliding_windows(1, window, stride)  # checks window and stride before any work
    start_id = prefix_id(tokenizer)
    totals = {name: TextScore(name, 0.0, 0, 0, 0) for name in ("base", "hypervocab")}
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pairs_of = [window_pairs(ids, start_id, window=window, stride=stride) for ids in encoded]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, pairs_of)), desc="scoring", unit="window")
    for text, ids, pairs in zip(texts, encoded, pairs_of):
        for name in totals:
            totals[name].bytes += len(text.encode("utf-8"))
            totals[name].tokens += len(ids)
        for context, target in pairs:
            for name in totals:
                c = continuation_logprob(model, context, target, base=name == "base")
                totals[name].nll -= c.logprob
                totals[name].units += c.units
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return totals


def bits_per_byte_report(model: Any, tokenizer: Any, domains: Mapping[str, Sequence[str]], *, window: int = 1024,
                         stride: int = 512, progress: bool = False) -> list[dict[str, Any]]:
    """One row per domain (and a total): bits per byte and byte perplexity, base vs hypervocab.

    ``domains`` maps a name to its texts; see :func:`score_texts` for how they are scored.
    """
    rows, totals = [], {"base": TextScore("base", 0.0, 0, 0, 0), "hypervocab": TextScore("hypervocab", 0.0, 0, 0, 0)}
    for name, texts in domains.items():
        scores = score_texts(model, tokenizer, list(texts), window=window, stride=stride, progress=progress)
        rows.append(_bpb_row(name, len(texts), scores))
        for key, s in scores.items():
            t = totals[key]
            t.nll, t.units, t.bytes, t.tokens = t.nll + s.nll, t.units + s.units, t.bytes + s.bytes, t.tokens + s.tokens
    if len(rows) > 1:
        rows.append(_bpb_row("total", sum(r["texts"] for r in rows), totals))
    return rows


def _bpb_row(name: str, n: int, scores: dict[str, TextScore]) -> dict[str, Any]:
    b, h = scores["base"], scores["hypervocab"]
    return {"domain": name, "texts": n, "bytes": b.bytes, "tokens": b.tokens, "codes": h.units,
            "base_bits_per_byte": b.bits_per_byte, "hypervocab_bits_per_byte": h.bits_per_byte,
            "ratio": h.bits_per_byte / b.bits_per_byte if b.bits_per_byte else 0.0,
            "base_byte_perplexity": b.byte_perplexity, "hypervocab_byte_perplexity": h.byte_perplexity}


def format_bits_per_byte_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`bits_per_byte_report` as a Markdown table."""
    lines = ["| domain | texts | bytes | base tokens | codes | base bits/byte | hypervocab bits/byte | ratio | "
             "base byte-ppl | hypervocab byte-ppl |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['texts']} | {r['bytes']:,} | {r['tokens']:,} | {r['codes']:,} | "
                     f"{r['base_bits_per_byte']:.4f} | {r['hypervocab_bits_per_byte']:.4f} | {r['ratio']:.3f} | "
                     f"{r['base_byte_perplexity']:.4f} | {r['hypervocab_byte_perplexity']:.4f} |")
    return "\n".join(lines)


@torch.inference_mode()
def first_token_divergence(model: Any, tokenizer: Any, texts: Sequence[str], *, window: int = 1024) -> dict[str, float]:
    """How far the model's next-code distribution, summed onto first base tokens, is from the base model's.

    A code's first base token is the text's next base token, so at every code position the model
    implies a next-token distribution; this is its KL divergence from the base model's next-token
    distribution at the same text position (LoRA off, base ids), in nats per code, averaged over
    every code position that has a next code.  It is what the distillation term of training
    minimises; 0 means the model predicts the next base token exactly as its base model does.
    Each text is read in consecutive windows of ``window`` base tokens.

    Returns ``{"kl_per_code": float, "codes": int, "tokens": int}``.
    """
    from ..codebook import PreparedCodebooks
    from ..loss import first_tokens, next_code_targets, score_chunks

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InputTypeError("texts must be a list of str")
    check_int("window", window, minimum=2)
    device = next(model.parameters()).device
    codec = model.codec
    total, positions, n_codes, n_tokens = 0.0, 0, 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), window):
            base = torch.tensor([ids[s: s + window]])
            codes = torch.as_tensor(codec.encode(base[0]))[None]
            prep = PreparedCodebooks.from_codes(codec, codes, exact=model.config.codebook_mask == "exact",
                                                score_next_id=model.config.score_next_id)
            out = model(codes.to(device), codebooks=prep, compute_logits=False)
            with model.disable_adapter():
                teacher = model(base.to(device), compute_logits=False, codebooks=PreparedCodebooks.base_only(
                    base, base_vocab_size=codec.base_vocab_size, max_subtokens=codec.max_subtokens)).hidden_states
            ends = (prep.lengths.cumsum(1) - 1).to(device)
            teacher = teacher.gather(1, ends.unsqueeze(-1).expand(-1, -1, teacher.shape[-1]))
            targets = next_code_targets(codes, torch.ones_like(codes)).to(device)
            prep = prep.to(device)
            scores = score_chunks(model, out.hidden_states, out.head_context, targets, teacher_hidden=teacher,
                                  first=first_tokens(prep, out.head_context.table.shape[1]))
            total += float(scores.distillation)
            positions += int((targets != -100).sum())
            n_codes += codes.shape[1]
            n_tokens += base.shape[1]
    return {"kl_per_code": total / max(positions, 1), "codes": n_codes, "tokens": n_tokens}
