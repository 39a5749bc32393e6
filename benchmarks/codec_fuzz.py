#!/usr/bin/env python
"""A long random run that hammers hypervocab's LZW codec with hostile input.

Every case is drawn from its own seed, in one of these categories:

  roundtrip      random configurations (V 1..5000, C from 0, M from 1, random disabled
                 ids and pad) and random or highly repetitive ids in many containers:
                 encode -> decode must be exact; encode_batch (padding, truncation,
                 threads), decode_batch and encode_windows must agree with encode/decode.
  reference      small cases against ``hypervocab.reference_codec``: encode ==
                 reference_encode; decode of model-like streams (hypertokens written
                 as base ids, the KwKwK id) == reference_decode; online pushes (one code,
                 chunks, push_batch) == offline decode.
  hostile_codes  code streams with negative, huge, >= V + C and not-yet-defined codes:
                 strict decoding raises InvalidCodeError naming the first bad position,
                 or succeeds exactly as the oracle; "replace" and "ignore" never raise
                 and match an oracle of their rules; same through decode_batch.
  bad_types      floats, bools, objects, 2-D arrays, strings, None, ragged lists, ...
                 and bad keyword values, to every entry point: each call succeeds or
                 raises a HypervocabError that is also a ValueError or TypeError.
  bad_config     hostile constructor arguments: ConfigError (or a working codec).
  state          DecoderState: invalid pushes leave the state unchanged (codebook,
                 pending, and equal to a copy taken before), replace/ignore pushes,
                 copy, reset, push_batch all-or-nothing, the same state twice in one
                 push_batch; a shadow oracle decoder checks every step.
  pickle         codec, DecoderState and Codebook through pickle (every protocol),
                 copy and deepcopy, then decoding goes on identically.
  misuse         wrong argument kinds outside the id/code data (states that are not
                 DecoderStates, codes for is_valid, unhashable errors=, ...).

The cases run in a worker process watched by this one, so a crash (segfault,
abort) or a hang (a case running longer than ``--case-timeout``) is reported with
its case; the worker is then restarted for the time left.  The summary lists the
cases run per category and every distinct failure with a reproducer; the exit
status is non-zero on any failure.

    python benchmarks/codec_fuzz.py --seconds 60 --seed 1
    python benchmarks/codec_fuzz.py --replay state:123456789      # one case, verbose
"""

from __future__ import annotations

import argparse
import array
import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from hypervocab import Codebook, DecoderState, HypervocabError, LZWCodec
from hypervocab.errors import CodeTypeError, ConfigError, InvalidCodeError
from hypervocab.reference_codec import ReferenceDecoder, reference_decode, reference_encode

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_STORED_FAILURES = 50  # distinct failures kept per worker run (the rest are counted)


# =========================================================================== framework


class Failure(Exception):
    """A check failed.  ``check`` names it (failures are grouped by it), ``detail`` says what happened."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


def short(value: Any, limit: int = 160) -> str:
    """A repr that stays readable: long arrays and lists are cut."""
    if isinstance(value, np.ndarray):
        body = np.array2string(value.reshape(-1)[:40], separator=", ", threshold=50)
        text = f"np.array({body}, dtype=np.{value.dtype.name})" if value.ndim == 1 else f"<array {value.shape} {value.dtype}>"
        if value.size > 40:
            text += f"  # first 40 of {value.size}"
        return text
    if isinstance(value, (list, tuple)) and len(value) > 40:
        return repr(list(value[:40]))[:-1] + f", ...]  # first 40 of {len(value)}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def codec_expr(args: dict[str, Any]) -> str:
    extra = "".join(f", {k}={args[k]!r}" for k in ("disabled_ids", "pad_id", "replacement_id") if args.get(k) not in (None, []))
    return f"LZWCodec({args['base_vocab_size']}, {args['max_codebook_size']}, {args['max_subtokens']}{extra})"


@dataclass
class Ctx:
    """What one case knows: its random generator and the calls made so far (for the reproducer)."""

    category: str
    seed: int
    rng: np.random.Generator
    verbose: bool = False
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)

    def note(self, label: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        self.calls.append((label, args, kwargs or {}))
        if len(self.calls) > 8:
            del self.calls[0]
        if self.verbose:
            print("  call:", self.render(self.calls[-1]))

    @staticmethod
    def render(call: tuple[str, tuple[Any, ...], dict[str, Any]]) -> str:
        label, args, kwargs = call
        parts = [short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()]
        if not parts and label.endswith(")"):  # the label is already the whole call
            return label
        return f"{label}({', '.join(parts)})"

    def last_call(self) -> str:
        return self.render(self.calls[-1]) if self.calls else "(no call)"

    def make_codec(self, args: dict[str, Any]) -> LZWCodec:
        self.setup.append(f"codec = {codec_expr(args)}")
        if len(self.setup) > 4:
            del self.setup[0]
        return LZWCodec(args["base_vocab_size"], args["max_codebook_size"], args["max_subtokens"],
                        disabled_ids=args.get("disabled_ids", ()), pad_id=args.get("pad_id"),
                        replacement_id=args.get("replacement_id"))


def attempt(ctx: Ctx, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call ``fn``: ``(True, result)``, or ``(False, error)`` for a proper HypervocabError; anything else fails."""
    ctx.note(label, args, kwargs)
    try:
        return True, fn(*args, **kwargs)
    except HypervocabError as e:
        if not isinstance(e, (ValueError, TypeError)):
            raise Failure("error is not a ValueError/TypeError", f"{label} raised {type(e).__name__}: {e}") from e
        return False, e
    except Exception as e:  # noqa: BLE001 - that is exactly what we look for
        raise Failure(f"{label} raised {type(e).__name__} (not a HypervocabError)",
                      f"{type(e).__name__}: {str(e)[:200]}") from e


