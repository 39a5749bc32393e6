"""Text as soon as it is final: incremental detokenizing of base tokens, and a streamer that colours hypertokens.

No torch here: ids may be lists, NumPy arrays or tensors (anything with ``reshape``/``tolist``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import TokenTypeError

__all__ = ["HyperTextStreamer", "IncrementalDetokenizer", "OutputText"]


class IncrementalDetokenizer:
    """Text from a growing list of base tokens, emitted as soon as it is final.

    A hypertoken gives several tokens at once, and byte-level tokens may need the next token to form a
    character: :meth:`push` returns only the text that no later token can change.

    >>> detok = IncrementalDetokenizer(tokenizer)       # doctest: +SKIP
    >>> detok.push([40, 1044]) + detok.push([1107]) + detok.flush()  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # decode from here: a few tokens of context, so word-initial spaces come out right
        self._done = 0  # tokens whose text was emitted
        self._emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: Sequence[int] | Any) -> str:
        """Add base tokens; returns the new final text (possibly empty)."""
        ids = ids.reshape(-1).tolist() if hasattr(ids, "reshape") else list(ids)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad = next(i for i in ids if not (isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0))
            raise TokenTypeError(f"ids must be base token ids (ints >= 0), got {bad!r}")
        self.ids.extend(int(i) for i in ids)
        prefix = self._decode(self.ids[self._start: self._done])
        text = self._decode(self.ids[self._start:])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""  # a character is still incomplete
        new = text[len(prefix):]
        self._start, self._done = self._done, len(self.ids)
        self._emitted += new
        return new

    def flush(self) -> str:
        """Whatever is left, final or not (the stream has ended)."""
        prefix = self._decode(self.ids[self._start: self._done])
        text = self._decode(self.ids[self._start:])
        self._start = self._done = len(self.ids)
        new = text[len(prefix):]
        self._emitted += new
        return new

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._emitted


class OutputText:
    """A sequence's new text as its codes are written: final text only, cut at the first stop string.

    tokenizer: the base Hugging Face tokenizer; stop_strings: the text ends just before the first of them
    to appear, and :attr:`stopped` turns true; emit: called with each piece of final text and whether a
    hypertoken wrote it, held back while it could still be the start of a stop string (``None``: only
    keep :attr:`text`); skip_special_tokens: as in ``decode``.

    >>> out = OutputText(tokenizer, ["\n\n"])         # doctest: +SKIP
    >>> out.push([40, 1044], hyper=True); out.stopped  # doctest: +SKIP
    False
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), *,
                 emit: Callable[[str, bool], None] | None = None, skip_special_tokens: bool = False) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop_strings, self.emit = list(stop_strings), emit
        self.pending: list[tuple[str, bool]] = []  # final text held back: it may still become a stop string
        self.text = ""  # the text released so far (all of it, once ended)
        self.stopped = False
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def push(self, ids: Sequence[int], *, hyper: bool) -> None:
        """The base ids of one code just written (``hyper``: the code is a hypertoken)."""
        self._add(self.detok.push(ids), hyper)

    def end(self) -> None:
        """The sequence has ended: release what is held back (up to a stop string)."""
        self._add(self.detok.flush(), False)
        self._release(final=True)

    def _add(self, text: str, hyper: bool) -> None:
        if text and not self.stopped:
            self.pending.append((text, hyper))
            self._release(final=False)

    def _release(self, *, final: bool) -> None:
        if self.stopped:
            return
        held = "".join(t for t, _ in self.pending)
        whole = self.text + held
        # a stop string may start in text already released (it was held back only as long as it could be one)
        cut = min((i for i in (whole.find(s, max(0, len(self.text) - len(s))) for s in self.stop_strings) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self._send(cut - len(self.text))
            return
        self._send(len(held) if final else max(0, len(held) - self.hold))

    def _send(self, n: int) -> None:
        """Release the first ``n`` held-back characters, keeping each piece's hypertoken flag."""
        while n > 0 and self.pending:
            text, hyper = self.pending[0]
            part = text[:n]
            if len(part) == len(text):
                self.pending.pop(0)
            else:
                self.pending[0] = (text[len(part):], hyper)
            n -= len(part)
            self.text += part
            if self.emit is not None:
                self.emit(part, hyper)


class HyperTextStreamer:
    """A streamer for :meth:`HyperModel.generate` that prints text as soon as it is final.

    Like ``transformers.TextStreamer``, with one addition: the text a hypertoken wrote (a code that
    stands for several base tokens) can be coloured, so you see the adaptive vocabulary at work.

    Args:
        tokenizer: the base Hugging Face tokenizer.
        file: where to write (default ``sys.stdout``); ``None`` only collects into :attr:`text`.
        color: wrap hypertoken text in ANSI colours.
        skip_prompt: do not print the prompt (the first ``put``).
    """

    def __init__(self, tokenizer: Any, *, file: Any = "stdout", color: bool = True, skip_prompt: bool = True,
                 skip_special_tokens: bool = True) -> None:
        self.file = sys.stdout if file == "stdout" else file
        self.color, self.skip_prompt = color, skip_prompt
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._prompt_seen = False
        self.pieces: list[tuple[str, bool]] = []  # (text, written by a hypertoken)

    def put(self, value: Sequence[int] | Any) -> None:
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self._write(self.detok.push(ids), len(ids) > 1)  # push checks the ids

    def end(self) -> None:
        self._write(self.detok.flush(), False)
        if self.file is not None:
            self.file.write("\n")
            self.file.flush()

    def _write(self, text: str, hyper: bool) -> None:
        if not text:
            return
        self.pieces.append((text, hyper))
        if self.file is not None:
            self.file.write(f"\x1b[36m{text}\x1b[0m" if hyper and self.color else text)
            self.file.flush()

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)
