"""LZW over token ids: turn a sequence of base ids into codes (base ids and hypertokens) and back.

The rules are those of ``docs/design.md`` sections 2-6 and give exactly the codes of the
public ``zip2zip-compression`` 0.3.4 codec.  The loops run in the compiled core
(``hypervocab._lzw``); this module checks arguments, batches, pads, pickles and
explains errors.  ``hypervocab.reference_codec`` holds the same rules in plain Python.

>>> codec = LZWCodec(10, 100, 4)
>>> codec.encode([1, 2, 1, 2, 1, 2, 1]).tolist()
[1, 2, 10, 12]
>>> codec.decode([1, 2, 10, 12]).tolist()
[1, 2, 1, 2, 1, 2, 1]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeGuard, cast

import numpy as np

from . import _lzw
from .codebook import Codebook, Entry
from .errors import (
    CodeTypeError,
    ConfigError,
    InputTypeError,
    InvalidCodeError,
    InvalidTokenError,
    TokenTypeError,
    check_int,
)

if TYPE_CHECKING:  # only for annotations: hypervocab.codec imports neither at run time
    import torch
    from typing_extensions import Buffer

__all__ = ["LZWCodec", "DecoderState", "EncodedBatch", "Window", "Decoded"]

# Anything that holds integers in one dimension: a list, a NumPy array, a torch tensor, ...
IdSequence = Sequence[int] | np.ndarray | Any
Errors = Literal["strict", "replace", "ignore"]

_ERRORS = {"strict": _lzw.ERRORS_STRICT, "replace": _lzw.ERRORS_REPLACE, "ignore": _lzw.ERRORS_IGNORE}
_MAX_ID = 2**31 - 1  # ids and codes are stored in 32 bits inside the core's hash tables
_INT64_MAX = np.iinfo(np.int64).max
_MAX_VOCAB = 1 << 24  # far above any tokenizer; keeps the per-codec map of disabled ids small
# below this many ids a batch runs on the calling thread: starting threads would cost more
_THREADING_MIN_IDS = 1 << 15


def _check_int(name: str, value: object, *, minimum: int, maximum: int = _MAX_ID) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (ids fit in 32 bits), else a :class:`ConfigError`."""
    return check_int(name, value, minimum=minimum, maximum=maximum)


def _is_torch(x: object) -> TypeGuard[torch.Tensor]:
    """Whether ``x`` comes from torch (a tensor), told without importing torch."""
    return type(x).__module__.partition(".")[0] == "torch"


