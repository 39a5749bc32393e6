"""Tokenizer-side settings: which base ids must never be merged into a hypertoken.

Merging digits is what destroyed arithmetic in the zip2zip paper, so by default
every token whose text contains a decimal digit is protected, along with every
special or added token and the pad token.
"""

from __future__ import annotations

from typing import Any

__all__ = ["default_disabled_ids", "load_tokenizer"]


def default_disabled_ids(tokenizer: Any, *, protect_digits: bool = True) -> list[int]:
    """Ids that must never be merged: special and added tokens, the pad id, and (by default) digit tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        protect_digits: also protect every token whose text contains a decimal digit.

    Returns:
        Sorted ids in ``[0, len(tokenizer))``.
    """
    V = len(tokenizer)
    ids = set(getattr(tokenizer, "all_special_ids", []))
    ids.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    if getattr(tokenizer, "pad_token_id", None) is not None:
        ids.add(tokenizer.pad_token_id)
    if protect_digits:
        texts = tokenizer.batch_decode([[i] for i in range(V)])
        ids.update(i for i, text in enumerate(texts) if any(ch.isdecimal() for ch in text))
    return sorted(i for i in ids if 0 <= i < V)


def load_tokenizer(name_or_path: str) -> Any:
    """Load a Hugging Face tokenizer by hub name, folder, or path to a ``.gguf`` file."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("loading a tokenizer needs transformers: pip install 'hypervocab[hf]'") from None
    from pathlib import Path

    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name_or_path)