def must(ctx: Ctx, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``, which must succeed."""
    ok, res = attempt(ctx, label, fn, *args, **kwargs)
    if not ok:
        raise Failure(f"{label} raised on valid input", f"{type(res).__name__}: {res}")
    return res


def check(cond: bool, name: str, detail: str | Callable[[], str] = "") -> None:
    if not cond:
        raise Failure(name, detail() if callable(detail) else detail)


def same(a: Any, b: Any) -> bool:
    return np.array_equal(np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1))


# =========================================================================== random inputs


def random_codec_args(rng: np.random.Generator, *, want_pad: bool | None = None) -> dict[str, Any]:
    r = rng.random()
    V = int(rng.integers(1, 17) if r < 0.45 else rng.integers(17, 301) if r < 0.75 else rng.integers(301, 5001))
    C = int(rng.choice([0, 0, 1, 2, 3, 5, 8, 30, 100, 1000, int(rng.integers(0, 5001))]))
    if rng.random() < 0.03:
        C = 2**31 - 1 - V  # the whole 31-bit id space
    M = int(rng.choice([1, 1, 2, 3, 4, 4, 5, 6, 8, 16, 64]))
    if rng.random() < 0.01:
        M = 1000
    k = int(rng.integers(0, min(V, 8) + 1)) if rng.random() < 0.9 else int(rng.integers(0, V + 1))
    disabled = sorted(int(x) for x in rng.choice(V, size=k, replace=False)) if k else []
    has_pad = rng.random() < 0.5 if want_pad is None else want_pad
    pad = int(rng.integers(0, V)) if has_pad else None
    repl = int(rng.integers(0, V)) if rng.random() < 0.15 else None
    return {"base_vocab_size": V, "max_codebook_size": C, "max_subtokens": M, "disabled_ids": disabled,
            "pad_id": pad, "replacement_id": repl}


def random_ids(rng: np.random.Generator, codec: LZWCodec, max_len: int = 400) -> np.ndarray:
    """Random or highly repetitive base ids, sometimes with disabled ids sprinkled in."""
    V = codec.base_vocab_size
    r = rng.random()
    n = int(rng.integers(0, 12) if r < 0.15 else rng.integers(0, min(max_len, 200) + 1) if r < 0.85
            else rng.integers(0, max_len + 1))
    a = int(min(V, 1 + rng.geometric(0.25))) if rng.random() < 0.7 else int(rng.integers(1, V + 1))
    alphabet = rng.choice(V, size=a, replace=False)
    kind = rng.choice(["random", "repeat", "runs", "constant", "ramp", "zipf"])
    if kind == "random" or n == 0:
        ids = rng.choice(alphabet, size=n)
    elif kind == "repeat":
        motif = rng.choice(alphabet, size=int(rng.integers(1, 9)))
        ids = np.resize(motif, n)
    elif kind == "runs":
        parts, total = [], 0
        while total < n:
            k = int(rng.integers(1, 12))
            parts.append(np.full(k, rng.choice(alphabet)))
            total += k
        ids = np.concatenate(parts)[:n]
    elif kind == "constant":
        ids = np.full(n, alphabet[0])
    elif kind == "ramp":
        ids = np.resize(np.sort(alphabet), n)
    else:
        ids = alphabet[np.minimum(rng.zipf(1.5, size=n) - 1, a - 1)]
    ids = np.asarray(ids, dtype=np.int64)
    if codec.disabled_ids and n and rng.random() < 0.3:
        dis = np.array(sorted(codec.disabled_ids), dtype=np.int64)
        where = rng.random(n) < rng.choice([0.02, 0.1, 0.5])
        ids[where] = rng.choice(dis, size=int(where.sum()))
    return ids


def model_stream(rng: np.random.Generator, codec: LZWCodec, max_len: int = 200) -> list[int]:
    """Codes a model might write: any code valid at its position, hypertokens and the KwKwK id often."""
    V, C, M = codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens
    walk = ReferenceDecoder(V, C, M, codec.disabled_ids)
    a = int(min(V, 1 + rng.geometric(0.2)))
    alphabet = rng.choice(V, size=a, replace=False)
    p_hyper, p_next = rng.random() * 0.7, rng.random() * 0.3
    out: list[int] = []
    for _ in range(int(rng.integers(0, max_len + 1))):
        nxt = walk.next_id
        if walk.is_valid(nxt) and rng.random() < p_next:
            c = nxt
        elif nxt > V and rng.random() < p_hyper:
            c = int(rng.integers(V, nxt))
        else:
            c = int(rng.choice(alphabet))
        walk.push(c)
        out.append(c)
    return out


def expanded_stream(rng: np.random.Generator, codec: LZWCodec) -> list[int]:
    """Encoder codes with some hypertokens written as their base ids ("missed merges"); may be invalid."""
    codes, cb = codec.encode(random_ids(rng, codec), return_codebook=True)
    p = rng.random()
    return [x for c in codes.tolist() for x in (cb.phrase(c) if rng.random() < p else (c,))]


def corrupt(rng: np.random.Generator, codec: LZWCodec, codes: list[int]) -> list[int]:
    """Put invalid (or borderline) codes at random places."""
    V, C = codec.base_vocab_size, codec.max_codebook_size
    out = list(codes)
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.integers(0, 9)
        if kind == 0:
            c = -int(rng.integers(1, 1000))
        elif kind == 1:
            c = int(rng.choice([INT64_MIN, INT64_MIN + 1, -(2**31), -(2**32)]))
        elif kind == 2:
            c = V + C + int(rng.integers(0, 3))
        elif kind == 3:
            c = int(rng.choice([INT64_MAX, 2**62, 2**31, 2**31 - 1, 2**32, 2**32 + V]))
        elif kind == 4:
            c = V + int(rng.integers(0, max(C, 1) + 1))  # maybe not yet defined
        elif kind == 5:
            c = V  # the first hypertoken, often not defined yet
        elif kind == 6:
            c = V - 1
        else:
            c = int(rng.integers(0, V + C + 1))
        out.insert(int(rng.integers(0, len(out) + 1)), c)
    return out


def emulate(codec: LZWCodec, codes: list[int], mode: str) -> tuple[list[int], list[tuple[int, ...]]] | int:
    """The oracle of ``decode(errors=mode)``: ids and entries, or (strict) the first invalid position."""
    dec = ReferenceDecoder(codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens, codec.disabled_ids)
    out: list[int] = []
    for pos, c in enumerate(codes):
        if dec.is_valid(c):
            out.extend(dec.push(c))
            continue
        if mode == "strict":
            return pos
        dec.pending = ()  # nothing merges across an invalid code
        if mode == "replace":
            out.append(codec.replacement_id)
    return out, dec.entries


def entries_of(book: Codebook) -> list[tuple[int, ...]]:
    return [book.phrase(i) for i in book.ids]


def fits(arr: np.ndarray, dtype: Any) -> bool:
    if arr.size == 0:
        return True
    info = np.iinfo(dtype)
    return info.min <= int(arr.min()) and int(arr.max()) <= info.max


def containers(rng: np.random.Generator, arr: np.ndarray) -> tuple[str, Any]:
    """The same integers in a random container the API accepts."""
    options: list[tuple[str, Callable[[], Any]]] = [
        ("list", arr.tolist),
        ("tuple", lambda: tuple(arr.tolist())),
        ("int64", lambda: arr.copy()),
        ("strided", lambda: np.repeat(arr, 2)[::2]),
        ("big-endian", lambda: arr.astype(">i8")),
        ("read-only", lambda: _readonly(arr)),
        ("generator", lambda: (int(x) for x in arr.tolist())),
        ("array('q')", lambda: array.array("q", arr.tolist())),
        ("memoryview", lambda: memoryview(arr.copy())),
        ("numpy ints", lambda: [np.int64(x) for x in arr.tolist()]),
    ]
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.uint64):
        if fits(arr, dt):
            options.append((np.dtype(dt).name, lambda dt=dt: arr.astype(dt)))
    name, make = options[int(rng.integers(0, len(options)))]
    return name, make()


def _readonly(arr: np.ndarray) -> np.ndarray:
    out = arr.copy()
    out.flags.writeable = False
    return out


# =========================================================================== categories


def case_roundtrip(ctx: Ctx) -> None:
    rng = ctx.rng
    args = random_codec_args(rng)
    codec = ctx.make_codec(args)
    M = codec.max_subtokens
    max_len = 300 if M >= 64 else 3000 if rng.random() < 0.1 else 400
    seqs = [random_ids(rng, codec, max_len) for _ in range(int(rng.integers(1, 5)))]
    for ids in seqs:
        name, data = containers(rng, ids)
        codes, book = must(ctx, f"codec.encode[{name}]", codec.encode, data, return_codebook=True)
        check(isinstance(codes, np.ndarray) and codes.dtype == np.int64 and codes.ndim == 1, "encode output type",
              lambda: f"{type(codes)} {getattr(codes, 'dtype', None)}")
        check(len(codes) <= len(ids), "encode made more codes than ids", f"{len(codes)} > {len(ids)}")
        check(len(book) <= codec.max_codebook_size, "codebook larger than C")
        check(bool(np.all((codes >= 0) & (codes < codec.base_vocab_size + len(book)))), "encode wrote an undefined code",
              lambda: short(codes))
        check(same(codec.encode(ids), codes), f"encode differs between list and {name} input")
        out, book2 = must(ctx, "codec.decode", codec.decode, codes, return_codebook=True)
        check(same(out, ids), "round trip is not exact", lambda: f"ids={short(ids)} codes={short(codes)} out={short(out)}")
        check(entries_of(book) == entries_of(book2), "decoder codebook != encoder codebook")
        check(all(1 <= len(p) <= M for p in entries_of(book)), "codebook phrase length outside [1, M]")
        for mode in ("ignore", "replace") if codec.replacement_id is not None else ("ignore",):
            out = must(ctx, "codec.decode", codec.decode, codes, errors=mode)
            check(same(out, ids), f"errors={mode!r} changed a valid stream")

    # batches: the same codes as one by one, whatever the padding, truncation and threads
    threads = int(rng.choice([1, 2, 3, 8]))
    trunc = bool(rng.random() < 0.4)
    max_length = int(rng.integers(1, 60)) if trunc or rng.random() < 0.2 else None
    padding: Any = rng.choice(["no", "longest", "max_length"]) if codec.pad_id is not None else "no"
    if padding == "max_length" and max_length is None:
        max_length = int(rng.integers(1, 60))
    kw: dict[str, Any] = {"num_threads": threads, "truncation": trunc, "max_length": max_length,
                          "return_codebooks": bool(rng.random() < 0.5)}
    if padding != "no":
        kw["padding"] = str(padding)
        kw["padding_side"] = str(rng.choice(["left", "right"]))
    if rng.random() < 0.1:  # enough ids for the worker threads to start
        seqs = seqs + [random_ids(rng, codec, 3000) for _ in range(12)]
    batch: Any = [s.tolist() for s in seqs]
    if len({len(s) for s in seqs}) == 1 and rng.random() < 0.5:
        batch = np.stack(seqs)
    ok, enc = attempt(ctx, "codec.encode_batch", codec.encode_batch, batch, **kw)
    singles = [codec.encode(s) for s in seqs]
    if not ok:
        too_long = padding == "max_length" and not trunc and max(len(c) for c in singles) > max_length
        check(too_long and isinstance(enc, ConfigError), "encode_batch raised on valid input", f"{type(enc).__name__}: {enc}")
    else:
        if padding == "no":
            rows = list(enc.codes)
        else:
            rows = [row[m.astype(bool)] for row, m in zip(enc.codes, enc.attention_mask)]
            check(bool(np.all(enc.codes[enc.attention_mask == 0] == codec.pad_id)), "padding is not pad_id")
            if padding == "max_length":
                check(enc.codes.shape[1] == max_length, "padding='max_length' width")
        for b, (ids, whole, row) in enumerate(zip(seqs, singles, rows)):
            used = int(enc.num_base_tokens[b])
            check(int(enc.lengths[b]) == len(row), "lengths disagree with codes")
            if trunc:
                check(len(row) <= max_length, "truncation kept too many codes")
                check(same(row, codec.encode(ids[:used])), "truncated codes != encode(ids[:num_base_tokens])",
                      lambda: f"batch[{b}] max_length={max_length} used={used}")
                check(used == len(ids) or len(whole) > max_length, "truncated a sequence that fit")
                check(same(codec.decode(row), ids[:used]), "truncated codes do not decode to the covered ids")
            else:
                check(used == len(ids), "num_base_tokens != len(ids) without truncation")
                check(same(row, whole), "encode_batch != encode", lambda: f"batch[{b}]")
            if kw["return_codebooks"]:
                check(entries_of(enc.codebooks[b]) == entries_of(codec.encode(ids[:used], return_codebook=True)[1]),
                      "encode_batch codebook != encode codebook")
        dec_kw = {"num_threads": threads}
        if padding != "no" and rng.random() < 0.7:
            dec = must(ctx, "codec.decode_batch", codec.decode_batch, enc.codes, attention_mask=enc.attention_mask, **dec_kw)
        else:
            dec = must(ctx, "codec.decode_batch", codec.decode_batch, rows, **dec_kw)
        for b, (ids, out) in enumerate(zip(seqs, dec)):
            check(same(out, ids[: int(enc.num_base_tokens[b])]), "decode_batch != ids", lambda: f"batch[{b}]")

    # training windows tile the document exactly
    ids = seqs[0]
    L = int(rng.integers(1, 40))
    wins = must(ctx, "codec.encode_windows", codec.encode_windows, ids, L, return_codebooks=bool(rng.random() < 0.3))
    pos = 0
    for k, w in enumerate(wins):
        check(w.start == pos and w.stop > w.start, "windows do not tile", lambda: f"window {k}: {w.start}..{w.stop}, expected start {pos}")
        check(len(w.codes) <= L and (len(w.codes) == L or k == len(wins) - 1), "window length")
        check(same(w.codes, codec.encode(ids[w.start:w.stop])), "window codes != encode(slice)", lambda: f"window {k}")
        pos = w.stop
    check(pos == len(ids), "windows do not cover the ids", f"{pos} != {len(ids)}")


def case_reference(ctx: Ctx) -> None:
    rng = ctx.rng
    codec = ctx.make_codec(random_codec_args(rng))
    V, C, M, dis = codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens, codec.disabled_ids
    ids = random_ids(rng, codec, 300)
    codes, book = must(ctx, "codec.encode", codec.encode, ids, return_codebook=True)
    r_codes, r_entries = reference_encode(ids.tolist(), V, C, M, dis)
    check(codes.tolist() == r_codes, "encode != reference_encode", lambda: f"ids={short(ids)}")
    check(entries_of(book) == r_entries, "encode codebook != reference_encode")

    streams = [model_stream(rng, codec) for _ in range(int(rng.integers(1, 5)))]
    for stream in streams:
        out, book = must(ctx, "codec.decode", codec.decode, stream, return_codebook=True)
        r_ids, r_entries = reference_decode(stream, V, C, M, dis)
        check(out.tolist() == r_ids, "decode != reference_decode", lambda: f"codes={short(stream)}")
        check(entries_of(book) == r_entries, "decode codebook != reference_decode", lambda: f"codes={short(stream)}")

        # online, in random pieces, must equal offline
        state, pos, got, installed = codec.decoder_state(), 0, [], []
        while pos < len(stream):
            k = int(rng.integers(1, 6)) if rng.random() < 0.5 else 1
            piece = stream[pos: pos + k]
            arg: Any = piece[0] if k == 1 and rng.random() < 0.5 else containers(rng, np.array(piece, np.int64))[1]
            res = must(ctx, "state.push", state.push, arg)
            got.extend(res.ids.tolist())
            installed.extend(res.installed)
            pos += len(piece)
        check(got == r_ids, "online push != offline decode", lambda: f"codes={short(stream)}")
        check(entries_of(state.codebook) == r_entries, "online codebook != offline")
        check([e.phrase for e in installed] == r_entries and [e.id for e in installed] == list(range(V, V + len(r_entries))),
              "push installed entries disagree with the codebook")

    # push_batch, one code per state per step, against offline decoding of each stream
    states = [codec.decoder_state() for _ in streams]
    steps = min(len(s) for s in streams)
    for t in range(steps):
        col = np.array([s[t] for s in streams], dtype=np.int64)
        must(ctx, "DecoderState.push_batch", DecoderState.push_batch, states, col)
    for st, s in zip(states, streams):
        ref = reference_decode(s[:steps], V, C, M, dis)[1]
        check(entries_of(st.codebook) == ref, "push_batch != offline decode")


def case_hostile_codes(ctx: Ctx) -> None:
    rng = ctx.rng
    codec = ctx.make_codec(random_codec_args(rng, want_pad=True))
    V, C = codec.base_vocab_size, codec.max_codebook_size
    src = rng.integers(0, 4)
    if src == 0:
        base = model_stream(rng, codec)
    elif src == 1:
        base = codec.encode(random_ids(rng, codec)).tolist()
    elif src == 2:
        base = expanded_stream(rng, codec)
    else:  # purely random codes around the id space
        n = int(rng.integers(0, 100))
        base = rng.integers(-3, V + C + 4, size=n).tolist() if V + C + 7 < INT64_MAX else []
    stream = corrupt(rng, codec, base) if rng.random() < 0.85 else base
    arr = np.array(stream, dtype=np.int64)
    data = containers(rng, arr)[1] if rng.random() < 0.3 else stream

    for mode in ("strict", "replace", "ignore"):
        expect = emulate(codec, stream, mode)
        ok, res = attempt(ctx, "codec.decode", codec.decode, data if mode == "strict" else stream, errors=mode,
                          return_codebook=True)
        if isinstance(expect, int):
            check(not ok and isinstance(res, InvalidCodeError) and not isinstance(res, CodeTypeError),
                  "strict decode accepted an invalid stream" if ok else "strict decode raised the wrong error",
                  lambda: f"first invalid at {expect}: codes={short(stream)}; got {'success' if ok else repr(res)}")
            check(str(res).startswith(f"codes[{expect}] = {stream[expect]} "), "strict error names the wrong position",
                  lambda: f"expected codes[{expect}]; message: {res}")
        else:
            if not ok:
                raise Failure(f"decode(errors={mode!r}) raised", f"{type(res).__name__}: {res}; codes={short(stream)}")
            out, book = res
            check(out.tolist() == expect[0], f"decode(errors={mode!r}) != oracle",
                  lambda: f"codes={short(stream)}\n    got      {short(out)}\n    expected {short(expect[0])}")
            check(entries_of(book) == expect[1], f"decode(errors={mode!r}) codebook != oracle", lambda: f"codes={short(stream)}")

    # batches: the same per sequence; strict names the first bad sequence
    others = [model_stream(rng, codec, 40) for _ in range(int(rng.integers(0, 4)))]
    batch = others + [stream]
    rng.shuffle(batch)
    for mode in ("strict", "replace", "ignore"):
        expects = [emulate(codec, s, mode) for s in batch]
        ok, res = attempt(ctx, "codec.decode_batch", codec.decode_batch, batch, errors=mode,
                          num_threads=int(rng.integers(1, 4)))
        bad = [b for b, e in enumerate(expects) if isinstance(e, int)]
        if bad:
            b = bad[0]
            check(not ok and isinstance(res, InvalidCodeError), "strict decode_batch accepted an invalid stream")
            check(str(res).startswith(f"batch[{b}][{expects[b]}] = "), "decode_batch error names the wrong position",
                  lambda: f"expected batch[{b}][{expects[b]}]; message: {res}")
        else:
            if not ok:
                raise Failure(f"decode_batch(errors={mode!r}) raised", f"{type(res).__name__}: {res}")
            for b, (out, e) in enumerate(zip(res, expects)):
                check(out.tolist() == e[0], f"decode_batch(errors={mode!r}) != oracle", lambda: f"batch[{b}]")

    # "replace" needs an id to write
    bare = LZWCodec(codec.base_vocab_size, C, codec.max_subtokens, disabled_ids=codec.disabled_ids)
    ok, res = attempt(ctx, "bare_codec.decode", bare.decode, stream, errors="replace")
    check(not ok and isinstance(res, ConfigError), "errors='replace' without pad_id or replacement_id did not raise ConfigError")
    ok, res = attempt(ctx, "bare_codec.decode", bare.decode, stream, errors="ignore")
    check(ok, "decode(errors='ignore') raised without a pad id", lambda: repr(res))

    # integers beyond int64 are invalid codes too: "replace" and "ignore" must not raise
    if rng.random() < 0.1:
        huge = [int(rng.choice([2**63, 2**64 - 1, 2**70, -(2**63) - 1]))]
        for data, what in ((stream + huge, "list with an integer beyond int64"),
                           (np.array([2**64 - 1] + [c for c in stream if 0 <= c <= INT64_MAX], dtype=np.uint64), "uint64 array above int64")):
            for mode in ("replace", "ignore"):
                ok, res = attempt(ctx, "codec.decode", codec.decode, data, errors=mode)
                check(ok, f"decode(errors={mode!r}) raised on a {what}", lambda: f"{type(res).__name__}: {res}")


def hostile_objects(rng: np.random.Generator, V: int) -> list[tuple[str, Any]]:
    ints = rng.integers(0, V, size=int(rng.integers(1, 6)))

    class IntLike:
        def __index__(self) -> int:
            return 1

    def bad_gen() -> Any:
        yield 1
        yield 0.5

    return [
        ("float64 array", ints.astype(np.float64)), ("float list", [float(x) for x in ints]),
        ("int and float list", ints.tolist() + [0.5]), ("float16 array", ints.astype(np.float16)),
        ("NaN list", [float("nan")]), ("inf array", np.array([np.inf])), ("complex array", ints.astype(complex)),
        ("bool array", ints % 2 == 0), ("bool list", [True, False]), ("numpy bool", np.bool_(True)),
        ("object array", ints.astype(object)), ("object array of None", np.array([None, None])),
        ("2-D array", ints.reshape(1, -1)), ("3-D array", np.zeros((2, 2, 2), np.int64)), ("0-d array", np.array(3)),
        ("numpy scalar", np.int64(3)), ("numpy float scalar", np.float64(3)), ("python float", 3.0),
        ("str", "1 2 3"), ("empty str", ""), ("bytes", b"\x01\x02"), ("None", None), ("dict", {0: 1}), ("set", {0, 1}),
        ("frozenset", frozenset({1})), ("list with None", [0, None]), ("ragged lists", [[0, 1], [2]]),
        ("nested lists", [[0, 1], [2, 3]]), ("str array", np.array(["1", "2"])), ("str list", ["1", "2"]),
        ("bytes list", [b"1"]), ("huge int list", [2**70]), ("huge negative list", [-(2**70)]),
        ("uint64 above int64", np.array([2**63], dtype=np.uint64)), ("empty list", []), ("empty tuple", ()),
        ("empty 2-D", np.zeros((0, 3), np.int64)), ("empty float", np.zeros(0, np.float64)),
        ("float memoryview", memoryview(np.array([1.0]))), ("array('d')", array.array("d", [1.0])),
        ("float generator", (x / 2 for x in range(3))), ("mixed generator", bad_gen()),
        ("datetime64", np.array(["2020-01-01"], dtype="datetime64[D]")), ("timedelta64", np.array([1, 2], dtype="timedelta64[s]")),
        ("structured", np.zeros(2, dtype=[("a", "i8")])), ("Fraction list", [Fraction(1, 2)]), ("Decimal list", [Decimal(1)]),
        ("__index__ objects", [IntLike()]), ("object()", object()), ("type", int), ("lambda", lambda: 1),
        ("Ellipsis", ...), ("range", range(min(V, 4))), ("masked array", np.ma.array(ints, mask=ints % 2 == 0)),
    ]


BAD_KW = {
    "errors": [None, "STRICT", "", 0, 1, b"strict", "replace ", ("strict",)],
    "padding": [None, "left", 1, 0, 2, "pad", ("longest",), 1.0],
    "padding_side": [None, "LEFT", 0, "", "center"],
    "truncation": [None, 1, 0, "yes", np.bool_(True)],
    "max_length": [0, -1, 1.5, True, "8", 2**70, -(2**70), np.float64(3)],
    "num_threads": [0, -1, 2**40, 1.5, "2", True, 10**9],
    "max_codes": [0, -5, 2**70, 1.0, None, "3", True, np.int64(-1)],
}


def case_bad_types(ctx: Ctx) -> None:
    rng = ctx.rng
    codec = ctx.make_codec(random_codec_args(rng, want_pad=True))
    V = codec.base_vocab_size
    objs = hostile_objects(rng, V)
    for _ in range(6):
        name, obj = objs[int(rng.integers(0, len(objs)))]
        target = int(rng.integers(0, 9))
        state = codec.decoder_state()
        if target == 0:
            attempt(ctx, f"codec.encode[{name}]", codec.encode, obj)
        elif target == 1:
            attempt(ctx, f"codec.decode[{name}]", codec.decode, obj, errors=str(rng.choice(["strict", "replace", "ignore"])))
        elif target == 2:
            batch = obj if rng.random() < 0.4 else [obj] if rng.random() < 0.5 else [[0], obj]
            attempt(ctx, f"codec.encode_batch[{name}]", codec.encode_batch, batch, padding=bool(rng.random() < 0.5))
        elif target == 3:
            batch = obj if rng.random() < 0.4 else [obj] if rng.random() < 0.5 else [[0], obj]
            attempt(ctx, f"codec.decode_batch[{name}]", codec.decode_batch, batch, errors="ignore")
        elif target == 4:
            good = np.zeros((2, 3), np.int64)
            attempt(ctx, f"codec.decode_batch[mask={name}]", codec.decode_batch, good, attention_mask=obj)
        elif target == 5:
            attempt(ctx, f"codec.encode_windows[{name}]", codec.encode_windows, obj, int(rng.integers(1, 5)))
        elif target == 6:
            state.push([0] if V > 0 else [])
            before = state.copy()
            ok, _ = attempt(ctx, f"state.push[{name}]", state.push, obj, errors=str(rng.choice(["strict", "replace", "ignore"])))
            if not ok:
                check(state == before, "a rejected push changed the state", name)
        elif target == 7:
            states = [state] if rng.random() < 0.7 else [state, codec.decoder_state()]
            before = [s.copy() for s in states]
            ok, _ = attempt(ctx, f"DecoderState.push_batch[{name}]", DecoderState.push_batch, states, obj)
            if not ok:
                check(all(s == b for s, b in zip(states, before)), "a rejected push_batch changed a state", name)
        else:  # a bad keyword value
            kw = str(rng.choice(list(BAD_KW)))
            value = BAD_KW[kw][int(rng.integers(0, len(BAD_KW[kw])))]
            ids = random_ids(rng, codec, 30)
            if kw == "errors":
                fn = [codec.decode, codec.decode_batch, state.push][int(rng.integers(0, 3))]
                arg: Any = [ids.tolist()] if fn is codec.decode_batch else ids.tolist()
                attempt(ctx, f"{fn.__qualname__}[errors={value!r}]", fn, arg, errors=value)
            elif kw == "max_codes":
                attempt(ctx, "codec.encode_windows", codec.encode_windows, ids, value)
            elif kw == "num_threads":
                fn = codec.encode_batch if rng.random() < 0.5 else codec.decode_batch
                attempt(ctx, f"{fn.__qualname__}[num_threads={value!r}]", fn, [ids.tolist()], num_threads=value)
            else:
                kwargs = {"padding": "longest", "truncation": False, "max_length": None, kw: value}
                if kw == "max_length":
                    kwargs["truncation"] = True
                attempt(ctx, f"codec.encode_batch[{kw}={value!r}]", codec.encode_batch, [ids.tolist()], **kwargs)


def case_bad_config(ctx: Ctx) -> None:
    rng = ctx.rng
    good = random_codec_args(rng)
    V = good["base_vocab_size"]
    bad: dict[str, list[Any]] = {
        "base_vocab_size": [0, -1, 2**31, 2**40, 1.0, "10", None, True, np.float64(10), [10], np.int64(V), np.uint8(min(V, 255))],
        "max_codebook_size": [-1, 2**31 - V, 2**31 - 1 - V, 2**40, 1.5, None, "1", False, np.int32(4)],
        "max_subtokens": [0, -1, 1, 65536, 65537, 2**40, 1.0, None, "4", True, np.int16(3)],
        "disabled_ids": [None, 5, "abc", b"ab", [V], [-1], [1.0], [True], [None], [2**70], np.array([0]), np.array([[0]]),
                         (i for i in [0]), {0: 1}, {0}, range(min(V, 3)), [np.int64(0)], np.array([0.0])],
        "pad_id": [-1, V, 1.0, True, "0", np.int32(0), np.uint64(0), 2**70, [0]],
        "replacement_id": [-1, V, 1.5, False, "1", np.int8(0), [0]],
    }
    args = dict(good)
    for _ in range(int(rng.integers(1, 3))):
        key = str(rng.choice(list(bad)))
        args[key] = bad[key][int(rng.integers(0, len(bad[key])))]
    ok, res = attempt(ctx, "LZWCodec", LZWCodec, args["base_vocab_size"], args["max_codebook_size"], args["max_subtokens"],
                      disabled_ids=args["disabled_ids"], pad_id=args["pad_id"], replacement_id=args["replacement_id"])
    if ok:  # accepted: it must behave like a codec
        codec = res
        check(codec.base_vocab_size >= 1 and codec.base_vocab_size + codec.max_codebook_size <= 2**31 - 1,
              "accepted an id space beyond 31 bits")
        ids = random_ids(rng, codec, 50)
        check(same(must(ctx, "codec.decode", codec.decode, must(ctx, "codec.encode", codec.encode, ids)), ids),
              "round trip of a codec built from odd arguments")
        check(pickle.loads(pickle.dumps(codec)) == codec, "pickle of a codec built from odd arguments")
    else:
        check(isinstance(res, (ConfigError, TypeError)), "bad configuration raised the wrong error", repr(res))


def state_view(state: DecoderState) -> tuple[Any, ...]:
    return (entries_of(state.codebook), tuple(state.pending), len(state), state.next_id, state.num_valid_codes)


def shadow_view(codec: LZWCodec, dec: ReferenceDecoder) -> tuple[Any, ...]:
    valid = codec.base_vocab_size + len(dec.entries) + int(dec.is_valid(dec.next_id))
    return (list(dec.entries), tuple(dec.pending), len(dec.entries), dec.next_id, valid)


def invalid_code(rng: np.random.Generator, codec: LZWCodec, dec: ReferenceDecoder) -> int:
    """A code that is not valid next for ``dec``."""
    choices = [-1, -int(rng.integers(2, 10**6)), INT64_MIN, INT64_MAX, codec.vocab_size, codec.vocab_size + 5,
               dec.next_id + 1, dec.next_id + int(rng.integers(2, 100))]
    if not dec.is_valid(dec.next_id):
        choices.append(dec.next_id)
    c = int(choices[int(rng.integers(0, len(choices)))])
    return c if not dec.is_valid(c) else -1


def valid_code(rng: np.random.Generator, codec: LZWCodec, dec: ReferenceDecoder) -> int:
    V = codec.base_vocab_size
    r = rng.random()
    if r < 0.2 and dec.is_valid(dec.next_id):
        return dec.next_id
    if r < 0.6 and dec.next_id > V:
        return int(rng.integers(V, dec.next_id))
    return int(rng.integers(0, min(V, 1 + rng.geometric(0.3))))


def case_state(ctx: Ctx) -> None:
    rng = ctx.rng
    codec = ctx.make_codec(random_codec_args(rng, want_pad=bool(rng.random() < 0.7)))
    V, C, M, dis = codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens, codec.disabled_ids
    state = codec.decoder_state()
    shadow = ReferenceDecoder(V, C, M, dis)

    def agree(what: str) -> None:
        check(state_view(state) == shadow_view(codec, shadow), f"state != oracle after {what}",
              lambda: f"state={state_view(state)}\n    oracle={shadow_view(codec, shadow)}")
        for c in (-1, 0, V - 1, V, shadow.next_id - 1, shadow.next_id, shadow.next_id + 1, codec.vocab_size):
            check(state.is_valid(c) == shadow.is_valid(c), "is_valid != oracle", f"code {c} after {what}")

    for _ in range(int(rng.integers(5, 60))):
        op = rng.random()
        if op < 0.35:  # valid codes, strict
            codes = []
            probe = copy.deepcopy(shadow)
            for _ in range(int(rng.integers(1, 4))):
                c = valid_code(rng, codec, probe)
                probe.push(c)
                codes.append(c)
            res = must(ctx, "state.push", state.push, codes if len(codes) > 1 else codes[0])
            n0 = len(shadow.entries)
            expect = [x for c in codes for x in shadow.push(c)]
            check(res.ids.tolist() == expect, "push ids != oracle", lambda: f"codes {codes}")
            check([e.phrase for e in res.installed] == shadow.entries[n0:], "push installed != oracle")
            agree(f"push({codes})")
        elif op < 0.55:  # a chunk with an invalid code, strict: all-or-nothing
            bad = invalid_code(rng, codec, shadow)
            probe = copy.deepcopy(shadow)
            codes = []
            for _ in range(int(rng.integers(0, 4))):
                c = valid_code(rng, codec, probe)
                probe.push(c)
                codes.append(c)
            codes.insert(len(codes) if rng.random() < 0.5 else int(rng.integers(0, len(codes) + 1)), bad)
            expect = emulate_from(shadow, codes, "strict", codec)
            before, snap = state_view(state), state.copy()
            book_before, pend_before = state.codebook, state.pending
            ok, res = attempt(ctx, "state.push", state.push, codes)
            if isinstance(expect, int):
                check(not ok and isinstance(res, InvalidCodeError), "invalid push did not raise InvalidCodeError",
                      lambda: f"codes {codes}, first invalid at {expect}")
                check(state.codebook == book_before and state.pending == pend_before and state_view(state) == before,
                      "a failed push changed the state", lambda: f"codes {codes}")
                check(state == snap, "a failed push: state != copy taken before")
            else:  # the "bad" code became valid after the codes before it
                check(ok, "push of a valid chunk raised", lambda: repr(res))
                for c in codes:
                    shadow.push(c)
            agree(f"push({codes}) strict")
        elif op < 0.7:  # replace / ignore never raise
            mode = "ignore" if codec.replacement_id is None or rng.random() < 0.5 else "replace"
            codes = []
            probe = copy.deepcopy(shadow)
            for _ in range(int(rng.integers(1, 5))):
                c = invalid_code(rng, codec, probe) if rng.random() < 0.4 else valid_code(rng, codec, probe)
                if probe.is_valid(c):
                    probe.push(c)
                else:
                    probe.pending = ()
                codes.append(c)
            arg: Any = codes if len(codes) > 1 or rng.random() < 0.5 else codes[0]
            ok, res = attempt(ctx, "state.push", state.push, arg, errors=mode)
            check(ok, f"push(errors={mode!r}) raised", lambda: f"{res!r} on codes {codes}")
            expect = emulate_from(shadow, codes, mode, codec, apply=True)
            check(res.ids.tolist() == expect, f"push(errors={mode!r}) != oracle", lambda: f"codes {codes}")
            agree(f"push({codes}, errors={mode!r})")
        elif op < 0.75:  # copies are independent
            snap = state.copy()
            other = copy.copy(state) if rng.random() < 0.5 else copy.deepcopy(state)
            c = valid_code(rng, codec, shadow)
            must(ctx, "copy.push", other.push, c)
            check(state == snap, "pushing into a copy changed the original")
        elif op < 0.78:
            state.reset()
            shadow = ReferenceDecoder(V, C, M, dis)
            agree("reset()")
        elif op < 0.82:
            state = pickle.loads(pickle.dumps(state, protocol=int(rng.integers(0, pickle.HIGHEST_PROTOCOL + 1))))
            agree("pickle round trip")
        elif op < 0.95:  # push_batch over states at different positions
            extra = [state.copy() for _ in range(int(rng.integers(0, 3)))] + [codec.decoder_state() for _ in range(int(rng.integers(0, 3)))]
            states = [state] + extra
            order = rng.permutation(len(states))
            states = [states[i] for i in order]
            shadows = [rebuild_shadow(codec, s) for s in states]
            codes = [valid_code(rng, codec, d) for d in shadows]
            broken = rng.random() < 0.3
            if broken:
                b = int(rng.integers(0, len(states)))
                codes[b] = invalid_code(rng, codec, shadows[b])
            before = [s.copy() for s in states]
            ok, res = attempt(ctx, "DecoderState.push_batch", DecoderState.push_batch, states, np.array(codes, dtype=np.int64))
            first_bad = next((i for i, (d, c) in enumerate(zip(shadows, codes)) if not d.is_valid(c)), None)
            if first_bad is not None:
                check(not ok and isinstance(res, InvalidCodeError), "push_batch accepted an invalid code")
                check(f"states[{first_bad}]" in str(res), "push_batch error names the wrong state", str(res))
                check(all(s == b for s, b in zip(states, before)), "a failed push_batch changed a state")
            else:
                check(ok, "push_batch raised on valid codes", lambda: repr(res))
                new = []
                for b, (d, c) in enumerate(zip(shadows, codes)):
                    n0 = len(d.entries)
                    d.push(c)
                    new += [(b, V + n0 + k, p) for k, p in enumerate(d.entries[n0:])]
                check(list(res) == new, "push_batch installed != oracle")
                for s, d in zip(states, shadows):
                    check(state_view(s) == shadow_view(codec, d), "push_batch state != oracle")
                shadow = shadows[[i for i, s in enumerate(states) if s is state][0]]
            agree("push_batch")
        else:  # the same state several times in one push_batch
            k = int(rng.integers(2, 4))
            codes, probe = [], copy.deepcopy(shadow)
            for _ in range(k):  # each code valid for the state as it is before the step
                codes.append(valid_code(rng, codec, shadow) if rng.random() < 0.8 else int(rng.choice(sorted(dis))) if dis else 0)
            snap = state.copy()
            ok, res = attempt(ctx, "DecoderState.push_batch", DecoderState.push_batch, [state] * k, np.array(codes, np.int64))
            seq = emulate_from(probe, codes, "strict", codec)
            if not ok:
                check(state == snap, "a failed push_batch (same state twice) changed the state")
            else:
                check(not isinstance(seq, int),
                      "push_batch with the same state twice accepted codes that are invalid one after the other",
                      lambda: f"codes {codes}: code {codes[seq]} is invalid after {codes[:seq]}; "
                              f"state after: {state!r} {state.codebook.to_dict()}")
                for c in codes:
                    shadow.push(c)
                check(state_view(state) == shadow_view(codec, shadow),
                      "push_batch with the same state twice != pushing the codes one after the other",
                      lambda: f"codes {codes}")
            if not ok or isinstance(seq, int):
                state, shadow = snap, rebuild_shadow(codec, snap)
            agree("push_batch with one state repeated")


def rebuild_shadow(codec: LZWCodec, state: DecoderState) -> ReferenceDecoder:
    """An oracle decoder holding ``state``'s entries and pending phrase."""
    d = ReferenceDecoder(codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens, codec.disabled_ids)
    for p in entries_of(state.codebook):
        d._install(p)
    d.pending = tuple(state.pending)
    return d


def emulate_from(dec: ReferenceDecoder, codes: list[int], mode: str, codec: LZWCodec,
                 apply: bool = False) -> list[int] | int:
    """Decode ``codes`` from ``dec``'s state (a copy unless ``apply``): ids, or the first invalid position (strict)."""
    d = dec if apply else copy.deepcopy(dec)
    out: list[int] = []
    for pos, c in enumerate(codes):
        if d.is_valid(c):
            out.extend(d.push(c))
        elif mode == "strict":
            return pos
        else:
            d.pending = ()
            if mode == "replace":
                out.append(codec.replacement_id)
    return out


def case_pickle(ctx: Ctx) -> None:
    rng = ctx.rng
    args = random_codec_args(rng)
    codec = ctx.make_codec(args)
    proto = int(rng.integers(0, pickle.HIGHEST_PROTOCOL + 1))
    twin = pickle.loads(pickle.dumps(codec, protocol=proto))
    check(twin == codec and hash(twin) == hash(codec) and repr(twin) == repr(codec), "codec pickle round trip")
    check(twin.disabled_ids == codec.disabled_ids and twin.pad_id == codec.pad_id
          and twin.replacement_id == codec.replacement_id, "codec pickle lost a setting")
    check(copy.copy(codec) == codec and copy.deepcopy(codec) == codec, "codec copy")
    ids = random_ids(rng, codec, 200)
    codes, book = codec.encode(ids, return_codebook=True)
    check(same(twin.encode(ids), codes), "unpickled codec encodes differently")
    book2 = pickle.loads(pickle.dumps(book, protocol=proto))
    check(book2 == book and entries_of(book2) == entries_of(book), "Codebook pickle round trip")

    stream = model_stream(rng, codec) if rng.random() < 0.6 else codes.tolist()
    cut = int(rng.integers(0, len(stream) + 1))
    state = codec.decoder_state()
    state.push(stream[:cut])
    clones = [pickle.loads(pickle.dumps(state, protocol=proto)), copy.copy(state), copy.deepcopy(state), state.copy()]
    for k, clone in enumerate(clones):
        check(clone == state and state_view(clone) == state_view(state), "DecoderState clone != original", f"clone {k}")
    rest = stream[cut:]
    outs = [must(ctx, "state.push", s.push, rest).ids.tolist() for s in [state] + clones]
    check(all(o == outs[0] for o in outs), "clones decode the rest differently")
    check(all(s == state for s in clones), "clones end in a different state")
    full, full_book = codec.decode(stream, return_codebook=True)
    check(entries_of(state.codebook) == entries_of(full_book), "state after pickle != offline decode")


def case_misuse(ctx: Ctx) -> None:
    rng = ctx.rng
    codec = ctx.make_codec(random_codec_args(rng, want_pad=True))
    state = codec.decoder_state()
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("DecoderState.push_batch(states=[1])", lambda: DecoderState.push_batch([1], [0])),
        ("DecoderState.push_batch(states=[None])", lambda: DecoderState.push_batch([None], [0])),
        ("DecoderState.push_batch(states=None)", lambda: DecoderState.push_batch(None, [0])),
        ("DecoderState.push_batch(states=generator)", lambda: DecoderState.push_batch((s for s in [state]), [0])),
        ("DecoderState.push_batch(states=[codec])", lambda: DecoderState.push_batch([codec], [0])),
        ("DecoderState.push_batch(codes of the wrong length)", lambda: DecoderState.push_batch([state], [0, 0])),
        ("DecoderState.push_batch(states=state)", lambda: DecoderState.push_batch(state, [0])),
        ("DecoderState(None)", lambda: DecoderState(None)),
        ("DecoderState('codec')", lambda: DecoderState("codec")),
        ("state.is_valid('x')", lambda: state.is_valid("x")),
        ("state.is_valid(None)", lambda: state.is_valid(None)),
        ("state.is_valid([1])", lambda: state.is_valid([1])),
        ("codec.decode(errors=[])", lambda: codec.decode([0], errors=[])),
        ("state.push(errors={})", lambda: state.push(0, errors={})),
        ("codec.decode_batch(ragged, attention_mask=ragged)", lambda: codec.decode_batch([[0, 0], [0]], attention_mask=[[1, 1], [1]])),
        ("codec.decode_batch(attention_mask of another shape)", lambda: codec.decode_batch(np.zeros((2, 3), np.int64), attention_mask=np.ones((3, 2)))),
        ("codec.encode_batch(padding={})", lambda: codec.encode_batch([[0]], padding={})),
        ("codec.encode_batch(padding_side=[])", lambda: codec.encode_batch([[0]], padding_side=[])),
        ("codec.encode(return_codebook=None)", lambda: codec.encode([0], return_codebook=None)),
    ]
    for _ in range(3):
        label, fn = calls[int(rng.integers(0, len(calls)))]
        before = state.copy()
        attempt(ctx, label, fn)
        check(state == before, "a rejected call changed the state", label)