def _as_int64(x: object, name: str, error: type[InputTypeError], *, clip: bool = False) -> np.ndarray:
    """A 1-D contiguous int64 array holding the integers of ``x`` (a list, array or tensor).

    With ``clip``, integers beyond int64 become -1 (an invalid code) instead of an error.
    """
    if _is_torch(x):  # no torch import: hypervocab stays light
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if isinstance(x, (str, bytes, dict, set)) or not isinstance(x, Iterable) and not hasattr(x, "__array__"):
            raise error(f"{name} must be a 1-D sequence of integers (list, NumPy array or torch tensor), "
                        f"got {type(x).__name__}")
        # iterable, or array-like (which np.asarray reads, and list() rejects with a TypeError caught below)
        items = cast("Iterable[object]", x)
        try:
            arr = np.asarray(x if hasattr(x, "__len__") or hasattr(x, "__array__") else list(items))
            if arr.dtype.kind not in "iub" and arr.ndim == 1 and arr.size or arr.dtype == np.uint64:
                arr = np.asarray(list(items), dtype=object)  # a mixture, or ints beyond int64: check one by one
        except (ValueError, TypeError, OverflowError) as e:  # ragged nesting and the like
            raise error(f"{name} must be a 1-D sequence of integers: {e}") from None
        if arr.size == 0:
            arr = arr.astype(np.int64).reshape(arr.shape)
    if arr.ndim != 1:
        raise error(f"{name} must be 1-D, got an array of shape {tuple(arr.shape)}")
    if arr.dtype == object:  # Python ints beyond int64, or a mixture of types
        for pos, v in enumerate(arr):
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise error(f"{name} must hold integers, got {type(v).__name__} at {name}[{pos}]")
            if not -(2**63) <= v <= _INT64_MAX:
                if clip:
                    arr[pos] = -1
                    continue
                raise error(f"{name}[{pos}] = {v} is too large for int64")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise error(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > _INT64_MAX:
        if clip:
            return np.where(arr > _INT64_MAX, -1, arr.astype(np.int64)).astype(np.int64)
        pos = int(np.argmax(arr > _INT64_MAX))
        raise error(f"{name}[{pos}] = {int(arr[pos])} is too large for int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_batch(batch: object, name: str, error: type[InputTypeError]) -> tuple[np.ndarray, np.ndarray]:
    """Lay a batch of 1-D sequences end to end: returns (flat int64 data, offsets [B + 1])."""
    if _is_torch(batch):
        batch = batch.detach().cpu().numpy()
    if isinstance(batch, np.ndarray):
        if batch.ndim != 2:
            raise error(f"{name} must be a 2-D array [batch, length] or a list of 1-D sequences, "
                        f"got shape {tuple(batch.shape)}")
        B, L = batch.shape
        flat = _as_int64(batch.reshape(-1), name, error)
        return flat, np.arange(0, (B + 1) * L, L, dtype=np.int64) if L else np.zeros(B + 1, np.int64)
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Iterable):
        raise error(f"{name} must be a list of 1-D integer sequences or a 2-D array, got {type(batch).__name__}")
    fast = _lzw.from_lists(batch)  # lists of Python ints: converted in C; anything else goes the checked way
    if fast is not None:
        return _frombuffer(fast[0]), _frombuffer(fast[1])
    seqs = [_as_int64(s, f"{name}[{i}]", error) for i, s in enumerate(batch)]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return flat, offsets


def _frombuffer(buf: Buffer) -> np.ndarray:
    # numpy's stubs accept any buffer only from Python 3.12 (before, a fixed list of types, not the core's buffers)
    return np.frombuffer(buf, dtype=np.int64)  # type: ignore[call-overload]


class Decoded(NamedTuple):
    """What :meth:`DecoderState.push` returns: the base ids of the codes pushed and the entries they installed."""

    ids: np.ndarray
    installed: tuple[Entry, ...]


class Window(NamedTuple):
    """One training window cut from a long document by :meth:`LZWCodec.encode_windows`.

    ``codes`` encode ``ids[start:stop]`` on a fresh codebook; windows tile the
    document exactly (each ``stop`` is the next ``start``).
    """

    codes: np.ndarray
    start: int
    stop: int
    codebook: Codebook | None = None


@dataclass
class EncodedBatch:
    """The result of :meth:`LZWCodec.encode_batch`.

    Attributes:
        codes: ``[B, L]`` int64 array when padded, else a list of ``B`` 1-D arrays.
        attention_mask: ``[B, L]`` int64 (1 = code, 0 = padding) when padded, else ``None``.
        lengths: ``[B]`` number of codes of each sequence (after truncation).
        num_base_tokens: ``[B]`` number of base ids each sequence's codes stand for.
        codebooks: one :class:`Codebook` per sequence, when asked for.
    """

    codes: np.ndarray | list[np.ndarray]
    attention_mask: np.ndarray | None
    lengths: np.ndarray
    num_base_tokens: np.ndarray
    codebooks: list[Codebook] | None = None

    def __getitem__(self, key: str) -> Any:  # dict-style access, as with Hugging Face batches
        if key == "input_ids":
            return self.codes
        if key in ("codes", "attention_mask", "lengths", "num_base_tokens", "codebooks"):
            return getattr(self, key)
        raise KeyError(key)

    def __len__(self) -> int:
        return len(self.lengths)


class LZWCodec:
    """Online LZW compression of token ids into hypertokens.

    Args:
        base_vocab_size: ``V``, the tokenizer's size (``len(tokenizer)``); base ids are ``[0, V)``.
        max_codebook_size: ``C``, how many hypertokens one sequence may define (ids ``[V, V + C)``);
            ``0`` disables merging.
        max_subtokens: ``M``, the longest phrase a hypertoken may stand for (``1`` disables merging).
        disabled_ids: base ids never merged into or across a hypertoken (special tokens, digits, ...).
        pad_id: the padding id; always disabled, and used to pad batches.
        replacement_id: what ``decode(errors="replace")`` writes for an invalid code; defaults to ``pad_id``.

    Instances are immutable, thread-safe and picklable.
    """

    __slots__ = ("base_vocab_size", "max_codebook_size", "max_subtokens", "disabled_ids", "pad_id",
                 "replacement_id", "_disabled_map")
    # set once in __init__ (through object.__setattr__: instances are immutable)
    base_vocab_size: int
    max_codebook_size: int
    max_subtokens: int
    disabled_ids: frozenset[int]
    pad_id: int | None
    replacement_id: int | None
    _disabled_map: bytes

    def __init__(
        self,
        base_vocab_size: int,
        max_codebook_size: int,
        max_subtokens: int,
        *,
        disabled_ids: Iterable[int] = (),
        pad_id: int | None = None,
        replacement_id: int | None = None,
    ) -> None:
        V = _check_int("base_vocab_size", base_vocab_size, minimum=1, maximum=_MAX_VOCAB)
        C = _check_int("max_codebook_size", max_codebook_size, minimum=0, maximum=_MAX_ID - V)
        M = _check_int("max_subtokens", max_subtokens, minimum=1, maximum=1 << 16)
        if isinstance(disabled_ids, (str, bytes)) or not isinstance(disabled_ids, Iterable):
            raise ConfigError(f"disabled_ids must be an iterable of ints, got {type(disabled_ids).__name__}")
        disabled = set()
        for i, d in enumerate(disabled_ids):
            disabled.add(_check_int(f"disabled_ids[{i}]", d, minimum=0, maximum=V - 1))
        if pad_id is not None:
            pad_id = _check_int("pad_id", pad_id, minimum=0, maximum=V - 1)
            disabled.add(pad_id)  # padding never merges, as in the public codec
        if replacement_id is None:
            replacement_id = pad_id
        elif replacement_id is not None:
            replacement_id = _check_int("replacement_id", replacement_id, minimum=0, maximum=V - 1)
        dmap = bytearray(V)
        for d in disabled:
            dmap[d] = 1
        object.__setattr__(self, "base_vocab_size", V)
        object.__setattr__(self, "max_codebook_size", C)
        object.__setattr__(self, "max_subtokens", M)
        object.__setattr__(self, "disabled_ids", frozenset(disabled))
        object.__setattr__(self, "pad_id", pad_id)
        object.__setattr__(self, "replacement_id", replacement_id)
        object.__setattr__(self, "_disabled_map", bytes(dmap))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"LZWCodec is immutable; build a new one to change {name}")

    def __reduce__(self) -> tuple[Callable[..., LZWCodec], tuple[int, int, int, list[int], int | None, int | None]]:
        return (_rebuild_codec, (self.base_vocab_size, self.max_codebook_size, self.max_subtokens,
                                 sorted(self.disabled_ids), self.pad_id, self.replacement_id))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LZWCodec):
            return NotImplemented
        return self.__reduce__()[1] == other.__reduce__()[1]

    def __hash__(self) -> int:
        return hash(self.__reduce__()[1][:3])

    def __repr__(self) -> str:
        return (f"LZWCodec(base_vocab_size={self.base_vocab_size}, max_codebook_size={self.max_codebook_size}, "
                f"max_subtokens={self.max_subtokens}, disabled_ids=<{len(self.disabled_ids)} ids>, "
                f"pad_id={self.pad_id})")

    @property
    def vocab_size(self) -> int:
        """``V + C``: the size of the id space codes live in."""
        return self.base_vocab_size + self.max_codebook_size

    # ------------------------------------------------------------------ encoding

    def _core_encode(self, flat: np.ndarray, offsets: np.ndarray, max_codes: int, num_threads: int,
                     want_codebook: bool) -> tuple[np.ndarray, ...]:
        out = _lzw.encode(flat, offsets, self.base_vocab_size, self.max_codebook_size, self.max_subtokens,
                          self._disabled_map, max_codes, num_threads, want_codebook)
        return tuple(_frombuffer(b) for b in out)

    def _raise_bad_id(self, flat: np.ndarray, offsets: np.ndarray, err: np.ndarray, name: str, batched: bool,
                      base: int = 0) -> None:
        b = int(np.argmax(err >= 0))
        pos = int(err[b])
        value = int(flat[offsets[b] + pos])
        where = f"{name}[{b}][{pos + base}]" if batched else f"{name}[{pos + base}]"
        raise InvalidTokenError(
            f"{where} = {value} is not a base id: ids to encode must be in [0, {self.base_vocab_size}) "
            f"(base_vocab_size={self.base_vocab_size})"
        )

    def _codebooks(self, cb: np.ndarray, cb_offsets: np.ndarray, cb_n: np.ndarray) -> list[Codebook]:
        M = self.max_subtokens
        return [Codebook(cb[cb_offsets[b]: cb_offsets[b] + cb_n[b] * M].reshape(-1, M), self.base_vocab_size)
                for b in range(len(cb_n))]

    def encode(self, ids: IdSequence, *, return_codebook: bool = False) -> np.ndarray | tuple[np.ndarray, Codebook]:
        """Compress base ids into codes.

        Args:
            ids: ``[n]`` base ids in ``[0, V)`` (list, NumPy array or torch tensor).
            return_codebook: also return the :class:`Codebook` the sequence built.

        Returns:
            ``[m]`` int64 codes (``m <= n``), and the codebook when asked for.

        Raises:
            InvalidTokenError: an id is outside ``[0, V)`` (the message names its position).
            TokenTypeError: ``ids`` is not a 1-D sequence of integers.
        """
        flat = _as_int64(ids, "ids", TokenTypeError)
        offsets = np.array([0, len(flat)], dtype=np.int64)
        codes, nout, _, err, cb, cb_off, cb_n = self._core_encode(flat, offsets, 0, 1, return_codebook)
        if err[0] >= 0:
            self._raise_bad_id(flat, offsets, err, "ids", batched=False)
        codes = codes[: nout[0]]
        return (codes, self._codebooks(cb, cb_off, cb_n)[0]) if return_codebook else codes

    def encode_batch(
        self,
        batch: Sequence[IdSequence] | np.ndarray,
        *,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        padding_side: Literal["left", "right"] = "left",
        truncation: bool = False,
        max_length: int | None = None,
        return_codebooks: bool = False,
        num_threads: int | None = None,
    ) -> EncodedBatch:
        """Compress many sequences at once, on several threads.

        Args:
            batch: a list of 1-D id sequences, or a ``[B, n]`` array (every row a sequence).
            padding: ``False``/``"do_not_pad"`` returns a list of arrays; ``True``/``"longest"`` pads to
                the longest sequence's codes; ``"max_length"`` pads to ``max_length``.
            padding_side: ``"left"`` (the default, ready for generation) or ``"right"``.
            truncation: keep at most ``max_length`` codes per sequence.  The codebook then holds only
                entries defined by the kept codes, and ``num_base_tokens`` says how many ids they cover.
            max_length: the code budget for ``truncation`` and ``padding="max_length"``.
            return_codebooks: also return each sequence's :class:`Codebook`.
            num_threads: worker threads (default: one per core; small batches use one).

        Returns:
            An :class:`EncodedBatch`.
        """
        pad_mode = self._check_padding(padding, padding_side, truncation, max_length)
        nthreads = self._threads(num_threads)
        flat, offsets = _as_batch(batch, "batch", TokenTypeError)
        B = len(offsets) - 1
        # _check_padding made sure max_length is given with truncation and padding="max_length"
        max_codes = max_length if truncation and max_length is not None else 0
        if len(flat) < _THREADING_MIN_IDS:
            nthreads = 1
        codes, nout, consumed, err, cb, cb_off, cb_n = self._core_encode(flat, offsets, max_codes, nthreads,
                                                                         return_codebooks)
        if B and (err >= 0).any():
            self._raise_bad_id(flat, offsets, err, "batch", batched=True)
        books = self._codebooks(cb, cb_off, cb_n) if return_codebooks else None
        lengths = nout.copy()
        starts = offsets[:-1]
        if pad_mode is None:
            seqs = [codes[starts[b]: starts[b] + nout[b]] for b in range(B)]
            return EncodedBatch(seqs, None, lengths, consumed.copy(), books)
        width = max_length if pad_mode == "max_length" and max_length is not None else int(lengths.max(initial=0))
        if pad_mode == "max_length" and B and lengths.max() > width:
            b = int(np.argmax(lengths > width))
            raise ConfigError(f"batch[{b}] has {int(lengths[b])} codes, more than max_length={width}; "
                              f"pass truncation=True or a larger max_length")
        padded, mask = self._pad(codes, starts, lengths, width, padding_side)
        return EncodedBatch(padded, mask, lengths, consumed.copy(), books)

    def _check_padding(self, padding: object, padding_side: object, truncation: object,
                       max_length: object) -> str | None:
        modes = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
        if not isinstance(padding, (bool, str)) or padding not in modes:
            raise ConfigError(f"padding must be one of False, True, 'longest', 'max_length', 'do_not_pad'; "
                              f"got {padding!r}")
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(truncation, bool):
            raise ConfigError(f"truncation must be True or False, got {truncation!r}")
        mode = modes[padding]
        if max_length is not None:
            _check_int("max_length", max_length, minimum=1, maximum=_INT64_MAX)
        elif truncation or mode == "max_length":
            raise ConfigError("max_length is required with truncation=True or padding='max_length'")
        if mode is not None and self.pad_id is None:
            raise ConfigError("padding needs a pad id: build the LZWCodec with pad_id=...")
        return mode

    @staticmethod
    def _threads(num_threads: object) -> int:
        if num_threads is None:
            return max(1, min(os.cpu_count() or 1, 32))
        return _check_int("num_threads", num_threads, minimum=1, maximum=1024)

    def _pad(self, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int,
             side: str) -> tuple[np.ndarray, np.ndarray]:
        """Scatter variable-length rows of ``data`` into ``[B, width]``, padded with ``pad_id``."""
        B = len(lengths)
        out = np.full((B, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, width), dtype=np.int64)
        if B == 0 or width == 0:
            return out, mask
        col = np.arange(width, dtype=np.int64)
        shift = (width - lengths) if side == "left" else np.zeros_like(lengths)
        valid = (col[None, :] >= shift[:, None]) & (col[None, :] < (shift + lengths)[:, None])
        src = starts[:, None] + col[None, :] - shift[:, None]
        out[valid] = data[src[valid]]
        mask[valid] = 1
        return out, mask

    def encode_windows(self, ids: IdSequence, max_codes: int, *, return_codebooks: bool = False) -> list[Window]:
        """Cut one long document into training windows of at most ``max_codes`` codes.

        Each window is encoded on a fresh codebook; together the windows cover
        ``ids`` exactly, with no id lost or repeated at a boundary.  Every
        window but the last has exactly ``max_codes`` codes, and
        ``window.codes == encode(ids[window.start:window.stop])``.

        Args:
            ids: ``[n]`` base ids.
            max_codes: ``L``, the window length in codes.
            return_codebooks: attach each window's :class:`Codebook`.
        """
        L = _check_int("max_codes", max_codes, minimum=1, maximum=_INT64_MAX)
        flat = _as_int64(ids, "ids", TokenTypeError)
        windows: list[Window] = []
        start, n = 0, len(flat)
        reach = L * self.max_subtokens  # a window of L codes covers at most L * M ids
        while start < n:
            piece = flat[start: start + reach]
            offsets = np.array([0, len(piece)], dtype=np.int64)
            codes, nout, consumed, err, cb, cb_off, cb_n = self._core_encode(piece, offsets, L, 1, return_codebooks)
            if err[0] >= 0:
                self._raise_bad_id(piece, offsets, err, "ids", batched=False, base=start)
            stop = start + int(consumed[0])
            book = self._codebooks(cb, cb_off, cb_n)[0] if return_codebooks else None
            windows.append(Window(codes[: nout[0]].copy(), start, stop, book))
            start = stop
        return windows

    # ------------------------------------------------------------------ decoding

    def _check_errors(self, errors: object) -> int:
        if not isinstance(errors, str) or errors not in _ERRORS:
            raise ConfigError(f"errors must be 'strict', 'replace' or 'ignore', got {errors!r}")
        if errors == "replace" and self.replacement_id is None:
            raise ConfigError("errors='replace' needs an id to write: build the LZWCodec with replacement_id= "
                              "or pad_id=, or use errors='ignore'")
        return _ERRORS[errors]

    def _explain_invalid(self, codes: np.ndarray, pos: int, where: str) -> InvalidCodeError:
        """Say why ``codes[pos]`` cannot be decoded, from the state just before it (error path only)."""
        return _invalid_code(self.decoder_state(), codes, pos, where)

    def decode(self, codes: IdSequence, *, errors: Errors = "strict",
               return_codebook: bool = False) -> np.ndarray | tuple[np.ndarray, Codebook]:
        """Expand codes back into base ids.

        Codes a model wrote may replace a hypertoken by the base ids it stands
        for ("missed merges"); the codebook is rebuilt as the encoder would
        have built it all the same.

        Args:
            codes: ``[m]`` codes (list, NumPy array or torch tensor).
            errors: what to do with a code that cannot be decoded at its position
                (negative, ``>= V + C``, or a hypertoken not defined yet):
                ``"strict"`` raises :class:`InvalidCodeError`; ``"replace"`` writes
                ``replacement_id`` (default: ``pad_id``) in its place; ``"ignore"``
                drops it.  With ``"replace"`` and ``"ignore"`` nothing merges across
                the bad code, as if it were a disabled id, and no error is raised.
            return_codebook: also return the rebuilt :class:`Codebook`.

        Returns:
            ``[n]`` int64 base ids, and the codebook when asked for.
        """
        mode = self._check_errors(errors)
        flat = _as_int64(codes, "codes", CodeTypeError, clip=mode != _lzw.ERRORS_STRICT)
        offsets = np.array([0, len(flat)], dtype=np.int64)
        ids, _, err, cb, cb_off, cb_n = self._core_decode(flat, offsets, mode, 1, return_codebook)
        if err[0] >= 0:
            raise self._explain_invalid(flat, int(err[0]), f"codes[{int(err[0])}]")
        return (ids, self._codebooks(cb, cb_off, cb_n)[0]) if return_codebook else ids

    def _core_decode(self, flat: np.ndarray, offsets: np.ndarray, mode: int, num_threads: int,
                     want_codebook: bool) -> tuple[np.ndarray, ...]:
        replacement = self.replacement_id if self.replacement_id is not None else -1
        out = _lzw.decode(flat, offsets, self.base_vocab_size, self.max_codebook_size, self.max_subtokens,
                          self._disabled_map, mode, replacement, num_threads, want_codebook)
        return tuple(_frombuffer(b) for b in out)

    def decode_batch(
        self,
        batch: Sequence[IdSequence] | np.ndarray,
        *,
        attention_mask: np.ndarray | Any | None = None,
        errors: Errors = "strict",
        return_codebooks: bool = False,
        num_threads: int | None = None,
    ) -> list[np.ndarray] | tuple[list[np.ndarray], list[Codebook]]:
        """Expand many code sequences at once, on several threads.

        Args:
            batch: a list of 1-D code sequences, or a ``[B, L]`` array.
            attention_mask: ``[B, L]``; positions where it is 0 (padding) are skipped.
            errors: as in :meth:`decode`.
            return_codebooks: also return each sequence's :class:`Codebook`.
            num_threads: worker threads (default: one per core; small batches use one).

        Returns:
            A list of ``B`` int64 arrays of base ids (and the codebooks when asked for).
        """
        mode = self._check_errors(errors)
        nthreads = self._threads(num_threads)
        if attention_mask is not None:
            batch = self._unpad(batch, attention_mask)
        flat, offsets = _as_batch(batch, "batch", CodeTypeError)
        if len(flat) < _THREADING_MIN_IDS:
            nthreads = 1
        ids, id_off, err, cb, cb_off, cb_n = self._core_decode(flat, offsets, mode, nthreads, return_codebooks)
        if len(err) and (err >= 0).any():
            b = int(np.argmax(err >= 0))
            pos = int(err[b])
            raise self._explain_invalid(flat[offsets[b]: offsets[b + 1]], pos, f"batch[{b}][{pos}]")
        out = [ids[id_off[b]: id_off[b + 1]] for b in range(len(offsets) - 1)]
        return (out, self._codebooks(cb, cb_off, cb_n)) if return_codebooks else out

    def encode_continuation(self, ids: IdSequence, state: DecoderState, *,
                            known: Mapping[tuple[int, ...], int] | None = None,
                            max_codes: int | None = None) -> list[int]:
        """Codes for base tokens ``ids`` that continue a sequence whose decoder is ``state`` (left unchanged).

        Greedy longest match over the entries the sequence has installed (and the one new id that may
        legally come next), so a later turn reuses the hypertokens of the conversation so far.

        Args:
            known: the phrase -> id map of ``state``'s entries (the first id of a phrase), if the caller keeps
                one up to date (prompt lookup does, once per step); read, never changed.
            max_codes: stop after this many codes (the tail of ``ids`` is then left unencoded).
        """
        if not isinstance(state, DecoderState) or state.codec != self:
            raise CodeTypeError(f"state must be a DecoderState of this codec, got {type(state).__name__}")
        if max_codes is not None:
            _check_int("max_codes", max_codes, minimum=0)
        M = self.max_subtokens
        disabled = set(self.disabled_ids)
        dec = state.copy()
        if known is None:
            known = {}
            for e in dec.codebook.entries():
                known.setdefault(e.phrase, e.id)
        added: dict[tuple[int, ...], int] = {}  # entries this continuation installs
        flat = _as_int64(ids, "ids", TokenTypeError)
        bad = np.flatnonzero((flat < 0) | (flat >= self.base_vocab_size))
        if len(bad):
            raise InvalidTokenError(f"ids[{int(bad[0])}] = {int(flat[bad[0]])} is outside the base vocabulary "
                                    f"[0, {self.base_vocab_size})")
        ids = flat.tolist()
        out: list[int] = []
        i, n = 0, len(ids)
        limit = n if max_codes is None else max_codes
        while i < n and len(out) < limit:
            best = ids[i]
            if best not in disabled:
                legal = dec.next_phrase
                for L in range(min(M, n - i), 1, -1):
                    phrase = tuple(ids[i: i + L])
                    if disabled and any(t in disabled for t in phrase):
                        continue
                    code = known.get(phrase, added.get(phrase))
                    if code is None and phrase == legal:
                        code = dec.next_id
                    if code is not None:
                        best = code
                        break
            got = dec.push(best)
            for e in got.installed:
                if e.phrase not in known:
                    added.setdefault(e.phrase, e.id)
            out.append(best)
            i += len(got.ids)
        return out

    def trace_batch(self, codes: np.ndarray | Any) -> tuple[list[Codebook], np.ndarray, np.ndarray]:
        """Decode a ``[B, T]`` batch of codes and report the state after every position.

        This is what the model needs to build its per-sequence tables and masks
        in one pass (padding ids are disabled, so they change nothing).

        Returns:
            ``(codebooks, n_after, pending)``: one :class:`Codebook` per row;
            ``n_after`` ``[B, T]``, the number of entries installed after reading
            codes ``<= t``; ``pending`` ``[B, T, M]``, the phrase the next code
            would extend, padded with ``-1``.

        Raises:
            InvalidCodeError: a code is not valid at its position.
        """
        if _is_torch(codes):
            codes = codes.detach().cpu().numpy()
        arr = np.asarray(codes)
        if arr.ndim != 2:
            raise CodeTypeError(f"codes must be a [batch, length] array, got shape {tuple(arr.shape)}")
        flat, offsets = _as_batch(arr, "codes", CodeTypeError)
        B, T = arr.shape
        replacement = self.replacement_id if self.replacement_id is not None else -1
        out = _lzw.decode(flat, offsets, self.base_vocab_size, self.max_codebook_size, self.max_subtokens,
                          self._disabled_map, _lzw.ERRORS_STRICT, replacement, 1, True, True)
        _, _, err, cb, cb_off, cb_n, n_after, pending = (_frombuffer(b) for b in out)
        if B and (err >= 0).any():
            b = int(np.argmax(err >= 0))
            raise self._explain_invalid(flat[offsets[b]: offsets[b + 1]], int(err[b]), f"codes[{b}][{int(err[b])}]")
        return (self._codebooks(cb, cb_off, cb_n), n_after.reshape(B, T),
                pending.reshape(B, T, self.max_subtokens))

    @staticmethod
    def _unpad(batch: object, attention_mask: object) -> list[np.ndarray]:
        if _is_torch(batch):
            batch = batch.detach().cpu().numpy()
        if _is_torch(attention_mask):
            attention_mask = attention_mask.detach().cpu().numpy()
        try:
            arr = np.asarray(batch)
            mask = np.asarray(attention_mask)
        except ValueError as e:  # ragged nesting
            raise CodeTypeError(f"with attention_mask, batch and mask must be rectangular [B, L]: {e}") from None
        if arr.ndim != 2 or mask.shape != arr.shape:
            raise CodeTypeError(f"attention_mask must have the batch's shape [B, L]; got batch "
                                f"{tuple(arr.shape)} and attention_mask {tuple(mask.shape)}")
        keep = mask.astype(bool)
        return [row[k] for row, k in zip(arr, keep)]

    # ------------------------------------------------------------------ online decoding

    def decoder_state(self) -> DecoderState:
        """A fresh :class:`DecoderState` for decoding one sequence code by code."""
        return DecoderState(self)


