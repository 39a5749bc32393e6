"""How repetitive generated text is: the share of distinct n-grams, against the base model on the same prompt.

Greedy decoding of a model that drifted from its base model falls into loops (the same line, or the same
hypertoken, again and again); the distinct-n ratio of its output says how much, and the base model's
ratio on the same prompt says how much is the prompt's own doing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import InputTypeError, check_int

__all__ = ["distinct_ngram_ratio", "greedy_pair"]


def distinct_ngram_ratio(ids: Sequence[int], n: int = 4) -> float:
    """Distinct n-grams of ``ids`` over all its n-grams (1.0: nothing repeats; 1.0 when there are none).

    ``ids`` are base token ids (compare outputs in the same tokenization), ``n`` >= 1.
    """
    check_int("n", n, minimum=1)
    if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) or hasattr(i, "__index__") for i in ids):
        raise InputTypeError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
    grams = [tuple(int(i) for i in ids[k: k + n]) for k in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def greedy_pair(model: Any, tokenizer: Any, prompt: str, *, add_special_tokens: bool,
                max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Greedy continuations of ``prompt`` by the hypervocab model and by its base model (LoRA off), as base ids.

    Both write at most ``max_new_tokens`` base tokens and stop at end-of-sequence as usual.
    """
    import torch

    from ..tokenizer import HyperTokenizer

    htok = HyperTokenizer(tokenizer, model.config)
    device = next(model.parameters()).device
    enc = htok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    with torch.no_grad():
        out = model.generate(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, max_new_base_tokens=max_new_tokens,
                             return_dict_in_generate=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]], device=device)
        with model.disable_adapter():
            base = model.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return list(out.new_base_ids[0]), base[0, ids.shape[1]:].tolist()