CATEGORIES: dict[str, tuple[Callable[[Ctx], None], float]] = {
    "roundtrip": (case_roundtrip, 3.0),
    "reference": (case_reference, 2.0),
    "hostile_codes": (case_hostile_codes, 3.0),
    "bad_types": (case_bad_types, 2.0),
    "bad_config": (case_bad_config, 1.0),
    "state": (case_state, 3.0),
    "pickle": (case_pickle, 1.0),
    "misuse": (case_misuse, 0.5),
}


# =========================================================================== running cases


def run_case(category: str, seed: int, verbose: bool = False) -> dict[str, Any] | None:
    """Run one case; ``None`` when it passes, else a failure record."""
    ctx = Ctx(category, seed, np.random.default_rng(seed), verbose)
    try:
        CATEGORIES[category][0](ctx)
        return None
    except Failure as f:
        check_name, detail = f.check, f.detail
        tb = traceback.format_exc() if verbose else ""
    except Exception as e:  # noqa: BLE001 - a bug in the checks or an escape from attempt()
        check_name, detail = f"unexpected {type(e).__name__} in the case", str(e)[:300]
        tb = traceback.format_exc()
    return {"category": category, "check": check_name, "detail": detail, "seed": seed,
            "setup": list(ctx.setup), "call": ctx.last_call(), "traceback": tb,
            "replay": f"python benchmarks/codec_fuzz.py --replay {category}:{seed}"}


