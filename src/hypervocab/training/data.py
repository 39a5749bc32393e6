"""Training data: documents from every source, tokenized, compressed into windows, split and cached.

A :class:`~hypervocab.training.config.DataSource` yields documents (a text file, a JSONL line,
a chat conversation, a row of a saved Hugging Face dataset).  Each document is tokenized with the
base tokenizer and cut by :meth:`~hypervocab.LZWCodec.encode_windows` into windows of at most
``window`` codes, each on a fresh codebook, so a window never crosses a document.  Which codes are
in the loss is decided per base token (all of a text document, only assistant turns of a chat) and
then per code (a hypertoken is in the loss only when every base token it stands for is).

Documents, not windows, go to the eval split, chosen by a hash of the seed and the document's
name, so the split is the same on every machine and in every run.  The arrays of each source and
split are cached under ``cache_dir`` and reused while nothing that shapes them changes.

:class:`MixtureOrder` then says which window training reads at each draw, mixing sources by weight.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..codec import LZWCodec
from ..errors import ConfigError, check_int
from ..textfiles import list_files, read_text_file
from .config import DataSource

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["MixtureOrder", "WindowSet", "build_windows"]

# Bump when the arrays or their meaning change: old caches then stop matching.
CACHE_FORMAT_VERSION = 2  # 2: files listed and read by hypervocab.textfiles
IGNORE_INDEX = -100  # what PyTorch's cross-entropy skips
_ARRAYS = ("codes", "labels", "n_codes", "base_tokens", "doc")
_SPLITS = ("train", "eval")
# A chunk sent to a worker: enough text that pickling and scheduling cost little next to tokenizing,
# few enough documents that the progress bar moves.
_CHUNK_CHARS = 1 << 20
_CHUNK_DOCS = 256

# A document's content: the text, or the messages of a conversation.
Payload = str | list


class _Doc(NamedTuple):
    """One document of a source: its name (for the split and for errors), its content, and whether it is a chat."""

    key: str
    where: str
    payload: Payload
    chat: bool


@dataclass
class WindowSet:
    """Training windows of one split: right-padded codes, labels, and where they came from.

    Attributes:
        codes: ``[N, L]`` int64 codes, right-padded with the codec's pad id (0 if it has none).
        labels: ``[N, L]`` int64: the code where it is in the loss, ``-100`` elsewhere (padding,
            non-assistant codes of chat data).
        n_codes: ``[N]`` real codes per window.
        base_tokens: ``[N]`` base tokens those codes stand for.
        source: ``[N]`` index of the :class:`DataSource` each window came from.
        doc: ``[N]`` index of the window's document within its source, in reading order (both splits
            count), or ``-1`` where unknown.  Windows of one document are consecutive and in order.
        from_cache: every array was loaded from the cache, none was tokenized.
    """

    codes: np.ndarray
    labels: np.ndarray
    n_codes: np.ndarray
    base_tokens: np.ndarray
    source: np.ndarray
    doc: np.ndarray | None = None
    from_cache: bool = False

    def __post_init__(self) -> None:
        n = len(self.codes)
        if self.doc is None:
            self.doc = np.full(n, -1, dtype=np.int64)
        if self.codes.ndim != 2 or self.labels.shape != self.codes.shape:
            raise ConfigError(f"WindowSet: codes and labels must both be [N, L], got {self.codes.shape} "
                              f"and {self.labels.shape}")
        for name in ("n_codes", "base_tokens", "source", "doc"):
            if getattr(self, name).shape != (n,):
                raise ConfigError(f"WindowSet: {name} must be [{n}] (one per window), got "
                                  f"{getattr(self, name).shape}")

    @property
    def window(self) -> int:
        """``L``: codes per window, padding included."""
        return self.codes.shape[1]

    def __len__(self) -> int:
        return len(self.codes)

    def batch(self, idx: Sequence[int] | np.ndarray | int) -> dict[str, torch.Tensor]:
        """Windows ``idx`` as model inputs, trimmed to the longest real window among them.

        Returns ``{"input_ids", "attention_mask", "labels"}``, each ``[b, L']`` int64 with
        ``L' = max n_codes`` of the batch; ``attention_mask`` is 1 on real codes.
        """
        import torch  # only the trainer needs torch: building windows does not

        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        n = self.n_codes[idx]
        width = max(1, int(n.max(initial=0)))
        mask = (np.arange(width)[None, :] < n[:, None]).astype(np.int64)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(self.codes[idx, :width])),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(np.ascontiguousarray(self.labels[idx, :width])),
        }

    @classmethod
    def empty(cls, window: int) -> WindowSet:
        z = np.zeros(0, dtype=np.int64)
        return cls(np.zeros((0, window), np.int64), np.zeros((0, window), np.int64), z, z.copy(), z.copy(), z.copy())

    @classmethod
    def concat(cls, parts: Sequence[WindowSet], window: int) -> WindowSet:
        if not parts:
            return cls.empty(window)
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                     ("codes", "labels", "n_codes", "base_tokens", "source", "doc")),
                   from_cache=all(p.from_cache for p in parts))


# ---------------------------------------------------------------------------------------------- documents


def _source_name(index: int, source: DataSource) -> str:
    return f"data[{index}] ({source.path!r})"


def _rel_name(root: Path, file: Path) -> str:
    # a single-file source is named by its file name: "." would say nothing in an error
    return file.name if root.is_file() else file.relative_to(root).as_posix()


def _text_documents(root: Path, patterns: Sequence[str], on_skip: Callable[[], None]) -> Iterator[_Doc]:
    for file in list_files(root, patterns):
        text = read_text_file(file)
        if not text:  # binary or empty: nothing to learn from
            on_skip()
            continue
        name = _rel_name(root, file)
        yield _Doc(name, str(file), text, False)


def _check_messages(messages: object, where: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ConfigError(f"{where}: field {field!r} (messages_field) must be a list of "
                          f"{{'role': str, 'content': str}} messages, got {_short(messages)}")
    return messages


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _jsonl_documents(root: Path, patterns: Sequence[str], field: str, chat: bool,
                     on_skip: Callable[[], None]) -> Iterator[_Doc]:
    option = "messages_field" if chat else "text_field"
    for file in list_files(root, patterns):
        name = _rel_name(root, file)
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{file}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); JSONL files must be "
                                      f"UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not a JSON object ({e.msg}); each line must be an object "
                                      f"with the field {field!r} ({option})") from None
                if not isinstance(row, dict) or field not in row:
                    got = f"keys {sorted(row)}" if isinstance(row, dict) else type(row).__name__
                    raise ConfigError(f"{where}: no field {field!r} ({option}) in this line, got {got}")
                value = row[field]
                if chat:
                    messages = _check_messages(value, where, field)
                    if not messages:
                        on_skip()
                        continue
                    yield _Doc(f"{name}:{lineno}", where, messages, True)
                else:
                    if not isinstance(value, str):
                        raise ConfigError(f"{where}: field {field!r} ({option}) must be a string, "
                                          f"got {type(value).__name__}")
                    if not value:
                        on_skip()
                        continue
                    yield _Doc(f"{name}:{lineno}", where, value, False)


def _load_hf_dataset(path: Path, name: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{name} is a saved Hugging Face dataset, which needs the datasets package: "
                          f"pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"{name}: the saved DatasetDict has no 'train' split (it has "
                              f"{', '.join(map(repr, ds))}); save the split to train on as 'train'")
        ds = ds["train"]
    return ds


def _hf_field(ds: Any, source: DataSource, name: str) -> tuple[str, bool]:
    """The column documents come from, and whether it holds conversations."""
    columns = list(ds.column_names)
    if source.text_field in columns:
        return source.text_field, False
    if source.messages_field in columns:
        return source.messages_field, True
    raise ConfigError(f"{name}: the dataset has neither the text_field {source.text_field!r} nor the "
                      f"messages_field {source.messages_field!r}; its columns are {columns}")


def _hf_documents(ds: Any, field: str, chat: bool, path: Path, on_skip: Callable[[], None]) -> Iterator[_Doc]:
    option = "messages_field" if chat else "text_field"
    row = 0
    # batches: reading one row at a time from Arrow is far slower
    for batch in ds.select_columns([field]).iter(batch_size=1000):
        for value in batch[field]:
            where = f"{path} row {row}"
            if chat:
                value = _check_messages(value, where, field)
            elif not isinstance(value, str):
                raise ConfigError(f"{where}: field {field!r} ({option}) must be a string, got {type(value).__name__}")
            if value:
                yield _Doc(str(row), where, value, chat)
            else:
                on_skip()
            row += 1


# ---------------------------------------------------------------------------------------------- encoding


class _Encoded(NamedTuple):
    """The windows of a chunk of documents, padded to ``window`` codes."""

    codes: np.ndarray  # [w, L]
    in_loss: np.ndarray  # [w, L] bool, False on padding
    n_codes: np.ndarray  # [w]
    base_tokens: np.ndarray  # [w]
    doc: np.ndarray  # [w] index of the document within the chunk


class _Encoder:
    """Tokenizes and compresses documents; lives in the main process or, pickled, in each worker."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, codec: LZWCodec, window: int) -> None:
        self.tokenizer = tokenizer
        self.codec = codec
        self.window = window
        self.pad = codec.pad_id if codec.pad_id is not None else 0

    def text_ids(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        ids = list(self.tokenizer(text, verbose=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        # EOS ends every document and is in the loss: the model learns where text stops
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return np.asarray(ids, dtype=np.int64), None

    def chat_ids(self, messages: list[dict[str, Any]], where: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the rendered conversation and which of them are in the loss (assistant turns)."""
        tok = self.tokenizer
        rendered = tok.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                # nothing precedes it, so no generation prompt can be rendered: the turn starts where its
                # content does in its own rendering (the template's header before it stays out of the loss)
                alone = tok.apply_chat_template(messages[:1], tokenize=False)
                found = alone.rfind(message["content"]) if message["content"] else -1
                start, before = max(found, 0), alone
            else:
                before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                start = len(before)
            upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            for part, n in ((before, i), (upto, i + 1)):
                if not rendered.startswith(part):
                    raise ConfigError(
                        f"{where}: the tokenizer's chat template is not incremental: rendering the first {n} "
                        f"message(s) is not a prefix of rendering all {len(messages)}, so assistant turns cannot "
                        f"be located; use a template whose output for a conversation starts with its output for "
                        f"any earlier part of it")
            spans.append((start, len(upto)))
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        in_loss = np.zeros(len(ids), dtype=bool)
        if spans:
            starts = np.array([s for s, _ in spans], dtype=np.int64)
            ends = np.array([e for _, e in spans], dtype=np.int64)
            # spans are increasing and disjoint: the only span that can hold a token is the last one
            # starting at or before it
            j = np.searchsorted(starts, offsets[:, 0], side="right") - 1
            ok = j >= 0
            in_loss[ok] = offsets[ok, 1] <= ends[j[ok]]
        return ids, in_loss

    def encode(self, docs: Sequence[_Doc]) -> _Encoded:
        L = self.window
        rows_codes, rows_loss, n_codes, base_tokens, doc_of = [], [], [], [], []
        for d, doc in enumerate(docs):
            ids, token_loss = self.chat_ids(doc.payload, doc.where) if doc.chat else self.text_ids(doc.payload)
            for w in self.codec.encode_windows(ids, L, return_codebooks=True):
                n = len(w.codes)
                row = np.full(L, self.pad, dtype=np.int64)
                row[:n] = w.codes
                loss = np.zeros(L, dtype=bool)
                if token_loss is None:
                    loss[:n] = True
                elif n:
                    # a code is in the loss only when every base token it stands for is: a hypertoken
                    # straddling a user/assistant boundary would teach the model to write user text
                    lengths = w.codebook.code_lengths(w.codes)
                    bounds = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                    hits = np.add.reduceat(token_loss[w.start: w.stop].astype(np.int64), bounds)
                    loss[:n] = hits == lengths
                rows_codes.append(row)
                rows_loss.append(loss)
                n_codes.append(n)
                base_tokens.append(w.stop - w.start)
                doc_of.append(d)
        if not rows_codes:
            return _Encoded(np.zeros((0, L), np.int64), np.zeros((0, L), bool), *(np.zeros(0, np.int64),) * 3)
        return _Encoded(np.stack(rows_codes), np.stack(rows_loss), np.asarray(n_codes, np.int64),
                        np.asarray(base_tokens, np.int64), np.asarray(doc_of, np.int64))


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    global _WORKER_ENCODER
    # one tokenizer per worker, unpickled once, instead of once per chunk
    _WORKER_ENCODER = encoder


def _encode_in_worker(docs: list[_Doc]) -> _Encoded:
    assert _WORKER_ENCODER is not None, "worker started without _init_worker"
    return _WORKER_ENCODER.encode(docs)


def _chunks(docs: Iterable[_Doc]) -> Iterator[list[_Doc]]:
    chunk: list[_Doc] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.payload) if isinstance(doc.payload, str) else sum(len(m["content"]) for m in doc.payload)
        if size >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunks(chunks: Iterable[list[_Doc]], encoder: _Encoder,
                   pool: ProcessPoolExecutor | None, workers: int) -> Iterator[tuple[list[_Doc], _Encoded]]:
    """Each chunk with its windows, in order; in the pool when there is one, a few chunks in flight."""
    if pool is None:
        for chunk in chunks:
            yield chunk, encoder.encode(chunk)
        return
    pending: deque[tuple[list[_Doc], Future[_Encoded]]] = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_encode_in_worker, chunk)))
            # bounded: a huge source is never read into memory all at once
            if len(pending) >= 2 * workers:
                chunk0, fut = pending.popleft()
                yield chunk0, fut.result()
        while pending:
            chunk0, fut = pending.popleft()
            yield chunk0, fut.result()
    finally:
        for _, fut in pending:  # an error or an abandoned build: don't tokenize what nobody will read
            fut.cancel()


# ---------------------------------------------------------------------------------------------- cache


def _file_stats(root: Path, files: Iterable[Path]) -> list[tuple[str, int, int]]:
    out = []
    for f in files:
        st = f.stat()
        out.append((_rel_name(root, f), st.st_size, st.st_mtime_ns))
    return out


def _cache_keys(index: int, source: DataSource, kind: str, tokenizer: PreTrainedTokenizerBase, codec: LZWCodec,
                *, window: int, eval_fraction: float, seed: int) -> dict[str, str]:
    """The cache folder name of each split of a source: a digest of everything that shapes its arrays."""
    root = Path(source.path)
    if kind == "hf_dataset":
        files = list_files(root)
    else:
        files = list_files(root, source.glob)
    template = getattr(tokenizer, "chat_template", None)
    material = {
        "format": CACHE_FORMAT_VERSION,
        # weight is left out on purpose: it changes how often windows are drawn, not the windows
        "source": {"index": index, "path": str(root.resolve()), "kind": kind, "glob": list(source.glob),
                   "text_field": source.text_field, "messages_field": source.messages_field},
        "files": _file_stats(root, files),
        "tokenizer": {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "len": len(tokenizer),
                      "eos": tokenizer.eos_token_id, "chat_template": template,
                      "class": type(tokenizer).__name__},
        "codec": {"V": codec.base_vocab_size, "C": codec.max_codebook_size, "M": codec.max_subtokens,
                  "disabled": sorted(codec.disabled_ids), "pad": codec.pad_id},
        "window": window, "eval_fraction": float(eval_fraction), "seed": seed,
    }
    keys = {}
    for split in _SPLITS:
        blob = json.dumps({**material, "split": split}, sort_keys=True, default=str).encode()
        keys[split] = hashlib.blake2b(blob, digest_size=16).hexdigest()
    return keys


def _load_cached(folder: Path, index: int) -> WindowSet | None:
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT_VERSION:
            return None
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
    except (OSError, ValueError):  # unreadable: rebuild it rather than fail the run
        return None
    n = len(arrays["codes"])
    return WindowSet(arrays["codes"], arrays["labels"], arrays["n_codes"], arrays["base_tokens"],
                     np.full(n, index, dtype=np.int64), arrays["doc"], from_cache=True)


def _save_cached(folder: Path, ws: WindowSet, meta: dict[str, Any]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # written aside then renamed: a run killed midway leaves a stray temp folder, never a half cache
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(ws, name))
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": CACHE_FORMAT_VERSION, "windows": len(ws)},
                                                  indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not another run having written the same arrays first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- building


def _in_eval(seed: int, index: int, key: str, eval_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def _resolve_kind(source: DataSource) -> str:
    """``source.resolved_kind()``, also seeing a saved ``DatasetDict`` (it has ``dataset_dict.json`` at the top)."""
    kind = source.resolved_kind()
    if source.kind == "auto" and kind == "text" and (Path(source.path) / "dataset_dict.json").is_file():
        return "hf_dataset"
    return kind


def _check_args(sources: object, codec: object, window: object, eval_fraction: object, seed: object,
                num_workers: object) -> None:
    if not isinstance(sources, list) or not sources or not all(isinstance(s, DataSource) for s in sources):
        raise ConfigError(f"sources must be a non-empty list of DataSource, got {_short(sources)}")
    if not isinstance(codec, LZWCodec):
        raise ConfigError(f"codec must be an LZWCodec, got {type(codec).__name__}")
    for name, value, low in (("window", window, 1), ("seed", seed, 0), ("num_workers", num_workers, 1)):
        check_int(name, value, minimum=low)
    if (isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float))
            or not 0 <= eval_fraction < 1):
        raise ConfigError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    problems = [p for i, s in enumerate(sources) for p in s.problems(f"data[{i}]")]
    if problems:
        raise ConfigError("the data sources have problems:\n  - " + "\n  - ".join(problems))


def _documents(index: int, source: DataSource, kind: str, tokenizer: PreTrainedTokenizerBase,
               on_skip: Callable[[], None]) -> tuple[Iterator[_Doc], int | None]:
    """The source's documents, and how many there are when that is known without reading them."""
    root = Path(source.path)
    name = _source_name(index, source)
    if kind == "hf_dataset":
        ds = _load_hf_dataset(root, name)
        field, chat = _hf_field(ds, source, name)
        if chat:
            _check_chat_tokenizer(tokenizer, name)
        return _hf_documents(ds, field, chat, root, on_skip), len(ds)
    if kind == "text":
        files = list_files(root, source.glob)
        return _text_documents(root, source.glob, on_skip), len(files)
    chat = kind == "chat"
    if chat:
        _check_chat_tokenizer(tokenizer, name)
    return _jsonl_documents(root, source.glob, source.messages_field if chat else source.text_field, chat,
                            on_skip), None


def _check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{name} holds chat data but the tokenizer "
                          f"{str(getattr(tokenizer, 'name_or_path', '')) or type(tokenizer).__name__!r} has no "
                          f"chat template; set tokenizer.chat_template or use a chat model's tokenizer")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{name} holds chat data, which needs a fast tokenizer (character offsets of tokens "
                          f"locate the assistant turns); got {type(tokenizer).__name__}")


def _build_source(index: int, source: DataSource, kind: str, encoder: _Encoder, *, eval_fraction: float, seed: int,
                  pool: ProcessPoolExecutor | None, workers: int, progress: bool) -> dict[str, WindowSet]:
    from tqdm.auto import tqdm

    L = encoder.window
    parts: dict[str, list[_Encoded]] = {split: [] for split in _SPLITS}
    doc_index: dict[str, list[np.ndarray]] = {split: [] for split in _SPLITS}
    with tqdm(desc=f"tokenizing {source.path}", unit="doc", disable=not progress) as bar:
        docs, total = _documents(index, source, kind, encoder.tokenizer, lambda: bar.update(1))
        bar.reset(total=total)  # known only once the source is opened
        n_docs = 0
        for chunk, enc in _encode_chunks(_chunks(docs), encoder, pool, workers):
            split_of = np.array([_in_eval(seed, index, d.key, eval_fraction) for d in chunk], dtype=bool)
            for split, is_eval in (("train", False), ("eval", True)):
                keep = split_of[enc.doc] == is_eval
                if keep.any():
                    parts[split].append(_Encoded(*(a[keep] for a in enc)))
                    doc_index[split].append(enc.doc[keep] + n_docs)
            n_docs += len(chunk)
            bar.update(len(chunk))
    if n_docs == 0:
        raise ConfigError(f"{_source_name(index, source)} yields no document (kind {kind!r}, glob {source.glob}): "
                          f"text files must be non-empty UTF-8 without NUL bytes, JSONL lines non-empty objects")
    out = {}
    for split in _SPLITS:
        if not parts[split]:
            out[split] = WindowSet.empty(L)
            continue
        codes = np.concatenate([p.codes for p in parts[split]])
        in_loss = np.concatenate([p.in_loss for p in parts[split]])
        out[split] = WindowSet(codes, np.where(in_loss, codes, IGNORE_INDEX).astype(np.int64),
                               np.concatenate([p.n_codes for p in parts[split]]),
                               np.concatenate([p.base_tokens for p in parts[split]]),
                               np.full(len(codes), index, dtype=np.int64), np.concatenate(doc_index[split]))
    return out


def build_windows(sources: list[DataSource], tokenizer: PreTrainedTokenizerBase, codec: LZWCodec, *, window: int,
                  eval_fraction: float, seed: int, cache_dir: str | Path, num_workers: int = 1,
                  progress: bool = True) -> tuple[WindowSet, WindowSet]:
    """(train, eval) windows of every source.

    Args:
        sources: where the documents are (see :class:`DataSource`).
        tokenizer: the base model's Hugging Face tokenizer (a fast one for chat data).
        codec: the :class:`~hypervocab.LZWCodec` of the hypervocab model.
        window: ``L``, codes per window.
        eval_fraction: share of documents held out for evaluation, in ``[0, 1)``.
        seed: chooses the held-out documents.
        cache_dir: where the arrays of each source and split are kept for later runs.
        num_workers: processes tokenizing and compressing; the result does not depend on it.
        progress: show a progress bar per source being tokenized.

    Returns:
        ``(train, eval)``; windows are ordered by source, then document, then position in the document.
        ``from_cache`` is true on a split whose arrays were all loaded from ``cache_dir``.

    Raises:
        ConfigError: a bad argument, a source that does not exist or yields no document, a malformed
            JSONL line, chat data without a (incremental) chat template.
        ImportError: a saved Hugging Face dataset without the ``datasets`` package.
    """
    _check_args(sources, codec, window, eval_fraction, seed, num_workers)
    cache_dir = Path(cache_dir)
    encoder = _Encoder(tokenizer, codec, window)
    results: dict[str, list[WindowSet]] = {split: [] for split in _SPLITS}
    with ExitStack() as stack:
        pool: ProcessPoolExecutor | None = None
        for index, source in enumerate(sources):
            kind = _resolve_kind(source)
            keys = _cache_keys(index, source, kind, tokenizer, codec, window=window, eval_fraction=eval_fraction,
                               seed=seed)
            cached = {split: _load_cached(cache_dir / keys[split], index) for split in _SPLITS}
            if all(ws is not None for ws in cached.values()):
                for split in _SPLITS:
                    results[split].append(cached[split])
                continue
            if num_workers > 1 and pool is None:
                # spawn, not fork: the parent may hold threads (tokenizers, torch) that fork would copy mid-work
                pool = stack.enter_context(ProcessPoolExecutor(
                    num_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                    initargs=(encoder,)))
            built = _build_source(index, source, kind, encoder, eval_fraction=eval_fraction, seed=seed, pool=pool,
                                  workers=num_workers, progress=progress)
            for split in _SPLITS:
                _save_cached(cache_dir / keys[split], built[split],
                             {"source": source.path, "kind": kind, "split": split, "window": window})
                results[split].append(built[split])
    train, eval_ = (WindowSet.concat(results[split], window) for split in _SPLITS)
    return train, eval_


# ---------------------------------------------------------------------------------------------- mixture


class MixtureOrder:
    """Deterministic order in which training draws windows, sources mixed by weight.

    Draw ``t`` picks a source with probability ``weight / sum(weights)`` among the sources that have
    training windows, then that source's next window: each source walks through its windows in a
    shuffled order, reshuffled on every pass, so every window is read once before any is read again.

    Every random number comes from a generator seeded by ``(seed, what, block)``, so any draw can be
    computed without the ones before it being kept: ``indices(start, count)`` is the same however
    the draws are split into calls, and a resumed run continues exactly where it stopped.
    """

    BLOCK = 4096  # draws per block of source choices
    _CACHED_BLOCKS = 8
    _CACHED_PASSES = 4

    def __init__(self, train: WindowSet, weights: list[float], seed: int) -> None:
        seed = check_int("seed", seed, minimum=0)
        n_sources = int(train.source.max()) + 1 if len(train) else 0
        if not isinstance(weights, (list, tuple)) or len(weights) < n_sources:
            raise ConfigError(f"weights must list one weight per data source ({n_sources} at least), got "
                              f"{_short(weights)}")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
                raise ConfigError(f"weights[{i}] must be a finite number > 0, got {w!r}")
        self.seed = seed
        order = np.argsort(train.source, kind="stable")
        bounds = np.searchsorted(train.source[order], np.arange(len(weights) + 1))
        # sources without training windows (all their documents went to eval) are never drawn
        self.sources = [s for s in range(len(weights)) if bounds[s + 1] > bounds[s]]
        if not self.sources:
            raise ConfigError("no training windows to draw from: every source is empty or held out for eval "
                              "(lower eval_fraction or add data)")
        self.windows = [order[bounds[s]: bounds[s + 1]] for s in self.sources]
        w = np.array([float(weights[s]) for s in self.sources])
        self._cum = np.cumsum(w / w.sum())
        # counts[b][k]: draws of the k-th drawable source before block b (grown on demand)
        self._counts: list[np.ndarray] = [np.zeros(len(self.sources), dtype=np.int64)]
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._passes: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _rng(self, *what: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *what])

    def _block(self, b: int) -> np.ndarray:
        """Which drawable source (position in ``self.sources``) each draw of block ``b`` reads."""
        got = self._blocks.get(b)
        if got is None:
            u = self._rng(0, b).random(self.BLOCK)
            got = np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.sources) - 1)
            self._blocks[b] = got
            if len(self._blocks) > self._CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(b)
        return got

    def _counts_before(self, b: int) -> np.ndarray:
        while len(self._counts) <= b:
            k = len(self._counts) - 1
            self._counts.append(self._counts[k] + np.bincount(self._block(k), minlength=len(self.sources)))
        return self._counts[b]

    def _permutation(self, k: int, p: int) -> np.ndarray:
        """The order of pass ``p`` over the windows of drawable source ``k``."""
        got = self._passes.get((k, p))
        if got is None:
            got = self._rng(1, self.sources[k], p).permutation(len(self.windows[k]))
            self._passes[(k, p)] = got
            if len(self._passes) > self._CACHED_PASSES * len(self.sources):
                self._passes.popitem(last=False)
        else:
            self._passes.move_to_end((k, p))
        return got

    def indices(self, start: int, count: int) -> np.ndarray:
        """Window indices (into the train :class:`WindowSet`) of draws ``start .. start + count - 1``."""
        start = check_int("start", start, minimum=0)
        count = check_int("count", count, minimum=0)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        first, last = start // self.BLOCK, (start + count - 1) // self.BLOCK
        before = self._counts_before(first).copy()
        choice = np.concatenate([self._block(b) for b in range(first, last + 1)])
        lo = start - first * self.BLOCK
        before += np.bincount(choice[:lo], minlength=len(self.sources))
        choice = choice[lo: lo + count]
        out = np.empty(count, dtype=np.int64)
        for k in range(len(self.sources)):
            where = np.nonzero(choice == k)[0]
            if not len(where):
                continue
            n = len(self.windows[k])
            ordinal = before[k] + np.arange(len(where))  # the source's own draw number
            passes, pos = np.divmod(ordinal, n)
            for p in np.unique(passes):
                sel = passes == p
                out[where[sel]] = self.windows[k][self._permutation(k, int(p))[pos[sel]]]
        return out


def base_tokens_read(windows: WindowSet, order: MixtureOrder, *, draws_per_step: int, steps: int) -> np.ndarray:
    """``[steps]`` the base tokens the first ``1, 2, ..., steps`` optimiser steps read, in the trainer's order.

    ``draws_per_step``: windows one step reads (batch size x gradient accumulation x processes).  Exact for
    any run on these windows with this order: a run's base tokens are counted along its data, not estimated
    from full windows (windows cut at a document's end hold fewer).
    """
    check_int("draws_per_step", draws_per_step, minimum=1)
    check_int("steps", steps, minimum=0)
    if not steps:
        return np.zeros(0, dtype=np.int64)
    read = windows.base_tokens[order.indices(0, steps * draws_per_step)].astype(np.int64)
    return np.cumsum(read.reshape(steps, draws_per_step).sum(1))
