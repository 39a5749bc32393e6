"""Text to compressed ids and back: a Hugging Face tokenizer followed by the LZW codec.

Which base ids are never merged (special and added tokens, the pad id, digits) is the config's rule:
:func:`hypervocab.config.default_disabled_ids`, also importable from here.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from .codebook import CodebookBatch
from .config import HyperConfig, bind_config, default_disabled_ids
from .errors import ConfigError, InputTypeError
from .positions import position_ids
from .streaming import IncrementalDetokenizer

__all__ = ["default_disabled_ids", "load_tokenizer", "HyperTokenizer"]


def load_tokenizer(name_or_path: str) -> Any:
    """Load a Hugging Face tokenizer by hub name, folder, or path to a ``.gguf`` file."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("loading a tokenizer needs transformers: pip install 'hypervocab[hf]'") from None
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name_or_path)


class HyperTokenizer:
    """Text to compressed ids and back: a Hugging Face tokenizer followed by the LZW codec.

    >>> htok = HyperTokenizer.from_base(tok, model.config)          # doctest: +SKIP
    >>> batch = htok(["def f(x): ...", "..."], return_tensors="pt", padding=True)  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.codec = config.codec()

    @classmethod
    def from_base(cls, tokenizer: Any, config: Any = None) -> HyperTokenizer:
        """Bind ``config`` (a :class:`~hypervocab.HyperConfig`, default settings if omitted) to ``tokenizer``."""
        config = bind_config(config or HyperConfig(), tokenizer)
        if len(tokenizer) != config.base_vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the config says "
                              f"base_vocab_size={config.base_vocab_size}")
        return cls(tokenizer, config)

    def __len__(self) -> int:
        return self.codec.vocab_size

    def __call__(self, text: str | list[str], *, return_tensors: str | None = None, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None, add_special_tokens: bool = True,
                 return_codebooks: bool = False) -> dict[str, Any]:
        """Tokenize and compress.

        Returns a dict with ``input_ids`` (codes), ``attention_mask`` and ``position_ids`` (what the model
        needs for ``config.position_mode``); with ``return_codebooks``, also ``codebooks`` (a
        :class:`~hypervocab.codebook.CodebookBatch`, needs ``return_tensors`` or ``padding``).  A single
        string gives flat lists unless ``return_tensors`` is ``"pt"`` or ``"np"``.  Padding is on the left.
        """
        if return_tensors not in (None, "pt", "np"):
            raise ConfigError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            bad = (type(text) if texts is None else type(next(t for t in texts if not isinstance(t, str)))).__name__
            raise InputTypeError(f"text must be a str or a list of str, got {bad}")
        base = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        if return_tensors is not None and not padding and len({len(b) for b in base}) > 1:
            padding = True  # tensors need one length
        enc = self.codec.encode_batch(base, padding=padding or False, truncation=truncation, max_length=max_length,
                                      return_codebooks=True)
        if enc.attention_mask is None:
            codes = list(enc.codes)
            masks = [np.ones(len(c), np.int64) for c in codes]
        else:
            codes, masks = list(enc.codes), list(enc.attention_mask)
        lengths = [book.code_lengths(c) for c, book in zip(codes, enc.codebooks)]
        positions = [position_ids(ln[None], m[None], self.config.position_mode)[0] for ln, m in zip(lengths, masks)]
        out: dict[str, Any] = {"input_ids": codes, "attention_mask": masks, "position_ids": positions}
        if return_tensors is not None:
            out = {k: np.stack(v) for k, v in out.items()}
            if return_codebooks:
                out["codebooks"] = CodebookBatch.from_codes(self.codec, out["input_ids"])
            if return_tensors == "pt":
                import torch

                out = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}
        else:
            out = {k: [x.tolist() for x in v] for k, v in out.items()}
            if single:
                out = {k: v[0] for k, v in out.items()}
        return out

    def encode_continuation(self, text: str | list[str], past: Any, *, return_tensors: str | None = "pt",
                            add_special_tokens: bool = False) -> dict[str, Any]:
        """Compress the next turn of sequences that :meth:`HyperModel.generate` left in ``past``.

        The new text reuses the hypertokens each sequence has so far (greedy longest match over its
        codebook), so ``model.generate(**batch, past=past)`` continues without reading anything twice.
        Returns ``input_ids`` and ``attention_mask``, ``[B, T]`` with left padding (lists without
        ``return_tensors``).
        """
        if return_tensors not in (None, "pt", "np"):
            raise ConfigError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise InputTypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        decoders = getattr(getattr(past, "state", past), "decoders", None)
        if decoders is None:
            raise InputTypeError(f"past must be a GenerationOutput or GenerationState, got {type(past).__name__}")
        if len(texts) != len(decoders):
            raise InputTypeError(f"{len(texts)} texts for {len(decoders)} sequences in past: give one per sequence")
        base = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        codes = [self.codec.encode_continuation(ids, dec) for ids, dec in zip(base, decoders)]
        if return_tensors is None:
            return {"input_ids": codes, "attention_mask": [[1] * len(c) for c in codes]}
        width = max(len(c) for c in codes)
        pad = self.config.pad_id or 0
        ids = np.full((len(codes), width), pad, np.int64)
        mask = np.zeros((len(codes), width), np.int64)
        for b, c in enumerate(codes):
            if c:
                ids[b, width - len(c):], mask[b, width - len(c):] = c, 1
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, codes: Any, *, skip_special_tokens: bool = False, errors: str = "strict") -> str:
        """Codes (list, array or tensor, 1-D) back to text."""
        return self.tokenizer.decode(self.codec.decode(codes, errors=errors).tolist(),
                                     skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Any, *, attention_mask: Any = None, skip_special_tokens: bool = False,
                     errors: str = "strict") -> list[str]:
        """Many code sequences (a list, or ``[B, T]`` with an optional attention mask) back to texts."""
        ids = self.codec.decode_batch(batch, attention_mask=attention_mask, errors=errors)
        return [self.tokenizer.decode(x.tolist(), skip_special_tokens=skip_special_tokens) for x in ids]

    def render(self, text_or_codes: Any, *, format: str = "ansi") -> str:
        """Show which spans became hypertokens: ANSI colours for terminals or HTML for notebooks and the web.

        Linear in the length: each code's text comes from an incremental detokenizer (a span whose bytes
        complete only with a later code's goes out with that code).
        """
        if format not in ("ansi", "html"):
            raise ConfigError(f"format must be 'ansi' or 'html', got {format!r}")
        if isinstance(text_or_codes, str):
            codes = self(text_or_codes)["input_ids"]
        else:  # a list, array or tensor of codes
            codes = [int(c) for c in (text_or_codes.tolist() if hasattr(text_or_codes, "tolist") else text_or_codes)]
        state = self.codec.decoder_state()
        detok = IncrementalDetokenizer(self.tokenizer)
        V = self.codec.base_vocab_size
        pieces = []
        for i, c in enumerate(codes):
            span = detok.push(state.push(c).ids.tolist())
            if i == len(codes) - 1:
                span += detok.flush()
            if format == "ansi":
                colour = 30 + 1 + (c - V) % 6 if c >= V else None
                pieces.append(f"\x1b[{colour}m{span}\x1b[0m" if colour else span)
            else:
                esc = html.escape(span)
                pieces.append(f'<span class="hypertoken" title="{c}" style="background:hsl({(c - V) * 47 % 360},'
                              f'70%,85%)">{esc}</span>' if c >= V else esc)
        body = "".join(pieces)
        return body if format == "ansi" else f'<pre class="hypervocab">{body}</pre>'

    def save_pretrained(self, directory: Any) -> None:
        """The base tokenizer's files plus ``hypervocab_config.json``."""
        self.tokenizer.save_pretrained(str(directory))
        self.config.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: Any) -> HyperTokenizer:
        """Load what :meth:`save_pretrained` wrote (a public zip2zip checkpoint's:
        :func:`hypervocab.interop.load_public_tokenizer`, or :func:`hypervocab.load`)."""
        config = HyperConfig.from_pretrained(directory)  # first: the cheap error for a folder that is not ours
        return cls(load_tokenizer(str(directory)), config)