def worker(args: argparse.Namespace) -> int:
    """Run cases until the deadline; write counts and failures as JSON to ``--_result``."""
    deadline = time.monotonic() + args.seconds
    master = np.random.default_rng(args.seed)
    names = list(CATEGORIES)
    weights = np.array([CATEGORIES[n][1] for n in names])
    weights /= weights.sum()
    counts = dict.fromkeys(names, 0)
    fails = dict.fromkeys(names, 0)
    failures: dict[str, dict[str, Any]] = {}
    status = os.open(args._status, os.O_WRONLY | os.O_CREAT, 0o644) if args._status else None
    result = Path(args._result)
    flushed = time.monotonic()

    def flush() -> None:  # so that a crash loses at most a second or two of counts
        tmp = result.with_name(result.name + ".tmp")
        tmp.write_text(json.dumps({"counts": counts, "fails": fails, "failures": list(failures.values())}))
        tmp.replace(result)

    while time.monotonic() < deadline:
        cat = names[int(master.choice(len(names), p=weights))]
        seed = int(master.integers(0, 2**63 - 1))
        if status is not None:
            os.pwrite(status, f"{cat}:{seed}".ljust(64).encode(), 0)
        rec = run_case(cat, seed)
        counts[cat] += 1
        if rec is not None:
            fails[cat] += 1
            key = f"{rec['category']}|{rec['check']}"
            if key in failures:
                failures[key]["count"] += 1
            elif len(failures) < MAX_STORED_FAILURES:
                failures[key] = rec | {"count": 1}
        if time.monotonic() - flushed > 1.0:
            flush()
            flushed = time.monotonic()
    flush()
    if status is not None:
        os.pwrite(status, b"done".ljust(64), 0)
        os.close(status)
    return 0