def _rebuild_codec(V: int, C: int, M: int, disabled: list[int], pad_id: int | None,
                   replacement_id: int | None) -> LZWCodec:
    return LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad_id, replacement_id=replacement_id)


class DecoderState:
    """The decoder of one sequence, fed a few codes at a time (for generation).

    After pushing a stream code by code, the state equals the offline
    :meth:`LZWCodec.decode` of the whole stream.  A push is all-or-nothing: a
    strict error leaves the state as it was.  ``copy()`` snapshots the state
    (for rollback in speculative decoding); states pickle.

    >>> state = LZWCodec(10, 100, 4).decoder_state()
    >>> state.push([1, 2]).ids.tolist(), state.push(10)
    ([1, 2], Decoded(ids=array([1, 2]), installed=(Entry(id=11, phrase=(2, 1)),)))
    """

    __slots__ = ("codec", "_core")

    def __init__(self, codec: LZWCodec) -> None:
        if not isinstance(codec, LZWCodec):
            raise InputTypeError(f"codec must be an LZWCodec, got {type(codec).__name__}")
        self.codec = codec
        self._core = _lzw.Decoder(codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens,
                                  codec._disabled_map)

    def push(self, codes: int | IdSequence, *, errors: Errors = "strict") -> Decoded:
        """Decode one code or a sequence of codes.

        Returns:
            :class:`Decoded`: the ``[k]`` base ids the codes stand for, and the
            entries they installed, in order.

        Raises:
            InvalidCodeError: under ``errors="strict"``, a code is not valid at its
                position; the state is left unchanged.
        """
        mode = self.codec._check_errors(errors)
        if isinstance(codes, (int, np.integer)) and not isinstance(codes, (bool, np.bool_)):
            flat = np.array([codes if -2**63 <= codes <= _INT64_MAX else -1], dtype=np.int64)
            if codes > _INT64_MAX and mode == _lzw.ERRORS_STRICT:
                raise CodeTypeError(f"code {codes} is too large for int64")
        else:
            flat = _as_int64(codes, "codes", CodeTypeError, clip=mode != _lzw.ERRORS_STRICT)
        n0 = self._core.size()
        replacement = self.codec.replacement_id if self.codec.replacement_id is not None else -1
        ids, err = self._core.push(flat, mode, replacement)
        if err >= 0:
            raise _invalid_code(self.copy(), flat, err, f"codes[{err}]")
        return Decoded(_frombuffer(ids), self._entries_since(n0))

    def _entries_since(self, n0: int) -> tuple[Entry, ...]:
        n = self._core.size()
        if n == n0:
            return ()
        M = self.codec.max_subtokens
        rows = _frombuffer(self._core.entries(n0)).reshape(-1, M)
        V = self.codec.base_vocab_size
        lengths = (rows >= 0).sum(1).tolist()
        return tuple(Entry(V + n0 + k, tuple(row[:n])) for k, (row, n) in enumerate(zip(rows.tolist(), lengths)))

    @staticmethod
    def push_batch(states: Sequence[DecoderState], codes: IdSequence) -> list[tuple[int, int, tuple[int, ...]]]:
        """Advance many states by one code each (one generation step of a batch).

        All-or-nothing: if any code is invalid for its state, nothing changes
        and :class:`InvalidCodeError` names the sequence.

        Args:
            states: ``B`` decoder states (of codecs with the same settings or not).
            codes: ``[B]`` codes, one per state.

        Returns:
            ``(batch_index, entry_id, phrase)`` for every entry installed, in batch order (plain tuples:
            this is the per-step hot path of generation).
        """
        # the per-step hot path: the core takes the states and a short int list (or int64 array) as they are
        if type(codes) is np.ndarray and codes.ndim == 1 and len(codes) <= 64:
            codes = codes.tolist()  # cheaper than exporting a NumPy buffer
        flat: list[int] | np.ndarray
        try:
            if type(codes) is not list:
                raise TypeError
            out = _lzw.push_batch(states, codes)
            flat = codes
        except TypeError:  # something unusual: check everything and explain
            flat = DecoderState._checked_codes(states, codes)
            out = _lzw.push_batch([s._core for s in states], flat)
        if type(out) is int and out < 0:
            raise InputTypeError(f"states[{-1 - out}] appears twice: each state takes one code per step")
        if type(out) is int:
            c = int(flat[out])
            raise InvalidCodeError(f"codes[{out}] = {c} cannot be decoded by states[{out}]: "
                                   + _why_invalid(states[out], c))
        return out

    @staticmethod
    def _checked_codes(states: object, codes: object) -> np.ndarray:
        """The slow path of :meth:`push_batch`: say exactly what is wrong with its arguments."""
        if not isinstance(states, (list, tuple)) or not all(isinstance(s, DecoderState) for s in states):
            raise InputTypeError("states must be a list or tuple of DecoderState objects, got "
                                 + type(states).__name__)
        flat = _as_int64(codes, "codes", CodeTypeError)
        if len(flat) != len(states):
            raise CodeTypeError(f"codes has {len(flat)} codes for {len(states)} states; give one code per state")
        return flat

    def is_valid(self, code: int) -> bool:
        """Whether ``code`` (an int) may come next."""
        if isinstance(code, (bool, np.bool_)) or not isinstance(code, (int, np.integer)):
            raise CodeTypeError(f"code must be an int, got {code!r} ({type(code).__name__})")
        return 0 <= int(code) < self.num_valid_codes

    @property
    def num_valid_codes(self) -> int:
        """Valid next codes are exactly ``[0, num_valid_codes)``: base ids, installed entries, maybe the next one."""
        return self.codec.base_vocab_size + self._core.size() + int(self.next_phrase is not None)

    @property
    def next_phrase(self) -> tuple[int, ...] | None:
        """The phrase of the one new id that may come next (``next_id``), or None when none may.

        The LZW "KwKwK" rule, written once here: when a phrase ``P`` is pending, the code after it may
        be the entry about to be made, ``P + P[0]``, provided the table has room and ``P`` is shorter
        than ``max_subtokens`` (the array form for training is :func:`hypervocab.codebook.next_candidates`).
        """
        p, c = self._core.pending(), self.codec
        if 0 < len(p) < c.max_subtokens and self._core.size() < c.max_codebook_size:
            return tuple(p) + (p[0],)
        return None

    @property
    def next_id(self) -> int:
        """The id the next new entry will get."""
        return self.codec.base_vocab_size + self._core.size()

    @property
    def pending(self) -> tuple[int, ...]:
        """The phrase the next code will extend (the decoder's ``P``)."""
        return self._core.pending()

    @property
    def codebook(self) -> Codebook:
        """A snapshot of the entries installed so far."""
        rows = _frombuffer(self._core.entries(0)).reshape(-1, self.codec.max_subtokens)
        return Codebook(rows.copy(), self.codec.base_vocab_size)

    def __len__(self) -> int:
        return self._core.size()

    def copy(self) -> DecoderState:
        """An independent snapshot; pushing into one does not affect the other."""
        new = DecoderState.__new__(DecoderState)
        new.codec = self.codec
        new._core = self._core.copy()
        return new

    __copy__ = copy

    def __deepcopy__(self, memo: dict) -> DecoderState:
        return self.copy()

    def reset(self) -> None:
        """Forget every entry and the pending phrase."""
        self._core.reset()

    def __getstate__(self) -> dict:
        book = self.codebook
        return {"codec": self.codec, "phrases": book.phrases, "lengths": book.lengths,
                "pending": np.array(self.pending, dtype=np.int64)}

    def __setstate__(self, state: dict) -> None:
        codec = state["codec"]
        self.codec = codec
        self._core = _lzw.Decoder(codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens,
                                  codec._disabled_map)
        self._core.load(np.ascontiguousarray(state["phrases"], np.int64).reshape(-1),
                        np.ascontiguousarray(state["lengths"], np.int64),
                        np.ascontiguousarray(state["pending"], np.int64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecoderState):
            return NotImplemented
        return self.codec == other.codec and self.pending == other.pending and self.codebook == other.codebook

    def __repr__(self) -> str:
        return f"DecoderState({len(self)} entries, pending={list(self.pending)})"


def _invalid_code(state: DecoderState, codes: np.ndarray, pos: int, where: str) -> InvalidCodeError:
    """The error for ``codes[pos]``: ``state`` (a scratch state, changed here) is first advanced to ``pos``."""
    state._core.push(codes[:pos], _lzw.ERRORS_STRICT, -1)
    c = int(codes[pos])
    err = InvalidCodeError(f"{where} = {c} cannot be decoded: " + _why_invalid(state, c))
    err.position, err.reason = pos, _why_invalid(state, c)  # for callers that renumber positions
    return err


def _why_invalid(state: DecoderState, c: int) -> str:
    codec = state.codec
    V, n = codec.base_vocab_size, len(state)
    nxt = V + n
    if c < 0:
        why = "codes are never negative"
    elif c >= codec.vocab_size:
        why = f"the id space ends at base_vocab_size + max_codebook_size = {codec.vocab_size}"
    elif c > nxt and n == 0:
        why = f"hypertoken {c} is not defined yet: no entry exists at this point (the first will be {V})"
    elif c > nxt:
        why = f"hypertoken {c} is not defined yet: only {n} entries exist at this point (ids {V}..{nxt - 1})"
    elif not state.pending:
        why = f"the next new id {nxt} may only follow a code it extends, and nothing precedes it here"
    else:
        why = f"the next new id {nxt} may only follow a phrase shorter than max_subtokens={codec.max_subtokens}"
    return f"{why}; valid codes here are [0, {state.num_valid_codes})"
