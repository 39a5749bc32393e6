"""A short pure-Python implementation of the LZW codec rules (the test oracle).

It follows ``docs/design.md`` sections 2-3 literally and favours clarity over speed: the compiled
core in ``hypervocab._lzw`` must agree with it on every input.  Phrases are tuples
of base ids; ``disabled`` must already contain the pad id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["reference_encode", "reference_decode", "ReferenceDecoder"]


def reference_encode(
    ids: Iterable[int], vocab_size: int, max_codebook_size: int, max_subtokens: int, disabled: frozenset[int]
) -> tuple[list[int], list[tuple[int, ...]]]:
    """Compress ``ids``; returns the codes and the codebook phrases in creation order."""
    V, C, M = vocab_size, max_codebook_size, max_subtokens
    table: dict[tuple[int, ...], int] = {}
    entries: list[tuple[int, ...]] = []
    out: list[int] = []
    buf: tuple[int, ...] = ()

    def code(phrase: tuple[int, ...]) -> int:
        return phrase[0] if len(phrase) == 1 else table[phrase]

    for t in ids:
        if t in disabled:
            if buf:
                out.append(code(buf))
            out.append(t)
            buf = ()
            continue
        if not 0 <= t < V:
            raise ValueError(f"id {t} outside [0, {V})")
        grown = buf + (t,)
        if len(grown) > 1 and grown not in table:
            if len(entries) < C:
                table[grown] = V + len(entries)
                entries.append(grown)
            out.append(code(buf))
            grown = (t,)
        buf = grown
        if len(buf) == M:
            out.append(code(buf))
            buf = ()
    if buf:
        out.append(code(buf))
    return out, entries


class ReferenceDecoder:
    """Online decoder state: feed codes one at a time with :meth:`push`."""

    def __init__(self, vocab_size: int, max_codebook_size: int, max_subtokens: int, disabled: frozenset[int]):
        self.V, self.C, self.M, self.disabled = vocab_size, max_codebook_size, max_subtokens, disabled
        self.entries: list[tuple[int, ...]] = []
        self.table: dict[tuple[int, ...], int] = {}
        self.pending: tuple[int, ...] = ()

    @property
    def next_id(self) -> int:
        return self.V + len(self.entries)

    def _known(self, phrase: tuple[int, ...]) -> bool:
        return phrase in self.table if len(phrase) > 1 else phrase[0] < self.V

    def _install(self, phrase: tuple[int, ...]) -> None:
        self.table[phrase] = self.next_id
        self.entries.append(phrase)

    def is_valid(self, c: int) -> bool:
        """Whether ``c`` may come next (the rule used to reject invalid codes)."""
        if c in self.disabled or 0 <= c < self.V:
            return True
        if self.V <= c < self.next_id:
            return True
        return (c == self.next_id and len(self.entries) < self.C
                and 0 < len(self.pending) < self.M)

    def push(self, c: int) -> tuple[int, ...]:
        """Decode one code; returns its base ids.  Raises ``ValueError`` on an invalid code."""
        if not self.is_valid(c):
            raise ValueError(f"invalid code {c}")
        if c in self.disabled:
            self.pending = ()
            return (c,)
        if c < self.next_id:
            expansion = (c,) if c < self.V else self.entries[c - self.V]
        else:  # the "KwKwK" case: the entry being defined by this very code
            expansion = self.pending + self.pending[:1]
            self._install(expansion)
            self.pending = expansion
            return expansion
        P, M = self.pending, self.M
        if len(self.entries) >= self.C:
            self.pending = ()
        elif not P or len(P) == M:
            self.pending = expansion
        else:
            for j, s in enumerate(expansion):
                grown = P + (s,)
                if not self._known(grown):
                    self._install(grown)
                    P = expansion[j:]
                    break
                P = grown
                if len(P) == M:
                    P = expansion[j + 1:]
                    break
            self.pending = P
        return expansion


def reference_decode(
    codes: Sequence[int], vocab_size: int, max_codebook_size: int, max_subtokens: int, disabled: frozenset[int]
) -> tuple[list[int], list[tuple[int, ...]]]:
    """Decompress ``codes`` (strict); returns the base ids and the codebook phrases."""
    dec = ReferenceDecoder(vocab_size, max_codebook_size, max_subtokens, disabled)
    out: list[int] = []
    for c in codes:
        out.extend(dec.push(c))
    return out, dec.entries