def supervise(args: argparse.Namespace) -> int:
    """Run workers for ``--seconds``; a crash or hang is recorded with its case and the worker restarted."""
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"codec_fuzz: {args.seconds:g} s, seed {seed}, case timeout {args.case_timeout:g} s")
    t_start = time.monotonic()
    end = t_start + args.seconds
    counts: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    fails: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    failures: dict[str, dict[str, Any]] = {}
    run_no = 0
    with tempfile.TemporaryDirectory(prefix="codec_fuzz_") as tmp:
        while True:
            left = end - time.monotonic()
            if left <= 0.5 and run_no > 0:
                break
            status, result = Path(tmp) / f"status{run_no}", Path(tmp) / f"result{run_no}.json"
            status.write_bytes(b"starting".ljust(64))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--seconds", f"{max(left, 0.1):.3f}",
                   "--seed", str(seed + run_no), "--_status", str(status), "--_result", str(result)]
            proc = subprocess.Popen(cmd)
            last, since, hung = b"", time.monotonic(), None
            while proc.poll() is None:
                time.sleep(0.2)
                now_status = status.read_bytes()
                if now_status != last:
                    last, since = now_status, time.monotonic()
                elif time.monotonic() - since > args.case_timeout and now_status.strip() != b"done":
                    hung = now_status.decode().strip()
                    proc.send_signal(signal.SIGABRT)  # faulthandler in the worker prints where it is
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    break
            case = status.read_bytes().decode().strip()
            finished = hung is None and proc.returncode == 0 and case == "done"
            if not finished:
                what = f"hang (> {args.case_timeout:g} s in one case)" if hung else f"crash (worker exit status {proc.returncode})"
                cat = (hung or case).partition(":")[0]
                cat = cat if cat in CATEGORIES else "roundtrip"
                counts[cat] += 1
                fails[cat] += 1
                key = f"{cat}|{what}"
                failures.setdefault(key, {"category": cat, "check": what, "detail": f"during case {hung or case}",
                                          "setup": [], "call": "", "traceback": "", "count": 0,
                                          "replay": f"python benchmarks/codec_fuzz.py --replay {hung or case}"})
                failures[key]["count"] += 1
            if result.exists():
                res = json.loads(result.read_text())
                for n in CATEGORIES:
                    counts[n] += res["counts"].get(n, 0)
                    fails[n] += res["fails"].get(n, 0)
                for rec in res["failures"]:
                    key = f"{rec['category']}|{rec['check']}"
                    if key in failures:
                        failures[key]["count"] += rec["count"]
                    else:
                        failures[key] = rec
            run_no += 1
            if finished or time.monotonic() >= end:
                break
    elapsed = time.monotonic() - t_start
    return summarize(counts, fails, failures, elapsed, seed, run_no)


