"""How much a tokenizer's output shrinks under LZW hypertokens, measured on real files.

Each document is tokenized alone (no special tokens) and compressed in windows
of ``window`` codes (a fresh codebook per window, as in training); with
``window_unit="tokens"`` the windows are cut every ``window`` base tokens
instead, the unit the public implementation reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..codec import LZWCodec
from ..errors import ConfigError, check_int
from ..textfiles import list_files, read_text_file
from ..tokenizer import HyperTokenizer

__all__ = ["CompressionRow", "GenerationRow", "compression_report", "generation_compression", "format_markdown",
           "format_generation_markdown"]


@dataclass
class CompressionRow:
    """Totals for one file or folder."""

    path: str
    files: int
    bytes: int
    tokens: int
    codes: int
    hypertokens: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_code(self) -> float:
        return self.bytes / self.codes if self.codes else 0.0

    @property
    def codes_per_token(self) -> float:
        return self.codes / self.tokens if self.tokens else 0.0

    @property
    def hypertoken_share(self) -> float:
        return self.hypertokens / self.codes if self.codes else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bytes_per_token=self.bytes_per_token, bytes_per_code=self.bytes_per_code,
                 codes_per_token=self.codes_per_token, hypertoken_share=self.hypertoken_share)
        return d


def compression_report(
    paths: Sequence[str | Path],
    tokenizer: Any,
    codec: LZWCodec,
    *,
    window: int = 2048,
    window_unit: Literal["codes", "tokens"] = "codes",
    pattern: str | Sequence[str] = "*",
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> list[CompressionRow]:
    """Tokenize and compress every text file under each path; one row per path plus a total.

    Args:
        paths: files or folders.
        tokenizer: a Hugging Face tokenizer (``len(tokenizer)`` must equal ``codec.base_vocab_size``).
        codec: the :class:`LZWCodec` to measure.
        window: window length, in ``window_unit``.
        window_unit: ``"codes"`` (training windows, :meth:`LZWCodec.encode_windows`) or ``"tokens"``.
        pattern: glob(s) for files inside folders (``"*.py"``), matched as :mod:`hypervocab.textfiles` says;
            binary and non-UTF-8 files are skipped.
        exclude: globs of file or folder names to skip inside folders (``"site-packages"``).
        progress: show a progress bar (tqdm) over files.
    """
    if window_unit not in ("codes", "tokens"):
        raise ConfigError(f"window_unit must be 'codes' or 'tokens', got {window_unit!r}")
    check_int("window", window, minimum=1)
    if len(tokenizer) != codec.base_vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the codec's base_vocab_size is "
                          f"{codec.base_vocab_size}")
    listing = [(str(p), list_files(p, pattern, exclude)) for p in paths]
    total_files = sum(len(files) for _, files in listing)
    bar = _progress(total_files, progress)
    rows = []
    for name, files in listing:
        row = CompressionRow(name, 0, 0, 0, 0, 0)
        for f in files:
            text = read_text_file(f)
            bar.update(1)
            if text is None:
                continue
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            row.files += 1
            row.bytes += len(text.encode("utf-8"))
            row.tokens += len(ids)
            for codes in _compress(codec, ids, window, window_unit):
                row.codes += len(codes)
                row.hypertokens += int((codes >= codec.base_vocab_size).sum())
        rows.append(row)
    bar.close()
    if len(rows) > 1:
        total = CompressionRow("total", *(sum(getattr(r, k) for r in rows)
                                          for k in ("files", "bytes", "tokens", "codes", "hypertokens")))
        rows.append(total)
    return rows


def _compress(codec: LZWCodec, ids: np.ndarray, window: int, unit: str) -> Iterable[np.ndarray]:
    if unit == "codes":
        return (w.codes for w in codec.encode_windows(ids, window))
    return codec.encode_batch([ids[i: i + window] for i in range(0, len(ids), window)]).codes


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # part of the [hf] extra the report needs anyway

    return tqdm(total=total, unit="file", desc="compressing", leave=False, disable=not enabled or total < 20)


def format_markdown(rows: Sequence[CompressionRow]) -> str:
    """The rows as a Markdown table."""
    head = ("| path | files | bytes | tokens | bytes/token | codes | bytes/code | codes/token | hypertoken share |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.path} | {r.files:,} | {r.bytes:,} | {r.tokens:,} | {r.bytes_per_token:.2f} | "
                     f"{r.codes:,} | {r.bytes_per_code:.2f} | {r.codes_per_token:.3f} | {r.hypertoken_share:.1%} |")
    return "\n".join(lines)


@dataclass
class GenerationRow:
    """What a model's own greedy continuations of one domain's prompts cost: codes emitted per base token."""

    domain: str
    prompts: int
    codes: int
    base_tokens: int
    hypertokens: int

    @property
    def base_tokens_per_code(self) -> float:
        return self.base_tokens / self.codes if self.codes else 0.0

    @property
    def hypertoken_share(self) -> float:
        return self.hypertokens / self.codes if self.codes else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(base_tokens_per_code=self.base_tokens_per_code, hypertoken_share=self.hypertoken_share)
        return d


def generation_compression(model: Any, tokenizer: Any, prompts: Mapping[str, Sequence[str]], *,
                           max_new_tokens: int = 128, progress: bool = False) -> list[GenerationRow]:
    """Greedy continuations of each domain's prompts: how many base tokens each emitted code stands for.

    ``prompts`` maps a domain name to its prompt texts; ``tokenizer`` is the base (Hugging Face)
    tokenizer.  End of sequence is disabled so every continuation is ``max_new_tokens`` *base tokens* long
    (a hypertoken counts as the base tokens it stands for, as in every length the CLI takes).
    """
    import torch

    check_int("max_new_tokens", max_new_tokens, minimum=1)
    htok = HyperTokenizer(tokenizer, model.config)
    device = next(model.parameters()).device
    rows = []
    bar = _progress(sum(map(len, prompts.values())), progress)
    for domain, texts in prompts.items():
        row = GenerationRow(domain, 0, 0, 0, 0)
        for text in texts:
            enc = htok(text, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                     max_new_tokens=max_new_tokens, max_new_base_tokens=max_new_tokens,
                                     eos_token_id=[], return_dict_in_generate=True)
            st = out.stats[0]
            row.prompts += 1
            row.codes += st.codes
            row.base_tokens += st.base_tokens
            row.hypertokens += st.hypertokens
            bar.update(1)
        rows.append(row)
    bar.close()
    return rows


def format_generation_markdown(rows: Sequence[GenerationRow]) -> str:
    """Generation rows as a Markdown table."""
    lines = ["| domain | prompts | codes emitted | base tokens | base tokens per code | hypertoken share |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.domain} | {r.prompts} | {r.codes:,} | {r.base_tokens:,} | {r.base_tokens_per_code:.3f} | "
                     f"{r.hypertoken_share:.1%} |")
    return "\n".join(lines)