def summarize(counts: dict[str, int], fails: dict[str, int], failures: dict[str, dict[str, Any]], elapsed: float,
              seed: int, runs: int) -> int:
    total = sum(counts.values())
    print(f"\n{total:,} cases in {elapsed:.1f} s (seed {seed}, {runs} worker run{'s' if runs != 1 else ''})\n")
    print("| category | cases | failed |\n|---|---:|---:|")
    for n in CATEGORIES:
        print(f"| {n} | {counts[n]:,} | {fails[n]:,} |")
    if not failures:
        print("\nno failures")
        return 0
    print(f"\n{len(failures)} distinct failure{'s' if len(failures) != 1 else ''}:")
    for rec in sorted(failures.values(), key=lambda r: (r["category"], r["check"])):
        print(f"\n[{rec['category']}] {rec['check']}  (x{rec['count']})")
        if rec.get("detail"):
            print(f"    {rec['detail']}")
        for line in rec.get("setup", [])[-1:]:
            print(f"    {line}")
        if rec.get("call"):
            print(f"    last call: {rec['call']}")
        print(f"    reproduce: {rec['replay']}")
    return 1


def replay(spec: str) -> int:
    category, _, seed = spec.partition(":")
    if category not in CATEGORIES or not seed.lstrip("-").isdigit():
        raise SystemExit(f"--replay wants CATEGORY:SEED with CATEGORY one of {', '.join(CATEGORIES)}")
    print(f"replaying {category}:{seed}")
    rec = run_case(category, int(seed), verbose=True)
    if rec is None:
        print("passed")
        return 0
    print(f"\nFAILED: {rec['check']}\n    {rec['detail']}")
    for line in rec["setup"]:
        print(f"    {line}")
    print(f"    last call: {rec['call']}")
    if rec["traceback"]:
        print(rec["traceback"])
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument("--seed", type=int, default=None, help="master seed (default: random, printed)")
    p.add_argument("--case-timeout", type=float, default=60.0,
                   help="seconds one case may run before it counts as a hang (default 60)")
    p.add_argument("--replay", metavar="CATEGORY:SEED", help="run one case from a failure report, verbosely")
    p.add_argument("--_status", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    if args._result:
        import faulthandler

        faulthandler.enable()  # a crash or SIGABRT from the supervisor prints the worker's stack
        return worker(args)
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
